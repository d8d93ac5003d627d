"""Shared pieces of the vLLM harness scripts (run with the .venv-vllm python, see tests/distributed/test_vllm.py).

Each script prints one line `REPORT {json}` with what it measured and exits non-zero when a check fails, so the
main suite only has to run it and read that line.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Offline and quiet before transformers/vLLM are imported. vLLM's CPU backend reserves its KV cache up front
# (VLLM_CPU_KVCACHE_SPACE, GiB; default 4): 1 GiB is plenty for a tiny model and keeps CI's memory low. Thread
# binding is left to the OS: this machine has 2 cores shared by the trainer and the engine. VLLM_CPU_CI_ENV=1 is the
# switch vLLM's own CPU CI uses: dynamo with the eager backend instead of inductor, which otherwise spends ~90 s
# compiling C++ kernels on a machine without a compile cache (the model and the generated tokens are the same).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_CI_ENV": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_key, _value)

# The tiny models rarely sample real punctuation; frequent letters stand in as marks so prefixes get cut (as in
# tests/unit/common.py, with more letters: most of the tiny vocabulary is single bytes, few of them letters).
TEST_MARKS = list("etaoinshrdlu")
G = 4


class CheckFailed(AssertionError):
    """A harness check that did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def build_model(path: Path, sharpen: float = 10.0, seed: int = 0, tied: bool = False) -> str:
    """A 2-layer tiny Llama that vLLM's CPU attention accepts, with a sharpened output layer.

    vLLM's CPU attention supports head sizes from 32 up, so hidden_size=128 with 4 heads. A freshly initialised model
    predicts an almost uniform distribution (every log-prob ~ -log(vocab)), which would make a log-prob alignment
    check pass even with shifted or mixed-up tokens; scaling the LM head spreads the log-probs out so it cannot.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from trl_guided.tiny_models import build_tiny_model

    build_tiny_model(path, arch="llama", seed=seed, hidden_size=128, tied=tied)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        if tied:
            # A tied LM head is the embedding matrix: scale the final norm instead (the same logits). Louder layer
            # outputs too: with the embedding dominating the residual, a random tied model repeats its last token.
            model.model.norm.weight.mul_(sharpen)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(10.0)
                layer.mlp.down_proj.weight.mul_(10.0)
        else:
            model.lm_head.weight.mul_(sharpen)
    model.save_pretrained(path)
    return str(path)


def dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in range(n)]}
    )


def reward_len(completions: list, **kwargs: Any) -> list[float]:
    return [-abs(30 - len(c[0]["content"])) / 30 for c in completions]


def guided_config(output_dir: Path, **overrides: Any):
    """A small guided config on CPU in fp32 (GRPOConfig defaults to bf16, which needs a GPU)."""
    from trl_guided import GuidedGRPOConfig

    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=2 * G,  # two prompt groups per step
        num_generations=G,
        max_completion_length=24,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        punctuation=TEST_MARKS,
        prefix_min_tokens=4,
        prefix_max_tokens=10,
        min_guide_tokens=2,
        max_guide_tokens=4,
        use_vllm=True,
        vllm_max_model_length=256,
    )
    values.update(overrides)
    return GuidedGRPOConfig(**values)


class Recorder:
    """Wraps the trainer's generation and scoring to keep what each rollout sampled and what TRL scored."""

    def __init__(self, trainer: Any) -> None:
        from trl import GRPOTrainer

        self.trainer = trainer
        self.rollouts: list[dict[str, Any]] = []  # one per _generate_single_turn call: ids, sampling logps, segments
        self.scored: list[dict[str, Any]] = []  # TRL's own scored batch, before the guided loss focus
        generate = trainer._generate_single_turn

        def record_generation(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            ids, logps = generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            # `_segments` is set by the guided generation and cleared once the batch is scored: read it right here.
            self.rollouts.append(dict(ids=ids, logps=logps, segments=trainer._segments, G=num_generations))
            return ids, logps

        trainer._generate_single_turn = record_generation
        # The parent's method (the subclass reaches it through super()) returns TRL's full-width batch; the guided
        # loss focus drops the columns after the guidance afterwards.
        parent = GRPOTrainer._generate_and_score_completions

        def record_scoring(self_, inputs):
            output = parent(self_, inputs)
            if self_ is trainer:
                batch = {k: v.detach().clone() if hasattr(v, "detach") else v for k, v in output.items()}
                # Before this batch's optimizer step: the stop-token mass of the policy that scored it.
                model = trainer.accelerator.unwrap_model(trainer.model)
                _, batch["stop_logp"] = completion_logprobs(model, batch, trainer.eos_token_ids)
                self.scored.append(batch)
            return output

        GRPOTrainer._generate_and_score_completions = record_scoring
        self._restore = lambda: setattr(GRPOTrainer, "_generate_and_score_completions", parent)

    def close(self) -> None:
        self._restore()


def held_back(segments: Any, row: int, min_guide_tokens: int) -> range:
    """Completion positions of the first `min_guide_tokens` guidance tokens of a row (EOS may be held back there)."""
    start = segments.prefix[row]
    return range(start, start + min(segments.guidance[row], min_guide_tokens))


def check_rollouts(
    rollouts: list[dict[str, Any]], max_completion_length: int, min_guide_tokens: int, prefixes_per_group: int = 1
) -> dict[str, Any]:
    """Branch sets (groups, or their `prefixes_per_group` parts) share their prefix; every completion token has
    exactly one sampling log-prob, finite except that the held-back guidance tokens may be None ("unknown": TRL then
    leaves them out of the importance-sampling ratio)."""
    check(bool(rollouts), "no rollout was generated")
    nonempty_prefixes = branching = rows = 0
    for rollout in rollouts:
        ids, logps, segments = rollout["ids"], rollout["logps"], rollout["segments"]
        g = rollout["G"] // prefixes_per_group
        check(segments is not None, "the guided three-phase sampler did not run")
        check(logps is not None, "vLLM returned no sampling log-probs")
        check(len(ids) == len(logps) == len(segments), "rows of ids, log-probs and segments differ")
        for row, (row_ids, row_logps) in enumerate(zip(ids, logps, strict=True)):
            check(
                len(row_logps) == len(row_ids),
                f"row {row}: {len(row_logps)} sampling log-probs for {len(row_ids)} completion tokens",
            )
            held = held_back(segments, row, min_guide_tokens)
            valid = [
                (x is None and t in held) or (x is not None and math.isfinite(x) and x <= 1e-6)
                for t, x in enumerate(row_logps)
            ]
            check(all(valid), f"row {row}: invalid log-probs {row_logps}")
            p, q, r = segments.prefix[row], segments.guidance[row], segments.postfix[row]
            check(p + q + r == len(row_ids) <= max_completion_length, f"row {row}: segments {p}+{q}+{r} != ids")
        for start in range(0, len(ids), g):
            group = range(start, start + g)
            prefixes = {tuple(ids[r][: segments.prefix[r]]) for r in group}
            check(len(prefixes) == 1, f"rows {list(group)} do not share their prefix: {prefixes}")
            nonempty_prefixes += bool(next(iter(prefixes)))
            guides = {tuple(ids[r][segments.prefix[r] : segments.prefix[r] + segments.guidance[r]]) for r in group}
            branching += len(guides) > 1
        rows += len(ids)
    check(nonempty_prefixes > 0, "no group got a non-empty shared prefix")
    check(branching > 0, "no group branched after its prefix")
    return dict(rows=rows, nonempty_prefix_groups=nonempty_prefixes, branching_groups=branching)


def check_scored(
    scored: list[dict[str, Any]], rollouts: list[dict[str, Any]], tolerance: float, min_guide_tokens: int
) -> dict[str, Any]:
    """TRL's scored batch holds the sampled ids and their vLLM log-probs column for column.

    `old_per_token_logps` is the trainer's own forward over the same ids; with the same weights it must match vLLM's
    sampling log-probs. Exception: the first `min_guide_tokens` guidance tokens, if the trainer asks vLLM for
    `min_tokens` there. vLLM then samples them with the stop tokens masked, and its processed log-probs are those of
    that renormalised distribution: policy log-prob - log(1 - P(stop)). Either form is accepted there, or "unknown"
    (NaN, which TRL leaves out of the ratio); `eos_held_back` reports which one matched. A control shifts the
    sampling log-probs by one token and must not match: it shows the check tells aligned from misaligned.
    """
    import torch

    check(len(scored) == len(rollouts), f"{len(scored)} scored batches for {len(rollouts)} rollouts")
    worst, held_plain, held_renormalised, held_unknown, aligned, shifted = 0.0, 0.0, 0.0, 0, [], []
    for batch, rollout in zip(scored, rollouts, strict=True):
        for key in ("sampling_per_token_logps", "old_per_token_logps", "importance_sampling_ratio"):
            check(key in batch, f"{key} missing from the scored batch (keys: {sorted(batch)})")
        ids, mask = batch["completion_ids"], batch["completion_mask"].bool()
        sampling, old = batch["sampling_per_token_logps"], batch["old_per_token_logps"]
        check(sampling.shape == old.shape == ids.shape, f"shapes {sampling.shape} {old.shape} {ids.shape}")
        held = torch.zeros_like(mask)
        for row, (row_ids, row_logps) in enumerate(zip(rollout["ids"], rollout["logps"], strict=True)):
            n = len(row_ids)
            check(ids[row, :n].tolist() == list(row_ids), f"row {row}: scored ids differ from the sampled ids")
            check(int(mask[row].sum()) <= n, f"row {row}: mask longer than the completion")
            expected = torch.tensor([math.nan if x is None else x for x in row_logps], dtype=sampling.dtype)
            check(
                torch.allclose(sampling[row, :n], expected, equal_nan=True),
                f"row {row}: scored sampling log-probs were reordered",
            )
            positions = held_back(rollout["segments"], row, min_guide_tokens)
            held[row, positions.start : positions.stop] = True
        free, held = mask & ~held, mask & held
        check(not torch.isnan(sampling[free]).any(), "unknown sampling log-probs outside the held-back tokens")
        worst = max(worst, float((old - sampling).abs()[free].max()))
        known = held & ~torch.isnan(sampling)
        held_unknown += int((held & torch.isnan(sampling)).sum())
        if known.any():
            renormalised = old - torch.log1p(-batch["stop_logp"].exp().clamp(max=1 - 1e-6))
            held_plain = max(held_plain, float((old - sampling).abs()[known].max()))
            held_renormalised = max(held_renormalised, float((renormalised - sampling).abs()[known].max()))
        aligned.append(masked_mean_abs(old, sampling, free))
        shifted.append(masked_mean_abs(old[:, 1:], sampling[:, :-1], free[:, 1:] & free[:, :-1]))
        ratio = batch["importance_sampling_ratio"]
        check(bool(torch.isfinite(ratio).all()), "non-finite importance sampling ratio")
    report = dict(
        max_logp_diff=worst,
        mean_logp_diff=max(aligned),
        shifted_mean_logp_diff=min(shifted),
        held_max_logp_diff=held_plain,
        held_renormalised_max_logp_diff=held_renormalised,
        held_unknown_logps=held_unknown,
        eos_held_back=held_renormalised < held_plain,
    )
    check(worst < tolerance, f"vLLM log-probs differ from the trainer's by up to {worst:.2e} (tolerance {tolerance})")
    check(
        min(held_plain, held_renormalised) < tolerance,
        f"the first {min_guide_tokens} guidance tokens match neither the policy nor the stop-masked policy: {report}",
    )
    check(
        min(shifted) > 10 * max(aligned),
        f"control: log-probs shifted by one token are about as close as the aligned ones {report}",
    )
    return report


def completion_logprobs(model: Any, batch: dict[str, Any], stop_ids: list[int] | None = None):
    """Under `model` (temperature 1), as TRL scores them: the (B, T) log-probs of the batch's completion tokens and,
    with `stop_ids`, the (B, T) log of the total probability of the stop tokens at each position."""
    import torch

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1].float()
    logps = torch.log_softmax(logits, dim=-1)
    tokens = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return tokens, (None if stop_ids is None else logps[..., list(stop_ids)].logsumexp(-1))


def masked_mean_abs(a: Any, b: Any, mask: Any) -> float:
    """Mean |a - b| over the mask, leaving out unknown (NaN) sampling log-probs: the guidance tokens sampled under
    vLLM's min_tokens carry None, which TRL turns into NaN."""
    difference = (a - b).abs()
    return float(difference[mask.bool() & ~difference.isnan()].mean())


def logged(trainer: Any, prefix: str) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k.startswith(prefix)} for e in trainer.state.log_history]


def run(main: Callable[[], dict[str, Any]]) -> None:
    """Run `main`, print `REPORT {json}`; exit 1 with the failed check in the report when one fails."""
    # SIGTERM (the test's timeout) must unwind through the `finally` blocks that stop the vLLM server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = main()
    except CheckFailed as error:
        print("REPORT " + json.dumps({"ok": False, "failed": str(error)}), flush=True)
        sys.exit(1)
    print("REPORT " + json.dumps({"ok": True, **report}), flush=True)
