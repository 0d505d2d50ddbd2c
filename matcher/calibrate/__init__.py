"""``matcher calibrate``: a score model from labelled photos (docs/operating-points.md).

One module per job, each importable alone: embedding.py (a labelled folder through the
served pipeline), pairs.py (genuine and impostor scores per comparison kind), noise.py
(label noise and look-alike families), fit.py (the tail and the score model), groups.py
(per-group models), report.py (per-group rates), run.py (the whole run, as the command
makes it).
"""
