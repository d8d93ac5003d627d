#!/usr/bin/env bash
# Phase 2 of the decisive study: train one arm for one seed on one core, evaluate the final model on the 400 test
# problems (greedy, plain sampling, vLLM float32, as the start), compare it with the start problem by problem, copy
# the records into bench/decisive/phase2/<arm>-s<seed>/ and write the ledger's lines.
#   bash bench/decisive/phase2/run.sh ARM SEED CORE [RUNS_DIR]
# Settings: phase 1's positive control with 2 prompts a step (4 samples each) for 60 optimizer steps.
set -u
arm=$1 seed=$2 core=$3 runs=${4:-/work/runs-phase2}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../phase1/env.sh"
# The arm's overlay, as flags: bench/learning_regime_arms.yaml names the arms (the report reads it too).
overlay=$("$here/../../../.venv/bin/python" - "$arm" "$here/../../learning_regime_arms.yaml" <<'PY'
import sys, yaml
arm, path = sys.argv[1:]
arms = yaml.safe_load(open(path))
if arm not in ("plain", "guided_postfix", "guided", "treerl"):
    sys.exit(f"unknown arm '{arm}': plain, guided_postfix, guided or treerl (overlays in {path})")
print(" ".join(f"--{key} {str(value).lower()}" for key, value in arms[arm].items()))
PY
) || exit 2
name=$arm-s$seed run=$runs/$arm-s$seed records=$here/$arm-s$seed
if [ -e "$records/comparison.json" ]; then echo "$name is done: $records/comparison.json"; exit 0; fi
mkdir -p "$run" "$records"
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
cat > "$records/train_command.sh" <<CMD
source bench/decisive/phase1/env.sh
taskset -c $core .venv/bin/python -m trl_guided.train --config recipes/smollm2-135m-instruct/instructions_cpu.yaml \\
  $overlay --reward_funcs constraints_followed constraints_all_followed --reward_weights 1.0 1.0 \\
  --beta 0.0 --mask_truncated_completions false --max_completion_length 160 \\
  --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --num_generations 4 --learning_rate 1e-5 \\
  --max_steps 60 --dataset_size 400 --eval_before_after false --save_strategy steps --save_steps 10 \\
  --save_total_limit 1 --resume_from_checkpoint auto --report_to none --seed $seed \\
  --output_dir $run
CMD
cat > "$records/eval_command.sh" <<CMD
source bench/decisive/phase1/env.sh
taskset -c $core .venv-vllm/bin/python -m trl_guided.cli eval --config recipes/smollm2-135m-instruct/instructions_cpu.yaml \\
  --model $run --reward-funcs constraints_followed constraints_all_followed \\
  --dataset-size 400 --limit 400 --temperature 0 --max-new-tokens 160 \\
  --sampling plain --backend vllm --seed 0 --quality-limit 100 \\
  --output $run/eval_end.json --records $run/eval_end.jsonl
taskset -c $core .venv/bin/python -m trl_guided.cli eval --compare bench/decisive/phase1/start/eval_start.json \\
  $run/eval_end.json --output $run/comparison.json
CMD
if [ ! -e "$run/summary.json" ]; then
  start=$(now); bash "$records/train_command.sh" > "$run/train.log" 2>&1; rc=$?; end=$(now)
  python3 "$here/../ledger_line.py" "phase 2 training: $name, 2 prompts x 4 samples, 60 steps, core $core (exit $rc)" \
    "$records/train_command.sh" "$start" "$end" "$core" ""
  [ $rc -eq 0 ] || { tail -30 "$run/train.log" > "$records/train_log_tail.txt"; exit $rc; }
fi
start=$(now); bash "$records/eval_command.sh" > "$run/eval.log" 2>&1; rc=$?; end=$(now)
python3 "$here/../ledger_line.py" "phase 2 eval: $name, 400 test problems, greedy, vLLM float32, fluency on 100; --compare with the start (exit $rc)" \
  "$records/eval_command.sh" "$start" "$end" "$core" "$(tail -1 "$run/eval.log")"
tail -30 "$run/train.log" > "$records/train_log_tail.txt"
cp "$run"/{trainer_state.json,run_config.json,summary.json} "$records/" 2>/dev/null
cp -r "$run/completions" "$records/" 2>/dev/null
[ $rc -eq 0 ] && cp "$run"/{eval_end.json,eval_end.jsonl,comparison.json} "$records/"
exit $rc
