"""Which checkpoint a resumed run starts from: the last *complete* one.

Trainer writes a checkpoint folder in place (model, optimizer, scheduler, RNG states, then `trainer_state.json`
last), and `resume_from_checkpoint=True` takes the highest-numbered folder, complete or not. A run killed while saving
leaves a folder without a readable `trainer_state.json`; resuming from it would fail or, worse, start from a
half-written model. This picks the newest folder whose `trainer_state.json` parses instead, and that does not carry
transformers' `checkpoint-is-incomplete.txt` (its just-in-time save writes that marker first and removes it last).
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# transformers' marker of a save in progress (`enable_jit_checkpoint`); GuidedGRPOTrainer's stop saves write it too.
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"


def is_complete(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` finished saving: its `trainer_state.json` (written last) exists and parses, and no
    in-progress marker is left in it."""
    if (Path(checkpoint) / INCOMPLETE_MARKER).exists():
        return False
    try:
        json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_step(path: str | Path) -> int | None:
    """N of a `checkpoint-N` folder name, None for any other name."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints_newest_first(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of a run directory, highest N first (empty when it is not a directory)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    numbered = [(step, path) for path in folder.iterdir() if (step := checkpoint_step(path)) is not None]
    return [path for _, path in sorted((n, p) for n, p in numbered if p.is_dir())[::-1]]


def last_complete_checkpoint(output_dir: str | Path) -> tuple[str | None, list[str]]:
    """(the highest-numbered complete `checkpoint-N` folder or None, the newer incomplete folders it skipped)."""
    skipped = []
    for path in checkpoints_newest_first(output_dir):
        if is_complete(path):
            return str(path), skipped
        skipped.append(str(path))
    return None, skipped


def save_sampler_state(output_dir: str | Path, rank: int, rng: random.Random, buffer: dict | None) -> None:
    """Write what else decides a guided run's next steps into a checkpoint, per process: the sampler's generator
    (segment lengths) and, when the checkpoint falls inside TRL's generation buffer, `buffer` (its step and rows)."""
    version, state, gauss = rng.getstate()
    state_file = Path(output_dir) / f"guidance_rng_state_{rank}.json"
    state_file.write_text(json.dumps({"version": version, "state": list(state), "gauss": gauss}))
    if buffer is not None and buffer["inputs"] is not None:
        torch.save(buffer, Path(output_dir) / f"generation_buffer_{rank}.pt")


def load_sampler_state(checkpoint: str | Path, rank: int, rng: random.Random, device) -> dict | None:
    """Restore `rng` from a checkpoint written by `save_sampler_state` (a warning for an older checkpoint without
    it); return the saved generation buffer, or None when the checkpoint holds none."""
    state_file = Path(checkpoint) / f"guidance_rng_state_{rank}.json"
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        rng.setstate((saved["version"], tuple(saved["state"]), saved["gauss"]))
    else:
        logger.warning("%s is missing (a checkpoint of an older version): segment lengths will differ", state_file)
    buffer_file = Path(checkpoint) / f"generation_buffer_{rank}.pt"
    return torch.load(buffer_file, map_location=device, weights_only=True) if buffer_file.is_file() else None
