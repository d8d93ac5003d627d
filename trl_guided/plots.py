"""The training curves of a run, drawn from its `trainer_state.json` log history: PNG files and inline SVG.

One table (`CURVE_GROUPS`) decides which metrics share a figure; `trl-guided plot` writes one PNG per group that has
data, and `trl-guided report` inlines the same figures as SVG. Evaluation entries TRL logs during training (`eval_*`)
are drawn dashed on the figure of their training metric.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CurveGroup:
    name: str  # file name stem and figure id
    title: str
    ylabel: str
    metrics: tuple[str, ...]  # exact log keys; a key ending in "*" matches every key with that prefix ("rewards/*")


CURVE_GROUPS = (
    CurveGroup("reward", "Reward (total and per reward function)", "mean reward", ("reward", "rewards/*/mean")),
    CurveGroup(
        "reward_spread",
        "Reward spread inside groups",
        "value",
        ("reward_std", "frac_reward_zero_std"),
    ),
    CurveGroup(
        "segments",
        "Segment lengths (tokens per completion)",
        "tokens",
        ("guidance/prefix_length", "guidance/guide_length", "guidance/postfix_length", "guidance/trained_tokens"),
    ),
    CurveGroup(
        "guidance_prefix",
        "Prefixes: share empty, EOS retries per group",
        "value",
        ("guidance/empty_prefix_ratio", "guidance/prefix_retries"),
    ),
    CurveGroup(
        "completion_length",
        "Completion length",
        "tokens",
        ("completions/mean_length", "completions/min_length", "completions/max_length"),
    ),
    CurveGroup("kl", "KL to the reference model", "KL", ("kl",)),
    CurveGroup("ot", "Optimal transport on hidden states", "value", ("ot/cost", "ot/penalty", "ot/marginal_error")),
    CurveGroup("loss", "Loss", "loss", ("loss",)),
    CurveGroup("learning_rate", "Learning rate", "learning rate", ("learning_rate",)),
)


def _matches(pattern: str, key: str) -> bool:
    if "*" not in pattern:
        return key == pattern
    return re.fullmatch(re.escape(pattern).replace(r"\*", "[^/]+"), key) is not None


def series(history: list[dict], group: CurveGroup) -> dict[str, list[tuple[float, float]]]:
    """{metric key: [(step, value), ...]} of the group's training metrics and their `eval_` counterparts."""
    keys: list[str] = []
    for entry in history:
        for key in entry:
            base = key.removeprefix("eval_")
            if key not in keys and any(_matches(pattern, base) for pattern in group.metrics):
                keys.append(key)
    out: dict[str, list[tuple[float, float]]] = {}
    for key in keys:
        points = [
            (float(e["step"]), float(e[key]))
            for e in history
            if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool) and "step" in e
        ]
        if not points:
            continue
        # Identical curves (one reward function's mean and the total reward; OT penalty and cost at target 0) are one
        # line labelled with both names, not two lines drawn on top of each other.
        same = next((name for name, values in out.items() if values == points), None)
        if same is None:
            out[key] = points
        else:
            out[f"{same} = {key}"] = out.pop(same)
    return out


def _pyplot():
    try:
        import matplotlib  # heavy: loaded only when a figure is drawn
    except ImportError as error:
        raise SystemExit("Plots need matplotlib: pip install matplotlib (it comes with trl-guided).") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, after the Agg backend is chosen

    return plt


def figure(history: list[dict], group: CurveGroup):
    """The group's matplotlib figure, or None when the run logged none of its metrics."""
    data = series(history, group)
    if not data:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator  # heavy: matplotlib

    # Constrained layout with the legend below the axes: a legend never hides a curve.
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    for key, points in data.items():
        steps, values = zip(*points, strict=True)
        evaluation = key.startswith("eval_")
        ax.plot(
            steps,
            values,
            linestyle="--" if evaluation else "-",
            marker="o" if len(points) <= 30 else None,
            markersize=3,
            label=key,
        )
    ax.set_title(group.title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(group.ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if group.name == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    # About 100 characters fit in one legend row at this size; long names get a row each instead of being cut.
    columns = max(1, min(3, len(data), 100 // (max(len(key) for key in data) + 8)))
    fig.legend(loc="outside lower center", ncols=columns, fontsize=8, frameon=False)
    return fig


def svg(fig) -> str:
    """The figure as an inline `<svg>` element, text kept as text (searchable, small, crisp when printed)."""
    plt = _pyplot()
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.DOTALL)
    return text


def save_pngs(history: list[dict], out_dir: Path, dpi: int = 120) -> list[Path]:
    """One PNG per curve group that has data, named `<group>.png`, in `out_dir`."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for group in CURVE_GROUPS:
        fig = figure(history, group)
        if fig is None:
            continue
        path = out_dir / f"{group.name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths


def reward_curve(log_history: list[dict], path: Path) -> Path | None:
    """The end-of-training summary picture: mean reward per step and mean completion tokens on a second axis."""
    try:
        plt = _pyplot()
    except SystemExit:
        return None
    points = [(e["step"], e["reward"]) for e in log_history if "reward" in e and "loss" in e]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points, strict=True), marker=".", label="reward")
    lengths = [(e["step"], e["completions/mean_length"]) for e in log_history if "completions/mean_length" in e]
    if lengths:
        twin = ax.twinx()
        twin.plot(*zip(*lengths, strict=True), color="tab:orange", alpha=0.6, label="completion tokens")
        twin.set_ylabel("mean completion tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("Guided GRPO training reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
