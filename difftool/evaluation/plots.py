"""The FID-vs-NFE figure: what a sweep saves as fid_vs_nfe.png and `difftool report` shows of each sweep.

Drawn on a bare matplotlib `Figure` (the Agg canvas, no pyplot): no display is needed, none is there on a
cluster node, and no global state is left behind for the caller.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def fd_vs_nfe_figure(rows: list[dict], distance_name: str = "FID") -> Figure:
    """One line per scheduler: distance against model calls, on a log axis ticked at the NFEs measured.

    `rows` are a sweep's (results.json): scheduler, nfe and fd each.
    """
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    axes = figure.subplots()
    for scheduler in dict.fromkeys(row["scheduler"] for row in rows):
        points = sorted((row["nfe"], row["fd"]) for row in rows if row["scheduler"] == scheduler)
        axes.plot(*zip(*points, strict=True), marker="o", label=scheduler)
    axes.set_xscale("log")
    nfes = sorted({row["nfe"] for row in rows})
    axes.set_xticks(nfes, [str(n) for n in nfes])
    axes.minorticks_off()
    axes.set_xlabel("model calls per image (NFE)")
    axes.set_ylabel(f"{distance_name} (lower is better)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
