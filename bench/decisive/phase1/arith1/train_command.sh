source bench/decisive/phase1/env.sh
taskset -c 0 .venv/bin/python -m trl_guided.train --config bench/decisive/arithmetic.yaml --seed 0 \
  --output_dir /work/runs-phase1/arith1
