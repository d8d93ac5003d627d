"""The examples of README.md and docs/ run as written: the README's Python quick start (on CPU, within 3 minutes)
and the custom-task recipe of docs/recipes.md, with its reward module next to the recipe."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_guided.train import run

ROOT = Path(__file__).resolve().parents[2]
QUICK_START_SECONDS = 180


def code_block(markdown: Path, heading: str, language: str, nth: int = 0) -> str:
    """The `nth` fenced block of `language` under the first heading named `heading` (before the next heading of the
    same or a higher level; a `#` line inside a code block is no heading)."""
    lines = markdown.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(heading)}\s*", line)]
    assert starts, f"{markdown.name}: no heading {heading!r}"
    level = len(lines[starts[0]]) - len(lines[starts[0]].lstrip("#"))
    blocks, block, fence = [], None, None
    for line in lines[starts[0] + 1 :]:
        if fence is None and re.match(rf"#{{1,{level}}} ", line):
            break
        if line.startswith("```"):
            if fence is None:
                fence, block = line[3:].strip(), []
            else:
                if fence == language:
                    blocks.append("".join(block))
                fence = None
        elif fence is not None:
            block.append(line)
    assert len(blocks) > nth, f"{markdown.name}, {heading!r}: fewer than {nth + 1} ```{language} blocks"
    return blocks[nth]


def test_code_block_finds_the_block_under_its_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A\n```python\na = 1\n```\n## Quick start\n```bash\nx\n```\n```python\n# b\nb = 2\n```\n# C\n")
    assert code_block(page, "Quick start", "python") == "# b\nb = 2\n"
    with pytest.raises(AssertionError, match="fewer than 2"):
        code_block(page, "Quick start", "python", nth=1)


@pytest.mark.slow
def test_readme_quick_start_in_python_runs_on_cpu_within_3_minutes(tmp_path):
    """The README's block as written, in a fresh interpreter (the test kit's forced CPU settings do not apply), in an
    empty working directory, without a GPU. Measured in CPU seconds of the child (user + system), which a machine
    shared with other jobs does not inflate: under 3 minutes of one core is under 3 minutes on 2 cores."""
    script = tmp_path / "quick_start.py"
    script.write_text(code_block(ROOT / "README.md", "Quick start in Python", "python"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"  # one core's work, so CPU seconds are wall seconds on an idle core
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < QUICK_START_SECONDS, f"the quick start took {cpu:.0f} CPU seconds ({wall:.0f} s wall)"


def _bring_your_own_task(root: Path) -> Path:
    """docs/recipes.md's custom task as a user lays it out: the reward module and the recipe where their first
    comment lines say, and GSM8K-style rows in data/my_questions.jsonl; returns the recipe."""
    page = ROOT / "docs" / "recipes.md"
    module = code_block(page, "Bring your own task", "python")
    recipe = code_block(page, "Bring your own task", "yaml")
    recipe_path = root / recipe.splitlines()[0].lstrip("# ").strip()
    assert module.splitlines()[0] == "# my_task.py, next to your recipe"
    recipe_path.parent.mkdir(parents=True)
    recipe_path.write_text(recipe)
    (recipe_path.parent / "my_task.py").write_text(module)
    rows = [{"question": f"What is {a} + 2?", "answer": f"{a} + 2 = {a + 2}\n#### {a + 2}"} for a in range(4)]
    data = root / "data" / "my_questions.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert f"dataset_name: {data.relative_to(root)}" in recipe
    return recipe_path


@pytest.mark.parametrize("model", ["tiny", pytest.param("as written", marks=pytest.mark.slow)])
def test_the_custom_task_recipe_of_the_docs_trains_with_its_reward_module_next_to_it(
    tmp_path, monkeypatch, tiny_llama, model
):
    """Run from the folder that holds recipes/ and data/ (not the module's folder): the module is found next to the
    recipe. The tiny model keeps the default run fast; the slow case trains the embedded model the recipe names."""
    recipe = _bring_your_own_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    argv = ["--config", str(recipe.relative_to(tmp_path)), "--max_steps", "1", "--logging_steps", "1"]
    if model == "tiny":
        argv += ["--model_name_or_path", tiny_llama, "--max_completion_length", "24", "--max_guide_tokens", "4"]
    try:
        run(argv)
    finally:
        sys.modules.pop("my_task", None)  # another test has a module of that name
    state = json.loads((tmp_path / "runs" / "my-task" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 1 and "rewards/reward_short_and_polite/mean" in logged[0]
