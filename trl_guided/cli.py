"""The `trl-guided` command line: a light dispatcher. `trl-guided --help` answers without loading torch or TRL; a
command loads what it needs when it runs (`train`: trl_guided.train; the others: trl_guided.commands)."""

from __future__ import annotations

import argparse
import sys

from . import __version__

# Each command and its one-line summary (its own `--help` says the rest).
COMMANDS = {
    "train": "train with Guided GRPO from a recipe: trl-guided train --config recipes/<model>/<task>.yaml "
    "[--field value ...]",
    "eval": "evaluate a model on a task's test split, or compare two results (docs/evaluation.md)",
    "report": "write one self-contained HTML page of a training run (curves, sample groups, settings, OT)",
    "plot": "write the training curves of a run as PNG files into RUN_DIR/plots/",
    "chat": "chat with a model or a training run's model in the terminal (reads stdin, so it is scriptable)",
    "resolve-model": "print the folder a model name means to train, eval and chat (converts an embedded model on "
    "first use)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-guided",
        description="Guided GRPO for Hugging Face TRL: prefix-shared rollouts and a guidance-focused loss.",
        epilog="`trl-guided COMMAND --help` describes a command's flags; every flag also takes its snake_case "
        "spelling (--max_new_tokens), as TRL's parsers do.",
    )
    parser.add_argument("--version", action="version", version=f"trl-guided {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)  # listed here; parsed by the command itself
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # Imported on demand (the dispatcher's exception to imports at the top): torch and TRL take seconds to load,
        # and `trl-guided --help` needs neither. `train` hands every flag to its own TrlParser.
        from .train import run

        run(argv[1:])
        return 0
    if argv and argv[0] in COMMANDS:
        # Imported on demand, as above: the commands load torch and transformers.
        from .commands import run_command

        return run_command(argv[0], argv[1:])
    parser = build_parser()
    parser.parse_args(argv)  # --help, --version and unknown commands end here
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
