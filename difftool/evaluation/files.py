"""The files an evaluation or a sweep leaves in its folder, named once.

`evaluate` and `sweep` write them and `difftool report` reads them back; this module imports nothing, so
the report finds them without loading torch and the feature networks.
"""

METRICS_FILE = "metrics.json"  # one evaluation: every score, and the sampling settings of a model's
RESULTS_CSV = "results.csv"  # a sweep: one row per setting
RESULTS_JSON = "results.json"  # a sweep: the same rows, with the model, reference and feature network
PLOT_FILE = "fid_vs_nfe.png"  # a sweep: distance against model calls, one line per scheduler
TIMING_FILE = "timing.json"  # a sweep setting's sampling time, summed over resumed runs
