"""The task and reward options of a run: `TaskArguments` (the task fields of a recipe) and the tables that turn them
into `load_task` options and reward functions, shared by `trl-guided train` and `trl-guided eval`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import TASK_OPTIONS
from .rewards import REWARD_FUNCS, get_reward


@dataclass
class TaskArguments:
    task: str = field(default="length", metadata={"help": "Task name (trl_guided.data.TASKS)."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local data file instead of the default."})
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
    eval_limit: int | None = field(default=None, metadata={"help": "Test problems evaluated (None: the whole split)."})
    eval_num_samples: int = field(default=1, metadata={"help": "Samples per test problem (K of pass@K)."})
    eval_temperature: float = field(default=0.0, metadata={"help": "Evaluation temperature (0: greedy)."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Evaluation completion budget (None: max_completion_length)."}
    )


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
