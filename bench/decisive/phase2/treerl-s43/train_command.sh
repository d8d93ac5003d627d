source bench/decisive/phase1/env.sh
taskset -c 1 .venv/bin/python -m trl_guided.train --config recipes/smollm2-135m-instruct/instructions_cpu.yaml \
  --guidance true --branch_point low_prob --num_prefixes_per_group 2 --tree_advantage treerl --guidance_loss_scope completion --beta 0.0 --mask_truncated_completions false --max_completion_length 160 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --num_generations 4 --learning_rate 1e-5 \
  --max_steps 60 --dataset_size 400 --eval_before_after false --save_strategy steps --save_steps 10 \
  --save_total_limit 1 --resume_from_checkpoint auto --report_to none --seed 43 \
  --output_dir /work/runs-phase2/treerl-s43
