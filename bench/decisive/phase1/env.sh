export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export TRL_GUIDED_VLLM_DTYPE=float32 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=2
# The repository root (the checkout this file is in), so the jobs import this checkout's trl_guided.
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)" && export PYTHONPATH=$PWD
