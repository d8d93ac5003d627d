"""Reading a training run's output folder, in one place: its log history (`trainer_state.json`, else the newest
checkpoint's), its settings (`run_config.json`), the first/last-window training reward, and the sample groups of its
`completions/*.parquet`. `trl-guided report`, `plot` and `quality` read runs through this module; which model a run
folder holds is `trl_guided.locate.locate_model`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .checkpoints import checkpoints_newest_first


class RunDirError(Exception):
    """A run directory that cannot be reported on; the message is one line saying what is wrong and what to do."""


@dataclass
class Run:
    path: Path
    history: list[dict]
    state: dict
    training: dict = field(default_factory=dict)  # GuidedGRPOConfig fields
    task: dict = field(default_factory=dict)  # TaskArguments fields (runs started with `trl-guided train`)
    model: str | None = None
    notes: list[str] = field(default_factory=list)  # what is missing or unreadable, shown on the page

    @property
    def completion_files(self) -> list[Path]:
        return completion_files(self.path)


def completion_files(run_dir: str | Path) -> list[Path]:
    """The `completions/completions_<step>.parquet` files TRL writes with `log_completions`, in step order."""
    return sorted(Path(run_dir, "completions").glob("completions_*.parquet"))


def load_run(run_dir: str | Path) -> Run:
    """Read what a run directory holds; raise `RunDirError` only when there is no log history at all."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory; give the output_dir of a training run.")
    notes = []
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        checkpoints = [c / "trainer_state.json" for c in checkpoints_newest_first(path)]
        checkpoints = [c for c in checkpoints if c.is_file()][::-1]
        if not checkpoints:
            raise RunDirError(
                f"{path} has no trainer_state.json (nor a checkpoint-*/trainer_state.json): it is not the output_dir "
                "of a training run, or the run stopped before its first save."
            )
        state_file = checkpoints[-1]
        notes.append(
            f"No trainer_state.json at the top (the run did not finish?): read {state_file.relative_to(path)}."
        )
    try:
        state = json.loads(state_file.read_text())
        history = list(state["log_history"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunDirError(f"{state_file} is not a readable trainer state ({type(error).__name__}: {error}).") from None
    run = Run(path=path, history=history, state=state, notes=notes)
    _read_config(run)
    return run


def _read_config(run: Run) -> None:
    """Settings from `run_config.json` (written by `trl-guided train`), else from TRL's `training_args.bin`."""
    config_file = run.path / "run_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
            run.training, run.task = dict(config.get("training", {})), dict(config.get("task", {}))
            run.model = config.get("model", {}).get("model_name_or_path")
            return
        except (OSError, ValueError, AttributeError) as error:
            run.notes.append(f"run_config.json is unreadable ({type(error).__name__}); settings taken from elsewhere.")
    if (run.path / "training_args.bin").is_file():
        # A pickle: loading it could run any code the file carries, so the report never unpickles it.
        run.notes.append(
            "No run_config.json (written by `trl-guided train`): the settings are unknown; training_args.bin is a "
            "pickle and is not loaded."
        )
    else:
        run.notes.append("No run_config.json or training_args.bin: the settings are unknown.")
    if run.model is None:
        model_config = run.path / "config.json"
        if model_config.is_file():
            try:
                run.model = json.loads(model_config.read_text()).get("_name_or_path") or None
            except ValueError:
                pass


# ------------------------------------------------------------------------------------------------------ numbers


def read_comparison(run_dir: str | Path) -> tuple[Any, str | None]:
    """`comparison.json` (the before/after evaluation of `eval_before_after`): (its data, None), (None, None) when the
    run has none, or (None, the error's name) when it cannot be read."""
    path = Path(run_dir) / "comparison.json"
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as error:
        return None, type(error).__name__


def first_last_reward(log_history: list[dict], window: int) -> dict:
    """Mean training reward over the first and the last `window` logged steps (at most half the steps each), with
    the number of steps and the window used; {} when no step logged a reward."""
    rewards = [e["reward"] for e in log_history if "loss" in e and isinstance(e.get("reward"), (int, float))]
    if not rewards:
        return {}
    window = max(1, min(window, len(rewards) // 2 or 1))
    first = sum(rewards[:window]) / window
    last = sum(rewards[-window:]) / window
    return {"steps": len(rewards), "window": window, "reward_first": first, "reward_last": last}


def headline(run: Run) -> dict[str, Any]:
    """Steps, wall time and the first/last mean training reward (the `summary.json` window when there is one)."""
    train_steps = [e for e in run.history if "loss" in e and "step" in e]
    window = None
    summary_file = run.path / "summary.json"
    if summary_file.is_file():
        try:
            window = json.loads(summary_file.read_text()).get("window")
        except ValueError:
            pass
    if not isinstance(window, int) or window < 1:
        window = 10
    runtime = next((e["train_runtime"] for e in reversed(run.history) if "train_runtime" in e), None)
    out = {
        "steps": run.state.get("global_step", train_steps[-1]["step"] if train_steps else 0),
        "max_steps": run.state.get("max_steps"),
        "wall_time": runtime,
        "window": window,
    }
    rewards = first_last_reward(train_steps, window)
    out.update({key: rewards[key] for key in ("window", "reward_first", "reward_last") if key in rewards})
    return out


# ------------------------------------------------------------------------------------------------- sample groups


@dataclass
class Branch:
    guidance: str
    postfix: str
    completion: str
    rewards: dict[str, float]
    reward: float
    advantage: float


@dataclass
class Group:
    step: int
    index: int  # position of the group in the logged batch
    prompt: str
    system: str
    prefix: str | None  # None: the parquet has no segment columns (guidance off)
    branches: list[Branch]


def message_text(value: Any) -> str:
    """A prompt/completion cell as text: the last message's content of a conversation, or the string itself."""
    if isinstance(value, str):
        return value
    try:
        messages = list(value)
    except TypeError:
        return str(value)
    if messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return str(value)


def _system(value: Any) -> str:
    if isinstance(value, str):
        return ""
    try:
        return next(
            (str(m.get("content", "")) for m in value if isinstance(m, dict) and m.get("role") == "system"), ""
        )
    except TypeError:
        return ""


def read_groups(
    path: Path, reward_names: list[str], weights: list[float] | None, group_size: int | None
) -> list[Group]:
    """The prompt groups of one completions parquet (rows of a group are consecutive, as TRL logs them)."""
    table = pd.read_parquet(path)
    if table.empty:
        return []
    if not reward_names:
        fixed = {"step", "prompt", "completion", "advantage", "prefix", "guidance", "postfix", "image"}
        reward_names = [c for c in table.columns if c not in fixed and pd.api.types.is_numeric_dtype(table[c])]
    reward_names = [name for name in reward_names if name in table.columns]
    if not weights or len(weights) != len(reward_names):
        weights = [1.0] * len(reward_names)
    segmented = {"prefix", "guidance", "postfix"} <= set(table.columns)
    keys = [
        (p if isinstance(p, str) else repr(list(p)), table["prefix"].iat[i] if segmented else "")
        for i, p in enumerate(table["prompt"])
    ]
    if (
        not group_size
        or len(table) % group_size
        or any(
            keys[i] != keys[start]
            for start in range(0, len(table), group_size)
            for i in range(start, start + group_size)
        )
    ):
        # No (or an inconsistent) num_generations: groups are runs of rows with the same prompt and prefix.
        starts = [i for i in range(len(table)) if i == 0 or keys[i] != keys[i - 1]]
    else:
        starts = list(range(0, len(table), group_size))
    bounds = list(zip(starts, [*starts[1:], len(table)], strict=True))
    groups = []
    for index, (start, end) in enumerate(bounds):
        rows = table.iloc[start:end]
        branches = []
        for _, row in rows.iterrows():
            rewards = {name: float(row[name]) for name in reward_names}
            total = sum(w * r for w, r in zip(weights, rewards.values(), strict=True) if not math.isnan(r))
            branches.append(
                Branch(
                    guidance=str(row["guidance"]) if segmented else "",
                    postfix=str(row["postfix"]) if segmented else "",
                    completion=message_text(row["completion"]),
                    rewards=rewards,
                    reward=total,
                    advantage=float(row["advantage"]) if "advantage" in row else float("nan"),
                )
            )
        branches.sort(key=lambda b: -b.reward if math.isfinite(b.reward) else math.inf)
        first = rows.iloc[0]
        groups.append(
            Group(
                step=int(first["step"]) if "step" in first else _file_step(path),
                index=index,
                prompt=message_text(first["prompt"]),
                system=_system(first["prompt"]),
                prefix=str(first["prefix"]) if segmented else None,
                branches=branches,
            )
        )
    return groups


def _file_step(path: Path) -> int:
    """The step in a `completions_<step>.parquet` name (-1 when it has none)."""
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else -1
