"""The `trl-guided` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .models import EMBEDDED_MODELS, EMBEDDED_PREFIX, resolve_model_path


def _resolve_model(args: argparse.Namespace) -> int:
    print(resolve_model_path(args.name))
    return 0


def _train(argv: list[str]) -> int:
    from .train import run

    run(argv)
    return 0


# ---- report / plot / chat: look at a run ------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    from .report import RunDirError, write_report

    if args.groups < 0:
        raise SystemExit(f"--groups must be >= 0, got {args.groups}.")
    try:
        path = write_report(args.run_dir, args.output, groups=args.groups, ot_plan=not args.no_ot_plan)
    except RunDirError as error:
        raise SystemExit(str(error)) from None
    print(path)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plots import save_pngs
    from .report import RunDirError, load_run

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
    from .chat import run_chat

    return run_chat(args)


def _add_look_commands(commands) -> None:
    report = commands.add_parser(
        "report",
        help="write one self-contained HTML page of a training run (curves, sample groups, settings, OT)",
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

    plot = commands.add_parser(
        "plot",
        help="write the training curves of a run as PNG files into RUN_DIR/plots/",
        description="Write one PNG per curve group (reward, reward spread, segments, completion length, KL, OT, "
        "loss, learning rate) that the run logged, into RUN_DIR/plots/ (or --output).",
    )
    plot.add_argument("run_dir", help="the output_dir of a training run")
    plot.add_argument("--output", "-o", help="directory for the PNG files (default RUN_DIR/plots)")
    plot.set_defaults(func=_plot)

    chat = commands.add_parser(
        "chat",
        help="chat with a model or a training run's model in the terminal (reads stdin, so it is scriptable)",
        description="Multi-turn chat with the chat template, streaming tokens. Commands: /reset clears the "
        "history, /exit quits (so does end of input).",
    )
    chat.add_argument("model", help="a run directory, a checkpoint-N folder, a local model folder, or embedded:NAME")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible answers)")
    chat.set_defaults(func=_chat)


# ---- end of report / plot / chat ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-guided",
        description="Guided GRPO for Hugging Face TRL: prefix-shared rollouts and a guidance-focused loss.",
    )
    parser.add_argument("--version", action="version", version=f"trl-guided {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    resolve = commands.add_parser(
        "resolve-model",
        help="print the local directory of a model name (converts an embedded model on first use)",
        description="Print the local directory for a model name. Embedded models: "
        + ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS),
    )
    resolve.add_argument("name", help="e.g. embedded:smollm2-135m-instruct")
    resolve.set_defaults(func=_resolve_model)

    commands.add_parser(
        "train",
        help="train with Guided GRPO from a recipe: trl-guided train --config recipes/<model>/<task>.yaml",
        description="Train with Guided GRPO. Flags: --config RECIPE.yaml, then any field of the recipe's dataclasses "
        "(TaskArguments, GuidedGRPOConfig, ModelConfig) as --field value; `trl-guided train --help` lists them all.",
        add_help=False,
    )
    # `train` hands every flag to its own TrlParser (see main), this entry only lists it in --help.
    _add_look_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
