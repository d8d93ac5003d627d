"""The subcommands of `trl-guided` other than `train`: resolve-model, eval, report, plot and chat. `trl_guided.cli`
imports this module only when one of them runs (it loads torch and transformers); each command has its own parser."""

from __future__ import annotations

import argparse
import sys
import time
import typing

from .chat import run_chat
from .config import SAMPLER_FIELDS
from .data import TASKS, DataError
from .evaluate import DEFAULT_QUALITY_MODEL, EvalSettings, default_backend, evaluate, read_result, write_json
from .locate import ModelError, locate_model
from .models import EMBEDDED_MODELS, EMBEDDED_PREFIX
from .plots import save_pngs
from .recipe import read_recipe, refuse_renamed
from .report import write_report
from .rundir import RunDirError, load_run
from .stats import EvalError, compare, format_comparison, format_result
from .tasks import DEFAULT_TASK_REWARDS, EVAL_TASK_FIELDS, TaskArguments, reward_options, task_options

EVAL_BACKENDS = ("auto", "transformers", "vllm")


class CommandParser(argparse.ArgumentParser):
    """Every `--dash-case` flag also answers to its `--snake_case` spelling, as TRL's parsers and `train` do."""

    def add_argument(self, *names, **kwargs):
        snake = ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*dict.fromkeys([*names, *snake]), **kwargs)


def _resolve_model(args: argparse.Namespace) -> int:
    """The folder (or Hub name) `locate_model` finds for a name, as train, eval and chat load it."""
    try:
        source = locate_model(args.name)
    except ModelError as error:
        raise SystemExit(f"trl-guided resolve-model: {error}") from None
    print(source.path)
    if source.kind == "adapter":
        print(
            f"(a LoRA adapter on the base model {source.base}: eval and chat merge it; train refuses it)",
            file=sys.stderr,
        )
    return 0


# ---- report / plot / chat: look at a run ------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    if args.groups < 0:
        raise SystemExit(f"--groups must be >= 0, got {args.groups}.")
    try:
        path = write_report(args.run_dir, args.output, groups=args.groups, ot_plan=not args.no_ot_plan)
    except RunDirError as error:
        raise SystemExit(str(error)) from None
    print(path)
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.run_dir)
    except RunDirError as error:
        raise SystemExit(str(error)) from None
    paths = save_pngs(run.history, args.output or run.path / "plots")
    if not paths:
        raise SystemExit(f"{args.run_dir}: the log history has no metric to plot.")
    for path in paths:
        print(path)
    return 0


def _chat(args: argparse.Namespace) -> int:
    return run_chat(args)


def _report_parser() -> argparse.ArgumentParser:
    report = CommandParser(
        prog="trl-guided report",
        description="Write RUN_DIR/report.html: settings and headline numbers, the curves, sample groups from "
        "completions/*.parquet with the prefix / guidance / postfix segments, and the OT transport plan when OT was "
        "on. No network needed to write or to view it.",
    )
    report.add_argument("run_dir", help="the output_dir of a training run")
    report.add_argument("--output", "-o", help="where to write the page (default RUN_DIR/report.html)")
    report.add_argument(
        "--groups",
        type=int,
        default=8,
        help="sample groups shown in total, over the first, middle and last logged steps (default 8)",
    )
    report.add_argument(
        "--no-ot-plan",
        action="store_true",
        help="skip the transport-plan picture (it loads the final and the reference model)",
    )
    report.set_defaults(func=_report)
    return report


def _plot_parser() -> argparse.ArgumentParser:
    plot = CommandParser(
        prog="trl-guided plot",
        description="Write one PNG per curve group (reward, reward spread, segments, completion length, KL, OT, "
        "loss, learning rate) that the run logged, into RUN_DIR/plots/ (or --output).",
    )
    plot.add_argument("run_dir", help="the output_dir of a training run")
    plot.add_argument("--output", "-o", help="directory for the PNG files (default RUN_DIR/plots)")
    plot.set_defaults(func=_plot)
    return plot


def _chat_parser() -> argparse.ArgumentParser:
    chat = CommandParser(
        prog="trl-guided chat",
        description="Multi-turn chat with the chat template, streaming tokens. Commands: /reset clears the "
        "history, /exit quits (so does end of input).",
    )
    chat.add_argument(
        "model", help="a run folder, a checkpoint-N, model or LoRA-adapter folder, a Hub name, or embedded:NAME"
    )
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible answers)")
    chat.set_defaults(func=_chat)
    return chat


def _resolve_parser() -> argparse.ArgumentParser:
    resolve = CommandParser(
        prog="trl-guided resolve-model",
        description="Print the local folder a model name means, as train, eval, chat and report find it: a run "
        "folder's final model, else its newest complete checkpoint-N; a model or LoRA adapter folder; a converted "
        "embedded model; a Hub name is printed as given. Embedded models: "
        + ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS),
    )
    resolve.add_argument("name", help="e.g. runs/x, embedded:smollm2-135m-instruct, Qwen/Qwen2.5-0.5B-Instruct")
    resolve.set_defaults(func=_resolve_model)
    return resolve


# ---------------------------------------------------------------------------------------------------------- eval
# `trl-guided eval`: held-out evaluation, comparison of two results (trl_guided/evaluate.py, docs/evaluation.md).


def _eval_parser() -> argparse.ArgumentParser:
    evaluation = CommandParser(
        prog="trl-guided eval",
        description="Evaluate a model on held-out problems (pass@k, avg@k, 95% CIs), or compare two results.\n"
        "  trl-guided eval --model M --task T [--limit N] [--output F.json]\n"
        "  trl-guided eval --config RECIPE --model runs/x\n"
        "  trl-guided eval --compare BEFORE.json AFTER.json [--output comparison.json]\n"
        "  trl-guided eval --model M --baseline B --task T\n"
        "Every flag also takes its snake_case spelling (--max_new_tokens), as in recipes.",
        epilog="Task fields, as in recipes: "
        + ", ".join("--" + n.replace("_", "-") for n in EVAL_TASK_FIELDS)
        + ". Details: docs/evaluation.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluation.add_argument("--model", help="Hub name, model/run/checkpoint-N/LoRA-adapter folder, or embedded:NAME")
    evaluation.add_argument("--baseline", help="a second model, evaluated the same way and compared with --model")
    evaluation.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"), help="compare two results")
    evaluation.add_argument("--force", action="store_true", help="compare results of different problems/settings")
    evaluation.add_argument("--config", help="a training recipe: its task fields (and model) are the defaults")
    evaluation.add_argument("--task", help=f"task name: {', '.join(TASKS)} (default: the recipe's)")
    evaluation.add_argument("--split", default="test", help="dataset split (default: test)")
    evaluation.add_argument("--limit", type=int, help="first N problems (recipe: heldout_limit; default: all)")
    evaluation.add_argument("--num-samples", type=int, help="samples per problem, K of pass@K (default 1)")
    evaluation.add_argument("--temperature", type=float, help="0 = greedy (default 0)")
    evaluation.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    evaluation.add_argument("--max-new-tokens", type=int, help="completion budget (default: recipe's, else 128)")
    evaluation.add_argument("--batch-size", type=int, default=16, help="rows per generate call (default 16)")
    evaluation.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    evaluation.add_argument("--sampling", default="plain", choices=("plain", "guided"), help="default: plain")
    evaluation.add_argument("--reward-funcs", nargs="+", help="reward names (default: the recipe's or the task's)")
    evaluation.add_argument(
        "--backend",
        default="auto",
        choices=EVAL_BACKENDS,
        help="auto: vLLM if it is installed and a GPU is visible, else transformers (default auto)",
    )
    evaluation.add_argument(
        "--vllm-gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM backend: share of GPU memory (on CPU: of RAM) for the engine (default: the recipe's, else 0.3)",
    )
    evaluation.add_argument(
        "--quality-model",
        default=None,
        help="model scoring completion fluency (NLL/token); 'none' to skip (default embedded:smollm2-135m-instruct)",
    )
    evaluation.add_argument(
        "--quality-limit",
        type=int,
        default=None,
        help="score fluency on the first N problems only (a forward pass costs about as much as generating)",
    )
    evaluation.add_argument("--output", help="write the result (or comparison) JSON here")
    evaluation.add_argument("--records", help="write the per-sample records (JSONL) here")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bar")
    kinds = typing.get_type_hints(TaskArguments)
    for name in EVAL_TASK_FIELDS:
        kind = kinds[name] if kinds[name] in (int, float) else str
        evaluation.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=argparse.SUPPRESS)
    evaluation.set_defaults(func=_eval)
    return evaluation


def _eval_settings(args: argparse.Namespace):
    """EvalSettings from the flags, then the recipe (--config), then the defaults; and the model name."""
    recipe = read_recipe(args.config) if args.config else {}
    refuse_renamed(recipe, args.config)
    task_fields = {k: recipe[k] for k in EVAL_TASK_FIELDS if k in recipe}
    task_fields.update({k: getattr(args, k) for k in EVAL_TASK_FIELDS if getattr(args, k) is not None})
    task = args.task or recipe.get("task")
    if not task:
        raise EvalError("no task: give --task (e.g. --task arithmetic) or --config RECIPE")
    rewards = args.reward_funcs or (recipe.get("reward_funcs") if recipe.get("task", task) == task else None)
    rewards = rewards or DEFAULT_TASK_REWARDS.get(task, [])
    task_args = TaskArguments(task=task, reward_funcs=list(rewards), **task_fields)

    def pick(flag, recipe_key, default):
        if flag is not None:
            return flag
        return recipe.get(recipe_key, default) if recipe.get(recipe_key) is not None else default

    quality = args.quality_model or DEFAULT_QUALITY_MODEL
    settings = EvalSettings(
        task=task,
        split=args.split,
        limit=pick(args.limit, "heldout_limit", None),
        num_samples=pick(args.num_samples, "heldout_num_samples", 1),
        temperature=pick(args.temperature, "heldout_temperature", 0.0),
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens
        or recipe.get("heldout_max_new_tokens")
        or recipe.get("max_completion_length")
        or 128,
        batch_size=args.batch_size,
        seed=args.seed,
        sampling=args.sampling,
        backend=default_backend(args.sampling) if args.backend == "auto" else args.backend,
        vllm_gpu_memory_utilization=pick(args.vllm_gpu_memory_utilization, "vllm_gpu_memory_utilization", 0.3),
        reward_funcs=list(rewards),
        task_options=task_options(task_args),
        reward_options={k: v for k, v in reward_options(task_args).items() if k in rewards},
        quality_model=None if quality.lower() == "none" else quality,
        quality_limit=args.quality_limit,
        guidance={k: recipe[k] for k in SAMPLER_FIELDS if k in recipe} if args.sampling == "guided" else {},
    )
    settings.check()
    return settings, args.model or recipe.get("model_name_or_path")


def _eval(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            if args.model or args.baseline:
                raise EvalError("--compare takes two result files; leave out --model/--baseline")
            comparison = compare(read_result(args.compare[0]), read_result(args.compare[1]), force=args.force)
            print(format_comparison(comparison))
            if args.output:
                write_json(comparison, args.output)
            return 0
        settings, model = _eval_settings(args)
        if not model:
            raise EvalError("no model: give --model (or --config with a recipe that names model_name_or_path)")
        if args.baseline and args.records:
            raise EvalError("--records keeps one model's samples; leave it out with --baseline")
        # Resolve every model before generating anything, so a typo fails in a second, not after an evaluation.
        source = locate_model(model)
        baseline = locate_model(args.baseline) if args.baseline else None
        results = []
        for each in [baseline, source] if baseline else [source]:
            started = time.perf_counter()
            records = args.records if each is source else None
            result = evaluate(each, settings, records, progress=not args.no_progress, log=lambda _: None)
            print(format_result(result))
            print(f"({time.perf_counter() - started:.1f} s)\n")
            results.append(result)
        if baseline:
            output = compare(results[0], results[1], force=args.force)
            print(format_comparison(output))
            output = {"comparison": output, "before": results[0], "after": results[1]}
        else:
            output = results[0]
        if args.output:
            write_json(output, args.output)
        return 0
    except (EvalError, ModelError, DataError) as error:
        raise SystemExit(f"trl-guided eval: {error}") from None


PARSERS = {
    "resolve-model": _resolve_parser,
    "eval": _eval_parser,
    "report": _report_parser,
    "plot": _plot_parser,
    "chat": _chat_parser,
}


def run_command(command: str, argv: list[str]) -> int:
    """Run one subcommand (a key of PARSERS) with its own flags."""
    args = PARSERS[command]().parse_args(argv)
    return args.func(args)
