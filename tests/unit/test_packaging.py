"""The requirements install next to a user's stack: no cap on torch, and each upper bound says who imposes it.

Our machines' torch pin lives in scripts/constraints.txt (setup and CI), not in the package metadata; the full check
against the newest releases the registries serve is scripts/check_newest.sh (docs/development.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# The newest torch PyPI served when the cap was lifted (docs/development.md); newer than the old cap (<2.14).
NEWER_TORCH = "2.15.0"


def _requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return project["dependencies"]


def _fake_installed(site: Path, name: str, version: str) -> None:
    """A distribution pip sees as installed when `site` comes first on sys.path (metadata only, nothing to import)."""
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_requirements_resolve_next_to_a_newer_torch(tmp_path):
    """pip, offline, with a torch newer than our CPU pin installed: the package's requirements keep it (no download,
    no downgrade). Fails with the old `torch>=2.6,<2.14`, since no other torch can be found without an index."""
    site = tmp_path / "site"
    _fake_installed(site, "torch", NEWER_TORCH)
    # No pip config (our machines' /etc/xdg/pip caps torch) and no PIP_* variables: only what the package asks for.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PYTHONPATH=str(site), PIP_CONFIG_FILE=os.devnull)
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check"]
    result = subprocess.run([*command, *_requirements()], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Requirement already satisfied: torch>=2.6 in {site}" in result.stdout, result.stdout
    assert "Would install" not in result.stdout, result.stdout


def test_torch_has_no_upper_bound():
    (torch,) = [Requirement(line) for line in _requirements() if Requirement(line).name == "torch"]
    assert torch.specifier.contains(NEWER_TORCH) and torch.specifier.contains("3.0")
    assert not torch.specifier.contains("2.5"), "transformers 5 treats a torch older than 2.6 as absent"


def test_every_upper_bound_has_a_comment_saying_who_imposes_it():
    """An upper bound (<, <=, ==, ~=) in the dependencies or an extra sits under a comment (TRL, vLLM or a break)."""
    lines = PYPROJECT.read_text().splitlines()
    start = lines.index("[project]")
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("[") and "optional" not in line)
    uncommented = []
    for i in range(start, end):
        for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+[<>=~!][^"]*)"', lines[i]):
            if not any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(spec).specifier):
                continue
            above = next(line.strip() for line in reversed(lines[start:i]) if line.strip())
            # A comment on the line above, or above the extra's `name = [` line when the bound sits inside it.
            if not (above.startswith("#") or lines[i].lstrip().startswith("#")):
                uncommented.append(spec)
    assert not uncommented, f"upper bounds without a comment saying who imposes them: {uncommented}"


def test_the_wheel_ships_the_package_assets(tmp_path):
    """A wheel built from the tracked files holds every file of trl_guided/assets (the report's style sheet, the length
    task's prompts): pyproject's package-data must name them, or the installed package fails at import or run time."""
    import zipfile

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run([*command, "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("trl_guided-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assets = {f"trl_guided/assets/{path.name}" for path in (ROOT / "trl_guided" / "assets").iterdir()}
    assert "trl_guided/assets/report.css" in assets and assets <= shipped, assets - shipped
