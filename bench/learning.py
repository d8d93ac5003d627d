"""Does guidance help? Guided vs plain GRPO at equal wall-clock, evaluated on held-out problems.

    python bench/learning.py                        # the arithmetic study -> bench/learning.json, bench/learning.png
    python bench/learning.py --study bench/learning_regime_study.yaml   # the regime study -> bench/learning_regime.*
    python bench/learning.py --tiny --out DIR       # a tiny local model, seconds: checks the pipeline, not the result
    python bench/learning.py --fresh                # redo the runs that already finished
    python bench/learning.py --report-only          # statistics and plot again from the per-run records
    python bench/learning.py --plan                 # the runs, batches and training minutes, without running

Every arm (a recipe overlay: `study.plan.ARMS`, or an `--arms-file`) trains once per seed for the same wall-clock
budget (`--budget-minutes`, counted from the first training step; the guided arms fit more steps in it). After
training, the final model answers every test problem greedily with plain sampling (`trl_guided.evaluate`, the same code
as `trl-guided eval`); the starting model is evaluated once. Each finished run leaves
`<name>_runs/<arm>-seed<k>/run.json` (settings, per-step curve, load average, eval metrics, timings) and `eval.jsonl`
(one record per test problem) next to the report; a rerun skips finished runs (a run whose settings changed is moved to
`<name>_runs/stale/` and redone), so a killed study loses at most the runs in progress. `<name>.json` and `<name>.png`
are recomputed from those files.

Learning rate per arm (`--lr-grid`, at least two values): before the test runs, each arm trains a short run
(`--tune-minutes`) per grid value and tuning seed (`--tune-seeds`, distinct from the test seeds) and is scored on the
task's `validation` split: problems of neither the test split (the generated tasks' hash partition keeps them apart,
checked here) nor the training set (validation problems whose prompt is also a training prompt are left out of the
score; see `study.tuning.validation_plan`). The value with the best mean validation score (ties to the smaller rate)
is the arm's rate for the test runs. An arm that sets `learning_rate` in its overlay is not tuned.

Two runs at a time (`--parallel 2 --cores 0,1`): each run is pinned to its own core, and the two runs of a batch
belong to the same seed (tuning: the same tuning seed), so machine load hits the arms alike; a batch with one run left
loads the idle core with a ballast process. `--pairing-check-minutes` measures what pairing does to the per-step time
(one run alone, then two side by side, no evaluation).

Learning curve (`--eval-every-minutes`): a test run saves its weights that often (off the training clock) and each
snapshot is evaluated after training on the first `--curve-problems` test problems; the final model's point on the
curve is its full evaluation restricted to the same problems. Evaluation never counts as training time; the JSON's
`machine_time` says how the study's wall-clock splits into tuning, training and evaluation.

Evaluation backend (`--eval-backend vllm`, the regime study's): a run saves its snapshots and final model in its
folder (`models/`, `trained.json`) instead of evaluating them; once a phase's runs have trained, one child per core
(the vLLM venv's python, `--eval-python`) evaluates its share in one vLLM engine, loading each model's weights into
the running engine (`trl_guided.vllm_engine.kept_vllm_engine`), writes run.json and deletes the models. The starting
model is evaluated with vLLM too, so every number of the study comes from the same engine. A killed round leaves its
runs trained and waiting: the rerun evaluates them without training them again.

Statistics: an arm's gain is its after - before accuracy, averaged over seeds and problems, with a 95 % bootstrap CI
that resamples seeds and problems; a pair of arms is compared the same way on the per-problem differences, paired by
seed and problem. The training curves also give each arm's training reward at equal steps and at equal generated
tokens (the shared prefix of a guided group counted once).

The code is the package bench/study/ (plan, runner, worker, evaluation, tuning, analysis, outputs, cli); this file is
its entry point, also of the child processes the study starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# The package `study` is in this folder (also when this file is run by runpy, or from another directory), and the
# parent imports the same trl_guided as its children, which run with the repository on PYTHONPATH.
sys.path[:0] = [folder for folder in (str(BENCH), str(BENCH.parent)) if folder not in sys.path]

from study.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
