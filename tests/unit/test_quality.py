"""Text quality on the embedded SmolLM2-135M: where the guided loss sends gradient, how large each trained token's
share is against plain GRPO under each `guidance_loss_normalization`, and whether the main job keeps its text fluent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from trl_guided import GuidedGRPOConfig
from trl_guided.locate import load_model, locate_model
from trl_guided.quality import completion_nll

from .common import EMBEDDED, guided_trainer, hidden_and_embedding_grads, scored_batch

MAIN_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml"


def test_gradient_reaches_only_the_trained_positions(embedded, tmp_path):
    trainer = guided_trainer(embedded, tmp_path, shared_prefix_loss=False)
    batch, _, segments = scored_batch(trainer)
    assert max(segments.prefix) > 0, "this seed should give a shared prefix; pick another seed"
    trained = (batch["completion_mask"] * batch["tool_mask"]).bool()
    prompt_width = batch["prompt_ids"].size(1)
    hidden, embedding = hidden_and_embedding_grads(trainer, batch)

    # Completion column c is predicted at position prompt_width + c - 1: gradient there iff c is trained.
    predicted_at = hidden[:, prompt_width - 1 : prompt_width - 1 + trained.size(1)]
    assert torch.all(predicted_at[trained] > 0), "a trained token received no gradient"
    assert torch.all(predicted_at[~trained] == 0), "an untrained completion token received gradient"
    assert torch.all(hidden[:, : prompt_width - 1] == 0), "a prompt token was trained"
    for row in range(trained.size(0)):
        columns = trained[row].nonzero().squeeze(1)
        assert columns.numel() > 0
        first, last = prompt_width + int(columns[0]), prompt_width + int(columns[-1])
        assert segments.prefix[row] == int(columns[0]), "training does not start at the guidance"
        assert embedding[row, last - 1] > 0
        assert torch.all(embedding[row, last:] == 0), "tokens after the last trained one influence the loss"
        assert first <= last


def test_shared_prefix_forward_gives_the_plain_gradients_on_the_embedded_model(embedded, tmp_path):
    trainer = guided_trainer(embedded, tmp_path, shared_prefix_loss=True, seed=5)
    batch, _, _ = scored_batch(trainer)
    grads = {}
    for shared in (True, False):
        trainer.args.shared_prefix_loss = shared
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        grads[shared] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_per_token_update_of_guided_and_plain_under_each_normalization(embedded, tmp_path, loss_type):
    """Each trained token's gradient share: with `completion` it is plain GRPO's at equal settings; with `trained` it
    is larger by completion tokens / trained tokens (per batch for dapo, per row for grpo)."""
    trainer = guided_trainer(embedded, tmp_path, loss_type=loss_type, shared_prefix_loss=False, seed=7)
    _, raw, segments = scored_batch(trainer)
    plain = {key: value for key, value in raw.items() if key != "tool_mask"}
    plain["num_items_in_batch"] = raw["completion_mask"].sum()
    hidden_plain, _ = hidden_and_embedding_grads(trainer, plain)
    prompt_width = raw["prompt_ids"].size(1)

    shares = {}
    for normalization in ("trained", "completion"):
        trainer._loss_focus.normalization = normalization  # `guidance_loss_normalization`, as wired
        guided = trainer._focus_loss(dict(raw), segments)
        trained = (guided["completion_mask"] * guided["tool_mask"]).bool()
        hidden, _ = hidden_and_embedding_grads(trainer, guided)
        positions = slice(prompt_width - 1, prompt_width - 1 + trained.size(1))
        guided_share, plain_share = hidden[:, positions], hidden_plain[:, positions]
        assert torch.all(guided_share[~trained] == 0)
        shares[normalization] = (guided_share, plain_share, trained)

    guided_share, plain_share, trained = shares["completion"]
    torch.testing.assert_close(guided_share[trained], plain_share[trained], rtol=2e-3, atol=1e-7)
    guided_share, plain_share, trained = shares["trained"]
    completion_tokens = raw["completion_mask"].sum(dim=1).float()
    trained_tokens = trained.sum(dim=1).float()
    if loss_type == "dapo":
        ratio = (completion_tokens.sum() / trained_tokens.sum()).expand_as(trained_tokens)
    else:
        ratio = completion_tokens / trained_tokens
    expected = plain_share * ratio.unsqueeze(1)
    torch.testing.assert_close(guided_share[trained], expected[trained], rtol=2e-3, atol=1e-7)
    assert float(ratio.min()) > 2, "guidance trains only a few tokens per row, so `trained` scales them up"


def test_completion_nll_scores_fluent_text_below_scrambled_text(embedded):
    model, tokenizer = load_model(locate_model(EMBEDDED))
    fluent = "Paper was invented in China around 105 AD and spread along trade routes to the rest of the world."
    words = fluent.split()
    scrambled = " ".join(words[::2] + words[1::2])
    prompt = [{"role": "user", "content": "Explain the history of paper."}]
    (fluent_nll, fluent_tokens), (scrambled_nll, scrambled_tokens) = completion_nll(
        model, tokenizer, [prompt, prompt], [fluent, scrambled]
    )
    assert fluent_tokens > 10 and scrambled_tokens > 10
    assert fluent_nll / fluent_tokens < scrambled_nll / scrambled_tokens


FLUENCY_STEPS = 4  # CI budget: about a minute of training on 2 free cores


def base_model_samples(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, per_prompt: int):
    """The base model's own answers to `prompts` (chat messages), sampled as the recipe samples."""
    torch.manual_seed(0)
    completions, prompt_rows = [], []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=per_prompt,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions += tokenizer.batch_decode(out[:, ids.size(1) :], skip_special_tokens=True)
        prompt_rows += [prompt] * per_prompt
    return prompt_rows, completions


@pytest.mark.slow
def test_main_job_recipe_keeps_text_fluent(tmp_path):
    """A short run of the main job's own recipe must not buy its reward with text the base model finds unlikely.

    The full 30-step run compares the last 3 steps' completions with the first 3 steps' (docs/training.md). A short
    run has two prompts per step, and the prompt moves the NLL per token more than a few steps of training do, so
    here the last 3 steps' completions are compared with the base model's own answers to the same prompts.
    """
    import pandas as pd

    from trl_guided.train import run

    recipe = yaml.safe_load(MAIN_RECIPE.read_text())
    chars_per_token = 4.0  # English under the SmolLM2 tokenizer; fragments (the failure) have fewer
    target_tokens = (recipe["length_target"] + recipe["length_tolerance"]) / chars_per_token
    assert target_tokens < recipe["max_completion_length"], "the length target needs truncated completions"

    argv = ["--config", str(MAIN_RECIPE), "--max_steps", str(FLUENCY_STEPS), "--output_dir", str(tmp_path)]
    argv += ["--eval_before_after", "false"]  # the held-out evaluation is tested elsewhere
    run([*argv, "--save_strategy", "no", "--report_to", "none"])
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "reward" in entry]
    assert len(logged) == FLUENCY_STEPS
    quality = [entry.get("quality/ref_nll") for entry in logged]
    assert any(value is not None and math.isfinite(value) and value > 0 for value in quality), quality

    model, tokenizer = load_model(locate_model(EMBEDDED))
    last = pd.concat(
        pd.read_parquet(tmp_path / "completions" / f"completions_{step:05d}.parquet")
        for step in range(FLUENCY_STEPS - 2, FLUENCY_STEPS + 1)
    )
    trained = completion_nll(model, tokenizer, list(last["prompt"]), list(last["completion"]))
    prompts = list({str(p.tolist()): [dict(m) for m in p] for p in last["prompt"]}.values())
    base_prompts, base_completions = base_model_samples(
        model, tokenizer, prompts, recipe["max_completion_length"], recipe["temperature"], recipe["num_generations"]
    )
    base = completion_nll(model, tokenizer, base_prompts, base_completions)
    per_token = [sum(s for s, _ in rows) / sum(n for _, n in rows) for rows in (trained, base)]
    assert per_token[0] <= 1.3 * per_token[1], f"NLL/token {per_token[0]:.2f} vs the base model's {per_token[1]:.2f}"


def test_unknown_loss_normalization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="guidance_loss_normalization='tokens' is unknown"):
        GuidedGRPOConfig(output_dir=str(tmp_path), guidance_loss_normalization="tokens", use_cpu=True, bf16=False)
