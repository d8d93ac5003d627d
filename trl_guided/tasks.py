"""The task and reward options of a run: `TaskArguments` (the task fields of a recipe) and the tables that turn them
into `load_task` options and reward functions, shared by `trl-guided train` and `trl-guided eval`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import TASK_OPTIONS, TASKS
from .rewards import REWARD_FUNCS, get_reward


@dataclass
class TaskArguments:
    _argument_group_name = "Task fields (TaskArguments: the task, its data, rewards, held-out evaluation)"  # --help

    task: str = field(default="length", metadata={"help": f"Task name: {', '.join(TASKS)}."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Local data file (or saved dataset folder) instead of the task's data."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "As in TRL: the dataset to load with `datasets` instead of the task's data: a local file or "
            "folder, a folder written by save_to_disk, or a Hub name (needs the Hub)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "As in TRL: the config of dataset_name."})
    dataset_train_split: str = field(default="train", metadata={"help": "As in TRL: the split trained on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "As in TRL: the held-out split (evaluation, eval_strategy)."}
    )
    eval_size: int = field(default=8, metadata={"help": "Prompts held out for the test split (length task)."})
    dataset_size: int = field(default=1000, metadata={"help": "Rows of a generated task (countdown, ...)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of a generated task (countdown, ...)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Replaces the task's system prompt."})
    arithmetic_mode: str = field(default="evaluate", metadata={"help": "arithmetic: 'evaluate', 'steps' or 'expand'."})
    arithmetic_terms: int = field(default=3, metadata={"help": "arithmetic task: numbers per expression."})
    arithmetic_max_number: int = field(default=20, metadata={"help": "arithmetic task: largest number."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["smooth_length"],
        metadata={"help": f"Reward functions by name: {', '.join(sorted(REWARD_FUNCS))}."},
    )
    length_target: int = field(default=300, metadata={"help": "length rewards: target length in characters."})
    length_tolerance: int = field(default=30, metadata={"help": "smooth_length: no penalty within ± this."})
    length_scale: float = field(default=0.05, metadata={"help": "smooth_length: penalty scale."})
    summary_window: int = field(default=10, metadata={"help": "Steps averaged for the first/last reward summary."})
    eval_before_after: bool = field(
        default=False,
        metadata={
            "help": "Evaluate the starting and the final model on the task's test split (plain sampling) and write "
            "eval_before.json, eval_after.json and comparison.json into output_dir (docs/evaluation.md)."
        },
    )
    # The held-out evaluation's settings (eval_before_after, and `trl-guided eval --config`). Not transformers' eval_*
    # fields, which govern evaluation on eval_dataset during training: hence heldout_* (they were eval_*).
    heldout_limit: int | None = field(
        default=None, metadata={"help": "Held-out evaluation: test problems evaluated (None: the whole split)."}
    )
    heldout_num_samples: int = field(
        default=1, metadata={"help": "Held-out evaluation: samples per test problem (K of pass@K)."}
    )
    heldout_temperature: float = field(
        default=0.0, metadata={"help": "Held-out evaluation: sampling temperature (0: greedy)."}
    )
    heldout_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Held-out evaluation: completion budget (None: max_completion_length)."}
    )


# Old names of renamed fields -> the new ones; refused with a message naming the new name (`recipe.refuse_renamed`).
RENAMED_FIELDS = {
    f"eval_{name}": f"heldout_{name}" for name in ("limit", "num_samples", "temperature", "max_new_tokens")
}


# Reward options: read only by the reward functions named here.
REWARD_FIELDS = {
    "length_target": ("length", "smooth_length"),
    "length_tolerance": ("smooth_length",),
    "length_scale": ("smooth_length",),
}
# Task fields `trl-guided eval` takes from a recipe or a flag (spelled --dataset-size or --dataset_size).
EVAL_TASK_FIELDS = (
    *dict.fromkeys(name for options in TASK_OPTIONS.values() for name in options),
    *REWARD_FIELDS,
)
# The reward each task is scored with when neither a flag nor a recipe names one.
DEFAULT_TASK_REWARDS = {
    "arithmetic": ["arithmetic_accuracy"],
    "countdown": ["countdown"],
    # The reward the recipes train on first (the headline), then the checker alone and its strict score.
    "instructions": ["instruction_following", "constraints_followed", "constraints_all_followed"],
    "gsm8k": ["gsm8k_accuracy"],
    "math": ["math_accuracy"],
    "length": ["smooth_length"],
    "tldr": ["length"],
}


def task_options(task_args: TaskArguments) -> dict:
    """The keyword options of `load_task` that the task fields set (only the fields the task reads, TASK_OPTIONS)."""
    options = {option: getattr(task_args, name) for name, option in TASK_OPTIONS.get(task_args.task, {}).items()}
    if options.get("system_prompt", "") is None:
        del options["system_prompt"]  # the task's own prompt
    return options


def reward_options(task_args: TaskArguments) -> dict[str, dict]:
    """Per reward name, the options the task fields bind (e.g. the length target)."""
    return {
        "length": {"target": task_args.length_target},
        "smooth_length": {
            "target": task_args.length_target,
            "tolerance": task_args.length_tolerance,
            "scale": task_args.length_scale,
        },
    }


def reward_functions_by_name(names: list[str], options: dict[str, dict]) -> list:
    return [get_reward(name, **options.get(name, {})) for name in names]


def reward_functions(task_args: TaskArguments) -> list:
    return reward_functions_by_name(task_args.reward_funcs, reward_options(task_args))
