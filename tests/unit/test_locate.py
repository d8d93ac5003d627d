"""One model locator: `trl-guided train`, `eval` and `resolve-model` read a run folder the same way (its final model,
else its newest complete checkpoint), and training refuses, in one line, what it cannot start from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trl_guided import GuidedGRPOTrainer, cli
from trl_guided.locate import ModelError, locate_model, locate_start
from trl_guided.tiny_models import build_tiny_model
from trl_guided.train import build_trainer, parse_args

from .common import config, dataset, reward_len

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml"


def _checkpoint(run: Path, step: int, seed: int) -> Path:
    folder = build_tiny_model(run / f"checkpoint-{step}", seed=seed)
    (Path(folder) / "trainer_state.json").write_text("{}")  # written last by the Trainer: the checkpoint is complete
    return Path(folder)


def _run_folder(root: Path) -> Path:
    """A run folder of three different tiny models: checkpoint-2, checkpoint-10 and the final model at its top."""
    run = root / "run"
    _checkpoint(run, 2, seed=1)
    _checkpoint(run, 10, seed=2)
    build_tiny_model(run, seed=3)
    (run / "trainer_state.json").write_text("{}")
    return run


def _eval_model_path(run: Path, tmp_path: Path) -> str:
    """The folder `trl-guided eval --model RUN` evaluated (the result's model.path)."""
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(run), "--task", "length", "--limit", "1", "--max-new-tokens", "2"]
    argv += ["--quality-model", "none", "--backend", "transformers", "--no-progress", "--output", str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())["model"]["path"]


def _resolved(run: Path, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["resolve-model", str(run)]) == 0
    return capsys.readouterr().out.strip()


def _train_weights(run: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The starting weights of the trainer `trl-guided train --model_name_or_path RUN` builds."""
    argv = ["--config", str(RECIPE), "--model_name_or_path", str(run), "--output_dir", str(tmp_path / "out")]
    trainer = build_trainer(*parse_args(argv))
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def _class_weights(run: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The starting weights of `GuidedGRPOTrainer(model="RUN")` in Python."""
    trainer = GuidedGRPOTrainer(
        model=str(run), reward_funcs=reward_len, args=config(tmp_path), train_dataset=dataset()
    )
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def _same_weights(weights: dict[str, torch.Tensor], folder: str) -> bool:
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    return weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)


def test_train_eval_resolve_model_and_the_trainer_class_start_from_the_same_weights_of_a_run_folder(tmp_path, capsys):
    run = _run_folder(tmp_path)
    for expected in (run, run / "checkpoint-10"):  # the final model; then, without it, the newest checkpoint
        if expected != run:
            for name in ("config.json", "model.safetensors"):
                (run / name).unlink()  # the run stopped before saving its final model
        assert _eval_model_path(run, tmp_path) == str(expected)
        assert _resolved(run, capsys) == str(expected)
        weights = _train_weights(run, tmp_path)
        assert _same_weights(weights, str(expected))
        assert not _same_weights(weights, str(run / "checkpoint-2"))  # the models differ: the check can fail
        assert _same_weights(_class_weights(run, tmp_path), str(expected))  # Python: the same resolver


def test_training_refuses_a_lora_adapter_in_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys):
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules="all-linear")
    )
    run = tmp_path / "lora_run"  # a use_peft run: its saved model is an adapter
    model.save_pretrained(run)
    (run / "trainer_state.json").write_text("{}")
    assert locate_model(str(run)).kind == "adapter"  # eval and chat load it, merged into its base
    assert _resolved(run, capsys) == str(run)
    out = tmp_path / "out"
    with pytest.raises(
        SystemExit, match=rf"Cannot train from model .*LoRA adapter.*its base model {tiny_llama}"
    ) as error:
        cli.main(["train", "--config", str(RECIPE), "--model_name_or_path", str(run), "--output_dir", str(out)])
    assert "\n" not in str(error.value.code)
    assert not out.exists()
    assert locate_start(tiny_llama).path == tiny_llama
    with pytest.raises(ModelError, match="LoRA adapter"):  # the trainer class refuses it as `train` does
        GuidedGRPOTrainer(model=str(run), reward_funcs=reward_len, args=config(tmp_path), train_dataset=dataset())


def test_names_that_mean_no_model_are_one_line_for_every_command(tmp_path):
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoint-1").mkdir(parents=True)  # a checkpoint without a model
    (empty_run / "trainer_state.json").write_text("{}")
    for name, message in ((str(empty_run), "training run folder without a saved model"), ("gpt-7", "not found")):
        with pytest.raises(ModelError, match=message):
            locate_model(name)
        for argv in (
            ["resolve-model", name],
            ["train", "--config", str(RECIPE), "--model_name_or_path", name, "--output_dir", str(tmp_path / "out")],
            ["eval", "--model", name, "--task", "length"],
            ["chat", name],
        ):
            with pytest.raises(SystemExit, match=message) as error:
                cli.main(argv)
            assert "\n" not in str(error.value.code), argv
    assert not (tmp_path / "out").exists()
    shutil.rmtree(empty_run)
