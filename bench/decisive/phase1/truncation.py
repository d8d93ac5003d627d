"""Truncation at smaller budgets from a training run's completions (sampled at temperature 1 with budget B_max).

A completion truncated at budget b is one that had not ended by its b-th token, so with the run's budget B_max >= b:
truncated_at(b) = completion length >= b tokens. The run saves text, not token ids, so lengths are re-tokenized; a
sample at temperature 1 is often not the canonical tokenization of its text (odd characters, broken words), so the
re-tokenized length is shorter than the generated one and these shares are LOWER BOUNDS (attempt 1: 0.18 at 256 where
the trainer logged 0.31 clipped). The trainer's own `completions/clipped_ratio` is exact at the run's budget.
Usage: python truncation.py RUN_DIR B_MAX [STEPS ...] (steps: which completions_000NN.parquet, default all).
"""

import json
import sys
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer

from trl_guided.models import resolve_model_path

run, budget_max = Path(sys.argv[1]), int(sys.argv[2])
steps = {int(s) for s in sys.argv[3:]}
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
files = sorted((run / "completions").glob("completions_*.parquet"))
files = [f for f in files if not steps or int(f.stem.split("_")[1]) in steps]
frame = pd.concat([pd.read_parquet(f) for f in files])
lengths = [len(tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"]) for c in frame["completion"]]
out = {"run": str(run), "steps": [int(f.stem.split("_")[1]) for f in files], "samples": len(lengths)}
for budget in (128, 160, 192, 224, 256):
    if budget <= budget_max:
        out[f"truncated_at_{budget}"] = round(sum(n >= budget for n in lengths) / len(lengths), 3)
out["median_tokens"] = sorted(lengths)[len(lengths) // 2]
print(json.dumps(out))
