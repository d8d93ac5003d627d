source bench/decisive/phase1/env.sh
taskset -c 1 .venv-vllm/bin/python -m trl_guided.cli eval --config recipes/smollm2-135m-instruct/instructions_cpu.yaml \
  --model /work/runs-phase2/treerl-s43 --dataset-size 400 --limit 400 --temperature 0 --max-new-tokens 160 \
  --sampling plain --backend vllm --seed 0 --quality-limit 100 \
  --output /work/runs-phase2/treerl-s43/eval_end.json --records /work/runs-phase2/treerl-s43/eval_end.jsonl
taskset -c 1 .venv/bin/python -m trl_guided.cli eval --compare bench/decisive/phase1/start/eval_start.json \
  /work/runs-phase2/treerl-s43/eval_end.json --output /work/runs-phase2/treerl-s43/comparison.json
