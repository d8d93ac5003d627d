#!/usr/bin/env bash
# Phase 2 planning: each arm's step time at the positive control's settings, 3 steps, one after another on core 1
# (core 0 idle), one thread. Ledger line per arm.
source /work/main/bench/decisive/phase1/env.sh
R=/work/runs-phase1
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
declare -A OVERLAY=(
  [plain]="--guidance false"
  [guided_postfix]="--guidance true --guidance_loss_scope guidance_postfix"
  [guided]="--guidance true --guidance_loss_scope guidance"
  [treerl]="--guidance true --branch_point low_prob --num_prefixes_per_group 2 --tree_advantage treerl --guidance_loss_scope completion"
  [plain_2x4]="--guidance false"
)
for arm in plain guided_postfix guided treerl plain_2x4; do
  accumulation=4; [ "$arm" = plain_2x4 ] && accumulation=2
  cat > $R/steptime/$arm.sh <<CMD
source bench/decisive/phase1/env.sh
taskset -c 1 .venv/bin/python -m trl_guided.train --config recipes/smollm2-135m-instruct/instructions_cpu.yaml \\
  ${OVERLAY[$arm]} --beta 0.0 --mask_truncated_completions false --max_completion_length 160 \\
  --per_device_train_batch_size 4 --gradient_accumulation_steps $accumulation --num_generations 4 --learning_rate 1e-5 \\
  --max_steps 3 --dataset_size 400 --eval_before_after false --save_strategy no --report_to none --seed 42 \\
  --output_dir /work/runs-phase1/steptime/$arm
CMD
  s=$(now); bash $R/steptime/$arm.sh > $R/steptime/$arm.log 2>&1; rc=$?; e=$(now)
  times=$(python3 -c "
import json
h=[e for e in json.load(open('$R/steptime/$arm/trainer_state.json'))['log_history'] if 'step_time' in e]
print(' / '.join(f\"{e['step_time']:.0f}\" for e in h), 's a step; mean length', ' / '.join(f\"{e['completions/mean_length']:.0f}\" for e in h))
" 2>&1)
  python3 $R/ledger.py "step time of $arm at the positive control's settings, 3 steps, core 1 alone (exit $rc)" $R/steptime/$arm.sh "$s" "$e" 1 "$times"
done
