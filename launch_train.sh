#!/usr/bin/env bash
# The main job. Usage: ./launch_train.sh [RECIPE] [--gpus N] [--vllm-gpus K] [--dry-run] [-- extra trainer flags]
#   no GPU:   trains RECIPE on CPU in one process (default recipe: the embedded SmolLM2-135M length-control demo);
#   GPUs:     default recipe: the embedded SmolLM2-135M on instruction following, bf16, vLLM server mode. How the
#             recipe generates decides the layout (`use_vllm`, `vllm_mode`, flags after `--` included):
#     use_vllm false (TRL's default), or vllm_mode colocate: no server; all N GPUs train (1 GPU: one process;
#             N >= 2: `accelerate launch --config_file zero3.yaml --num_processes N`);
#     vllm_mode server, N >= 2: `vllm serve` on the first K GPUs (--vllm-gpus, default 1) with NCCL weight transfer,
#             processed log-probs and prefix caching; once its /health answers, ZeRO-3 training on the other N-K GPUs.
#             The server is stopped on every exit path. On 1 GPU the server has no GPU of its own: vLLM is colocated.
#   A recipe with `use_cpu: true` trains on CPU when the GPUs were found by nvidia-smi (refused with --gpus N).
# Setup is a separate step, run once (and again after an update): `bash scripts/setup_env.sh` makes .venv; this
# script installs nothing and stops with that command when the environment is missing.
# SIGTERM or Ctrl-C reaches the training as SIGTERM: with enable_jit_checkpoint (every GPU recipe) it saves the step
# it is in and exits 143; then the server is stopped. Resume with `-- --resume_from_checkpoint true`.
# --gpus defaults to what nvidia-smi sees; --dry-run prints the commands and runs nothing.
# Flags after `--` override recipe fields (`--model_name_or_path` the served model too), e.g. `-- --max_steps 10`.
# Environment: VLLM_PORT (8000), VLLM_TIMEOUT seconds to wait for the server (900), VLLM_BIN (vllm), VENV (.venv),
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds the workers get after a stop signal (600).
set -euo pipefail

# Helpers shared with slurm/train.slurm, which sources this file (sourcing defines them and runs nothing else).
quoted() { printf '%q ' "$@"; }

# trainer_setting [--bool] TAG RECIPE FIELD [TRAINER_FLAGS...]: the value the training will use for FIELD, as its
# parser reads it: the last --FIELD VALUE (or --FIELD=VALUE) among the trainer flags, else the recipe's, else nothing
# (the field's default). --bool: FIELD is a boolean, printed as true or false (nothing when unset); a bare --FIELD
# means true, as in the trainer's parser.
trainer_setting() {
  local boolean=0 value="" given=0
  if [ "$1" = --bool ]; then boolean=1; shift; fi
  local tag=$1 recipe=$2 field=$3
  shift 3
  while [ $# -gt 0 ]; do
    case "$1" in
      "--$field")
        given=1
        value=""
        if [ $# -ge 2 ] && [ "${2#--}" = "$2" ]; then value=$2; shift; elif [ "$boolean" -eq 1 ]; then value=true; fi
        ;;
      "--$field="*) given=1; value="${1#*=}" ;;
    esac
    shift
  done
  if [ "$given" -eq 1 ]; then
    [ -n "$value" ] || { echo "$tag: --$field needs a value" >&2; return 2; }
  elif ! value=$("$VENV/bin/python" - "$recipe" "$field" 2>/dev/null <<'PY'
import sys, yaml
value = (yaml.safe_load(open(sys.argv[1])) or {}).get(sys.argv[2])
print("" if value is None else str(value).lower() if isinstance(value, bool) else value)
PY
  ); then
    echo "$tag: cannot read $recipe as a recipe (a YAML mapping of fields)" >&2
    return 2
  fi
  if [ "$boolean" -eq 1 ] && [ -n "$value" ]; then
    # The spellings of transformers' string_to_bool.
    case "${value,,}" in
      true | t | yes | y | 1) value=true ;;
      false | f | no | n | 0) value=false ;;
      *) echo "$tag: $field is '$value'; it takes true or false" >&2; return 2 ;;
    esac
  fi
  echo "$value"
}

# vllm_layout TAG RECIPE [TRAINER_FLAGS...]: how the training generates, from use_vllm and vllm_mode (TRL's defaults:
# false, colocate): none (transformers generation), colocate (vLLM inside each training process) or server (a vLLM
# server the training processes call, which the launcher starts).
vllm_layout() {
  local use_vllm mode
  use_vllm=$(trainer_setting --bool "$1" "$2" use_vllm "${@:3}") || return 2
  if [ "$use_vllm" != true ]; then
    echo none
    return 0
  fi
  mode=$(trainer_setting "$1" "$2" vllm_mode "${@:3}") || return 2
  case "${mode:-colocate}" in
    colocate | server) echo "${mode:-colocate}" ;;
    *) echo "$1: vllm_mode '$mode' is neither server nor colocate (set one of them in $2 or after --)" >&2; return 2 ;;
  esac
}

# recipe_model TAG RECIPE [TRAINER_FLAGS...]: the model the training will load: the last --model_name_or_path among
# the trainer flags, else the recipe's.
recipe_model() {
  local model
  model=$(trainer_setting "$1" "$2" model_name_or_path "${@:3}") || return 2
  [ -n "$model" ] || { echo "$1: $2 has no model_name_or_path (add one to the recipe)" >&2; return 2; }
  echo "$model"
}

# served_model MODEL: the name or folder for the vLLM server to serve the model the training loads (an embedded:
# model resolved to its local folder).
served_model() {
  local model=$1
  # The last line: under WANDB_MODE=offline, importing transformers prints a line to stdout first.
  case "$model" in embedded:*) model=$("$VENV/bin/trl-guided" resolve-model "$model" | tail -n 1) || return 2 ;; esac
  echo "$model"
}

# vllm_serve_command MODEL HOST PORT DATA_PARALLEL TENSOR_PARALLEL [DTYPE]: sets the array VLLM_SERVE to the server
# command (dev mode for weight sync, NCCL weight transfer, processed log-probs, all log-probs, prefix caching; the
# recipe's dtype, so that the server samples in the precision the training computes in).
vllm_serve_command() {
  VLLM_SERVE=(VLLM_SERVER_DEV_MODE=1 "${VLLM_BIN:-vllm}" serve "$1" --host "$2" --port "$3"
    --data-parallel-size "$4" --tensor-parallel-size "$5"
    --weight-transfer-config '{"backend":"nccl"}' --logprobs-mode processed_logprobs --max-logprobs -1
    --enable-prefix-caching)
  case "${6:-auto}" in auto) ;; *) VLLM_SERVE+=(--dtype "$6") ;; esac
}

# wait_for_vllm TAG URL PID LOG TIMEOUT: poll URL until it answers; if the process PID dies or TIMEOUT seconds pass,
# print the reason and the tail of LOG and return 1 (also, silently, when a stop signal arrived: STOP_SIGNAL).
wait_for_vllm() {
  local tag=$1 url=$2 pid=$3 log=$4 timeout=$5 deadline=$((SECONDS + $5))
  until "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$url" >/dev/null 2>&1; do
    [ -z "${STOP_SIGNAL:-}" ] || return 1
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "[$tag] the vLLM server exited before answering $url. Last lines of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "[$tag] the vLLM server did not answer $url within $timeout s. Last lines of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 2
  done
}

# Stop signals. trap_stop_signals TAG SIGNAL...: each SIGNAL sets STOP_SIGNAL to its name and, while run_stoppable
# runs the training, reaches the training's process group as one SIGTERM: `trl-guided train` with
# enable_jit_checkpoint then finishes its step, saves it as a checkpoint and exits 143 (accelerate's multi-process
# launcher passes the SIGTERM on to its workers and gives them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds).
STOP_SIGNAL=""
TRAIN_PID=""
trap_stop_signals() {
  STOP_TAG=$1
  shift
  local name
  for name in "$@"; do
    # shellcheck disable=SC2064  # the name is fixed now, on purpose
    trap "on_stop_signal $name" "$name"
  done
}
on_stop_signal() {
  STOP_SIGNAL=$1
  if [ -n "$TRAIN_PID" ]; then
    echo "[$STOP_TAG] SIG$1: asking the training to save a checkpoint at the end of its step and stop" >&2
    kill -TERM -- "-$TRAIN_PID" 2>/dev/null || true
  fi
}

# run_stoppable COMMAND...: run COMMAND in a process group of its own (setsid; it gets the stop signals through
# on_stop_signal) and wait until every process of that group has exited. Returns COMMAND's exit status.
run_stoppable() {
  local status=0
  setsid "$@" &
  TRAIN_PID=$!
  [ -z "$STOP_SIGNAL" ] || on_stop_signal "$STOP_SIGNAL"  # a signal that came while it was starting
  while kill -0 "$TRAIN_PID" 2>/dev/null; do wait "$TRAIN_PID" || true; done  # a trapped signal interrupts wait
  wait "$TRAIN_PID" || status=$?
  while kill -0 -- "-$TRAIN_PID" 2>/dev/null; do sleep 1; done  # e.g. a worker of a launcher that already exited
  TRAIN_PID=""
  return "$status"
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CPU_RECIPE="$ROOT/recipes/smollm2-135m-instruct/length_cpu.yaml"
GPU_RECIPE="$ROOT/recipes/smollm2-135m-instruct/instructions_gpu.yaml"
RECIPE=""
DRY_RUN=0
GPUS=""
VLLM_GPUS=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --gpus) GPUS="${2:?--gpus needs a number}"; shift ;;
    --vllm-gpus) VLLM_GPUS="${2:?--vllm-gpus needs a number}"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "launch_train.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) RECIPE="$1" ;;
  esac
  shift
done
case "$GPUS$VLLM_GPUS" in *[!0-9]*) echo "launch_train.sh: --gpus and --vllm-gpus take numbers" >&2; exit 2 ;; esac
GPUS_GIVEN="$GPUS"
if [ -z "$GPUS" ]; then
  GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
fi
if [ -z "$RECIPE" ]; then
  if [ "$GPUS" -eq 0 ]; then RECIPE="$CPU_RECIPE"; else RECIPE="$GPU_RECIPE"; fi
fi
if [ ! -f "$RECIPE" ]; then
  echo "launch_train.sh: recipe '$RECIPE' not found (give a YAML file under recipes/)" >&2
  exit 2
fi

# Setting up is a separate step (scripts/setup_env.sh): this script only checks that it was done.
VENV="${VENV:-$ROOT/.venv}"
INSTALLED='import importlib.util as u, sys; sys.exit(not (u.find_spec("trl_guided") and u.find_spec("yaml")))'
if ! "$VENV/bin/python" -c "$INSTALLED" 2>/dev/null; then
  echo "launch_train.sh: trl-guided is not installed in $VENV. Set it up once with \`bash scripts/setup_env.sh\`" \
    "(makes .venv), or point VENV at a venv where trl-guided is installed." >&2
  exit 2
fi

# The layout: cpu, or on GPUs how the recipe generates (vllm_layout). The trainer flags after -- count.
LAYOUT=cpu
NOTE=""
if [ "$GPUS" -gt 0 ]; then
  USE_CPU=$(trainer_setting --bool launch_train.sh "$RECIPE" use_cpu "${EXTRA[@]}") || exit 2
  if [ "$USE_CPU" = true ]; then
    if [ -n "$GPUS_GIVEN" ]; then
      echo "launch_train.sh: $RECIPE sets use_cpu: true, so --gpus $GPUS would go unused: drop --gpus to train it on" \
        "CPU, or give a GPU recipe (with no recipe, --gpus N trains $GPU_RECIPE)" >&2
      exit 2
    fi
    NOTE="the recipe sets use_cpu: true, so it trains on CPU (the $GPUS GPU(s) nvidia-smi found stay unused)"
    GPUS=0
  else
    LAYOUT=$(vllm_layout launch_train.sh "$RECIPE" "${EXTRA[@]}") || exit 2
  fi
fi
COLOCATE_FLAG=()
if [ "$LAYOUT" = server ] && [ "$GPUS" -eq 1 ]; then
  LAYOUT=colocate
  COLOCATE_FLAG=(--vllm_mode colocate)
  NOTE="vLLM colocated with the training: the recipe's server mode needs a GPU of its own for the server"
fi
seq_csv() { seq -s, "$1" "$2"; }
VLLM_GPUS_GIVEN="$VLLM_GPUS"
VLLM_GPUS="${VLLM_GPUS:-1}"
case "$LAYOUT" in
  cpu) GENERATION="CPU, one process" ;;
  none) GENERATION="transformers (use_vllm: false), training on every GPU" ;;
  colocate) GENERATION="vLLM colocated, training on every GPU" ;;
  server)
    GENERATION="vLLM server on GPU(s) $(seq_csv 0 $((VLLM_GPUS - 1))), training on the other $((GPUS - VLLM_GPUS))"
    ;;
esac
if [ -n "$VLLM_GPUS_GIVEN" ] && [ "$LAYOUT" != server ]; then
  echo "launch_train.sh: --vllm-gpus sets the GPUs of a vLLM server, and this run starts none ($GPUS GPU(s)," \
    "generation: $GENERATION); a server runs for use_vllm: true with vllm_mode: server on 2 or more GPUs" >&2
  exit 2
fi
if [ "$LAYOUT" = server ] && { [ "$VLLM_GPUS" -lt 1 ] || [ "$VLLM_GPUS" -ge "$GPUS" ]; }; then
  echo "launch_train.sh: --vllm-gpus $VLLM_GPUS leaves no GPU for training out of $GPUS; use 1..$((GPUS - 1))" >&2
  exit 2
fi

PORT="${VLLM_PORT:-8000}"
TRAIN=(-m trl_guided.train --config "$RECIPE")

SERVER=()
case "$LAYOUT" in
  cpu)
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
    CMD=("$VENV/bin/python" "${TRAIN[@]}" --use_cpu true --bf16 false)
    ;;
  none | colocate)
    if [ "$GPUS" -eq 1 ]; then
      CMD=("$VENV/bin/accelerate" launch --num_processes 1 "${TRAIN[@]}" "${COLOCATE_FLAG[@]}")
    else
      CMD=("$VENV/bin/accelerate" launch --config_file "$ROOT/zero3.yaml" --num_processes "$GPUS" "${TRAIN[@]}")
    fi
    ;;
  server)
    MODEL=$(recipe_model launch_train.sh "$RECIPE" "${EXTRA[@]}") || exit 2
    MODEL=$(served_model "$MODEL") || exit 2
    DTYPE=$(trainer_setting launch_train.sh "$RECIPE" dtype "${EXTRA[@]}") || exit 2
    vllm_serve_command "$MODEL" 127.0.0.1 "$PORT" "$VLLM_GPUS" 1 "$DTYPE"
    SERVER=(env "CUDA_VISIBLE_DEVICES=$(seq_csv 0 $((VLLM_GPUS - 1)))" "${VLLM_SERVE[@]}")
    CMD=(env "CUDA_VISIBLE_DEVICES=$(seq_csv "$VLLM_GPUS" $((GPUS - 1)))" "$VENV/bin/accelerate" launch
      --config_file "$ROOT/zero3.yaml" --num_processes $((GPUS - VLLM_GPUS)) "${TRAIN[@]}"
      --vllm_server_host 127.0.0.1 --vllm_server_port "$PORT")
    ;;
esac
CMD+=("${EXTRA[@]}")

echo "[launch] $GPUS GPU(s); recipe $RECIPE; generation: $GENERATION"
if [ -n "$NOTE" ]; then echo "[launch] $NOTE"; fi
if [ ${#SERVER[@]} -gt 0 ]; then echo "[launch] server: $(quoted "${SERVER[@]}")"; fi
echo "[launch] train: $(quoted "${CMD[@]}")"
[ "$DRY_RUN" -eq 1 ] && exit 0
start=$SECONDS
# SIGTERM / Ctrl-C: the training saves its current step and stops (enable_jit_checkpoint), then the server stops.
trap_stop_signals launch TERM INT
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"  # the workers' time for a step + save

if [ ${#SERVER[@]} -gt 0 ]; then
  LOG="$(mktemp -t vllm-server.XXXXXX.log)"
  "${SERVER[@]}" >"$LOG" 2>&1 &
  SERVER_PID=$!
  stop_server() { kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true; }
  trap stop_server EXIT
  if ! wait_for_vllm launch "http://127.0.0.1:$PORT/health" "$SERVER_PID" "$LOG" "${VLLM_TIMEOUT:-900}"; then
    [ -z "$STOP_SIGNAL" ] || { echo "[launch] stopped by SIG$STOP_SIGNAL before training started" >&2; exit 143; }
    exit 1
  fi
  echo "[launch] vLLM server ready on port $PORT (log: $LOG)"
fi
status=0
run_stoppable "${CMD[@]}" || status=$?
[ -z "$STOP_SIGNAL" ] || echo "[launch] stopped by SIG$STOP_SIGNAL; training exited with status $status"
echo "[launch] finished in $((SECONDS - start)) s"
exit "$status"
