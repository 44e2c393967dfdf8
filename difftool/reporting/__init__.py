"""`difftool report`: one self-contained HTML page about a run, from its folder and the evaluations of it.

history (metrics.jsonl), facts (config, sessions, versions, state) and the judge (eval/judge.json, with the
verdict) are read, charts drawn, evaluations and sweeps found; page puts them together. Nothing here takes the
run's lock: a run still training can be reported on while it trains. Only the preview grids need torch
(difftool.images, the one image decoder).

The run folder may come from someone else: its files are data. They are read only as regular files (never
through a link, never a FIFO), bounded in size, and whatever is damaged is left out with a note naming it;
only an unreadable config.yaml stops the report, in one line.
"""
