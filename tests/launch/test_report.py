"""`trl-guided report` and `trl-guided plot` on real 2-step runs of the tiny model, checked in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from trl_guided import cli
from trl_guided.plots import CURVE_GROUPS
from trl_guided.train import run

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml"
G = 4


@pytest.fixture(scope="module", params=["guided", "guided_ot"])
def run_dir(request, tmp_path_factory, tiny_llama) -> Path:
    """A finished 2-step run of the tiny model through `trl-guided train` (it writes report.html at its end)."""
    root = tmp_path_factory.mktemp(request.param)
    recipe = yaml.safe_load(DEMO.read_text())
    recipe.update(
        model_name_or_path=tiny_llama,
        max_steps=2,
        save_steps=2,
        max_completion_length=20,
        prefix_min_tokens=3,
        prefix_max_tokens=8,
        max_guide_tokens=4,
        num_generations=G,
        per_device_train_batch_size=8,
        warmup_steps=0,
        log_completions=True,
        output_dir=str(root / "run"),
        # The tiny model samples few sentence marks; a space ends a prefix too, so most groups get a shared prefix.
        punctuation=[" ", ".", ","],
    )
    if request.param == "guided_ot":
        recipe.update(ot_coef=0.1, ot_window=4, ot_epsilon=0.1, ot_iterations=20, ot_reference="ref")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(["--config", str(path)])
    return root / "run"


def _visible(text: str) -> str:
    """What the page shows for a logged text: HTML-unescaped, control characters as \\xNN."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def _spans(fragment: str, css: str) -> list[str]:
    found = re.findall(rf'<span class="{css}">((?:<span class="(?:ctl|nl)">[^<]*</span>|[^<])*)</span>', fragment)
    return [html.unescape(re.sub(r"<[^>]+>", "", text.replace('<span class="nl">↵</span>', ""))) for text in found]


def _group_fragment(page: str, step: int, index: int) -> str:
    start = page.index(f'<div class="group" data-step="{step}" data-group="{index}">')
    return page[start : page.index("</table></div>", start)]


def test_report_has_header_segments_and_curves(run_dir):
    page = (run_dir / "report.html").read_text()  # written by the end of `trl-guided train`
    summary = json.loads((run_dir / "summary.json").read_text())
    assert re.search(r"id='steps'>2 of 2<", page)
    assert f"id='reward-first'>{summary['reward_first']:.3f}<" in page
    assert f"id='reward-last'>{summary['reward_last']:.3f}<" in page
    for setting in ("guidance tokens</td><td>2..4", "prefix tokens</td><td>3..8", "group size G</td><td>4"):
        assert setting in page
    for group in ("reward", "segments", "completion_length", "learning_rate"):
        assert f"id='curve-{group}'><svg" in page
    assert "guidance/guide_length" in page  # legends are SVG text, not paths
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page), (
        "no network"
    )

    # A known group, checked against the parquet: the first group logged at step 1.
    table = pd.read_parquet(run_dir / "completions" / "completions_00001.parquet")
    rows = table.iloc[:G]
    assert rows["prompt"].astype(str).nunique() == 1 and rows["prefix"].nunique() == 1
    fragment = _group_fragment(page, 1, 0)
    prefix = rows["prefix"].iat[0]
    if prefix:
        assert _spans(fragment, "seg-prefix") == [_visible(prefix)]
    else:
        assert "empty prefix" in fragment and "seg-prefix" not in fragment
    assert sorted(_spans(fragment, "seg-guidance")) == sorted(_visible(t) for t in rows["guidance"])
    assert sorted(_spans(fragment, "seg-postfix")) == sorted(_visible(t) for t in rows["postfix"])
    # The segments are the completion, split: prefix + guidance + postfix is what the reward function read.
    for _, row in rows.iterrows():
        assert row["prefix"] + row["guidance"] + row["postfix"] == row["completion"][0]["content"]
    # Rows sorted by reward, best first; each row shows its advantage.
    shown = re.findall(r'<tr(?: class="top")?><td class="num">\d+</td><td class="num">([^<]+)<', fragment)
    assert shown == [f"{r:.3f}" for r in sorted(rows["smooth_length"], reverse=True)]
    assert len(re.findall(r'<span class="(?:pos|neg|)">[+-]', fragment)) == G
    assert 'id="legend"' in page and page.count('class="group"') == 4  # 2 steps x 2 groups

    if "ot" in run_dir.parent.name:
        assert "id='curve-ot'><svg" in page and "id='ot-plan'><svg" in page
        assert "reference model" in page
    else:
        assert "id='ot'" not in page


def test_plot_writes_one_png_per_logged_curve_group(run_dir):
    from PIL import Image

    assert cli.main(["plot", str(run_dir)]) == 0
    pngs = sorted((run_dir / "plots").glob("*.png"))
    expected = {"reward", "reward_spread", "segments", "guidance_prefix", "completion_length", "loss", "learning_rate"}
    if "ot" in run_dir.parent.name:
        expected.add("ot")
    if yaml.safe_load(DEMO.read_text()).get("beta", 0.0) > 0:  # the demo recipe trains with a KL term
        expected.add("kl")
    assert {p.stem for p in pngs} == expected and expected <= {g.name for g in CURVE_GROUPS}
    for png in pngs:
        with Image.open(png) as image:
            colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 10, f"{png.name} looks blank"
    assert (run_dir / "reward_curve.png").stat().st_size > 0  # train.py still writes its summary picture


# --------------------------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is missing in CI: bash scripts/setup_env.sh --with-browser installs it (apt-get, as root)"
            )
        pytest.skip(
            "chromium is not installed; bash scripts/setup_env.sh --with-browser installs it (apt-get, as root)"
        )
    return binary


def _browse(tmp_path: Path, url: str, *flags: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([*command, *flags, url], capture_output=True, text=True, timeout=180)


def _page_errors(result: subprocess.CompletedProcess) -> list[str]:
    """Script errors recorded into the DOM by the page's probe, and console errors chromium logged."""
    errors = re.findall(r'data-errors="([^"]*)"', result.stdout)
    return errors + [line for line in result.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]


def test_ot_plan_of_a_run_without_a_final_model_comes_from_its_newest_checkpoint(run_dir, tmp_path):
    """The report finds the run's model as `trl-guided eval --model` does (trl_guided.locate): a run that saved no
    final model at its top has its plan drawn from its newest complete checkpoint, and the page says which."""
    if "ot" not in run_dir.parent.name:
        pytest.skip("the transport plan is drawn for OT runs only")
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("config.json", "model.safetensors"):
        (copy / name).unlink()  # as if the run had stopped after its checkpoint
    assert cli.main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert "id='ot-plan'><svg" in page and "rows are the checkpoint-2's last hidden states" in page


def test_error_probe_catches_a_script_error(tmp_path):
    """The no-error check below can fail: a page with a broken script is caught."""
    from trl_guided.report import ERROR_PROBE

    broken = tmp_path / "broken.html"
    broken.write_text(f"<!DOCTYPE html><html><head>{ERROR_PROBE}</head><body><script>undefinedCall()</script></body>")
    assert _page_errors(_browse(tmp_path, broken.as_uri(), "--dump-dom"))


def test_report_opens_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    report = run_dir / "report.html"
    dom = _browse(tmp_path, report.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="legend"' in dom.stdout and "<svg" in dom.stdout
    assert not _page_errors(dom)

    # A screenshot of the header, the curves and the first sample groups: not blank, and the legend is on it (the one
    # line where the prefix and the guidance colours sit side by side).
    shot = tmp_path / "report.png"
    result = _browse(tmp_path, report.as_uri(), "--window-size=1280,3200", f"--screenshot={shot}")
    assert shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
    colors = pixels.getcolors(maxcolors=1 << 22)
    assert colors is not None and len(colors) > 50, "the screenshot is (nearly) uniform"
    width, height = pixels.size
    data = pixels.load()
    legend_rows = [
        y for y in range(height) if {(255, 216, 77), (219, 231, 246)} <= {data[x, y] for x in range(0, width // 2, 2)}
    ]
    assert legend_rows, "no line shows the prefix and guidance swatches of the legend side by side"


def test_report_shows_the_before_after_evaluation(run_dir, tmp_path):
    """comparison.json as `trl-guided eval` writes it (a hand-made one here); an unknown layout is shown raw."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors", "completions"))
    comparison = {
        "before": {"model": {"name": "embedded:smollm2-135m-instruct"}, "settings": {}},
        "after": {"model": {"name": str(copy)}, "settings": {}},
        "problems": 32,
        "forced": False,
        "metrics": {
            "arithmetic_accuracy/mean": {
                "before": 0.125,
                "after": 0.21875,
                "diff": 0.09375,
                "diff_ci95": [0.03125, 0.15625],
                "problems": 32,
                "ties": 25,
                "mcnemar_p": 0.453,
                "better_when": "higher",
                "better": 5,
                "worse": 2,
            },
            # As files from before metrics knew their direction: "wins" counted a rise, which is worse here.
            "truncated": {"before": 0.75, "after": 0.25, "diff": -0.5, "wins": 0, "losses": 4, "ties": 4},
        },
    }
    (copy / "comparison.json").write_text(json.dumps(comparison))
    assert cli.main(["report", str(copy), "--no-ot-plan"]) == 0
    page = (copy / "report.html").read_text()
    row = re.search(r"<tr><td>arithmetic_accuracy/mean</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert cells == ["0.125", "0.219", "0.094", "0.031 .. 0.156", "5 better / 2 worse / 25 ties, p 0.453"]
    truncated = re.findall(r"<td>([^<]*)</td>", re.search(r"<tr><td>truncated</td>(.*?)</tr>", page).group(1))
    assert truncated[-1] == "4 better / 0 worse / 4 ties"
    assert "32 problems matched" in page and "embedded:smollm2-135m-instruct" in page
    (copy / "comparison.json").write_text('{"something": "else"}')
    assert cli.main(["report", str(copy), "--no-ot-plan"]) == 0
    assert "no per-metric table this report knows" in (copy / "report.html").read_text()


# ---------------------------------------------------------------------------------------- missing or broken runs


def test_missing_or_corrupt_run_dir_is_one_line_or_said_on_the_page(tmp_path, run_dir):
    def one_line_error(argv, match):
        with pytest.raises(SystemExit, match=match) as error:
            cli.main(argv)
        assert "\n" not in str(error.value.code)

    one_line_error(["report", str(tmp_path / "nope")], "is not a directory")
    (tmp_path / "empty").mkdir()
    one_line_error(["report", str(tmp_path / "empty")], "has no trainer_state.json")
    one_line_error(["plot", str(tmp_path / "empty")], "has no trainer_state.json")
    broken_state = tmp_path / "broken_state"
    broken_state.mkdir()
    (broken_state / "trainer_state.json").write_text('{"log_history": [')
    one_line_error(["report", str(broken_state)], "not a readable trainer state")

    # A copy of the run with a truncated parquet and one without completions: a page that says what is missing.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    parquet = copy / "completions" / "completions_00002.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])
    assert cli.main(["report", str(copy), "--no-ot-plan"]) == 0
    page = (copy / "report.html").read_text()
    assert "completions/completions_00002.parquet is unreadable" in page
    shutil.rmtree(copy / "completions")
    (copy / "trainer_state.json").unlink()  # the checkpoint copy was left out too: nothing to read
    one_line_error(["report", str(copy)], "has no trainer_state.json")
    shutil.copy(run_dir / "trainer_state.json", copy / "trainer_state.json")
    assert cli.main(["report", str(copy), "-o", str(tmp_path / "out.html"), "--groups", "2"]) == 0
    assert "No completions/*.parquet" in (tmp_path / "out.html").read_text()


# ------------------------------------------------------------------------------------------------- trackio dashboard


def test_trackio_stores_guidance_and_ot_metrics_locally(tmp_path, tiny_llama):
    """`report_to: trackio` on a 2-step CPU run: the guidance/* and ot/* metrics land in the local SQLite store.

    A subprocess, because trackio fixes its storage folder (TRACKIO_DIR) when it is imported; the proxy variables point
    at a closed local port, so any network access would fail.
    """
    pytest.importorskip("trackio", reason="trackio is an extra: pip install 'trl-guided[trackio]'")
    import sqlite3

    recipe = yaml.safe_load(DEMO.read_text())
    recipe.update(
        model_name_or_path=tiny_llama,
        max_steps=2,
        max_completion_length=16,
        prefix_min_tokens=2,
        prefix_max_tokens=6,
        max_guide_tokens=4,
        output_dir=str(tmp_path / "run"),
        save_strategy="no",
        ot_coef=0.1,
        ot_window=4,
        ot_iterations=10,
        report_to="trackio",
        project="trl-guided-test",
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HTTP_PROXY": closed, "HTTPS_PROXY": closed}
    env.update(http_proxy=closed, https_proxy=closed, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "trl_guided.cli", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    database = tmp_path / "trackio" / "trl-guided-test.db"
    assert database.exists(), sorted(p.name for p in (tmp_path / "trackio").iterdir())
    with sqlite3.connect(database) as connection:
        logged = [json.loads(m) for (m,) in connection.execute("SELECT metrics FROM metrics ORDER BY id")]
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    for name in (
        "guidance/guide_length",
        "guidance/trained_tokens",
        "guidance/empty_prefix_ratio",
        "ot/cost",
        "reward",
    ):
        stored = [entry[f"train/{name}"] for entry in logged if f"train/{name}" in entry]
        assert stored == pytest.approx([e[name] for e in history if name in e]), name


def test_report_is_logged_to_an_active_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from trl_guided.report import log_to_wandb

    report = tmp_path / "report.html"
    report.write_text("<!DOCTYPE html><html><body><h1>run</h1></body></html>")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert not log_to_wandb(report)  # no active run: nothing to do
    wandb.init(project="trl-guided-test", dir=str(tmp_path))
    try:
        assert log_to_wandb(report)
    finally:
        wandb.finish()
    assert list(tmp_path.rglob("media/html/report_*.html")), "the report is in the run's files"


def test_the_report_never_unpickles_training_args(tmp_path, run_dir):
    """training_args.bin is a pickle: a crafted one would run code when loaded; the report leaves it alone."""
    import pickle

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    (copy / "run_config.json").unlink()
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (copy / "training_args.bin").write_bytes(pickle.dumps(RunsCode()))
    assert cli.main(["report", str(copy), "--no-ot-plan"]) == 0
    assert not marker.exists()
    assert "training_args.bin is a pickle and is not loaded" in (copy / "report.html").read_text()
