"""What one prefill and one decode step of the policy cost as the number of rows grows: why sharing a group's prefill
pays on CPU and why drawing spare phase-1 samples up front does not.

    taskset -c 1 env OMP_NUM_THREADS=1 python bench/decode_cost.py --out bench/decode_cost.json
    python bench/decode_cost.py --tiny        # seconds-long smoke run, JSON on stdout

The embedded SmolLM2-135M on one torch thread, no gradient: the prefill of the first instruction prompt of the study's
train split (chat template applied) repeated over 1-8 rows, and one decode step (one new token per row, the prompt in
the KV cache) over 1-16 rows. Medians of `--repeats` timings after one warm-up each.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from harness import Settings, emit, machine_info, median_seconds, progress, resolve_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from trl_guided.data import load_instructions

PREFILL_ROWS = (1, 2, 4, 8)
DECODE_ROWS = (1, 2, 4, 8, 12, 16)


def warm_median_seconds(function, repeats: int) -> float:
    """`median_seconds` after one untimed warm-up call."""
    function()
    return median_seconds(function, repeats)


def prompt_ids(tokenizer) -> list[int]:
    """The first train prompt of the instruction task, as TRL tokenizes a conversational prompt."""
    prompt = load_instructions("train")[0]["prompt"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def run(model_path: str, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = prompt_ids(tokenizer)
    prefill, decode = {}, {}
    with torch.no_grad():
        for rows in PREFILL_ROWS:
            batch = torch.tensor([ids] * rows)
            prefill[rows] = warm_median_seconds(lambda batch=batch: model(input_ids=batch, logits_to_keep=1), repeats)
            progress("decode_cost", f"prefill, {rows} rows: {prefill[rows]:.3f} s")
        for rows in DECODE_ROWS:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([ids] * rows), past_key_values=cache, logits_to_keep=1)
            token = torch.zeros((rows, 1), dtype=torch.long)

            def step(token=token, cache=cache):  # each timing decodes the next position (the cache grows a token)
                model(input_ids=token, past_key_values=cache, logits_to_keep=1)

            decode[rows] = warm_median_seconds(step, repeats)
            progress("decode_cost", f"decode step, {rows} rows: {decode[rows]:.4f} s")
    return {
        "benchmark": "decode_cost",
        "machine": machine_info(),
        "model": model_path,
        "prompt_tokens": len(ids),
        "repeats": repeats,
        "prefill_seconds_by_rows": prefill,
        "decode_step_seconds_by_rows": decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny local model: a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement (median)")
    parser.add_argument("--out", default="-", help="also write the JSON here ('-': stdout only)")
    args = parser.parse_args()
    settings = Settings.tiny() if args.tiny else Settings()
    emit(run(resolve_model(settings), args.repeats), args.out)


if __name__ == "__main__":
    main()
