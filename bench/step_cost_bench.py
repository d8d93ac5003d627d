"""Step cost at the learning study's shape, TRL's own GRPOTrainer side by side, with a per-phase breakdown.

    taskset -c 1 env OMP_NUM_THREADS=1 python bench/step_cost_bench.py --out bench/step_cost.json
    python bench/step_cost_bench.py --tiny                      # seconds-long smoke run, JSON on stdout

The shape of the instruction-following study: task `instructions` with the verifiable reward `constraints_followed`,
2 prompts x 4 samples a step in micro-batches of 4 (gradient_accumulation_steps 2), 128 completion tokens, `beta` 0,
truncated answers trained, learning rate 1e-5, the embedded SmolLM2-135M on one torch thread. Configurations: TRL's
plain `GRPOTrainer`, the plugin with `guidance=False`, the default guided configuration (`guidance_postfix`), and the
TreeRL-style tree of bench/learning_regime_arms.yaml.

All trainers live in this one process, each training in its own thread, and a turnstile lets exactly one run a step at
a time, round-robin: the configurations' steps interleave, so drift of the machine hits all of them alike. Each step's
wall time runs from `on_step_begin` to `on_step_end`; its phases are the time spent in: generation (TRL's `_generate`,
the three guided phases included), of which branch scoring (the guided sampler's scoring forward at the branch point:
it runs only where generation keeps no logits, e.g. vLLM; on the transformers backend used here the signals are read
off generation and this phase is 0), scoring (the rest of `_generate_and_score_completions`: rewards, advantages, old
log-probs, the loss focus), loss (`training_step` without its `_prepare_inputs`: the loss forward and backward), and
optimizer (the rest of the step: gradient clipping, optimizer step, zero_grad). Medians over the timed steps after the
warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml
from harness import ROOT, Settings, build_trainer, emit, machine_info, progress, resolve_model, summary
from transformers import TrainerCallback

ARMS = ROOT / "bench" / "learning_regime_arms.yaml"
# The instruction recipe's settings (recipes/smollm2-135m-instruct/instructions_cpu.yaml) every trainer shares.
SHARED = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    mask_truncated_completions=False,
    temperature=1.0,
)
GUIDED = dict(postfix_decay=0.9)
CONFIGURATIONS = ("trl_plain", "guidance_off", "default", "treerl")
TARGETS = {"guidance_off": 0.90, "default": 0.85, "treerl": 0.95}


def study_settings(tiny: bool) -> Settings:
    if tiny:
        settings = Settings.tiny()
        settings.task, settings.reward = "instructions", "constraints_followed"
        return settings
    return Settings(
        task="instructions",
        reward="constraints_followed",
        num_generations=4,
        groups=2,
        max_completion_length=128,
        prefix_min_tokens=8,
        prefix_max_tokens=48,
        max_guide_tokens=8,
        learning_rate=1e-5,
        threads=1,
        warmup=1,
        repeats=7,
    )


def overlays() -> dict[str, dict[str, Any] | None]:
    """Configuration -> guided config fields (None: TRL's own trainer)."""
    arms = yaml.safe_load(ARMS.read_text())
    return {
        "trl_plain": None,
        "guidance_off": {"guidance": False},
        "default": {"guidance": True, "guidance_loss_scope": "guidance_postfix", **GUIDED},
        "treerl": {**arms["treerl"], **GUIDED},
    }


class Turnstile:
    """Round-robin: the named trainers take turns, one step each; a finished (or failed) trainer leaves the ring."""

    def __init__(self, names: list[str]):
        self.ring, self.turn = list(names), 0
        self.condition = threading.Condition()

    def enter(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.ring[self.turn % len(self.ring)] == name)

    def leave(self, name: str, finished: bool = False) -> None:
        with self.condition:
            if finished:
                index = self.ring.index(name)
                self.ring.remove(name)
                self.turn = index if self.ring else 0
            else:
                self.turn += 1
            self.condition.notify_all()


class PhaseTimer(TrainerCallback):
    """Takes a turn at each step begin, times the step and its phases (see the module docstring)."""

    def __init__(self, name: str, turnstile: Turnstile, total: int):
        self.name, self.turnstile, self.total = name, turnstile, total
        self.steps: list[dict[str, float]] = []
        self.phases: dict[str, float] = defaultdict(float)
        self._start = 0.0

    def timed(self, phase: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.phases[phase] += time.perf_counter() - start

        return wrapper

    def install(self, trainer) -> None:
        trainer._generate = self.timed("generation", trainer._generate)
        trainer._generate_and_score_completions = self.timed(
            "generate_and_score", trainer._generate_and_score_completions
        )
        trainer._prepare_inputs = self.timed("prepare_inputs", trainer._prepare_inputs)
        trainer.training_step = self.timed("training_step", trainer.training_step)
        backend = getattr(trainer, "_backend", None)
        if backend is not None:
            backend.token_signals = self.timed("branch_scoring", backend.token_signals)

    def on_step_begin(self, args, state, control, **kwargs):
        self.turnstile.enter(self.name)
        self.phases.clear()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        p = self.phases
        self.steps.append(
            {
                "step": seconds,
                "generation": p["generation"],
                "branch_scoring": p["branch_scoring"],
                "scoring": p["generate_and_score"] - p["generation"],
                "loss": p["training_step"] - p["prepare_inputs"],
                "optimizer": seconds - p["training_step"],
            }
        )
        progress("step_cost", f"{self.name} step {len(self.steps)}/{self.total}: {seconds:.2f} s")
        self.turnstile.leave(self.name, finished=len(self.steps) == self.total)


def logged_means(trainer, warmup: int) -> dict[str, float]:
    """Means over the timed steps of the per-step metrics that explain the cost."""
    names = ("completions/mean_length", "frac_reward_zero_std", "savings/skipped_rows", "guidance/prefix_retries")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry][warmup:]
    means = {}
    for name in names:
        values = [entry[name] for entry in logs if name in entry]
        if values:
            means[name] = sum(values) / len(values)
    return means


def run(settings: Settings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads or 1)
    model_path = resolve_model(settings)
    total = settings.warmup + settings.repeats
    turnstile = Turnstile(list(CONFIGURATIONS))
    trainers, timers, errors = {}, {}, {}
    for name, overlay in overlays().items():
        timers[name] = PhaseTimer(name, turnstile, total)
        kind = "vanilla" if overlay is None else "guided"
        overrides = {**SHARED, **(overlay or {})}
        trainers[name] = build_trainer(kind, settings, model_path, total, [timers[name]], overrides)
        timers[name].install(trainers[name])
        progress("step_cost", f"{name}: built ({type(trainers[name]).__name__})")

    def train(name: str) -> None:
        try:
            trainers[name].train()
        except Exception as error:  # noqa: BLE001 - recorded in the report; the other trainers go on
            errors[name] = repr(error)
            turnstile.leave(name, finished=True)

    threads = [threading.Thread(target=train, args=(name,)) for name in CONFIGURATIONS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    reports = {}
    for name in CONFIGURATIONS:
        timed = timers[name].steps[settings.warmup :]
        if not timed:
            continue
        phases = {phase: statistics.median(step[phase] for step in timed) for phase in timed[0]}
        reports[name] = {
            "step_seconds": summary([step["step"] for step in timed]),
            "phase_medians_seconds": phases,
            "steps": timers[name].steps,
            **logged_means(trainers[name], settings.warmup),
        }
    plain = reports.get("trl_plain", {}).get("step_seconds", {}).get("median")
    ratios = {
        name: report["step_seconds"]["median"] / plain
        for name, report in reports.items()
        if plain and name != "trl_plain"
    }
    return {
        "benchmark": "step_cost",
        "machine": machine_info(),
        "settings": {**vars(settings), "shared": SHARED, "configurations": overlays()},
        "configurations": reports,
        "ratios_to_trl_plain": ratios,
        "targets": {name: {"at_most": bound, "value": ratios.get(name)} for name, bound in TARGETS.items()},
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny local model, few tokens: a smoke run")
    parser.add_argument("--repeats", type=int, help="timed steps per configuration (default 7)")
    parser.add_argument("--out", default="-", help="also write the JSON here ('-': stdout only)")
    args = parser.parse_args()
    settings = study_settings(args.tiny)
    if args.repeats:
        settings.repeats = args.repeats
    report = run(settings)
    emit(report, args.out)
    if args.out != "-":
        progress("step_cost", f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
