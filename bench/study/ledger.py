"""A study's files on disk: run records, the ledger of batches, and which runs are finished, waiting for their
evaluation, or stale (done with other settings). What lets a killed study resume where it stopped."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .plan import identity


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_ledger(runs_dir: Path) -> list[dict]:
    """The study's batches and evaluation rounds so far, one entry each (empty before the first)."""
    path = runs_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def append_ledger(runs_dir: Path, entry: dict) -> None:
    with open(runs_dir / "ledger.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def finished(run_dir: Path, spec: dict) -> bool | None:
    """True: done with these settings; None: not done; False: done with other settings (stale)."""
    path = run_dir / "run.json"
    if not path.exists():
        return None
    record = load_json(path)
    if "identity" not in record:  # a run of the first study (before identities): its overrides decide
        return (
            spec["phase"] == "before"
            and spec.get("validation") is None
            or record.get("overrides") == spec["overrides"]
        )
    return record["identity"] == identity(spec)


def waiting_for_evaluation(run_dir: Path, spec: dict) -> bool:
    """Trained with these settings and its models are there; evaluations pending (an evaluation round was not reached
    or did not finish). Without its models (another checkout: they are not committed) the run trains again."""
    path = run_dir / "trained.json"
    if not path.exists() or (run_dir / "run.json").exists():
        return False
    record = load_json(path)
    return record["identity"] == identity(spec) and all(Path(item["folder"]).is_dir() for item in record["pending"])


def discard_models(run_dir: Path) -> None:
    """Once a run's record is complete: its saved models (~0.5 GB each) and the record of their pending evaluations."""
    (run_dir / "trained.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "models", ignore_errors=True)


def move_stale(run_dir: Path, runs: Path) -> Path:
    stale = runs / "stale" / f"{run_dir.parent.name}-{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stale.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), stale)
    return stale


def log_tail(log: Path, lines: int = 30) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def final_score(record: dict) -> str:
    """'<metric> <value>' of a run's last evaluation (its headline reward's mean), or '' without one."""
    last = record["evals"][-1] if record.get("evals") else {}
    metric = next((key for key in last if key.endswith("/mean")), None)
    return f"{metric} {last[metric]:.3f}" if metric else ""
