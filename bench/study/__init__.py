"""The guided-vs-plain study behind `python bench/learning.py` (its docstring describes the study).

plan: arms, run names, order, batches and each run's spec; estimate: `--plan`'s text; runner: the phases in batches
of pinned child processes, the evaluation rounds, resume; ledger: the study's files (records, ledger, finished,
waiting and stale runs); worker: one training run; evaluation: the evaluations of a run, a round, the starting model;
scores: a run's per-problem scores; tuning: validation problems and the learning rate per arm; analysis: the
statistics; outputs: the report's JSON and plot; tables: its text tables; ballast: a core's load; cli: the options.
"""
