"""The report's charts, drawn with matplotlib and embedded as PNG data URIs.

Bare `Figure`s on the Agg canvas (no pyplot): no display is needed and no global state is left behind. PNG
rather than SVG keeps every image of the page one kind, which a test decodes one by one.

Text drawn from the run's files (a distance's name, a sweep's schedulers) goes through `literal`: matplotlib
reads "$...$" as math text, and a metrics key such as `eval/$\\foo$` would otherwise fail the whole page.
"""

from __future__ import annotations

import base64
import io

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from difftool.reporting.history import SMOOTH_SPAN, EvalHistory, Series, smooth

SIZE = (4.8, 3.0)  # inches, at DPI: 576 x 360 pixels, shown three in a row
DPI = 120
COLOUR = "tab:blue"
BEST = "tab:red"
LOG_RANGE = 30  # a positive curve spanning more than this factor gets a log axis (losses that fall fast)
LABEL_CHARS = 60  # text from the run's files is cut to this on a chart (the tables show it whole)


def literal(text) -> str:
    """`text` as matplotlib shows it literally: every `$` escaped (no math text), cut to LABEL_CHARS, and
    bytes of undecodable names as escapes."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"
    return text.replace("$", r"\$")


def data_uri(figure: Figure) -> str:
    """The figure as `data:image/png;base64,...`, for an <img> that needs no file beside the page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curve_figure(series: Series, *, title: str, label: str, smoothed: bool, resumed_at: list[int],
                 log_scale: bool = False) -> Figure:
    """`series` over steps: with `smoothed`, raw values pale and an EMA over them; dashed lines where a
    resumed session began. With `log_scale`, a positive curve spanning a wide range gets a log axis."""
    figure = Figure(figsize=SIZE, dpi=DPI)
    axes = figure.subplots()
    few = len(series) <= SMOOTH_SPAN
    if smoothed and not few:
        axes.plot(series.steps, series.values, color=COLOUR, alpha=0.3, linewidth=1, label="raw",
                  marker="." if few else None)
        axes.plot(series.steps, smooth(series.values), color=COLOUR, linewidth=2, label="smoothed (EMA)")
    else:
        axes.plot(series.steps, series.values, color=COLOUR, linewidth=1.5, marker="o" if few else None)
    positive = [v for v in series.values if v > 0]
    if log_scale and len(positive) == len(series) and max(positive) > LOG_RANGE * min(positive):
        axes.set_yscale("log")
    for step in resumed_at:
        axes.axvline(step, color="grey", linestyle="--", linewidth=1, label=f"resumed at {step:,}")
    _finish(axes, title, label)
    return figure


def eval_figure(evals: EvalHistory) -> Figure:
    """The distance (best step starred) and KID (± its std over subsets, where recorded) over steps."""
    figure = Figure(figsize=(SIZE[0] * 2, SIZE[1]), dpi=DPI)
    left, right = figure.subplots(1, 2)
    left.plot(evals.distance.steps, evals.distance.values, color=COLOUR, marker="o", linewidth=1.5)
    name = literal(evals.name)
    left.plot([evals.best_step], [evals.best_value], linestyle="none", marker="*", markersize=16, color=BEST,
              label=f"best: step {evals.best_step:,}, {name} {evals.best_value:.4g}")
    left.axvline(evals.best_step, color=BEST, linestyle=":", linewidth=1)
    _finish(left, f"{name} during training (lower is better)", name)
    if len(evals.kid):
        right.plot(evals.kid.steps, evals.kid.values, color=COLOUR, marker="o", linewidth=1.5)
        std = dict(zip(evals.kid_std.steps, evals.kid_std.values, strict=True))
        if std:
            low = [v - std.get(s, 0.0) for s, v in zip(evals.kid.steps, evals.kid.values, strict=True)]
            high = [v + std.get(s, 0.0) for s, v in zip(evals.kid.steps, evals.kid.values, strict=True)]
            right.fill_between(evals.kid.steps, low, high, color=COLOUR, alpha=0.2, label="± std over subsets")
        right.axvline(evals.best_step, color=BEST, linestyle=":", linewidth=1, label=f"best {name} step")
        _finish(right, "KID during training (lower is better)", "KID")
    else:
        right.set_axis_off()
        right.text(0.5, 0.5, "no KID recorded", ha="center", va="center", transform=right.transAxes)
    figure.tight_layout()
    return figure


def _finish(axes, title: str, label: str) -> None:
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(label)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    axes.figure.tight_layout()
