"""The `trl-guided` console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from trl_guided import cli


def test_console_script_help():
    exe = shutil.which("trl-guided") or str(Path(sys.executable).parent / "trl-guided")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: trl-guided" in result.stdout and "resolve-model" in result.stdout


def test_resolve_model_passes_other_names_through(capsys):
    assert cli.main(["resolve-model", "Qwen/Qwen2.5-0.5B"]) == 0
    assert capsys.readouterr().out.strip() == "Qwen/Qwen2.5-0.5B"
