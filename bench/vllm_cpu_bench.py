"""Generation speed on CPU: transformers `generate` (what the trainer's transformers backend calls) against vLLM's CPU
engine (what `trl-guided eval --backend vllm` and TRL's colocated engine run), at a training batch and at an evaluation
batch of the CPU instruction recipe (recipes/smollm2-135m-instruct/instructions_cpu.yaml).

- training batch: 2 prompts x 4 samples, sampled (temperature 1), 160 new tokens: one rollout's worth of rows;
- evaluation batch: 64 test prompts, greedy, 160 new tokens: one held-out evaluation (`heldout_limit: 64`).

Every row generates exactly 160 tokens (EOS ignored), so both engines do the same work and tokens/s compare. Each
call's wall time and CPU time (this process and its children, vLLM's engine core among them) are recorded: on a core
shared with other jobs the CPU time is the work done, the wall time includes the waiting. The
transformers model is float32 (the CPU recipes' `bf16: false`); the vLLM engine runs the dtype `trl-guided eval` gives
it (float32 on CPU, `trl_guided.vllm_engine.engine_dtype`), or `--vllm-dtype` (`auto`: TRL's colocated engine, bfloat16
from this checkpoint); each dtype's numbers are kept under `vllm_<dtype>`. Run with the vLLM venv
(scripts/setup_vllm_env.sh), pinned to one core:

    OMP_NUM_THREADS=1 taskset -c 0 .venv-vllm/bin/python bench/vllm_cpu_bench.py --output bench/vllm_cpu.json

`--only transformers` / `--only vllm` measure one side and merge it into the same file, so the two can run as two
processes side by side (each pinned to the same core).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Before vLLM is imported: offline; a small KV cache (the study's 2 GiB); threads left where taskset put them.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_guided.data import load_task  # noqa: E402
from trl_guided.evaluate import prompt_token_ids  # noqa: E402
from trl_guided.models import resolve_model_path  # noqa: E402
from trl_guided.vllm_engine import engine_dtype  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
NEW_TOKENS = 160
TRAIN_PROMPTS, SAMPLES = 2, 4
EVAL_PROMPTS = 64


def prompts(split: str, count: int, tokenizer) -> list[list[int]]:
    rows = load_task("instructions", split, size=400)
    return [prompt_token_ids(tokenizer, rows[i]["prompt"]) for i in range(count)]


def transformers_call(model, tokenizer, prompt_ids: list[list[int]], samples: int, sample: bool) -> None:
    """One left-padded batched `generate` of `samples` rows per prompt, exactly NEW_TOKENS each."""
    rows = [ids for ids in prompt_ids for _ in range(samples)]
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=pad,
            **options,
        )
    assert out.shape == (len(rows), width + NEW_TOKENS), out.shape


def vllm_call(llm, prompt_ids: list[list[int]], samples: int, sample: bool) -> None:
    from vllm import SamplingParams  # optional: the vLLM venv

    params = SamplingParams(
        n=samples, temperature=1.0 if sample else 0.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=0
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    assert all(len(o.token_ids) == NEW_TOKENS for out in outputs for o in out.outputs)


def transformers_side(path: str, tokenizer, train: list, test: list, repeats: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print("[bench] transformers, training batch", flush=True)
    training = measure(lambda: transformers_call(model, tokenizer, train, SAMPLES, True), repeats)
    print(f"[bench] {training}\n[bench] transformers, evaluation batch", flush=True)
    evaluation = measure(lambda: transformers_call(model, tokenizer, test, 1, False), 1, warm_up=False)
    print(f"[bench] {evaluation}", flush=True)
    return {"dtype": "float32", "training_batch": training, "evaluation_batch": evaluation}


def vllm_side(path: str, train: list, test: list, repeats: int, dtype: str) -> dict:
    from vllm import LLM, __version__  # optional: the vLLM venv

    start, start_cpu = time.perf_counter(), cpu_seconds()
    llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=0, max_model_len=1024, enable_prefix_caching=True)
    started, started_cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    print(f"[bench] vLLM engine started in {started:.0f} s; training batch", flush=True)
    training = measure(lambda: vllm_call(llm, train, SAMPLES, True), repeats)
    print(f"[bench] {training}\n[bench] vLLM, evaluation batch", flush=True)
    evaluation = measure(lambda: vllm_call(llm, test, 1, False), 1, warm_up=False)
    print(f"[bench] {evaluation}", flush=True)
    return {
        "version": __version__,
        "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "engine_start_wall_seconds": round(started, 1),
        "engine_start_cpu_seconds": round(started_cpu, 1),
        "training_batch": training,
        "evaluation_batch": evaluation,
    }


def cpu_seconds() -> float:
    """CPU time of this process and its children (vLLM's engine core runs in one): on a core shared with other jobs
    it counts the work done, where wall time also counts the waiting."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def measure(call, repeats: int, warm_up: bool = True) -> dict:
    """Wall and CPU seconds of `repeats` calls (after one untimed warm-up: first-call allocations, vLLM's first batch
    shapes), and their medians."""
    if warm_up:
        call()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - start_cpu)
    return {
        "wall_seconds": [round(s, 2) for s in wall],
        "cpu_seconds": [round(s, 2) for s in cpu],
        "median_wall_seconds": round(statistics.median(wall), 2),
        "median_cpu_seconds": round(statistics.median(cpu), 2),
    }


def compare(result: dict) -> None:
    """vLLM's speed-up and both engines' tokens per second, per batch and clock, once both sides are measured."""
    if "transformers" not in result:
        return
    for side in [key for key in result if key.startswith("vllm_") and "batch" not in key]:
        for name, rows in (("training_batch", TRAIN_PROMPTS * SAMPLES), ("evaluation_batch", EVAL_PROMPTS)):
            for clock in ("wall", "cpu"):
                hf = result["transformers"][name][f"median_{clock}_seconds"]
                vl = result[side][name][f"median_{clock}_seconds"]
                result[f"{name}_{side}_speedup_{clock}"] = round(hf / vl, 2)
                result[f"{name}_tokens_per_{clock}_second"] = {
                    **result.get(f"{name}_tokens_per_{clock}_second", {}),
                    "transformers": round(rows * NEW_TOKENS / hf, 1),
                    side: round(rows * NEW_TOKENS / vl, 1),
                }


def record(output: Path, side: str, measured: dict, header: dict) -> dict:
    """Merge one side into `output` (the two sides may run as two processes side by side), under a file lock."""
    with open(output.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(output.read_text()) if output.exists() else {}
        if result.get("header") != header:
            result = {"header": header}  # another configuration's results: start over
        result[side] = measured
        compare(result)
        output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".lock").unlink(missing_ok=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("bench/vllm_cpu.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed training-batch calls (after one warm-up)")
    parser.add_argument(
        "--only", choices=("transformers", "vllm"), help="measure one side (merged into --output); default both"
    )
    parser.add_argument(
        "--vllm-dtype", default=engine_dtype(), help="the vLLM engine's dtype (default: what trl-guided eval runs)"
    )
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, test = prompts("train", TRAIN_PROMPTS, tokenizer), prompts("test", EVAL_PROMPTS, tokenizer)
    header = {
        "model": MODEL,
        "cores": threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()},
        "new_tokens_per_row": NEW_TOKENS,
        "training_batch": {"prompts": TRAIN_PROMPTS, "samples": SAMPLES, "sampled": True},
        "evaluation_batch": {"prompts": EVAL_PROMPTS, "samples": 1, "sampled": False},
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    command = f"OMP_NUM_THREADS={omp} taskset -c {cores} {sys.executable} {' '.join(sys.argv)}"
    if args.only in (None, "transformers"):
        measured = transformers_side(path, tokenizer, train, test, args.repeats)
        measured["command"] = command
        result = record(args.output, "transformers", measured, header)
    if args.only in (None, "vllm"):
        measured = vllm_side(path, train, test, args.repeats, args.vllm_dtype)
        measured["command"] = command
        result = record(args.output, f"vllm_{measured['dtype']}", measured, header)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
