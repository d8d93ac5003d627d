"""`trl-guided report RUN_DIR`: one self-contained HTML page that shows a training run.

The page needs no network (inline CSS, inline SVG, no script from anywhere): a header with the settings and the
headline numbers (and the before/after evaluation when `comparison.json` exists), the curves of `trl_guided.plots`,
sample groups from `completions/*.parquet` (the shared prefix once, then the G branches sorted by reward with the
guidance tokens highlighted), and, when OT was on, a transport plan between the final and the reference model.

Whatever is missing from the run directory is said on the page; only a directory without any `trainer_state.json`
is an error (one line).
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import plots
from .locate import ModelError, load_model, locate_model
from .ot import banded_sinkhorn_solve
from .rundir import Group, Run, RunDirError, headline, load_run, message_text, read_comparison, read_groups
from .stats import count_text, directed_counts

__all__ = ["RunDirError", "build_report", "load_run", "log_to_wandb", "write_report"]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"


def pick_steps(files: list[Path]) -> list[Path]:
    """The first, middle and last logged steps (fewer when fewer were logged)."""
    if len(files) <= 3:
        return files
    return [files[0], files[(len(files) - 1) // 2], files[-1]]


def spread(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as possible, the earlier parts taking the remainder."""
    return [total // parts + (i < total % parts) for i in range(parts)] if parts else []


# ---------------------------------------------------------------------------------------------------- OT picture


def transport_plan(run: Run, text_prompt: list, completion: str, max_tokens: int = 64):
    """Dense (T, T) transport plan of one logged completion between the run's model and the OT reference; its tokens,
    the band's half-width, the sample's cost, and the names of the two models.

    The run's model is what `locate_model` finds in the run folder (its final model, else its newest complete
    checkpoint; a LoRA adapter merged into its base), the reference the run's starting model. Hidden states are the
    backbone's last hidden states on the completion tokens (re-tokenized from the logged text, after the prompt's chat
    template), compared with `trl_guided.ot` under the run's window and epsilon.
    """
    args = run.training
    try:
        trained = locate_model(str(run.path))
    except ModelError as error:
        raise RunDirError(f"{error}; no plan drawn") from None
    model, tokenizer = load_model(trained, device="cpu")
    trained_name = "final model" if Path(trained.path) == run.path else Path(trained.path).name  # e.g. checkpoint-8
    if isinstance(text_prompt, str):
        prompt_ids = tokenizer(text_prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(list(text_prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(completion_ids) < 2:
        raise RunDirError("the sample completion has fewer than 2 tokens; no plan drawn")
    input_ids = torch.tensor([list(prompt_ids) + completion_ids])

    def states(model) -> torch.Tensor:
        with torch.no_grad():
            return model.get_decoder()(input_ids=input_ids).last_hidden_state[:, -len(completion_ids) :]

    current = states(model)
    del model
    if args.get("ot_reference", "ref") == "old":
        reference, reference_name = (
            current,
            f"the {trained_name} itself (ot_reference='old': the sampling-time policy)",
        )
    else:
        base = run.model or args.get("model_name_or_path")
        if not base:
            raise RunDirError("the reference model's name is unknown (no run_config.json); no plan drawn")
        try:
            reference_model, _ = load_model(locate_model(base), device="cpu")
        except ModelError as error:
            raise RunDirError(f"the reference model cannot be found ({error}); no plan drawn") from None
        reference, reference_name = states(reference_model), f"the reference model {base}"
    mask = torch.ones(current.shape[:2], dtype=torch.bool)
    result = banded_sinkhorn_solve(
        current,
        reference,
        mask,
        window=int(args.get("ot_window", 16)),
        epsilon=float(args.get("ot_epsilon", 0.1)),
        iterations=int(args.get("ot_iterations", 50)),
    )
    band = result.plan[0]
    length, width = band.shape
    window = (width - 1) // 2
    dense = torch.zeros(length, length)
    for i in range(length):
        for k in range(width):
            j = i + k - window
            if 0 <= j < length:
                dense[i, j] = band[i, k]
    tokens = [tokenizer.decode([t]) for t in completion_ids]
    return dense.numpy(), tokens, window, float(result.cost[0]), trained_name, reference_name


def plan_svg(dense, tokens: list[str], window: int, title: str) -> str:
    plt = plots._pyplot()
    size = max(4.0, min(9.0, 0.16 * len(tokens) + 2))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    rows, cols = np.indices(dense.shape)
    # Cells outside the band cannot carry mass: grey, so the band itself is what the eye sees.
    banded = np.ma.masked_where(np.abs(rows - cols) > window, dense * len(tokens))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#e6e6e6")
    image = ax.imshow(banded, cmap=cmap, interpolation="nearest", vmin=0.0)
    # Whitespace made visible (a token that is a newline or a space would otherwise be a blank tick label).
    labels = [_visible(t.replace("\n", "\\n").replace(" ", "·"), limit=10) for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), labels, fontsize=8)
    ax.set_xlabel("reference tokens")
    ax.set_ylabel("final-model tokens")
    ax.set_title(title, fontsize=12)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="plan x tokens (1 = all mass on one cell)")
    fig.tight_layout()
    return plots.svg(fig)


# ---------------------------------------------------------------------------------------------------------- HTML

# The page's style sheet, a package asset (inlined: the page loads nothing).
CSS = resources.files("trl_guided").joinpath("assets/report.css").read_text(encoding="utf-8")

# Records script errors into the page, so a headless browser's --dump-dom shows them (the page loads nothing).
ERROR_PROBE = (
    "<script>window.addEventListener('error',function(e){document.documentElement.setAttribute('data-errors',"
    "(document.documentElement.getAttribute('data-errors')||'')+e.message+';');});</script>"
)


def _visible(text: str, limit: int | None = None) -> str:
    """Control characters (other than newline and tab) as \\xNN, so garbled samples stay readable and valid."""
    out = "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return out if limit is None or len(out) <= limit else out[: limit - 1] + "…"


def _segment(text: str, css: str, mark_newlines: bool = False) -> str:
    """A segment span; control characters shown as \\xNN in a muted style (they are what the model sampled).

    `mark_newlines`: a newline inside a highlighted segment is drawn as a ↵ before the line break; otherwise a
    guidance segment that starts with a newline is only a thin coloured sliver at the end of an empty line.
    """
    parts = []
    for piece in re.split(r"([\x00-\x08\x0b-\x1f\x7f]|\n)", text):
        if not piece:
            continue
        if piece == "\n":
            parts.append('<span class="nl">↵</span>\n' if mark_newlines else "\n")
        elif len(piece) == 1 and (ord(piece) < 32 or ord(piece) == 127) and piece != "\t":
            parts.append(f'<span class="ctl">\\x{ord(piece):02x}</span>')
        else:
            parts.append(html.escape(piece))
    return f'<span class="{css}">{"".join(parts)}</span>'


def _signed(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    css = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<span class="{css}">{value:+.3f}</span>'


def _group_html(group: Group, reward_names: list[str]) -> str:
    size = len(group.branches)
    badges = f'<span class="badge">{size} branches</span>'
    if group.prefix is not None and not group.prefix:
        badges += '<span class="badge empty">empty prefix: no branch point found, plain GRPO for this group</span>'
    rewards = [b.reward for b in group.branches if math.isfinite(b.reward)]
    spread_text = f"reward spread {max(rewards) - min(rewards):.3f}" if rewards else ""
    out = [f'<div class="group" data-step="{group.step}" data-group="{group.index}">']
    out.append(f'<div class="meta">step {group.step} · group {group.index + 1} · {spread_text} {badges}</div>')
    out.append(f'<div class="prompt">{html.escape(_visible(group.prompt))}</div>')
    if group.prefix:
        out.append(
            f'<div class="shared text">shared prefix: {_segment(group.prefix, "seg-prefix", mark_newlines=True)}</div>'
        )
    multi = len(reward_names) > 1
    header = "<th>#</th><th>reward</th>"
    header += "".join(f"<th>{html.escape(n)}</th>" for n in reward_names) if multi else ""
    header += "<th>advantage</th><th>guidance + postfix</th>"
    out.append(f'<table class="branches"><thead><tr>{header}</tr></thead><tbody>')
    for rank, branch in enumerate(group.branches, 1):
        cells = [f'<td class="num">{rank}</td>', f'<td class="num">{_number(branch.reward)}</td>']
        if multi:
            cells += [f'<td class="num">{_number(branch.rewards[n])}</td>' for n in reward_names]
        cells.append(f'<td class="num">{_signed(branch.advantage)}</td>')
        if group.prefix is None:
            body = _segment(branch.completion, "seg-postfix")
        else:
            body = _segment(branch.guidance, "seg-guidance", mark_newlines=True) + _segment(
                branch.postfix, "seg-postfix"
            )
        cells.append(f'<td class="text">{body}</td>')
        top = ' class="top"' if rank == 1 and size > 1 else ""
        out.append(f"<tr{top}>{''.join(cells)}</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


LEGEND = (
    '<div class="legend" id="legend"><strong>Legend</strong>'
    '<span><span class="swatch seg-prefix">prefix</span> shared by the whole group, sampled once</span>'
    '<span><span class="swatch seg-guidance">guidance</span> the branch tokens the loss credits</span>'
    '<span><span class="swatch seg-postfix">postfix</span> each branch finished to the end</span>'
    "<span>rows sorted by reward, the best on top (green)</span></div>"
)


def _settings_rows(run: Run) -> list[tuple[str, str]]:
    args, task = run.training, run.task
    if not args:
        return [("settings", "unknown (no run_config.json or training_args.bin)")]
    rows = [("model", html.escape(str(run.model or args.get("model_name_or_path") or "unknown")))]
    if task:
        rows.append(("task", html.escape(str(task.get("task")))))
        rows.append(("reward functions", html.escape(", ".join(task.get("reward_funcs") or []))))
        if any("length" in name for name in task.get("reward_funcs") or []) and "length_target" in task:
            target = f"{task['length_target']} characters"
            if "smooth_length" in (task.get("reward_funcs") or []):
                target += f" (no penalty within ± {task.get('length_tolerance')})"
            rows.append(("length target", html.escape(target)))
    if args.get("guidance", True):
        rows += [
            ("guided sampling", "on"),
            ("loss scope", html.escape(str(args.get("guidance_loss_scope")))),
            ("guidance tokens", f"{args.get('min_guide_tokens')}..{args.get('max_guide_tokens')}"),
            ("prefix tokens", f"{args.get('prefix_min_tokens')}..{args.get('prefix_max_tokens')} (before the cut)"),
            ("branch point", html.escape(str(args.get("branch_point", "punctuation")))),
        ]
    else:
        rows.append(("guided sampling", "off (plain GRPO)"))
    rows.append(("group size G", str(args.get("num_generations"))))
    rows.append(("max completion tokens", str(args.get("max_completion_length"))))
    rows.append(("learning rate / beta (KL)", f"{_number(args.get('learning_rate'))} / {_number(args.get('beta'))}"))
    if (args.get("ot_coef") or 0) > 0:
        ot = (
            f"coef {_number(args.get('ot_coef'))}, reference {html.escape(str(args.get('ot_reference')))}, window "
            f"{args.get('ot_window')}, epsilon {_number(args.get('ot_epsilon'))}"
        )
        rows.append(("optimal transport", ot + (", debiased" if args.get("ot_debiased") else "")))
    else:
        rows.append(("optimal transport", "off"))
    return rows


def _model_name(side: Any) -> str:
    model = side.get("model") if isinstance(side, dict) else None
    return str(model.get("name", "?")) if isinstance(model, dict) else str(model or "?")


def _comparison_html(run: Run) -> str:
    """The before/after evaluation from comparison.json (written by a run with `eval_before_after`), read safely."""
    data, error = read_comparison(run.path)
    if error is not None:
        return f'<p class="notes">comparison.json is unreadable ({html.escape(error)}).</p>'
    if data is None:
        return ""
    metrics = data.get("metrics", data.get("comparison")) if isinstance(data, dict) else None
    rows = []
    if isinstance(metrics, dict):
        for name, entry in metrics.items():
            if not isinstance(entry, dict):
                continue
            before = entry.get("before", entry.get("baseline"))
            after = entry.get("after", entry.get("model"))
            diff = entry.get("difference", entry.get("diff", entry.get("delta")))
            ci = entry.get("diff_ci95", entry.get("ci", entry.get("ci95", entry.get("difference_ci"))))
            if ci is None and "ci_low" in entry:
                ci = [entry.get("ci_low"), entry.get("ci_high")]
            ci_text = f"{_number(ci[0])} .. {_number(ci[1])}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
            tests = [
                f"{key.removeprefix('mcnemar_')} {_number(entry[key])}"
                for key in ("mcnemar_p", "p_value")
                if key in entry
            ]
            extra = ", ".join(part for part in [_counts(str(name), entry), *tests] if part)
            rows.append(
                f"<tr><td>{html.escape(str(name))}</td><td>{_number(before)}</td><td>{_number(after)}</td>"
                f"<td>{_number(diff)}</td><td>{ci_text}</td><td>{extra}</td></tr>"
            )
    models = ""
    if isinstance(data, dict):
        names = [_model_name(data.get(side)) for side in ("before", "after")]
        models = f"<p class='sub'>before: {html.escape(names[0])} · after: {html.escape(names[1])}"
        models += f" · {_number(data['problems'])} problems matched" if "problems" in data else ""
        models += " (forced)" if data.get("forced") else ""
        models += " (trl-guided eval)</p>"
    raw = html.escape(json.dumps(data, indent=2)[:20000])
    table = (
        "<table class='branches'><thead><tr><th>metric</th><th>before</th><th>after</th><th>difference</th>"
        "<th>95% CI</th><th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        if rows
        else "<p>comparison.json has no per-metric table this report knows; the file is shown below.</p>"
    )
    return (
        f"<h2 id='evaluation'>Before / after evaluation</h2>{models}{table}"
        f"<details><summary>comparison.json</summary><pre class='text'>{raw}</pre></details>"
    )


def _counts(name: str, entry: dict) -> str:
    """The per-problem counts of a comparison entry by the metric's direction. Files written before entries knew
    their direction hold `wins`/`losses` meaning "after is higher"/"lower": those are read by the metric's name."""
    if "better" in entry or "higher" in entry:
        return count_text(entry)
    if {"wins", "losses", "ties"} <= entry.keys():
        return count_text(directed_counts(name, entry["wins"], entry["losses"], entry["ties"]))
    return ""


def build_report(run_dir: str | Path, groups: int = 8, ot_plan: bool = True) -> str:
    """The HTML page of a run directory (see the module docstring)."""
    run = load_run(run_dir)
    notes = list(run.notes)
    title = f"Guided GRPO run: {run.path.resolve().name}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title>{ERROR_PROBE}<style>{CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>{html.escape(str(run.path.resolve()))} · report written "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
    ]
    notes_at = len(parts)
    parts.append(_facts_html(run, notes))
    parts.append(_comparison_html(run))
    ot_on = (run.training.get("ot_coef") or 0) > 0 or any("ot/cost" in e for e in run.history)
    parts.extend(_curves_html(run, ot_on))
    samples, chosen_groups = _samples_html(run, groups, notes)
    parts.extend(samples)
    if ot_on:
        parts.extend(_ot_html(run, chosen_groups, notes, ot_plan))
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.insert(
            notes_at, f"<div class='notes' id='notes'><strong>Missing or skipped</strong><ul>{items}</ul></div>"
        )
    parts.append("<footer>Written by <code>trl-guided report</code>; self-contained (no network).</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _facts_html(run: Run, notes: list[str]) -> str:
    """The header: headline numbers next to the settings."""
    numbers = headline(run)
    steps = f"{numbers['steps']}" + (f" of {numbers['max_steps']}" if numbers.get("max_steps") else "")
    if "reward_first" in numbers:
        reward = (
            f"<span class='big' id='reward-first'>{numbers['reward_first']:.3f}</span> → "
            f"<span class='big' id='reward-last'>{numbers['reward_last']:.3f}</span>"
            f"<br><small>mean of the first / last {numbers['window']} logged steps (training prompts, guided "
            "sampling: not an evaluation)</small>"
        )
    else:
        reward = "no reward logged"
        notes.append("The log history has no training reward.")
    facts = [("steps", f"<span class='big' id='steps'>{steps}</span>"), ("wall time", _duration(numbers["wall_time"]))]
    facts.append(("training reward", reward))
    left = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
    right = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in _settings_rows(run))
    return f"<div class='facts'><table>{left}</table><table>{right}</table></div>"


def _curves_html(run: Run, ot_on: bool) -> list[str]:
    """Every logged curve group (the OT group is drawn in its own section when OT is on)."""
    figures = []
    for group in plots.CURVE_GROUPS:
        if group.name == "ot" and ot_on:
            continue
        fig = plots.figure(run.history, group)
        if fig is not None:
            figures.append(f"<figure id='curve-{group.name}'>{plots.svg(fig)}</figure>")
    shown = f"<div class='curves'>{''.join(figures)}</div>" if figures else "<p>No metrics were logged.</p>"
    return ["<h2 id='curves'>Curves</h2>", shown]


def _samples_html(run: Run, groups: int, notes: list[str]) -> tuple[list[str], list[Group]]:
    """Up to `groups` sample groups from the logged steps, and the groups shown (the OT plan draws on them)."""
    parts = ["<h2 id='samples'>Sample groups</h2>"]
    files = run.completion_files
    chosen_groups: list[Group] = []
    if not files:
        notes.append("No completions/*.parquet: set log_completions: true in the recipe to see sample groups.")
        return [*parts, "<p>No logged completions (log_completions was off).</p>"], chosen_groups
    reward_names = list(run.task.get("reward_funcs") or [])
    weights = run.training.get("reward_weights")
    chosen = pick_steps(files)
    parts.append(
        f"<p class='sub'>{len(files)} logged steps; shown: "
        + ", ".join(html.escape(f.stem.removeprefix("completions_").lstrip("0") or "0") for f in chosen)
        + f". Up to {groups} groups in total.</p>"
    )
    legend_at = len(parts)
    for path, count in zip(chosen, spread(groups, len(chosen)), strict=True):
        try:
            found = read_groups(path, reward_names, weights, run.training.get("num_generations"))
        except Exception as error:  # noqa: BLE001 - a truncated or foreign parquet is reported, not raised
            notes.append(f"{path.relative_to(run.path)} is unreadable ({type(error).__name__}); skipped.")
            continue
        if not found:
            notes.append(f"{path.relative_to(run.path)} holds no rows.")
            continue
        # Spread the shown groups over the batch, so a step's groups are not all from its first prompts.
        shown = min(count, len(found))
        picks = sorted({round(i * (len(found) - 1) / max(shown - 1, 1)) for i in range(shown)})
        names = reward_names or list(found[0].branches[0].rewards)
        for group in (found[i] for i in picks):
            parts.append(_group_html(group, names))
            chosen_groups.append(group)
    if any(group.prefix is not None for group in chosen_groups):
        parts.insert(legend_at, LEGEND)
    elif chosen_groups:
        parts.insert(legend_at, "<p class='sub'>No segment columns (guidance was off): whole completions shown.</p>")
    return parts, chosen_groups


def _ot_html(run: Run, groups: list[Group], notes: list[str], ot_plan: bool) -> list[str]:
    """The OT section: its curves and, unless skipped, the transport plan of a shown group."""
    fig = plots.figure(run.history, next(g for g in plots.CURVE_GROUPS if g.name == "ot"))
    parts = ["<h2 id='ot'>Optimal transport</h2><div class='ot'>"]
    parts.append(
        f"<div class='curves'><figure id='curve-ot'>{plots.svg(fig)}</figure></div>"
        if fig
        else "<p>No ot/* metric logged.</p>"
    )
    if ot_plan:
        parts.append(_plan_html(run, groups, notes))
    else:
        notes.append(f"OT transport plan not drawn (skipped); `trl-guided report {run.path}` draws it.")
    parts.append("</div>")
    return parts


def _plan_html(run: Run, groups: list[Group], notes: list[str]) -> str:
    if not any(g.branches for g in groups):
        notes.append("No logged completion to draw an OT transport plan on.")
        return ""
    files = run.completion_files
    try:
        table = pd.read_parquet(files[-1])
        row = table.iloc[0]
        plan = transport_plan(run, row["prompt"], message_text(row["completion"]))
        dense, tokens, window, cost, trained, reference = plan
    except Exception as error:  # noqa: BLE001 - the picture is optional; say why it is absent
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        notes.append(f"OT transport plan not drawn: {message}")
        return ""
    title = f"Transport plan, {trained} vs {reference.split(' (')[0].removeprefix('the ')}"
    caption = (
        f"One logged completion of step {int(row['step']) if 'step' in row else '?'} ({len(tokens)} tokens, "
        f"re-tokenized from the logged text): rows are the {trained}'s last hidden states, columns those of "
        f"{html.escape(reference)}. Banded Sinkhorn (trl_guided.ot) with window {window}: only cells with "
        f"|i - j| ≤ {window} can carry mass. Cost of this sample {cost:.4f}. A sharp diagonal means the trained "
        "model's states still match the reference token by token; mass off the diagonal means they moved."
    )
    return f"<figure id='ot-plan'>{plan_svg(dense, tokens, window, title)}<figcaption>{caption}</figcaption></figure>"


def write_report(run_dir: str | Path, output: str | Path | None = None, groups: int = 8, ot_plan: bool = True) -> Path:
    """Write the report (default RUN_DIR/report.html) and return its path."""
    page = build_report(run_dir, groups=groups, ot_plan=ot_plan)
    path = Path(output) if output else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def log_to_wandb(path: Path) -> bool:
    """Attach the report to the active wandb run as an HTML artifact (and an HTML panel); False when no run."""
    try:
        import wandb  # optional: the `wandb` extra
    except ImportError:
        return False
    if wandb.run is None:
        return False
    artifact = wandb.Artifact(f"report-{wandb.run.id}", type="report", description="trl-guided report (HTML)")
    artifact.add_file(str(path), name="report.html")
    wandb.run.log_artifact(artifact)
    wandb.run.log({"report": wandb.Html(path.read_text(encoding="utf-8"), inject=False)})
    return True
