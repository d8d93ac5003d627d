"""What the instructions task's reward costs a training step at the decisive study's shape: 2 prompts x 4 samples of
up to 160 tokens, one thread. Times `instruction_following` on real answers (the starting model's, from an
evaluation record file) beside the checker alone (`constraints_followed`) and, for the choice of design, a forward
pass of the frozen SmolLM2-135M over the same answers given the request alone (what a CALIF-style likelihood term
would add to every step). The study's step took 49-54 s (median, bench/learning_decisive.json).

    OMP_NUM_THREADS=1 taskset -c 0 python bench/instruction_reward_cost.py \
        bench/decisive/phase1/start/eval_start.jsonl --recipe recipes/smollm2-135m-instruct/instructions_cpu.yaml \
        --out bench/instruction_reward_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml
from answer_position import _test_problems
from constraint_kinds import answer_text, problem_specs
from harness import emit, median_seconds

from trl_guided.evaluate import completion_nll, read_records
from trl_guided.instruction_reward import embedder, request_text
from trl_guided.locate import load_model, locate_model
from trl_guided.rewards import constraints_followed, instruction_following

PROMPTS, SAMPLES = 2, 4  # the study's step: 2 prompts x 4 samples
STEP_SECONDS = 49.0  # the shortest median step of the decisive study's arms (bench/learning_decisive.json)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="an evaluation record file (.jsonl) of the instructions task's test split")
    parser.add_argument("--recipe", required=True, help="the recipe the records were evaluated with")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write the timings as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    specs = problem_specs(_test_problems(recipe))
    # The longest answers (the 160-token budget), as many as a step scores: PROMPTS problems x SAMPLES answers.
    records = sorted(read_records(args.records), key=lambda r: -len(answer_text(r)))[: PROMPTS * SAMPLES]
    columns = {
        "prompts": [r["prompt"] for r in records],
        "constraints": [json.dumps(specs[int(r["problem_id"].split("-", 1)[0])]) for r in records],
    }
    answers = [answer_text(r) for r in records]
    started = time.perf_counter()
    embedder()
    load_seconds = time.perf_counter() - started
    reward = median_seconds(lambda: instruction_following(answers, **columns), args.repeats)
    checker = median_seconds(lambda: constraints_followed(answers, **columns), args.repeats)
    model, tokenizer = load_model(locate_model(recipe["model_name_or_path"]))
    tokenizer.padding_side = "right"
    requests = [
        [{"role": "user", "content": request_text(r["prompt"], json.loads(c))}]
        for r, c in zip(records, columns["constraints"], strict=True)
    ]
    likelihood = median_seconds(
        lambda: completion_nll(model, tokenizer, requests, answers, 8), max(3, args.repeats // 5)
    )
    result = {
        "command": "OMP_NUM_THREADS=1 taskset -c 0 python bench/instruction_reward_cost.py " + args.records,
        "completions": len(answers),
        "completion_tokens": [int(r["tokens"]) for r in records],
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine's 2 cores slow every timing
        "instruction_following_seconds": reward,
        "constraints_followed_seconds": checker,
        "wordllama_load_seconds_once": load_seconds,
        "reference_model_likelihood_seconds": likelihood,
        "step_seconds": STEP_SECONDS,
        "instruction_following_share_of_step": reward / STEP_SECONDS,
        "reference_model_likelihood_share_of_step": likelihood / STEP_SECONDS,
    }
    emit(result, args.out or "-")


if __name__ == "__main__":
    main()
