"""The sections of the report page, each as HTML: every string from the run or the user goes through `esc`, and
every one drawn on a chart through `charts.literal`."""

from __future__ import annotations

import datetime
import html
import json
import math

import yaml

from difftool.evaluation.plots import fd_vs_nfe_figure
from difftool.reporting import charts
from difftool.reporting.evaluations import Evaluation, Found, Sweep
from difftool.reporting.facts import NOT_RECORDED, RunFacts
from difftool.reporting.history import (
    DISTANCE_NAMES,
    EVAL_PREFIX,
    MAX_STEP,
    SMOOTH_SPAN,
    EvalHistory,
    History,
    Stop,
    finite,
)
from difftool.reporting.judge import Judge
from difftool.reporting.timeline import Timeline

CURVES = (  # metrics.jsonl key, title, axis label, smoothed (lr follows its schedule: nothing to smooth), log axis
    ("loss", "Training loss", "loss (mean over the logged steps)", True, True),
    ("lr", "Learning rate", "learning rate", False, False),
    ("img_per_s", "Training speed", "images per second", True, False),
)


def esc(value) -> str:
    """`value` as HTML text; bytes of undecodable file names as escapes (\\udcff), which UTF-8 can write."""
    return html.escape(str(value).encode("utf-8", "backslashreplace").decode("utf-8"), quote=True)


def table(header: list[str], rows: list[list], css: str = "") -> str:
    """An HTML table; cells are escaped, except those given as `Raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{esc(css)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """HTML made here (never from user data), placed into a table as it is."""


def image(uri: str, alt: str, css: str = "chart") -> str:
    return f'<img class="{css}" src="{esc(uri)}" alt="{esc(alt)}">'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def when(seconds: float | None) -> str:
    if seconds is None:
        return NOT_RECORDED
    return datetime.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def duration(seconds: float | None) -> str:
    if seconds is None or not finite(seconds) or seconds < 0:  # NaN or 1e300 in a damaged line
        return NOT_RECORDED
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def number(value, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


# ---------------------------------------------------------------- the run


def verdict(text: str | None) -> str:
    """The judge's verdict in a box at the top of the page: what the run's last evaluation says to do."""
    if text is None:
        return ""
    return (f'<section id="verdict" class="verdict"><p class="verdict-head">Verdict of the judge</p>'
            f"<p>{esc(text)}</p></section>")


def summary(facts: RunFacts, stop: Stop | None = None) -> str:
    """The run's facts; with `stop`, the end `train.until: plateau` set (past the budget, train.max_steps)."""
    goal = stop.end if stop is not None else facts.max_steps
    rows = [
        ["run folder", str(facts.root)],
        ["state", facts.state],
        ["steps", f"{number(facts.step) if facts.step is not None else 'none logged'}"
                  + (f" of {goal:,}" if goal else "")],
        ["recipe", facts.recipe],
        ["wall time", duration(facts.wall_seconds)
         + (f" over {len(facts.sessions)} sessions" if len(facts.sessions) > 1 else "")
         + (f" (the first {facts.untimed_steps:,} steps: {NOT_RECORDED})" if facts.untimed_steps else "")],
        ["hardware", "; ".join(facts.hardware)],
        ["versions", "; ".join(facts.versions)],
    ]
    distill = facts.config.get("distill") if isinstance(facts.config.get("distill"), dict) else {}
    if facts.command == "distill":
        teacher = (f"{distill.get('teacher')} ({distill.get('method', '?')} distillation, "
                   f"guidance {distill.get('guidance_scale', '?')} baked in)")
        rows.insert(4, ["distilled from", teacher])
    if stop is not None:
        ended = "stopped" if stop.reached else "stopping"
        decided = f"decided at the evaluation of step {stop.step:,}"
        why = stop.why or NOT_RECORDED
        rows.insert(3, ["until", f"{ended} by train.until: plateau at step {stop.end:,} ({decided}): {why}"])
    left_out = "".join(note(f"Left out: {n}") for n in facts.notes)
    return section("run", "The run", table(["", ""], rows, "facts") + left_out + _sessions(facts))


def _sessions(facts: RunFacts) -> str:
    if not facts.sessions:
        return note(f"Sessions (start, end, hardware of each `difftool train`): {NOT_RECORDED}. Runs trained "
                    f"before sessions.jsonl existed have none; every training from now on records one.")
    rows = []
    for i, session in enumerate(facts.sessions, 1):
        start, end = session.start, session.end or {}
        running = facts.training is not None and session is facts.sessions[-1]
        outcome = end.get("outcome") or ("running" if running else "killed (no end recorded)")
        rows.append([i, when(session.started), when(end.get("time")) if end else "-",
                     f"{number(start.get('step'))} → {number(end.get('step')) if end else '?'}",
                     start.get("resumed_from") or "-", outcome,
                     f"{start.get('processes', '?')} × {start.get('device_name') or start.get('device', '?')}"])
    return "<h3>Sessions</h3>" + table(["#", "started", "ended", "steps", "resumed from", "outcome", "on"], rows)


def recipe(facts: RunFacts) -> str:
    if facts.overrides is None:
        changes = note(f"The recipe {facts.recipe} is not one of the built-in recipes: the whole config is below.")
    elif not facts.overrides:
        changes = note(f"No changes to the built-in recipe {facts.recipe}.")
    else:
        rows = [[o.key, _yaml_value(o.recipe), _yaml_value(o.run)] for o in facts.overrides]
        changes = (f"<p>Changes to the built-in recipe <code>{esc(facts.recipe)}</code> (as this difftool ships "
                   f"it):</p>" + table(["key", "recipe", "this run"], rows))
    config = yaml.safe_dump(facts.config, sort_keys=False)
    return section("recipe", "Recipe and overrides",
                   changes + f"<details><summary>config.yaml</summary><pre>{esc(config)}</pre></details>")


def _yaml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


# ---------------------------------------------------------------- history


def curves(history: History, resumed_at: list[int]) -> str:
    parts = []
    for key, title, label, smoothed, log_scale in CURVES:
        series = history.series(key)
        if len(series):
            figure = charts.curve_figure(series, title=title, label=label, smoothed=smoothed, resumed_at=resumed_at,
                                         log_scale=log_scale)
            parts.append(image(charts.data_uri(figure), f"{title} over steps"))
    if not parts:
        parts.append(note("No training step has been logged yet (metrics.jsonl is empty or missing)."))
    if history.unreadable:
        parts.append(note(f"Left out: {history.unreadable}"))
    if history.damaged_lines:
        parts.append(note(f"{history.damaged_lines} line(s) of metrics.jsonl could not be read (half-written "
                          f"while training, or damaged: not JSON, or no usable step) and are left out."))
    return section("curves", "Training curves", '<div class="charts">' + "".join(parts) + "</div>"
                   + note(f"Pale: the values as logged; dark: an exponential moving average over about "
                          f"1/{SMOOTH_SPAN} of the points (drawn from {SMOOTH_SPAN + 1} points on). x: optimizer "
                          f"step; dashed: where a resumed session began."))


def evaluation_curves(evals: EvalHistory | None, judge: Judge | None = None, stop: Stop | None = None,
                      left_out: str | None = None) -> str:
    """The distance and KID over steps and, with a judge, class fidelity and brightness; `left_out`: why
    judge.json was not read."""
    skipped = note(f"Left out: {left_out}") if left_out else ""
    if evals is None:
        return section("eval", "FID and KID during training", note(
            "No evaluation during training was recorded. Turn it on with an `eval:` section in the recipe "
            "(for example --set eval.every=1000 with a reference data set), or score the finished model with "
            "difftool evaluate RUN --reference DATA.") + skipped)
    figure = charts.eval_figure(evals, floor_images=judge.floor_images if judge else None, stop=stop)
    charts_html = image(charts.data_uri(figure), f"{evals.name} and KID over steps", "chart wide")
    for title, extra in ((charts.CLASS_TITLE, charts.class_figure(evals, judge, stop)),
                         (charts.BRIGHTNESS_TITLE, charts.brightness_figure(evals, stop))):
        if extra is not None:
            charts_html += image(charts.data_uri(extra), f"{title} over steps")
    noise = dict(zip(evals.distance_std.steps, evals.distance_std.values, strict=True))
    kid_std = dict(zip(evals.kid_std.steps, evals.kid_std.values, strict=True))
    kid = dict(zip(evals.kid.steps, evals.kid.values, strict=True))
    rows = [[Raw("<b>★</b>") if s == evals.best_step else "", number(s), _pm(v, noise.get(s)),
             _pm(kid.get(s), kid_std.get(s))]
            for s, v in zip(evals.distance.steps, evals.distance.values, strict=True)]
    last = evals.last
    about = (f"Best step {evals.best_step:,}: {evals.name} {evals.best_value:.4g}"
             + (f". Each evaluation: {number(last.get(EVAL_PREFIX + 'num_samples'))} samples"
                if last.get(EVAL_PREFIX + "num_samples") else "")
             + (f", {duration(last[EVAL_PREFIX + 'seconds'])}" if isinstance(last.get(EVAL_PREFIX + "seconds"),
                                                                          (int, float)) else "") + ".")
    return section("eval", f"{evals.name} and KID during training",
                   f'<div class="charts">{charts_html}</div>' + (note(judge.describe()) if judge else "")
                   + f"<p>{esc(about)}</p>" + table(["best", "step", evals.name, "KID"], rows) + skipped)


def previews(timeline: Timeline) -> str:
    if not timeline.total:
        return section("previews", "Preview grids", note("No preview grid yet (samples/step-NNNNNN.png)."))
    figures = "".join(f'<figure>{image(uri, f"preview grid at step {step}", "grid")}'
                      f"<figcaption>step {step:,}</figcaption></figure>" for step, uri in timeline.shown)
    thinned = len(timeline.shown) + len(timeline.skipped) < timeline.total
    shown = (f"All {timeline.total} grids" if len(timeline.shown) == timeline.total else
             f"{len(timeline.shown)} of {timeline.total} grids"
             + (", evenly spaced (--max-grids shows more)" if thinned else ""))
    skipped = note(f"Left out, not read: {'; '.join(timeline.skipped)} (difftool reads only regular files inside "
                   f"the run that decode as PNG).") if timeline.skipped else ""
    return section("previews", "Preview grids",
                   note(f"{shown}: samples of the EMA weights from fixed seeds, oldest first.") + skipped
                   + f'<div class="timeline">{figures}</div>' + _trajectory(timeline))


def _trajectory(timeline: Timeline) -> str:
    if timeline.trajectory is None:
        return ""
    step, uri = timeline.trajectory
    return (f"<h3>How the first image came out of the noise at step {step:,}</h3>"
            + note("The noisy sample x_t (top) and the clean image the model predicts from it (bottom) at evenly "
                   "spaced steps of the preview sampler; the last column is the image (sample.trajectory).")
            + f'<figure>{image(uri, f"trajectory of the first preview image at step {step}", "trajectory")}</figure>')


# ---------------------------------------------------------------- evaluations


def evaluations(found: Found, searched: list[str]) -> str:
    damaged = "".join(note(f"Left out, damaged: {d}") for d in found.damaged)
    if not found.evaluations and not found.sweeps:
        return section("evaluations", "Evaluations and sweeps", note(
            f"No evaluation of this run found in {', '.join(searched)}. Make one with difftool evaluate RUN "
            f"--reference DATA (a sweep: add --sweep \"ddim:10,20,50;dpm-solver:10,20\"); --evaluations DIR "
            f"looks elsewhere.") + damaged)
    parts = []
    if found.evaluations:
        parts.append("<h3>Evaluations</h3>" + table(
            ["folder", "model", "distance", "KID", "IS", "precision / recall", "N", "sampler", "reference"],
            [_evaluation_row(e) for e in found.evaluations]))
    for sweep in found.sweeps:
        parts.append(_sweep(sweep))
    return section("evaluations", "Evaluations and sweeps", "".join(parts) + damaged)


def _evaluation_row(found: Evaluation) -> list:
    r, sampling = found.record, found.record.get("sampling", {})
    key = next((k for k in DISTANCE_NAMES if k in r), None)
    pr = f"{number(r['precision'], 3)} / {number(r.get('recall'), 3)}" if "precision" in r else "-"
    model = found.model + (f" ({sampling['weights']} weights)" if sampling.get("weights") else "")
    return [found.folder.name, model, f"{DISTANCE_NAMES[key]} {number(r[key])}" if key else "-",
            _pm(r.get("kid_mean"), r.get("kid_std")), _pm(r.get("is_mean"), r.get("is_std")), pr,
            number(r.get("num_images")), f"{sampling.get('scheduler', '?')} × {sampling.get('steps', '?')}",
            r.get("reference", "-")]


def _sweep(sweep: Sweep) -> str:
    results = sweep.results
    distance = str(results.get("distance", "FID"))
    rows = [r for r in results["rows"] if isinstance(r, dict)]
    # drawn: what a log axis can take (an NFE from 1 to MAX_STEP, a finite distance), names as literal text
    plotted = [{"scheduler": charts.literal(r.get("scheduler")), "nfe": r["nfe"], "fd": r["fd"],
                "guidance": r["guidance"] if finite(r.get("guidance")) else None} for r in rows
               if finite(r.get("nfe")) and 1 <= r["nfe"] <= MAX_STEP and finite(r.get("fd"))]
    figure = image(charts.data_uri(fd_vs_nfe_figure(plotted, charts.literal(distance))),
                   f"{distance} against NFE") if plotted else ""
    guided = any(finite(r.get("guidance")) for r in rows)  # a sweep over guidance scales (evaluation/sweep.py)
    body = table(["scheduler", "steps", *(["guidance"] if guided else []), "NFE", distance, "KID", "IS", "img/s",
                  "N"],
                 [[r.get("scheduler"), number(r.get("steps")), *([number(r.get("guidance"))] if guided else []),
                   number(r.get("nfe")), number(r.get("fd")),
                   _pm(r.get("kid_mean"), r.get("kid_std")), _pm(r.get("is_mean"), r.get("is_std")),
                   number(r.get("img_per_s"), 3), number(r.get("num_images"))] for r in rows])
    about = (f"Model {sweep.model}, reference {results.get('reference', '?')}, features "
             f"{results.get('features', '?')}.")
    return (f"<h3>Sweep {esc(sweep.folder.name)}</h3><p>{esc(about)}</p>"
            f'<div class="sweep">{body}{figure}</div>')


def _pm(mean, std) -> str:
    if not isinstance(mean, (int, float)):
        return "-"
    return number(mean) + (f" ± {number(std, 2)}" if isinstance(std, (int, float)) else "")
