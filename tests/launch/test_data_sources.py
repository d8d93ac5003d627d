"""TRL's data keys in a recipe (`dataset_name`, `dataset_config`, `dataset_train_split`, `dataset_test_split`) load
through `datasets`: a local data file, a folder written by `save_to_disk`, or the Hub; offline, a Hub name is refused
in one line that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from trl_guided.data import DataError, load_task
from trl_guided.train import run

GSM8K_ROWS = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(8)]


def _saved_dataset(root: Path) -> Path:
    """A DatasetDict saved with save_to_disk, with TRL-style split names that differ from train/test."""
    folder = root / "gsm8k_saved"
    train = Dataset.from_list(GSM8K_ROWS)
    held_out = Dataset.from_list([{"question": "What is 9 + 9?", "answer": "#### 18"}])
    DatasetDict({"training": train, "heldout": held_out}).save_to_disk(str(folder))
    return folder


def test_dataset_name_loads_a_local_file_a_saved_dataset_and_maps_the_split_names(tmp_path):
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    rows = load_task("gsm8k", "train", dataset_name=str(data_file))
    assert rows["question"] == [row["question"] for row in GSM8K_ROWS]
    saved = _saved_dataset(tmp_path)
    splits = dict(dataset_name=str(saved), train_split="training", test_split="heldout")
    assert len(load_task("gsm8k", "train", **splits)) == len(GSM8K_ROWS)
    assert load_task("gsm8k", "test", **splits)["question"] == ["What is 9 + 9?"]
    with pytest.raises(DataError, match=r"has the splits \['heldout', 'training'\], not 'train'"):
        load_task("gsm8k", "train", dataset_name=str(saved))
    with pytest.raises(DataError, match="give one of them"):
        load_task("gsm8k", "train", dataset_name=str(saved), dataset_path=str(data_file))


def test_a_hub_dataset_name_offline_is_refused_in_one_line(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="'my-org/my-data' is not a local file or folder, and the Hub is off") as error:
        load_task("gsm8k", "train", dataset_name="my-org/my-data", dataset_config="main")
    assert "\n" not in str(error.value) and "save_to_disk" in str(error.value)
    recipe = tmp_path / "hub.yaml"
    fields = dict(task="gsm8k", dataset_name="my-org/my-data", reward_funcs=["gsm8k_accuracy"], report_to="none")
    recipe.write_text(yaml.safe_dump({**fields, "model_name_or_path": tiny_llama, "num_generations": 4}))
    with pytest.raises(SystemExit, match="Cannot load the data of task 'gsm8k': 'my-org/my-data' is not a local"):
        run(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])


def test_a_recipe_with_dataset_name_pointing_at_a_saved_dataset_trains(tmp_path, tiny_llama):
    recipe = dict(
        model_name_or_path=tiny_llama,
        task="gsm8k",
        dataset_name=str(_saved_dataset(tmp_path)),
        dataset_train_split="training",
        dataset_test_split="heldout",
        reward_funcs=["gsm8k_accuracy"],
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=16,
        prefix_min_tokens=2,
        prefix_max_tokens=6,
        max_guide_tokens=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        output_dir=str(tmp_path / "run"),
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(["--config", str(path)])
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
