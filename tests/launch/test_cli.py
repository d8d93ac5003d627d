"""The `trl-guided` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trl_guided import cli, commands
from trl_guided.recipe import make_parser

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_help():
    exe = shutil.which("trl-guided") or str(Path(sys.executable).parent / "trl-guided")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: trl-guided" in result.stdout and "resolve-model" in result.stdout


def test_resolve_model_passes_other_names_through(capsys):
    assert cli.main(["resolve-model", "Qwen/Qwen2.5-0.5B"]) == 0
    assert capsys.readouterr().out.strip() == "Qwen/Qwen2.5-0.5B"


def test_the_dispatcher_answers_help_without_loading_torch_or_trl(tmp_path):
    """`trl-guided --help` took ~13 s when the CLI imported torch and TRL before parsing anything; the dispatcher now
    loads a command's module only when that command runs."""
    script = (
        "import sys\nfrom trl_guided import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('loaded:', sorted({'torch', 'trl', 'transformers', 'datasets'} & set(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: trl-guided" in result.stdout and "loaded: []" in result.stdout


def test_unknown_command_is_refused_with_the_list_of_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["trian"])
    assert "invalid choice: 'trian'" in capsys.readouterr().err
    assert set(cli.COMMANDS) == {"train", *commands.PARSERS}  # every command listed runs, every runnable is listed


def test_train_help_names_config_in_its_usage_then_the_field_groups():
    text = make_parser().format_help()
    assert text.startswith("usage: trl-guided train --config RECIPE.yaml")
    headings = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [h.split(" (")[0] for h in headings] == ["options:", "Task fields", "Training fields", "Model fields"]
    assert text.index("trl-guided train --config recipes/") < text.index("--guidance_loss_scope")
    assert "Task name: length, countdown, arithmetic, instructions, gsm8k, math, tldr." in " ".join(text.split())


@pytest.mark.parametrize("command", sorted(commands.PARSERS))
def test_every_flag_of_every_command_takes_its_snake_case_spelling(command):
    parser = commands.PARSERS[command]()
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--") and "-" in s[2:]]
    for flag in flags:
        assert "--" + flag[2:].replace("-", "_") in parser._option_string_actions, (command, flag)


def test_eval_takes_snake_case_flags_and_lists_its_choices(capsys):
    parser = commands.PARSERS["eval"]()
    dashed = parser.parse_args(["--max-new-tokens", "5", "--num-samples", "2", "--dataset-size", "4"])
    snake = parser.parse_args(["--max_new_tokens", "5", "--num_samples", "2", "--dataset_size", "4"])
    assert vars(dashed) == vars(snake) and snake.max_new_tokens == 5 and snake.dataset_size == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "vlm"])
    error = capsys.readouterr().err.replace("'", "")
    assert "invalid choice: vlm (choose from auto, transformers, vllm)" in error
    help_text = " ".join(parser.format_help().split())
    assert "task name: length, countdown, arithmetic, instructions, gsm8k, math, tldr" in help_text
    assert commands.PARSERS["chat"]().parse_args(["m", "--max_new_tokens", "3"]).max_new_tokens == 3
