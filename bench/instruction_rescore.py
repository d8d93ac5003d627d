"""What would `instruction_following` have said of a training run on the checker alone? Re-scores the completions a
run logged (`completions/*.parquet`, log_completions: true) and prints, per run, the checker's and the new reward's
mean over the first and the last ten logged steps, and how many of the first step's groups (the starting model's
samples) each reward spreads. The constraints of each logged prompt come from the recipe's
train split (the prompt's text finds its row).

    python bench/instruction_rescore.py --recipe recipes/smollm2-135m-instruct/instructions_cpu.yaml \
        bench/decisive/phase2/plain-s42 bench/decisive/phase2/plain-s43 [...] --out bench/instruction_rescore.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import yaml
from harness import emit

from trl_guided.data import load_task
from trl_guided.quality import _messages, _text
from trl_guided.rewards import instruction_following
from trl_guided.rundir import completion_files
from trl_guided.tasks import TaskArguments, task_options

WINDOW = 10  # logged steps averaged at each end
REWARDS = ("constraints_followed", "instruction_following")


def train_constraints(recipe: dict) -> dict[str, str]:
    """The user message of each train prompt -> its constraints column."""
    fields = {k: v for k, v in recipe.items() if k in TaskArguments.__dataclass_fields__ and k != "reward_funcs"}
    train = load_task(recipe["task"], "train", **task_options(TaskArguments(**fields)))
    return {
        prompt[-1]["content"]: constraints
        for prompt, constraints in zip(train["prompt"], train["constraints"], strict=True)
    }


def rescore(run: Path, constraints_of: dict[str, str]) -> dict:
    """Both rewards' means over the first and last WINDOW logged steps of one run."""
    frames = []
    for path in completion_files(run):
        frame = pd.read_parquet(path)
        frame["step"] = int(path.stem.rsplit("_", 1)[-1])
        frames.append(frame)
    logged = pd.concat(frames, ignore_index=True)
    prompts = [_messages(p) for p in logged["prompt"]]
    columns = {"prompts": prompts, "constraints": [constraints_of[p[-1]["content"]] for p in prompts]}
    logged["instruction_following"] = instruction_following([_text(c) for c in logged["completion"]], **columns)
    logged["request"] = [p[-1]["content"] for p in prompts]
    steps = sorted(logged["step"].unique())
    ends = {"first": logged[logged["step"].isin(steps[:WINDOW])], "last": logged[logged["step"].isin(steps[-WINDOW:])]}
    first = logged[logged["step"] == steps[0]].groupby("request")  # the starting model's groups (no update yet)
    return {
        **{
            f"{end}_{WINDOW}_steps": {name: statistics.fmean(rows[name]) for name in REWARDS}
            for end, rows in ends.items()
        },
        "first_step_groups": {
            name: {"groups": len(first), "with_spread": int(sum(g[name].std(ddof=0) > 0 for _, g in first))}
            for name in REWARDS
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders with completions/*.parquet")
    parser.add_argument("--recipe", required=True, help="the recipe the runs trained with")
    parser.add_argument("--out", help="write the measures as JSON here")
    args = parser.parse_args(argv)
    constraints_of = train_constraints(yaml.safe_load(Path(args.recipe).read_text()))
    emit({run: rescore(Path(run), constraints_of) for run in args.runs}, args.out or "-")


if __name__ == "__main__":
    main()
