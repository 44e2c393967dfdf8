"""`difftool report`: one self-contained HTML page about a run, from its folder and the evaluations of it.

history (metrics.jsonl) and facts (config, sessions, versions, state) are read, charts drawn, evaluations
and sweeps found; page puts them together. Nothing here imports torch, and nothing takes the run's lock:
a run still training can be reported on while it trains.
"""
