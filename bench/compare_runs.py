"""Compare a guided and a vanilla (`guidance: false`) training run on GPUs: one JSON object of ratios (bench/GPU.md).

Reads each run directory's `trainer_state.json` (TRL's per-step `step_time`, completion lengths, guidance metrics),
and when present `nvidia-smi.csv` (lines `index, memory.used` in MiB, sampled while the run trained) and
`vllm-metrics.txt` (scrapes of the vLLM server's /metrics). The first `--skip` steps are warm-up and dropped.

    python bench/compare_runs.py --guided runs/bench-1.5b/guided --vanilla runs/bench-1.5b/vanilla
    python bench/compare_runs.py --guided runs/bench-7b/guided --vanilla runs/bench-7b/vanilla --exclude-gpus 0
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

VLLM_COUNTERS = ("generation_tokens", "prompt_tokens", "prefix_cache_queries", "prefix_cache_hits")


def step_metrics(run: Path, skip: int) -> dict[str, Any]:
    logs = json.loads((run / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in logs if "step_time" in entry][skip:]
    if not steps:
        raise SystemExit(f"{run}: no logged steps after skipping {skip}; train longer or lower --skip.")
    result: dict[str, Any] = {
        "steps": len(steps),
        "step_time_median": statistics.median(entry["step_time"] for entry in steps),
        "step_time": [entry["step_time"] for entry in steps],
    }
    keys = {key for entry in steps for key in entry if key.startswith(("completions/mean_length", "guidance/"))}
    for key in sorted(keys):
        result[key] = statistics.mean(entry[key] for entry in steps if key in entry)
    return result


def peak_gpu_memory(run: Path, exclude: set[int]) -> float | None:
    path = run / "nvidia-smi.csv"
    if not path.exists():
        return None
    peaks: dict[int, float] = {}
    for line in path.read_text().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and int(fields[0]) not in exclude:
            peaks[int(fields[0])] = max(peaks.get(int(fields[0]), 0.0), float(fields[1]))
    return max(peaks.values(), default=None)


def vllm_counters(run: Path) -> dict[str, float]:
    """Last scraped value of each vLLM counter (they only grow while the server lives)."""
    path = run / "vllm-metrics.txt"
    if not path.exists():
        return {}
    last: dict[str, float] = {}
    pattern = re.compile(r"^vllm:(" + "|".join(VLLM_COUNTERS) + r")(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+]+)$")
    for line in path.read_text().splitlines():
        match = pattern.match(line.strip())
        if match:
            last[match.group(1)] = float(match.group(2))
    if last.get("prefix_cache_queries"):
        last["prefix_cache_hit_rate"] = last.get("prefix_cache_hits", 0.0) / last["prefix_cache_queries"]
    return last


def ratio(guided: float | None, vanilla: float | None) -> float | None:
    return None if guided is None or not vanilla else guided / vanilla


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guided", type=Path, required=True)
    parser.add_argument("--vanilla", type=Path, required=True)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps to drop (default 5)")
    parser.add_argument("--exclude-gpus", default="", help="comma-separated GPU indices to leave out (the vLLM GPU)")
    args = parser.parse_args()
    exclude = {int(index) for index in args.exclude_gpus.split(",") if index}
    runs = {"guided": args.guided, "vanilla": args.vanilla}
    report: dict[str, Any] = {}
    for kind, run in runs.items():
        report[kind] = step_metrics(run, args.skip)
        report[kind]["peak_gpu_memory_mib"] = peak_gpu_memory(run, exclude)
        report[kind]["vllm"] = vllm_counters(run)
    guided, vanilla = report["guided"], report["vanilla"]
    report["ratios"] = {
        "step_time": ratio(guided["step_time_median"], vanilla["step_time_median"]),
        "peak_gpu_memory": ratio(guided["peak_gpu_memory_mib"], vanilla["peak_gpu_memory_mib"]),
        "vllm_generation_tokens": ratio(
            guided["vllm"].get("generation_tokens"), vanilla["vllm"].get("generation_tokens")
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
