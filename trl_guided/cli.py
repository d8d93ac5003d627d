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
