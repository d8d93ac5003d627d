"""A training recipe, read once and checked before anything is built: `parse_args` turns a command line
(`--config RECIPE.yaml` plus `--field value` flags) into (TaskArguments, GuidedGRPOConfig, ModelConfig), or exits with
one line naming what is wrong and how to fix it.

The recipe holds the fields of the three dataclasses; command-line flags override it. Unknown keys, values of the wrong
type, settings no part of the run reads and objects a YAML value cannot express are refused; settings a switch turns
off are named in one warning.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path
from types import UnionType

import torch
import yaml
from trl import GRPOConfig, ModelConfig, TrlParser

from .config import GuidedGRPOConfig, vllm_training_refusal
from .data import TASK_OPTIONS, TASKS
from .rewards import get_reward
from .tasks import RENAMED_FIELDS, REWARD_FIELDS, TaskArguments

logger = logging.getLogger("trl_guided.train")


def read_recipe(path: str) -> dict:
    """The recipe's mapping of field: value; SystemExit (one line) when the file is missing or not a mapping."""
    if not Path(path).is_file():
        raise SystemExit(f"Recipe file not found: {path}")
    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: a recipe must be a YAML mapping of field: value.")
    return config


def import_next_to(recipe: str) -> None:
    """Put the recipe's folder on the import path, after the working directory, so that a reward function named by
    a dotted path (`my_task.reward_polite`) may live in a module next to the recipe."""
    folder = str(Path(recipe).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(1, folder)


class ModelArguments(ModelConfig):
    """TRL's ModelConfig under its own heading in `trl-guided train --help` (HfArgumentParser groups the fields of a
    dataclass that names an `_argument_group_name`)."""

    _argument_group_name = "Model fields (TRL's ModelConfig)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (as HfArgumentParser does), the description kept as written."""


TRAIN_USAGE = "trl-guided train --config RECIPE.yaml [--FIELD VALUE ...]"
TRAIN_DESCRIPTION = """\
Train with Guided GRPO from a recipe: a YAML mapping of the fields listed below, e.g.
  trl-guided train --config recipes/smollm2-135m-instruct/length_cpu.yaml --max_steps 10 --output_dir runs/try
  accelerate launch --config_file zero3.yaml -m trl_guided.train --config RECIPE.yaml
Flags after --config override the recipe (--field_name or --field-name). An unknown key, a value of the wrong type
or a setting no part of the run reads stops the run with one line before anything is written. Recipes and their
fields: docs/recipes.md, docs/configuration.md."""


def make_parser() -> TrlParser:
    return TrlParser(
        (TaskArguments, GuidedGRPOConfig, ModelArguments),
        prog="trl-guided train",
        usage=TRAIN_USAGE,
        description=TRAIN_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )


DATACLASSES = (TaskArguments, GuidedGRPOConfig, ModelArguments)


def _field_types() -> dict[str, object]:
    types: dict[str, object] = {}
    for cls in DATACLASSES:
        types.update(typing.get_type_hints(cls))
    return {name: kind for name, kind in types.items() if not name.startswith("_")}


def _unknown_keys(strings: list[str], source: str) -> SystemExit:
    names = list(_field_types())
    keys = [s[2:].split("=")[0] for s in strings if s.startswith("--")] or strings
    described = []
    for key in keys:
        close = difflib.get_close_matches(key, names, n=1)
        described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return SystemExit(
        f"{source}: unknown key(s) {', '.join(described)}. Every key must be a field of TaskArguments, "
        "GuidedGRPOConfig or ModelConfig; `trl-guided train --help` lists them."
    )


# Fields that hold library objects: HfArgumentParser would pass a YAML value through unchecked.
OBJECT_FIELDS = {
    "parallelism_config": "it is an accelerate ParallelismConfig; configure parallelism in the accelerate config "
    "(`accelerate launch --config_file ...`) or build GuidedGRPOConfig in Python.",
}


def _check_keys_before_building(argv: list[str], recipe: str | None, config: dict) -> None:
    """Unknown keys fail before any config is built: TRL's and transformers' own checks run while the configs are
    built and would otherwise report a consequence (e.g. bf16 on a machine without GPU) instead of the typo."""
    names = set(_field_types()) | {"config", "help", "h"}
    given = [t[2:].split("=")[0] for t in argv if t.startswith("--")] + list(config)
    refuse_renamed(given, recipe or "command line")
    for key in sorted(set(given) & set(OBJECT_FIELDS)):
        raise SystemExit(f"{key} cannot be set from a recipe or the command line: {OBJECT_FIELDS[key]}")
    unknown = [key for key in config if key not in names and key != "env"]
    if unknown:
        raise _unknown_keys(unknown, recipe)
    flags = [token for token in argv if token.startswith("--")]
    unknown = [flag for flag in flags if flag[2:].split("=")[0] not in names]
    if unknown:
        raise _unknown_keys(unknown, "command line")


def refuse_renamed(keys, source: str) -> None:
    """SystemExit naming the new name of every renamed field among `keys` (a recipe's keys or flag names)."""
    old = [key for key in dict.fromkeys(k.replace("-", "_") for k in keys) if key in RENAMED_FIELDS]
    if old:
        renames = ", ".join(f"{key} -> {RENAMED_FIELDS[key]}" for key in old)
        raise SystemExit(
            f"{source}: renamed field(s): {renames}. The held-out evaluation's settings are heldout_*, apart from "
            "transformers' eval_* fields (evaluation on eval_dataset during training); rename them."
        )


def _config_error(error: Exception) -> SystemExit:
    """An error raised while TRL / transformers / GuidedGRPOConfig build the configs, as one line with the fix."""
    message = " ".join(str(error).split())  # TRL and transformers spread some messages over several lines
    if "bf16/gpu" in message or ("fp16" in message and "gpu" in message.lower()):
        return SystemExit(
            "No GPU found for this recipe's bf16/fp16 settings: set `use_cpu: true` and `bf16: false` in the recipe "
            "(or pass --use_cpu true --bf16 false), or use a CPU recipe (recipes/smollm2-135m-instruct/*_cpu.yaml)."
        )
    return SystemExit(f"Invalid configuration: {message}")


def _check_recipe_types(recipe: str, config: dict) -> None:
    """Scalar fields must get scalars of their type: `num_generations: four` fails here, naming key and file."""
    types = _field_types()
    for key, value in config.items():
        annotation = types.get(key)
        union = typing.get_origin(annotation) in (typing.Union, UnionType)
        candidates = typing.get_args(annotation) if union else (annotation,)
        if value is None and annotation is not None and type(None) not in candidates:
            raise SystemExit(f"{recipe}: {key} cannot be null; give a value or leave the key out for its default.")
        candidates = tuple(t for t in candidates if t is not type(None))
        lists = [typing.get_args(t)[0] for t in candidates if typing.get_origin(t) is list and typing.get_args(t)]
        if lists and lists[0] in (int, float, str) and isinstance(value, list):
            wrong = [item for item in value if not isinstance(item, lists[0]) or isinstance(item, bool)]
            if wrong and not (lists[0] is float and all(isinstance(i, int) for i in wrong)):
                raise SystemExit(f"{recipe}: {key} must be a list of {lists[0].__name__}, got {value!r}.")
            continue
        if not all(t in (int, float, bool, str) for t in candidates):
            continue  # dicts, enums, other lists: left to the parser
        allowed = candidates
        if not allowed or value is None:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join(t.__name__ for t in allowed)
            raise SystemExit(f"{recipe}: {key} must be {expected}, got {value!r}.")


def validate(task_args: TaskArguments) -> None:
    """Fail before anything is written when the task, a reward or a data file does not exist."""
    if task_args.task not in TASKS:
        close = difflib.get_close_matches(task_args.task, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SystemExit(f"Unknown task {task_args.task!r}; known tasks: {sorted(TASKS)}.{hint}")
    for name in task_args.reward_funcs:
        try:
            get_reward(name)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if task_args.dataset_path is not None and not Path(task_args.dataset_path).exists():
        raise SystemExit(f"dataset_path={task_args.dataset_path!r} does not exist.")
    if task_args.dataset_path is not None and task_args.dataset_name is not None:
        raise SystemExit("dataset_path and dataset_name both name the data: keep one of them.")


# Fields that act only while a switch is on. Set while it is off, they are named in one warning rather than refused,
# so that flipping the switch (`--guidance false` for a plain-GRPO baseline) keeps the rest of a recipe.
GUIDED_FIELDS = {f.name for f in fields(GuidedGRPOConfig) if f.name not in {g.name for g in fields(GRPOConfig)}}
SWITCHES = (
    (
        "guidance: false",
        lambda t, c, m: not c.guidance,
        GUIDED_FIELDS - {"guidance"} - {n for n in GUIDED_FIELDS if n.startswith("ot_")},
    ),
    (
        "ot_coef: 0",
        lambda t, c, m: c.ot_coef == 0,
        {n for n in GUIDED_FIELDS if n.startswith("ot_") and n != "ot_coef"},
    ),
    (
        "branch_snap_to_punctuation: false",
        lambda t, c, m: not c.branch_snap_to_punctuation,
        {"branch_snap_window"},
    ),
    (
        "guidance_loss_scope is not guidance_postfix",
        lambda t, c, m: c.guidance_loss_scope != "guidance_postfix",
        {"postfix_decay", "postfix_min_weight"},
    ),
    (
        "use_peft: false",
        lambda t, c, m: not m.use_peft,
        {f.name for f in fields(ModelConfig) if f.name.startswith("lora_")} | {"use_rslora", "use_dora"},
    ),
    (
        "load_in_4bit: false",
        lambda t, c, m: not m.load_in_4bit,
        {"bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"},
    ),
    (
        "eval_before_after: false",
        lambda t, c, m: not t.eval_before_after,
        {"heldout_limit", "heldout_num_samples", "heldout_temperature", "heldout_max_new_tokens"},
    ),
)


def explicit_keys(argv: list[str], config: dict) -> set[str]:
    """The fields the recipe (its mapping, `read_recipe`) and the command line set."""
    keys = {token[2:].split("=")[0] for token in argv if token.startswith("--")} - {"config"}
    return keys | set(config) - {"env"}


def unused_settings(keys: set[str], task_args, training_args, model_args) -> tuple[list[str], list[str]]:
    """(errors, warnings) for set fields that cannot act in this run: a field the task or the rewards never read is an
    error; a field a switch turned off is a warning."""
    errors, warnings_ = [], []
    task_fields = {name for options in TASK_OPTIONS.values() for name in options}
    read = TASK_OPTIONS.get(task_args.task, {})
    for name in sorted(keys & task_fields - set(read)):
        reads = ", ".join(read) or "none of the task options"
        errors.append(f"{name} is not read by task {task_args.task!r} (it reads {reads}); remove it")
    for name in sorted(keys & set(REWARD_FIELDS)):
        if not set(REWARD_FIELDS[name]) & set(task_args.reward_funcs):
            errors.append(
                f"{name} is read by the {' / '.join(REWARD_FIELDS[name])} reward only, which reward_funcs "
                f"({', '.join(task_args.reward_funcs)}) does not include; remove it"
            )
    for switch, is_off, names in SWITCHES:
        unused = sorted(keys & names)
        if unused and is_off(task_args, training_args, model_args):
            warnings_.append(f"{', '.join(unused)} will have no effect ({switch})")
    return errors, warnings_


def parse_args(argv: list[str]):
    """(TaskArguments, GuidedGRPOConfig, ModelConfig) from a command line, after every check; SystemExit with one line
    for anything that is wrong or cannot take effect."""
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    config = read_recipe(recipe) if recipe is not None else {}
    if recipe is not None:
        import_next_to(recipe)
    _check_recipe_types(recipe, config)
    _check_keys_before_building(argv, recipe, config)
    try:
        task_args, training_args, model_args, from_recipe, from_command_line = make_parser().parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError, OSError) as error:  # e.g. accelerator_config: an unknown key, a missing file
        raise _config_error(error) from None
    if from_recipe:
        raise _unknown_keys(from_recipe, recipe or "recipe")
    if from_command_line:
        raise _unknown_keys(from_command_line, "command line")
    validate(task_args)
    validate_model_args(model_args)
    errors, unused = unused_settings(explicit_keys(argv, config), task_args, training_args, model_args)
    if errors:
        raise SystemExit("Settings that cannot take effect: " + "; ".join(errors) + ".")
    for line in unused:
        logger.warning("Unused setting: %s.", line)
    check_deepspeed_without_gpu(training_args)
    refusal = vllm_training_refusal(training_args)  # before the model, the starting evaluation or the engine load
    if refusal:
        raise SystemExit(refusal)
    if str(training_args.resume_from_checkpoint).lower() in ("true", "last"):
        training_args.resume_from_checkpoint = True  # the last checkpoint in output_dir
    elif str(training_args.resume_from_checkpoint).lower() == "auto":
        training_args.resume_from_checkpoint = "auto"  # the last checkpoint if there is one (a requeued job)
    return task_args, training_args, model_args


def check_deepspeed_without_gpu(training_args: GuidedGRPOConfig) -> None:
    """DeepSpeed (`accelerate launch` with a DeepSpeed config) on a machine without a GPU needs `use_cpu`: without it
    the processes disagree on the batch size and DeepSpeed stops with a `train_batch_size` mismatch."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or training_args.deepspeed
    if deepspeed and not torch.cuda.is_available() and not training_args.use_cpu:
        raise SystemExit(
            "DeepSpeed on a machine without a GPU: set `use_cpu: true` and `bf16: false` in the recipe (or pass "
            "--use_cpu true --bf16 false), as with recipes/accelerate/zero3_cpu.yaml; on GPUs, check that CUDA is "
            "visible to this process."
        )


def model_init_kwargs(model_args: ModelConfig) -> dict:
    """The `ModelConfig` fields that reach `from_pretrained`, as TRL's own `grpo.py` forwards them (quantization goes
    to the trainer as `quantization_config`, PEFT as `peft_config`)."""
    kwargs = {"revision": model_args.model_revision}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def validate_model_args(model_args: ModelConfig) -> None:
    """Refuse, in one line, what cannot take effect here instead of failing deep inside model loading."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not torch.cuda.is_available():
        raise SystemExit(
            "load_in_4bit / load_in_8bit quantize with bitsandbytes, which needs a CUDA GPU; none was found. Remove "
            "them (or set them to false) to train in full precision on this machine."
        )
