"""Text quality of logged completions: the negative log-likelihood per token a frozen model assigns to them.

A reward can rise while the text stops being language (a length reward paid with fragments); the NLL of the
completions under the *base* model rises with it. `run_quality` reads the `completions/*.parquet` files TRL writes
when `log_completions=True` and scores every step's completions (given their prompts) with a model.

    python -m trl_guided.quality RUN_DIR [--model embedded:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from .evaluate import completion_nll as score_texts
from .locate import load_model, locate_model
from .rundir import completion_files


def _text(completion) -> str:
    if isinstance(completion, list | tuple) or hasattr(completion, "tolist"):
        items = completion.tolist() if hasattr(completion, "tolist") else completion
        return "".join(str(m.get("content", "")) for m in items if isinstance(m, dict))
    return str(completion)


def _messages(prompt):
    """A logged prompt (text, or chat messages as a list or parquet array) as `evaluate.completion_nll` wants it."""
    if isinstance(prompt, str):
        return prompt
    items = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    return [{"role": m["role"], "content": m["content"]} for m in items]


def completion_nll(model, tokenizer, prompts: list, completions: list, batch_size: int = 8) -> list[tuple[float, int]]:
    """Per row: (summed NLL of the completion tokens given the prompt, number of completion tokens; 0, 0 if empty).

    The scoring of `trl-guided eval` (`trl_guided.evaluate.completion_nll`), on logged prompts and completions."""
    texts = [_text(completion) for completion in completions]
    scores = score_texts(model, tokenizer, [_messages(p) for p in prompts], texts, batch_size)
    return [score if score is not None else (0.0, 0) for score in scores]


def run_quality(run_dir: str | Path, model=None, tokenizer=None, model_name: str = "embedded:smollm2-135m-instruct"):
    """{step: NLL per token} of the logged completions of a run, plus the last-3 / first-3 steps ratio."""
    if model is None:
        model, tokenizer = load_model(locate_model(model_name))
    files = completion_files(run_dir)
    if not files:
        raise FileNotFoundError(f"No completions/*.parquet in {run_dir}: train with log_completions=True.")
    per_step = {}
    for file in files:
        frame = pd.read_parquet(file)
        scored = completion_nll(model, tokenizer, list(frame["prompt"]), list(frame["completion"]))
        total, count = sum(s for s, _ in scored), sum(n for _, n in scored)
        per_step[int(frame["step"].iloc[0])] = total / max(count, 1)
    steps = sorted(per_step)
    first = sum(per_step[s] for s in steps[:3]) / len(steps[:3])
    last = sum(per_step[s] for s in steps[-3:]) / len(steps[-3:])
    return {
        "nll_per_step": per_step,
        "nll_first3": first,
        "nll_last3": last,
        "nll_ratio": last / first,
        "ppl_first3": math.exp(first),
        "ppl_last3": math.exp(last),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = parser.parse_args(argv)
    report = run_quality(args.run_dir, model_name=args.model)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
