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

from difftool.evaluation.verdict import BRIGHTNESS_LEVELS
from difftool.reporting.history import SMOOTH_SPAN, EvalHistory, Series, Stop, smooth
from difftool.reporting.judge import Judge

SIZE = (4.8, 3.0)  # inches, at DPI: 576 x 360 pixels, shown three in a row
DPI = 120
COLOUR = "tab:blue"
BEST = "tab:red"
SECOND = "tab:orange"
FLOOR = "tab:green"
STOP = "tab:purple"
CLASS_TITLE, BRIGHTNESS_TITLE = "Class fidelity", "Brightness error"
STOP_LABELS = {"levelled": "until: levelled off", "limit": "until: limit reached"}  # until/decided
LOG_RANGE = 30  # a positive curve spanning more than this factor gets a log axis (losses that fall fast)
LEGEND_COLUMNS, LEGEND_ROW = 2, 0.17  # a legend below a chart: its entries per row, and inches per row
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


def eval_figure(evals: EvalHistory, *, floor_images: int | None = None, stop: Stop | None = None) -> Figure:
    """The distance (best step starred, ± its noise and its floor where recorded) and KID (± its std over
    subsets) over steps; where `train.until: plateau` decided to stop, its decision and the end."""
    left, right = _eval_canvas(2).subplots(1, 2)
    _distance(left, evals, floor_images)
    _mark_stop(left, stop)
    name = literal(evals.name)
    _finish(left, f"{name} during training (lower is better)", name, legend_below=True)
    if len(evals.kid):
        right.plot(evals.kid.steps, evals.kid.values, color=COLOUR, marker="o", linewidth=1.5)
        std = dict(zip(evals.kid_std.steps, evals.kid_std.values, strict=True))
        if std:
            low = [v - std.get(s, 0.0) for s, v in zip(evals.kid.steps, evals.kid.values, strict=True)]
            high = [v + std.get(s, 0.0) for s, v in zip(evals.kid.steps, evals.kid.values, strict=True)]
            right.fill_between(evals.kid.steps, low, high, color=COLOUR, alpha=0.2, label="± std over subsets")
        right.axvline(evals.best_step, color=BEST, linestyle=":", linewidth=1, label=f"best {name} step")
        _mark_stop(right, stop)
        _finish(right, "KID during training (lower is better)", "KID", legend_below=True)
    else:
        right.set_axis_off()
        right.text(0.5, 0.5, "no KID recorded", ha="center", va="center", transform=right.transAxes)
    return left.figure


def _distance(axes, evals: EvalHistory, floor_images: int | None) -> None:
    """The distance with its noise as error bars, its floor as a dashed line, and the best step starred."""
    noise = dict(zip(evals.distance_std.steps, evals.distance_std.values, strict=True))
    errors = [noise.get(s, 0.0) for s in evals.distance.steps]
    name = literal(evals.name)
    axes.plot(evals.distance.steps, evals.distance.values, color=COLOUR, marker="o", linewidth=1.5,
              label=f"{name} (bars: ± its noise)" if noise else None)
    if noise:
        axes.errorbar(evals.distance.steps, evals.distance.values, yerr=errors, fmt="none", ecolor=COLOUR, capsize=3)
    axes.plot([evals.best_step], [evals.best_value], linestyle="none", marker="*", markersize=16, color=BEST,
              label=f"best: step {evals.best_step:,}, {name} {evals.best_value:.4g}")
    axes.axvline(evals.best_step, color=BEST, linestyle=":", linewidth=1)
    drawn = list(evals.distance.values)
    if len(evals.floor):
        floor = evals.floor.values[-1]
        images = f", {floor_images:,} images" if floor_images else ""
        axes.axhline(floor, color=FLOOR, linestyle="--", linewidth=1.2, label=f"floor (real vs real{images})")
        drawn.append(floor)
    if all(v > 0 for v in drawn) and max(drawn) > LOG_RANGE * min(drawn):
        axes.set_yscale("log")


def class_figure(evals: EvalHistory, judge: Judge | None, stop: Stop | None = None) -> Figure | None:
    """Right class and the largest class's share in % over steps, beside what the judge does on real images
    (its held-out accuracy) and 1/K; None when no evaluation recorded either."""
    if not len(evals.right_class) and not len(evals.largest_class_share):
        return None
    axes = _eval_canvas().subplots()
    for series, label, colour in ((evals.right_class, "right class (higher is better)", COLOUR),
                                  (evals.largest_class_share, "largest class share", SECOND)):
        if len(series):
            axes.plot(series.steps, [100 * v for v in series.values], color=colour, marker="o", linewidth=1.5,
                      label=label)
    if judge is not None and judge.accuracy is not None:
        axes.axhline(100 * judge.accuracy, color=COLOUR, linestyle="--", linewidth=1,
                     label=f"judge on real images ({judge.accuracy:.0%})")
    if judge is not None and judge.kind == "classes":
        axes.axhline(100 / len(judge.classes), color="grey", linestyle=":", linewidth=1.2,
                     label=f"1/{len(judge.classes)}: chance; each class's share")
    axes.set_ylim(0, 105)
    _mark_stop(axes, stop)
    _finish(axes, CLASS_TITLE, "% of samples", legend_below=True)
    return axes.figure


def brightness_figure(evals: EvalHistory, stop: Stop | None = None) -> Figure | None:
    """The samples' mean pixel minus the data's over steps, with the band the verdict takes as invisible."""
    if not len(evals.brightness_error):
        return None
    axes = _eval_canvas().subplots()
    axes.axhspan(-BRIGHTNESS_LEVELS, BRIGHTNESS_LEVELS, color=FLOOR, alpha=0.12,
                 label=f"within ±{BRIGHTNESS_LEVELS:g} levels: not visible")
    axes.axhline(0, color="grey", linewidth=1)
    axes.plot(evals.brightness_error.steps, evals.brightness_error.values, color=COLOUR, marker="o", linewidth=1.5)
    _mark_stop(axes, stop)
    _finish(axes, BRIGHTNESS_TITLE, "levels of 255 (samples − data)", legend_below=True)
    return axes.figure


def _eval_canvas(columns: int = 1) -> Figure:
    """A figure for evaluation charts: their legends go below the axes, which constrained layout makes room for."""
    return Figure(figsize=(SIZE[0] * columns, SIZE[1]), dpi=DPI, layout="constrained")


def _mark_stop(axes, stop: Stop | None) -> None:
    """Vertical lines where `train.until: plateau` decided to stop and where the run ends."""
    if stop is None:
        return
    decided = STOP_LABELS.get(stop.decided, f"until: {literal(stop.decided)}")
    axes.axvline(stop.step, color=STOP, linestyle="-.", linewidth=1.2, label=decided)
    axes.axvline(stop.end, color=STOP, linestyle="-", linewidth=1.2, label="stopped" if stop.reached else "stops here")


def _finish(axes, title: str, label: str, *, legend_below: bool = False) -> None:
    """Title, labels and grid; the legend inside the axes, or `legend_below` them (on an `_eval_canvas`, which
    grows to hold it), where many reference lines would otherwise cover the curves."""
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(label)
    axes.grid(True, alpha=0.3)
    entries = len(axes.get_legend_handles_labels()[0])
    if entries and legend_below:
        rows = -(-entries // LEGEND_COLUMNS)
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=LEGEND_COLUMNS, frameon=False)
        axes.figure.set_figheight(max(axes.figure.get_figheight(), SIZE[1] + LEGEND_ROW * rows))
    elif entries:
        axes.legend(fontsize=8)
    if axes.figure.get_layout_engine() is None:
        axes.figure.tight_layout()
