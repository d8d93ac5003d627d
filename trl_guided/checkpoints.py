"""Which checkpoint a resumed run starts from: the last *complete* one.

Trainer writes a checkpoint folder in place (model, optimizer, scheduler, RNG states, then `trainer_state.json`
last), and `resume_from_checkpoint=True` takes the highest-numbered folder, complete or not. A run killed while saving
leaves a folder without a readable `trainer_state.json`; resuming from it would fail or, worse, start from a
half-written model. This picks the newest folder whose `trainer_state.json` parses instead, and that does not carry
transformers' `checkpoint-is-incomplete.txt` (its just-in-time save writes that marker first and removes it last).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
