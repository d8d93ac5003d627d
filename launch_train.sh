#!/usr/bin/env bash
# The main job. Usage: ./launch_train.sh [RECIPE] [--dry-run] [-- extra trainer flags]
#   no GPU (this machine):  bootstraps .venv if needed, then trains RECIPE on CPU in one process
#                           (default recipe: the embedded SmolLM2-135M length-control demo);
#   GPUs:                   accelerate launch, one process per GPU (DDP). vLLM serving and ZeRO-3 sharding are added by
#                           the distributed launcher (issue 5); pass --config_file to accelerate yourself until then.
# Extra flags after `--` override recipe fields, e.g. `./launch_train.sh -- --max_steps 10`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE="$ROOT/recipes/smollm2-135m-instruct/length_cpu.yaml"
DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    -*) echo "launch_train.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) RECIPE="$1" ;;
  esac
  shift
done
[ -f "$RECIPE" ] || { echo "launch_train.sh: recipe '$RECIPE' not found (give a YAML file under recipes/)" >&2; exit 2; }

VENV="${VENV:-$ROOT/.venv}"
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi

if [ "$GPUS" -eq 0 ]; then
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
  CMD=("$VENV/bin/python" -m trl_guided.train --config "$RECIPE" --use_cpu true --bf16 false)
else
  CMD=("$VENV/bin/accelerate" launch --num_processes "$GPUS" $([ "$GPUS" -gt 1 ] && echo --multi_gpu)
       -m trl_guided.train --config "$RECIPE")
fi
CMD+=("${EXTRA[@]}")

echo "[launch] $GPUS GPU(s); recipe $RECIPE"
echo "[launch] ${CMD[*]}"
[ "$DRY_RUN" -eq 1 ] && exit 0
bash "$ROOT/scripts/setup_env.sh"
start=$SECONDS
"${CMD[@]}"
echo "[launch] finished in $((SECONDS - start)) s"
