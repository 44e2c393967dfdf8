"""The report page: its sections put together into one HTML file that needs nothing else.

Charts and grids are inline PNGs, the style sheet is inline, and there is no script at all; the page's
Content-Security-Policy forbids anything else, so a browser refuses (and reports) any stray network access.
The page is written atomically: a browser reloading it while a report is made sees the old page or the new.

Where it goes: the default, RUN/report.html, lies inside the run, so the run folder may take a report, but
inside it only a new file or a page difftool report wrote itself (it carries the GENERATOR meta tag) is ever
replaced, and never a file of the run's layout (`RUN/train.lock` replaced under a running `train` would let a
second one start beside it), --overwrite or not. Outside the run, --overwrite replaces another file.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

from difftool import __version__
from difftool.errors import UserError
from difftool.reporting import sections
from difftool.reporting.evaluations import default_places, find_evaluations
from difftool.reporting.facts import read_facts
from difftool.reporting.history import (
    eval_history,
    plateau_stop,
    plausible_step,
    read_history,
)
from difftool.reporting.judge import read_judge, verdict_line
from difftool.reporting.timeline import preview_timeline
from difftool.output_rules import refuse_inputs_as_output
from difftool.rundir import LOCK_FILE, RunDir
from difftool.safeio import TMP_PREFIX, open_regular, refuse_special, write_text

GENERATOR = "difftool report"  # marks a file as a report, which a new report may replace
MAX_GRIDS = 24
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1320px; padding: 0 24px 48px;
       color: #1d2330; background: #fbfbfd; }
header { border-bottom: 1px solid #d8dbe3; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 24px 0 4px; } h2 { font-size: 20px; margin: 32px 0 10px; }
h3 { font-size: 16px; margin: 20px 0 8px; }
nav a { margin-right: 14px; color: #2456a6; text-decoration: none; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { border-bottom: 1px solid #e3e5ec; padding: 4px 12px 4px 0; text-align: left; vertical-align: top; }
table.facts thead { display: none; } table.facts td:first-child { color: #5b6170; width: 9em; }
.note { color: #5b6170; font-size: 14px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
img.chart { width: calc(33.3% - 10px); min-width: 380px; height: auto; background: #fff;
            border: 1px solid #e3e5ec; }
img.chart.wide { width: calc(66.6% - 10px); }
.sweep img.chart { width: 576px; min-width: 0; max-width: 100%; }
.timeline { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; text-align: center; font-size: 13px; color: #5b6170; }
img.grid { image-rendering: pixelated; border: 1px solid #e3e5ec; max-width: 100%; min-width: 96px; }
img.trajectory { image-rendering: pixelated; border: 1px solid #e3e5ec; max-width: 100%; }
.sweep { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
pre { background: #f1f2f6; padding: 10px; overflow-x: auto; font-size: 13px; }
code { background: #f1f2f6; padding: 0 3px; }
.verdict { margin: 16px 0 8px; padding: 12px 16px; border: 1px solid #9bb4dc; border-left: 6px solid #2456a6;
           border-radius: 4px; background: #eef3fb; font-size: 16px; }
.verdict p { margin: 0; } .verdict p.verdict-head { font-weight: 600; margin-bottom: 4px; color: #2456a6; }
"""


@dataclass
class Report:
    path: Path
    grids_shown: int
    grids_total: int
    evaluations: int  # evaluations and sweeps of the run found
    has_eval_history: bool
    notes: list[str] = field(default_factory=list)  # files left out (links, special files, damage), with why


def make_report(run_folder: Path, output: Path | None = None, *, places: list[Path] | None = None,
                max_grids: int = MAX_GRIDS, overwrite: bool = False) -> Report:
    """Write the report of `run_folder` to `output` (default RUN/report.html).

    `places` are where evaluations are looked for (default: `evaluations.default_places`). An existing report
    is replaced, as any derived file is; another file only with `overwrite`.
    """
    run = RunDir(run_folder)
    history = read_history(run)
    facts = read_facts(run, history.last_step)
    output = Path(output) if output is not None else run.report
    check_output(output, run, overwrite)
    places = default_places(run.root) if places is None else list(places)
    found = find_evaluations(run.root, places)
    evals = eval_history(history)
    judge, judge_left_out = read_judge(run)
    stop = plateau_stop(history)
    timeline = preview_timeline(run, max_grids)
    resumed_at = [s.start["step"] for s in facts.sessions if s.start.get("resumed_from")
                  and plausible_step(s.start.get("step"))]
    body = "".join([
        sections.verdict(verdict_line(history, judge, str(run_folder), finished=facts.state.startswith("finished"),
                                      command=facts.command, levelled=stop is not None and stop.decided == "levelled",
                                      teacher=_teacher(facts)) if judge else None),
        sections.summary(facts, stop),
        sections.curves(history, resumed_at),
        sections.evaluation_curves(evals, judge, stop, judge_left_out),
        sections.previews(timeline),
        sections.evaluations(found, [str(p) for p in places]),
        sections.recipe(facts),
    ])
    write_text(output, document(facts.name, facts.state, body))
    notes = [*facts.notes, *([history.unreadable] if history.unreadable else []),
             *([judge_left_out] if judge_left_out else [])]
    if timeline.skipped:
        notes.append(f"left out {len(timeline.skipped)} preview grid(s), not read: {'; '.join(timeline.skipped)}")
    notes += [f"left out a damaged evaluation file: {d}" for d in found.damaged]
    return Report(output, len(timeline.shown), timeline.total, len(found.evaluations) + len(found.sweeps),
                  evals is not None, notes)


def check_output(output: Path, run: RunDir, overwrite: bool) -> None:
    """The report may replace an earlier report; inside the run nothing else, outside another file only with
    `overwrite`; never the run's own files. A link at `output` is replaced itself, never written through."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the .html file to write")
    refuse_special(output)  # before is_report looks into it
    where = Path(os.path.realpath(output.parent)) / output.name  # the entry the page will take
    root = Path(os.path.realpath(run.root))
    if where.is_relative_to(root) and where != root:
        _check_inside_run(output, where.relative_to(root), run)
    elif not os.path.islink(output):  # a hard link to a run's file is that file
        refuse_inputs_as_output(where, {"the run's config": run.config, "its metrics": run.metrics,
                                        "its sessions": run.sessions, "its preview grids": run.samples_dir,
                                        "its checkpoints": run.checkpoints_dir, "its model": run.model_dir,
                                        "its lock": run.root / LOCK_FILE, "its evaluation data": run.eval_dir})
    if os.path.lexists(output) and not overwrite and not is_report(output):
        raise UserError(f"{output} exists and is not a difftool report; pass --overwrite to replace it or choose "
                        f"another --output")


def _check_inside_run(output: Path, inside: Path, run: RunDir) -> None:
    """In the run folder: a new file or an earlier report, never a name of the run's layout."""
    layout = {p.name for p in (run.config, run.metrics, run.sessions, run.checkpoints_dir, run.model_dir,
                               run.samples_dir, run.logs_dir, run.eval_dir)} | {LOCK_FILE}
    first = inside.parts[0]
    if first in layout or first.startswith(TMP_PREFIX) or first.endswith(".lock"):
        raise UserError(f"--output {output} is {'' if len(inside.parts) == 1 else 'inside '}the run's own "
                        f"{first}; difftool report never writes over the run's files, --overwrite or not: choose "
                        f"another --output (the default {run.report}, or a path outside the run)")
    if os.path.lexists(output) and not is_report(output):
        raise UserError(f"--output {output} is in the run folder and is not a page difftool report wrote; inside "
                        f"a run it replaces only its own pages, --overwrite or not: remove it, or choose an "
                        f"--output outside the run")


def is_report(path: Path) -> bool:
    """Whether `path` is a regular file (not a link) that starts as a page of difftool report does."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, UserError):
        return False
    try:
        return f'<meta name="generator" content="{GENERATOR}">'.encode() in os.read(fd, 4096)
    except OSError:
        return False
    finally:
        os.close(fd)


def document(name: str, state: str, body: str) -> str:
    esc = sections.esc
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    nav = "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in [
        ("run", "Run"), ("curves", "Curves"), ("eval", "During training"), ("previews", "Previews"),
        ("evaluations", "Evaluations"), ("recipe", "Recipe")])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(name)}: difftool report</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{esc(name)}</h1><p>{esc(state)}</p><nav>{nav}</nav></header>
{body}
<footer><p class="note">Made by difftool {esc(__version__)} on {esc(made)}: difftool report makes it again
with the newest curves, grids and evaluations.</p></footer>
</body>
</html>
"""


def _teacher(facts) -> str | None:
    """A student's teacher as its config.yaml names it (a name that is not text: none)."""
    distill = facts.config.get("distill") if isinstance(facts.config, dict) else None
    teacher = distill.get("teacher") if isinstance(distill, dict) else None
    return teacher if isinstance(teacher, str) and teacher else None
