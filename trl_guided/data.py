"""Tasks by name: `load_task(name, split, **options)` returns a dataset with a conversational `prompt` column."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from datasets import Dataset

LENGTH_SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's request."


def _length_prompts(path: str | None) -> list[str]:
    if path is None:
        text = resources.files("trl_guided").joinpath("assets/length_prompts.txt").read_text()
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"dataset_path={path!r} does not exist: give a text file with one prompt per line."
            )
        text = Path(path).read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"No prompts found in {path or 'the shipped length prompt set'}.")
    return prompts


def load_length(split: str = "train", dataset_path: str | None = None, eval_size: int = 8, **_) -> Dataset:
    """Length control in the spirit of the TL;DR seed: short open requests; rewards score the answer's length.

    The shipped prompt set (trl_guided/assets/length_prompts.txt) or a local text file, one prompt per line; the last
    `eval_size` prompts form the `test` split.
    """
    prompts = _length_prompts(dataset_path)
    chosen = prompts[-eval_size:] if split == "test" else prompts[:-eval_size] if eval_size else prompts
    return Dataset.from_dict(
        {
            "prompt": [
                [{"role": "system", "content": LENGTH_SYSTEM_PROMPT}, {"role": "user", "content": p}] for p in chosen
            ]
        }
    )


TASKS = {"length": load_length}


def load_task(name: str, split: str = "train", **options) -> Dataset:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {sorted(TASKS)}.")
    return TASKS[name](split=split, **options)
