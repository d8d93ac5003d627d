"""The offline vLLM engine of the `vllm` evaluation backend: a new engine per evaluation, or, inside
`kept_vllm_engine()`, one engine kept across evaluations that loads each model's weights in place.

Evaluating many checkpoints of one architecture in one process (the study in bench/study/ evaluates every trained
model of a phase this way) then costs one engine start-up (minutes on CPU: start-up and compilation) instead of one per
model. `trl_guided.evaluate.generate_vllm` asks `vllm_engine` for its engine; nothing else here is public.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from pathlib import Path
from typing import Any

import torch

# The engine kept for the next evaluation inside `kept_vllm_engine()`: (engine, what it can serve, model length).
_KEPT_ENGINE: dict[str, Any] | None = None


@contextlib.contextmanager
def kept_vllm_engine():
    """Inside this block, plain-sampling vLLM evaluations share one engine: a model with the same architecture (its
    config.json apart from name and version) gets its weights loaded into the running engine, in seconds, where a new
    engine takes minutes on CPU (start-up and compilation). For evaluating many checkpoints in one process; outside
    the block every evaluation starts its own engine and frees it at the end (a training run must get its memory
    back)."""
    global _KEPT_ENGINE
    outer = _KEPT_ENGINE
    _KEPT_ENGINE = {} if outer is None else outer
    serialization = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    try:
        yield
    finally:
        if outer is None:
            _KEPT_ENGINE = None
            gc.collect()
            if serialization is None:  # set by vllm_engine for the block's engine only
                os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)


def engine_dtype() -> str:
    """The engine's dtype: TRL_GUIDED_VLLM_DTYPE when set; vLLM's `auto` on a GPU; float32 on CPU. There `auto` takes a
    bf16 checkpoint's dtype, which a CPU without native bf16 runs many times slower (SmolLM2-135M, 400 greedy answers
    on one core: unfinished after 32 minutes in bf16, 11.8 minutes in float32), and float32 is what the transformers
    backend scores with."""
    chosen = os.environ.get("TRL_GUIDED_VLLM_DTYPE")
    if chosen:
        return chosen
    return "auto" if torch.cuda.is_available() else "float32"


def vllm_engine(engine_class, path: str, seed: int, gpu_memory_utilization: float, max_model_len: int):
    """An engine serving the model at `path`: the kept one with these weights reloaded when it fits, else a new one."""
    config = json.loads((Path(path) / "config.json").read_text())
    for name_or_version in ("_name_or_path", "transformers_version"):
        config.pop(name_or_version, None)
    dtype = engine_dtype()
    serves = (json.dumps(config, sort_keys=True), dtype, seed, gpu_memory_utilization)
    kept = _KEPT_ENGINE
    if kept and kept["serves"] == serves and kept["max_model_len"] >= max_model_len:
        _reload_weights(kept["llm"], path)
        return kept["llm"]
    if kept:
        kept.clear()
        gc.collect()
    if kept is not None:
        # Room for a later split's longer prompts, within the model's positions.
        max_model_len = min(-(-max_model_len // 256) * 256, config.get("max_position_embeddings", max_model_len))
        # The engine runs a function of this module after each reload (_repack_cpu_lm_head): vLLM sends callables
        # to its workers only when allowed; nothing but that function of ours goes this way.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = engine_class(
        model=path,
        tokenizer=path,
        seed=seed,
        dtype=dtype,
        max_model_len=max_model_len,
        enable_prefix_caching=True,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    if kept is not None:
        kept.update(llm=llm, serves=serves, max_model_len=max_model_len)
    return llm


def _reload_weights(llm, path: str) -> None:
    """The weights at `path` into the running engine: vLLM's in-place reload (the worker reads the folder); on CPU
    the LM head packed again too, since vLLM's CPU backend computes it from a private copy made at load time that the
    reload leaves stale (SmolLM2-135M, 24 greedy answers: 2 matched a fresh engine's without the repack, 24 with);
    then no cached prefix computed with the old weights is reused."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
    llm.collective_rpc(_repack_cpu_lm_head)
    llm.reset_prefix_cache()


def _repack_cpu_lm_head(worker) -> None:
    """Runs in vLLM's worker: on CPU, pack the LM head's current weight for the GEMM kernel, as loading does."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm  # optional: vllm (its internals)
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # optional: vllm
    from vllm.platforms import current_platform  # optional: vllm

    if current_platform.is_cpu():
        for module in worker.model_runner.model.modules():
            if isinstance(module, ParallelLMHead):
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
