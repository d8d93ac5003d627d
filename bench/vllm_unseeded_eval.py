"""`trl-guided eval` with vLLM's per-request sampling seeds dropped: vLLM 0.31's CPU worker fails on a seeded request
at a temperature above 0 ("CPU Generator does not use offset"), which `trl_guided.evaluate.generate_vllm` sent when
the instruction reward's regime was measured (it now sends none there itself: `vllm_request_seed`; this script is
kept as the command that made bench/instruction_regime/). The engine's global seed (--seed) still seeds the run.
Run with the vLLM venv's python:

    TRL_GUIDED_VLLM_DTYPE=float32 OMP_NUM_THREADS=1 taskset -c 0 .venv-vllm/bin/python bench/vllm_unseeded_eval.py \
        eval --config recipes/smollm2-135m-instruct/instructions_cpu.yaml --model embedded:smollm2-135m-instruct \
        --dataset-size 400 --limit 100 --num-samples 4 --temperature 1.0 --max-new-tokens 160 --backend vllm \
        --seed 0 --quality-model none --records bench/instruction_regime/sampled_start.jsonl \
        --output bench/instruction_regime/sampled_start.json
"""

import sys

import vllm
from trl import GRPOTrainer  # noqa: F401  (imported before the patch: TRL's annotations use the real class)

from trl_guided import cli

_SamplingParams = vllm.SamplingParams


def unseeded(*args, seed=None, **kwargs):
    """vLLM's SamplingParams without the request's seed."""
    return _SamplingParams(*args, **kwargs)


if __name__ == "__main__":
    vllm.SamplingParams = unseeded
    sys.exit(cli.main(sys.argv[1:]))
