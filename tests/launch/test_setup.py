"""scripts/setup_env.sh is idempotent: a second run changes nothing in the environment it made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup_env.sh"
STAMP = Path(sys.prefix) / ".trl-guided-setup"
# Our machines' torch pin, from the constraints file the setup scripts pass to pip (the package itself has no cap).
TORCH_PIN = next(
    line for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines() if line.startswith("torch==")
)

pytestmark = pytest.mark.skipif(
    not STAMP.exists(), reason="the suite is not running inside a venv made by scripts/setup_env.sh"
)


def _freeze() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(out.stdout.splitlines())


def _setup(**env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRL_GUIDED_SETUP_FORCE"}
    full_env.update(VENV=sys.prefix, **env)
    return subprocess.run(["bash", str(SETUP)], env=full_env, capture_output=True, text=True, timeout=900)


def test_second_run_is_a_no_op():
    before, stamp = _freeze(), STAMP.read_text()
    result = _setup()
    assert result.returncode == 0, result.stderr
    assert "up to date; nothing to do" in result.stderr
    assert "installing" not in result.stderr
    assert _freeze() == before and STAMP.read_text() == stamp


def test_forced_full_run_changes_nothing():
    before, stamp = _freeze(), STAMP.read_text()
    result = _setup(TRL_GUIDED_SETUP_FORCE="1")
    assert result.returncode == 0, result.stderr
    assert f"installing {TORCH_PIN}" in result.stderr
    assert _freeze() == before, "re-running every pip step changed the installed packages"
    assert STAMP.read_text() == stamp
