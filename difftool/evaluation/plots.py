"""The FID-vs-NFE figure: what a sweep saves as fid_vs_nfe.png and `difftool report` shows of each sweep.

Drawn on a bare matplotlib `Figure` (the Agg canvas, no pyplot): no display is needed, none is there on a
cluster node, and no global state is left behind for the caller.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def fd_vs_nfe_figure(rows: list[dict], distance_name: str = "FID") -> Figure:
    """One line per scheduler (and guidance scale, where the sweep had several): distance against model calls, on
    a log axis ticked at the NFEs measured.

    `rows` are a sweep's (results.json): scheduler, nfe and fd each, and guidance where it was swept.
    """
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    axes = figure.subplots()
    for label in dict.fromkeys(map(line_label, rows)):
        points = sorted((row["nfe"], row["fd"]) for row in rows if line_label(row) == label)
        axes.plot(*zip(*points, strict=True), marker="o", label=label)
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


def line_label(row: dict) -> str:
    """A sweep row's line: its scheduler, and its guidance scale where one was swept."""
    guidance = row.get("guidance")
    return row["scheduler"] if guidance is None else f"{row['scheduler']}, guidance {guidance:g}"
