"""Which model a name means, and loading it: the one locator of `trl-guided train`, `eval`, `chat`, `report`,
`resolve-model`, `trl_guided.quality` and the benchmarks.

A name is `embedded:<model>`, a model or LoRA adapter folder, a training run's output folder (its final model, else
its newest complete checkpoint), or a Hub name. Training starts from a full model only (`locate_start`).
`ModelSource.identity` fingerprints local weights, so an evaluation result says which weights it measured.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoints import checkpoints_newest_first, is_complete
from .models import is_embedded, resolve_model_path


class ModelError(ValueError):
    """A name that names no loadable model; the message says what is wrong and how to fix it, in one line."""


@dataclass
class ModelSource:
    """Where a model comes from: `path` to load (for a LoRA adapter, `base` is loaded and the adapter applied)."""

    name: str
    path: str
    kind: str  # embedded | folder | adapter | hub
    base: str | None = None

    def identity(self) -> dict:
        """Name, kind and a fingerprint of the weights (sha256 of the weight files of a local folder)."""
        identity = {"name": self.name, "kind": self.kind, "path": self.path}
        if self.base is not None:
            identity["base"] = self.base
        if Path(self.path).is_dir():
            identity["weights_sha256"] = _weights_fingerprint(Path(self.path))
        if self.base is not None and Path(self.base).is_dir():
            identity["base_weights_sha256"] = _weights_fingerprint(Path(self.base))
        return identity


_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt)$")


def _weights_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and _WEIGHT_FILE.match(p.name)):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def locate_model(name: str) -> ModelSource:
    """The one answer to "which model does `name` mean", for train, eval, chat, report, resolve-model and quality.

    `embedded:<model>`; a model folder (config.json) or LoRA adapter folder (adapter_config.json, loaded onto its
    base model); a training run's output folder: its final model when the run saved one at its top, else its newest
    complete `checkpoint-N` holding a model; a Hub name (org/model). ModelError (one line: what is wrong and how to fix
    it) for anything else.
    """
    if is_embedded(name):
        try:
            return ModelSource(name, resolve_model_path(name), "embedded")
        except (ValueError, RuntimeError) as error:
            raise ModelError(str(error)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path if _holds_model(path) else _newest_checkpoint_model(path)
        if folder is None:
            raise ModelError(_no_model(name, path))
        if (folder / "adapter_config.json").is_file():
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelError(f"{folder}: adapter_config.json names no base_model_name_or_path; add it there")
            return ModelSource(name, str(folder), "adapter", locate_model(base).path)
        return ModelSource(name, str(folder), "folder")
    if path.exists():
        raise ModelError(f"{name} is a file; give a model folder, a run folder, a Hub name or embedded:<model>")
    if not _HUB_ID.match(name):
        raise ModelError(
            f"model {name!r} not found: no such folder, and not a Hub name of the form org/model (a name without an "
            "org has one on the Hub, e.g. openai-community/gpt2)"
        )
    return ModelSource(name, name, "hub")


def locate_start(name: str) -> ModelSource:
    """The model a training run starts from: `locate_model`'s answer, which must be a full model.

    A LoRA adapter folder (or a run folder whose saved model is one) is refused: loaded for training, transformers
    would attach the adapter frozen to a trainable base and save only the adapter, losing the trained weights.
    """
    source = locate_model(name)
    if source.kind == "adapter":
        raise ModelError(
            f"{name} means the LoRA adapter {source.path}, and training starts from a full model: start from its base "
            f"model {source.base} (add --use_peft true for a new adapter), or merge the adapter into it first (peft's "
            "merge_and_unload, then save_pretrained) and start from that folder"
        )
    return source


def _newest_checkpoint_model(run_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a run folder that holds a model (a half-written one is never loaded)."""
    return next((c for c in checkpoints_newest_first(run_dir) if is_complete(c) and _holds_model(c)), None)


def _no_model(name: str, path: Path) -> str:
    checkpoints = checkpoints_newest_first(path)
    if checkpoints or (path / "trainer_state.json").is_file():
        found = f" ({len(checkpoints)} checkpoint-N folder(s), none complete with a model)" if checkpoints else ""
        return (
            f"{name} is a training run folder without a saved model: no config.json at its top and no complete "
            f"checkpoint-N with one{found}; let the run save (the end of training or save_steps), or give a model "
            "folder"
        )
    return f"{name} holds no model: no config.json (full model) or adapter_config.json (LoRA adapter)"


def load_model(source: ModelSource, device: str | None = None):
    """(model in eval mode, tokenizer with left padding) for a ModelSource; a LoRA adapter is merged into its base."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        if source.kind == "adapter":
            base = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype)
            model = PeftModel.from_pretrained(base, source.path).merge_and_unload()
            has_tokenizer = any((Path(source.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            tokenizer = AutoTokenizer.from_pretrained(source.path if has_tokenizer else source.base)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot load model {source.name!r}: {first}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
