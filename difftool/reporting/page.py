"""The report page: its sections put together into one HTML file that needs nothing else.

Charts and grids are inline PNGs, the style sheet is inline, and there is no script at all; the page's
Content-Security-Policy forbids anything else, so a browser refuses (and reports) any stray network access.
The page is written atomically: a browser reloading it while a report is made sees the old page or the new.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from difftool import __version__
from difftool.errors import UserError
from difftool.reporting import sections
from difftool.reporting.evaluations import default_places, find_evaluations
from difftool.reporting.facts import read_facts
from difftool.reporting.history import eval_history, read_history
from difftool.reporting.timeline import preview_timeline
from difftool.rundir import RunDir, refuse_inputs_as_output, write_text

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
.sweep { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
pre { background: #f1f2f6; padding: 10px; overflow-x: auto; font-size: 13px; }
code { background: #f1f2f6; padding: 0 3px; }
"""


@dataclass
class Report:
    path: Path
    grids_shown: int
    grids_total: int
    evaluations: int  # evaluations and sweeps of the run found
    has_eval_history: bool


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
    found, sweeps = find_evaluations(run.root, places)
    evals = eval_history(history)
    timeline = preview_timeline(run, max_grids)
    resumed_at = [s.start["step"] for s in facts.sessions if s.start.get("resumed_from")
                  and isinstance(s.start.get("step"), int)]
    body = "".join([
        sections.summary(facts),
        sections.curves(history, resumed_at),
        sections.evaluation_curves(evals),
        sections.previews(timeline),
        sections.evaluations(found, sweeps, [str(p) for p in places]),
        sections.recipe(facts),
    ])
    write_text(output, document(facts.name, facts.state, body))
    return Report(output, len(timeline.shown), timeline.total, len(found) + len(sweeps), evals is not None)


def check_output(output: Path, run: RunDir, overwrite: bool) -> None:
    """The report may replace an earlier report, never the run's own files or another file unasked."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the .html file to write")
    refuse_inputs_as_output(output, {"the run's config": run.config, "its metrics": run.metrics,
                                     "its sessions": run.sessions, "its preview grids": run.samples_dir,
                                     "its checkpoints": run.checkpoints_dir, "its model": run.model_dir})
    if output.exists() and not overwrite and not is_report(output):
        raise UserError(f"{output} exists and is not a difftool report; pass --overwrite to replace it or choose "
                        f"another --output")


def is_report(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f'<meta name="generator" content="{GENERATOR}">'.encode() in f.read(4096)
    except OSError:
        return False


def document(name: str, state: str, body: str) -> str:
    esc = sections.esc
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    nav = "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in [
        ("run", "Run"), ("curves", "Curves"), ("eval", "FID/KID"), ("previews", "Previews"),
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
