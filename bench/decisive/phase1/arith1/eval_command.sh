source bench/decisive/phase1/env.sh
for model in embedded:smollm2-135m-instruct /work/runs-phase1/arith1; do
  name=$([ "$model" = /work/runs-phase1/arith1 ] && echo end || echo start)
  taskset -c 0 .venv/bin/python -m trl_guided.cli eval --config bench/decisive/arithmetic.yaml --model "$model" \
    --limit 400 --temperature 0 --max-new-tokens 32 --sampling plain --backend transformers --batch-size 64 \
    --seed 0 --quality-limit 100 --no-progress \
    --output /work/runs-phase1/arith1/eval_$name.json --records /work/runs-phase1/arith1/eval_$name.jsonl
done
taskset -c 0 .venv/bin/python -m trl_guided.cli eval --compare /work/runs-phase1/arith1/eval_start.json \
  /work/runs-phase1/arith1/eval_end.json --output /work/runs-phase1/arith1/comparison.json
