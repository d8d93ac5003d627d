"""The study's command line: `python bench/learning.py [options]` (see bench/learning.py), the options of a
`--study` file under the command line's, every choice checked in one line; and the child processes' commands."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import yaml

from .ballast import ballast
from .estimate import describe
from .ledger import load_json
from .plan import BENCH, RECIPE, ROOT, StudyPlan, load_arms, shown, study_paths
from .tables import markdown_table, print_table

DESCRIPTION = "Does guidance help? Guided vs plain GRPO at equal wall-clock, evaluated on held-out problems."
CHILD_COMMANDS = ("run-one", "evaluate-start", "evaluate-runs", "ballast")


def _setting(text: str) -> tuple:
    """`FIELD=VALUE` of --set: the value read as YAML (numbers, booleans)."""
    return tuple(yaml.safe_load(part) if i else part for i, part in enumerate(text.split("=", 1)))


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-every-minutes", type=float, default=None, help="Also evaluate snapshots this often.")
    parser.add_argument("--curve-problems", type=int, default=64, help="Test problems each snapshot is scored on.")
    parser.add_argument("--test-problems", type=int, default=None, help="Test problems (default: the recipe's).")
    parser.add_argument(
        "--quality-problems",
        type=int,
        default=None,
        help="Score fluency (NLL/token) on the first N test problems of a test run (default: all); the starting "
        "model's fluency is compared on the same problems.",
    )
    parser.add_argument("--lr-grid", nargs="+", type=float, default=None, help="Learning rates to tune each arm over.")
    parser.add_argument(
        "--eval-backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help="vllm: each phase's trained models are evaluated after its training, in one vLLM engine per core "
        "(--eval-python), which loads each model's weights in place: minutes of engine start-up once, then ~7x faster "
        "generation on CPU than transformers. Models wait in the run folder (~0.5 GB each for SmolLM2-135M).",
    )
    parser.add_argument(
        "--eval-python",
        default=None,
        help="The interpreter of the vLLM evaluations (default: .venv-vllm/bin/python from scripts/setup_vllm_env.sh "
        "when it exists, else this one).",
    )
    parser.add_argument("--tune-minutes", type=float, default=2.0, help="Training wall-clock per tuning run.")
    parser.add_argument("--tune-seeds", nargs="+", type=int, default=[100], help="Seeds of the tuning runs.")
    parser.add_argument("--validation-problems", type=int, default=64, help="Validation problems a tuning run scores.")


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parallel", type=int, default=1, choices=[1, 2], help="Runs side by side (one core each).")
    parser.add_argument(
        "--pairing-check-minutes", type=float, default=0.0, help="With --parallel 2: step time alone vs paired."
    )
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument(
        "--cores",
        default="0",
        help="taskset core list for the runs ('' for none); with --parallel 2 one core per run.",
    )


def study_parser() -> argparse.ArgumentParser:
    """The study's options (not a recipe parser: `trl_guided.train.make_parser` is that)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--study", default=None, help="A YAML file of this command's options (the command line wins).")
    parser.add_argument("--out", default=str(BENCH), help="Where <name>.json, <name>.png and <name>_runs/ go.")
    parser.add_argument("--name", default="learning", help="The study's name: <name>.json, <name>.png, <name>_runs/.")
    parser.add_argument("--recipe", default=str(RECIPE), help="The base recipe the arms overlay (bench/GPU.md).")
    parser.add_argument(
        "--task",
        default=None,
        help="Use the task's CPU recipe (recipes/smollm2-135m-instruct/<task>_cpu.yaml) as the base recipe, with the "
        "study's fixed settings (constant learning rate, one log row per step, no checkpoints) over it.",
    )
    parser.add_argument("--arms-file", default=None, help="YAML: arm name -> recipe overlay (default: ARMS).")
    parser.add_argument("--arms", nargs="+", default=None, help="Run these arms only (default: all).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="Training wall-clock per test run.")
    _add_evaluation_options(parser)
    _add_machine_options(parser)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        type=_setting,
        metavar="FIELD=VALUE",
        help="Override a recipe field in every arm (a diagnostic variant; give it its own --out).",
    )
    parser.add_argument("--stop-after", choices=["before", "tune"], default=None, help="Stop after this phase.")
    parser.add_argument("--fresh", action="store_true", help="Redo runs that finished earlier.")
    parser.add_argument("--report-only", action="store_true", help="Only recompute <name>.json and <name>.png.")
    parser.add_argument("--markdown", action="store_true", help="Print <name>.json as the README tables and exit.")
    parser.add_argument("--plan", action="store_true", help="Print the runs and batches the study holds and exit.")
    parser.add_argument("--tiny", action="store_true", help="A tiny local model and a few seconds per run (CI).")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return parser


def _read_study_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """The `--study` file's options become the parser's defaults (the command line wins)."""
    first, _ = parser.parse_known_args(argv)
    if not first.study:
        return
    options = yaml.safe_load(Path(first.study).read_text()) or {}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(options) - known)
    if unknown:
        parser.error(f"{first.study}: unknown options {unknown}; use the command's option names with _ for -")
    parser.set_defaults(**options)


def _resolve_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--task's CPU recipe; a study file's paths may be relative to the repository."""
    if args.task:
        recipe = ROOT / "recipes" / "smollm2-135m-instruct" / f"{args.task}_cpu.yaml"
        if not recipe.is_file():
            known = sorted(p.stem.removesuffix("_cpu") for p in recipe.parent.glob("*_cpu.yaml"))
            parser.error(f"--task {args.task}: no recipe {shown(recipe)}; tasks with a CPU recipe: {known}")
        args.recipe = str(recipe)
    for option in ("arms_file", "recipe"):
        path = getattr(args, option)
        if path and not Path(path).exists() and (ROOT / path).exists():
            setattr(args, option, str(ROOT / path))


def _choose_eval_python(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The interpreter of the vLLM evaluation rounds, only when the command evaluates; refused when it cannot run."""
    evaluates = not (args.markdown or args.plan or args.report_only)
    if args.eval_backend == "vllm" and args.eval_python is None and evaluates:
        vllm_venv = ROOT / ".venv-vllm" / "bin" / "python"  # scripts/setup_vllm_env.sh (CPU)
        if vllm_venv.exists():
            args.eval_python = str(vllm_venv)
        elif importlib.util.find_spec("vllm") is not None:  # one venv with vLLM (a GPU machine)
            args.eval_python = sys.executable
        else:
            parser.error(
                "--eval-backend vllm needs vLLM: run bash scripts/setup_vllm_env.sh (CPU), install vllm in this venv, "
                "or give --eval-python"
            )
    if args.eval_python and not Path(args.eval_python).exists():
        parser.error(f"--eval-python {args.eval_python}: no such interpreter")
    if args.eval_python and args.eval_backend != "vllm":
        parser.error("--eval-python runs the vLLM evaluation rounds: give --eval-backend vllm too, or leave it out")
    if args.eval_python:  # the rounds start in the repository: a relative path must not change its meaning
        args.eval_python = os.path.abspath(args.eval_python)  # not resolve(): that leaves the venv for its python


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line over the `--study` file's options over the defaults; every choice checked in one line."""
    parser = study_parser()
    _read_study_file(parser, argv)
    args = parser.parse_args(argv)
    if isinstance(args.set, dict):
        args.set = list(args.set.items())
    args.set = [tuple(item) for item in args.set]
    _resolve_paths(parser, args)
    args.arm_overlays = load_arms(args.arms_file)
    args.arms = args.arms or list(args.arm_overlays)
    unknown = sorted(set(args.arms) - set(args.arm_overlays))
    if unknown:
        parser.error(f"--arms {unknown}: not in the arms ({', '.join(args.arm_overlays)})")
    if args.lr_grid is not None and len(args.lr_grid) == 1:
        parser.error("--lr-grid needs at least two values to tune over (set one rate with --set learning_rate=X)")
    if args.lr_grid and set(args.tune_seeds) & set(args.seeds):
        parser.error("--tune-seeds must differ from --seeds (a tuning run would repeat the start of a test run)")
    _choose_eval_python(parser, args)
    if args.quality_problems is not None and args.quality_problems < 1:
        parser.error(f"--quality-problems {args.quality_problems}: must be at least 1; leave it out to score all")
    if args.parallel > 1 and args.cores and len([c for c in args.cores.split(",") if c]) < args.parallel:
        parser.error(f"--parallel {args.parallel} pins each run to its own core: give as many, e.g. --cores 0,1")
    return args


def run_child(argv: list[str]) -> None:
    """A child process's command: `ballast`, `run-one SPEC`, `evaluate-start SPEC` or `evaluate-runs SPEC...`."""
    if argv[0] == "ballast":
        ballast()
        return
    from . import evaluation, worker  # heavy: torch, transformers, trl_guided; the children's code only

    if argv[0] == "evaluate-runs":
        evaluation.evaluate_runs(argv[1:])
        return
    spec = load_json(Path(argv[1]))
    (worker.run_one if argv[0] == "run-one" else evaluation.evaluate_start)(spec)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CHILD_COMMANDS:
        run_child(argv)
        return
    args = parse_arguments(argv)
    report_path, plot_path, _ = study_paths(Path(args.out), args.name)
    if args.markdown:
        print(markdown_table(load_json(report_path)))
        return
    if args.tiny and args.out == str(BENCH):
        sys.exit(f"--tiny writes a smoke result: give --out DIR so bench/{args.name}.json is not overwritten")
    if args.plan:
        print(describe(StudyPlan(args)))
        return
    # Running and reporting load trl_guided (torch, TRL: seconds and memory): --markdown and --plan do without.
    from trl_guided.tiny_models import build_tiny_model  # heavy: torch, transformers (a --tiny study only)

    from .outputs import write_report  # heavy: trl_guided, torch (the report's analysis)
    from .runner import Study  # heavy: trl_guided, torch (the recipe parser)

    if args.tiny and args.model is None:
        args.model = build_tiny_model(Path(args.out) / "tiny-model")
    plan = StudyPlan(args)
    if not args.report_only:
        Study(plan).run()
    if args.stop_after:
        print(describe(plan))
        return
    report = write_report(args)
    print_table(report)
    print(f"wrote {report_path} and {plot_path}")
