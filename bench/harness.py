"""Shared pieces of the guided-vs-vanilla benchmarks: settings, the two trainers, token counting, output.

Each benchmark builds a stock `trl.GRPOTrainer` (with `trl.GRPOConfig`) and a `GuidedGRPOTrainer` (with
`GuidedGRPOConfig`, through `trl_guided.train.build_trainer`, as `trl-guided train` builds it) from the same
`Settings` (model, prompts, G, lengths, seed) and times the trainers' own entry points; nothing here re-implements
trainer logic. Progress goes to stderr, the one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_START = time.perf_counter()

# stdout carries the JSON report only: from here on, whatever else is written to file descriptor 1 (library prints,
# DeepSpeed's logger, C code, inherited by child processes) goes to stderr; `emit` writes to the original stdout.
sys.stdout.flush()
_REPORT_STREAM = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

# Imported after the lines above: huggingface_hub and datasets read the offline switches when they are imported, and
# whatever a library prints on import belongs on stderr.
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, ModelConfig  # noqa: E402

from trl_guided import GuidedGRPOConfig  # noqa: E402
from trl_guided.locate import locate_start  # noqa: E402
from trl_guided.recipe import model_init_kwargs  # noqa: E402
from trl_guided.tasks import TaskArguments  # noqa: E402
from trl_guided.tiny_models import build_tiny_model  # noqa: E402
from trl_guided.train import build_trainer as build_guided_trainer  # noqa: E402
from trl_guided.train import task_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("vanilla", "guided")
TINY_PUNCTUATION = ["e", "a", "o", "t", "s"]  # a random tiny model rarely samples real punctuation marks


@dataclasses.dataclass
class Settings:
    """What both trainers share. Full size by default; `tiny()` gives the seconds-long smoke size."""

    model: str = "embedded:smollm2-135m-instruct"
    task: str = "length"
    reward: str = "smooth_length"
    num_generations: int = 8
    groups: int = 1  # prompt groups per step: per_device_train_batch_size = groups * G (1: as a GPU recipe's 16 rows)
    max_completion_length: int = 256
    prefix_min_tokens: int | None = None  # None: GuidedGRPOConfig's default, derived from max_completion_length
    prefix_max_tokens: int | None = None
    min_guide_tokens: int = 2
    max_guide_tokens: int = 8
    punctuation: list[str] | None = None  # None: GuidedGRPOConfig's default marks
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    learning_rate: float = 1e-6
    gradient_checkpointing: bool = False
    dtype: str | None = None  # model weights dtype (e.g. bfloat16 on a GPU); None: TRL's default (float32)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    tiny_hidden_size: int = 32

    @classmethod
    def tiny(cls) -> Settings:
        return cls(
            model="tiny",
            num_generations=4,
            groups=2,
            max_completion_length=24,
            prefix_min_tokens=4,
            prefix_max_tokens=10,
            max_guide_tokens=4,
            punctuation=TINY_PUNCTUATION,
            repeats=1,
        )

    @property
    def batch_size(self) -> int:
        return self.groups * self.num_generations


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark understands; unset flags keep the full (or `--tiny`) defaults."""
    parser.add_argument("--tiny", action="store_true", help="tiny local model, few tokens, 1 repeat (smoke run)")
    parser.add_argument("--model", help="model path, hub id, 'embedded:smollm2-135m-instruct' or 'tiny'")
    parser.add_argument("--task", help="trl_guided.data task (default: length)")
    parser.add_argument("--reward", help="trl_guided.rewards reward name (default: smooth_length)")
    parser.add_argument("--num-generations", type=int, help="G (default 8)")
    parser.add_argument("--groups", type=int, help="prompt groups per step (default 1)")
    parser.add_argument("--max-completion-length", type=int, help="default 256")
    parser.add_argument("--prefix-min-tokens", type=int)
    parser.add_argument("--prefix-max-tokens", type=int)
    parser.add_argument("--min-guide-tokens", type=int)
    parser.add_argument("--max-guide-tokens", type=int)
    parser.add_argument("--repeats", type=int, help="timed repeats (default 3), the median is reported")
    parser.add_argument("--warmup", type=int, help="untimed warm-up repeats (default 1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--dtype", help="model weights dtype, e.g. bfloat16 (default: TRL's float32)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: one per core)")
    parser.add_argument("--out", default="-", help="also write the JSON to this file ('-': stdout only)")
    parser.add_argument("--settings", help=argparse.SUPPRESS)  # JSON of a parent's Settings (child processes)


def settings_from(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    """`base` (default: full or `--tiny` size) with every flag given on the command line applied."""
    if args.settings:
        return Settings(**json.loads(args.settings))
    settings = base or (Settings.tiny() if args.tiny else Settings())
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(settings, field.name, value)
    return settings


# ------------------------------------------------------------------------------------------------------- progress


def progress(bench: str, message: str) -> None:
    """One progress line on stderr (the JSON stays alone on stdout)."""
    print(f"[bench {bench} +{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def emit_text(text: str) -> None:
    """A report that is not JSON (e.g. a Markdown table), on the real stdout."""
    print(text, file=_REPORT_STREAM, flush=True)


def emit(result: dict[str, Any], out: str = "-") -> None:
    text = json.dumps(result, indent=2)
    emit_text(text)
    if out and out != "-":
        Path(out).write_text(text + "\n")


def parse_json_output(stdout: str) -> dict[str, Any]:
    """The last JSON object a benchmark printed (libraries may print other lines before it)."""
    decoder, found, offset = json.JSONDecoder(), None, 0
    for line in stdout.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                found, _ = decoder.raw_decode(stdout, offset)
            except json.JSONDecodeError:
                pass
        offset += len(line)
    if found is None:
        raise ValueError(f"no JSON object in the output: {stdout[-500:]!r}")
    return found


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median of the timed repeats, with every repeat."""
    return {"median": statistics.median(values), "repeats": list(values)}


def median_seconds(call, repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `call`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def target(value: float | None, at_most: float) -> dict[str, Any]:
    """A target recorded next to the measured ratio (not asserted: timings on a shared machine are noisy)."""
    return {"value": value, "at_most": at_most, "pass": value is not None and value <= at_most}


def ratio(guided: float | None, vanilla: float | None) -> float | None:
    if guided is None or not vanilla:
        return None
    return guided / vanilla


def synchronize() -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """This process's peak resident set size (the kernel's high-water mark, `ru_maxrss`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(memory_gb, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


# ------------------------------------------------------------------------------------------------- the two trainers


def resolve_model(settings: Settings) -> str:
    """A local model directory: 'tiny' is built (deterministic by seed); any other name is found as `trl-guided train`
    finds its starting model (`locate_start`: a run folder's final model or newest checkpoint, 'embedded:*' converted
    once)."""
    if settings.model == "tiny":
        folder = tempfile.mkdtemp(prefix="bench-tiny-")
        return build_tiny_model(folder, seed=settings.seed, hidden_size=settings.tiny_hidden_size)
    return locate_start(settings.model).path


def config_fields(settings: Settings, output_dir: str, max_steps: int = 1) -> dict[str, Any]:
    """The GRPOConfig fields both trainers get."""
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        max_steps=max_steps,
        learning_rate=settings.learning_rate,
        beta=0.0,
        seed=settings.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=settings.gradient_checkpointing,
        disable_tqdm=True,
    )


def guided_fields(settings: Settings) -> dict[str, Any]:
    """The GuidedGRPOConfig fields on top of the shared ones (guidance scope: guidance tokens only)."""
    fields: dict[str, Any] = dict(
        guidance_loss_scope="guidance",
        min_guide_tokens=settings.min_guide_tokens,
        max_guide_tokens=settings.max_guide_tokens,
        prefix_min_tokens=settings.prefix_min_tokens,
        prefix_max_tokens=settings.prefix_max_tokens,
    )
    if settings.punctuation is not None:
        fields["punctuation"] = settings.punctuation
    return fields


def recipe_arguments(settings: Settings, model_path: str) -> tuple[TaskArguments, ModelConfig]:
    """The settings' task, reward and model as a recipe states them (the reward's options: the recipe defaults)."""
    model_args = ModelConfig(model_name_or_path=model_path)
    if settings.dtype:
        model_args.dtype = settings.dtype
    return TaskArguments(task=settings.task, reward_funcs=[settings.reward]), model_args


def build_trainer(
    kind: str, settings: Settings, model_path: str, max_steps: int = 1, callbacks=None, overrides: dict | None = None
):
    """`trl.GRPOTrainer` + `GRPOConfig` ("vanilla") or `GuidedGRPOTrainer` + `GuidedGRPOConfig` ("guided").

    The guided trainer is `trl_guided.train.build_trainer`'s, from the settings as a recipe; the vanilla one is TRL's
    own class given what that factory gives the guided one: the model with the same `from_pretrained` arguments, the
    task's rewards and train split (`task_inputs`). `overrides`: config fields set on top of the shared ones (e.g. OT
    settings for the guided trainer)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    task_args, model_args = recipe_arguments(settings, model_path)
    common = config_fields(settings, tempfile.mkdtemp(prefix=f"bench-{kind}-"), max_steps)
    common.update(overrides or {})
    if kind == "vanilla":
        args = GRPOConfig(**{"model_init_kwargs": model_init_kwargs(model_args), **common})
        trainer = GRPOTrainer(model=model_path, args=args, callbacks=callbacks, **task_inputs(task_args, args))
    elif kind == "guided":
        args = GuidedGRPOConfig(**{**guided_fields(settings), **common})
        trainer = build_guided_trainer(task_args, args, model_args, callbacks)
    else:
        raise ValueError(f"unknown trainer kind {kind!r}; choose one of {KINDS}")
    trainer.model.train()  # Trainer.train() does this; direct calls to the trainer's steps need it too
    return trainer


def benchmark_inputs(settings: Settings, trainer) -> list[dict[str, Any]]:
    """One generation batch as TRL's sampler lays it out: each of the first `groups` prompts of the trainer's train
    split (every trainer `build_trainer` makes gets the same) repeated G times."""
    rows = [trainer.train_dataset[i] for i in range(settings.groups)]
    return [row for row in rows for _ in range(settings.num_generations)]


def guided_settings_used(trainer) -> dict[str, Any]:
    """The guided fields as the config resolved them (prefix range defaults depend on the completion length)."""
    args = trainer.args
    names = ("prefix_min_tokens", "prefix_max_tokens", "min_guide_tokens", "max_guide_tokens", "guidance_loss_scope")
    return {name: getattr(args, name) for name in names}


def describe(settings: Settings, model_path: str) -> dict[str, Any]:
    described = dataclasses.asdict(settings)
    described["batch_size"] = settings.batch_size
    described["model_path"] = model_path
    return described


def last_metric(trainer, name: str) -> float | None:
    values = trainer._metrics["train"].get(name)
    return values[-1] if values else None


# --------------------------------------------------------------------------------------------- generation counter


class GenerationCounter:
    """Counts generation work while installed: every call of TRL's backend dispatch
    `GRPOTrainer._generate_single_turn` (tokens returned per row: every backend) and every transformers `generate`
    call (decode steps = new columns; row-steps = rows * steps, the work of the transformers backend).

    Both are patched on the class, so the guided trainer's per-phase `super()._generate_single_turn` calls are seen.
    """

    def __init__(self, eos_token_ids: Sequence[int]):
        self.eos = set(eos_token_ids)
        self.backend_calls: list[dict[str, Any]] = []
        self.generate_calls: list[dict[str, Any]] = []
        self._saved: list[tuple[type, str, Callable]] = []

    def __enter__(self) -> GenerationCounter:
        counter = self
        original_turn, original_generate = GRPOTrainer._generate_single_turn, GenerationMixin.generate

        def generate_single_turn(trainer, prompt_ids, *args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = original_turn(trainer, prompt_ids, *args, **kwargs)
            lengths = [len(ids) for ids in completion_ids]
            counter.backend_calls.append(
                {
                    "rows": len(prompt_ids),
                    "tokens": sum(lengths),
                    "longest": max(lengths, default=0),
                    "seconds": time.perf_counter() - start,
                }
            )
            return completion_ids, logprobs

        def generate(model, *args, **kwargs):
            start = time.perf_counter()
            output = original_generate(model, *args, **kwargs)
            sequences = output if hasattr(output, "shape") else output.sequences
            inputs = kwargs.get("input_ids", args[0] if args else None)
            new = sequences[:, inputs.size(1) :] if inputs is not None else sequences
            counter.generate_calls.append(
                {
                    "rows": new.size(0),
                    "decode_steps": new.size(1),
                    "tokens": sum(counter._until_eos(row) for row in new.tolist()),
                    "seconds": time.perf_counter() - start,
                }
            )
            return output

        self._saved = [
            (GRPOTrainer, "_generate_single_turn", original_turn),
            (GenerationMixin, "generate", original_generate),
        ]
        GRPOTrainer._generate_single_turn = generate_single_turn
        GenerationMixin.generate = generate
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)

    def _until_eos(self, row: list[int]) -> int:
        for index, token in enumerate(row):
            if token in self.eos:
                return index + 1
        return len(row)

    def reset(self) -> None:
        self.backend_calls.clear()
        self.generate_calls.clear()

    def totals(self) -> dict[str, Any]:
        return {
            "generated_tokens": sum(c["tokens"] for c in self.backend_calls),
            "backend_calls": len(self.backend_calls),
            "decode_steps": sum(c["decode_steps"] for c in self.generate_calls),
            "row_steps": sum(c["rows"] * c["decode_steps"] for c in self.generate_calls),
            "generate_tokens": sum(c["tokens"] for c in self.generate_calls),
            "generate_seconds": sum(c["seconds"] for c in self.generate_calls),
            "calls": [dict(c) for c in self.backend_calls],
            "generate": [dict(c) for c in self.generate_calls],
        }
