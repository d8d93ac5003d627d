source /work/runs-phase1/env.sh
taskset -c 1 .venv-vllm/bin/python -m trl_guided.cli eval --config recipes/smollm2-135m-instruct/instructions_cpu.yaml \
  --model embedded:smollm2-135m-instruct --dataset-size 400 --limit 400 --temperature 0 --max-new-tokens 160 \
  --sampling plain --backend vllm --seed 0 --quality-limit 100 \
  --output /work/runs-phase1/start/eval_start.json --records /work/runs-phase1/start/eval_start.jsonl
