"""Fixtures of the distributed tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The .venv-vllm interpreter, bootstrapped (or checked in about a second) by scripts/setup_vllm_env.sh."""
    venv = Path(os.environ.get("VLLM_VENV") or ROOT / ".venv-vllm")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_vllm_env.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "VLLM_VENV": str(venv)},
    )
    assert result.returncode == 0, f"setup_vllm_env.sh failed:\n{result.stderr[-4000:]}"
    return venv / "bin" / "python"
