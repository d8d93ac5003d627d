"""Train with Guided GRPO from a recipe: `trl-guided train --config recipes/<model>/<task>.yaml [--key value ...]`.

The recipe holds the fields of three dataclasses (task, `GuidedGRPOConfig`, TRL's `ModelConfig`); command-line flags
override it. Unknown keys are an error, not silently ignored.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType

import yaml
from trl import GRPOConfig, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .checkpoints import last_complete_checkpoint
from .config import GuidedGRPOConfig
from .data import TASK_OPTIONS, TASKS, load_task
from .models import resolve_model_path
from .plots import reward_curve
from .rewards import REWARD_FUNCS, get_reward
from .trainer import GuidedGRPOTrainer

logger = logging.getLogger("trl_guided.train")
# TRL 1.16 calls transformers' renamed gradient-checkpointing helpers on every step; keep the progress output readable.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


@dataclass
class TaskArguments:
    task: str = field(default="length", metadata={"help": "Task name (trl_guided.data.TASKS)."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local data file instead of the default."})
    eval_size: int = field(default=8, metadata={"help": "Prompts held out for the test split (length task)."})
    dataset_size: int = field(default=1000, metadata={"help": "Rows of a generated task (countdown, ...)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of a generated task (countdown, ...)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Replaces the task's system prompt."})
    arithmetic_mode: str = field(default="evaluate", metadata={"help": "arithmetic: 'evaluate', 'steps' or 'expand'."})
    arithmetic_terms: int = field(default=3, metadata={"help": "arithmetic task: numbers per expression."})
    arithmetic_max_number: int = field(default=20, metadata={"help": "arithmetic task: largest number."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["smooth_length"],
        metadata={"help": f"Reward functions by name: {', '.join(sorted(REWARD_FUNCS))}."},
    )
    length_target: int = field(default=300, metadata={"help": "length rewards: target length in characters."})
    length_tolerance: int = field(default=30, metadata={"help": "smooth_length: no penalty within ± this."})
    length_scale: float = field(default=0.05, metadata={"help": "smooth_length: penalty scale."})
    summary_window: int = field(default=10, metadata={"help": "Steps averaged for the first/last reward summary."})
    eval_before_after: bool = field(
        default=False,
        metadata={
            "help": "Evaluate the starting and the final model on the task's test split (plain sampling) and write "
            "eval_before.json, eval_after.json and comparison.json into output_dir (docs/evaluation.md)."
        },
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Test problems evaluated (None: the whole split)."})
    eval_num_samples: int = field(default=1, metadata={"help": "Samples per test problem (K of pass@K)."})
    eval_temperature: float = field(default=0.0, metadata={"help": "Evaluation temperature (0: greedy)."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Evaluation completion budget (None: max_completion_length)."}
    )


def task_options(task_args: TaskArguments) -> dict:
    """The keyword options of `load_task` that the task fields set (only the fields the task reads, TASK_OPTIONS)."""
    options = {option: getattr(task_args, name) for name, option in TASK_OPTIONS.get(task_args.task, {}).items()}
    if options.get("system_prompt", "") is None:
        del options["system_prompt"]  # the task's own prompt
    return options


def reward_options(task_args: TaskArguments) -> dict[str, dict]:
    """Per reward name, the options the task fields bind (e.g. the length target)."""
    return {
        "length": {"target": task_args.length_target},
        "smooth_length": {
            "target": task_args.length_target,
            "tolerance": task_args.length_tolerance,
            "scale": task_args.length_scale,
        },
    }


def reward_functions_by_name(names: list[str], options: dict[str, dict]) -> list:
    return [get_reward(name, **options.get(name, {})) for name in names]


def reward_functions(task_args: TaskArguments) -> list:
    return reward_functions_by_name(task_args.reward_funcs, reward_options(task_args))


def summarize(log_history: list[dict], window: int) -> dict:
    """Mean reward over the first and the last `window` logged training steps."""
    rewards = [(entry["step"], entry["reward"]) for entry in log_history if "reward" in entry and "loss" in entry]
    if not rewards:
        return {}
    window = max(1, min(window, len(rewards) // 2 or 1))
    first = sum(r for _, r in rewards[:window]) / window
    last = sum(r for _, r in rewards[-window:]) / window
    return {"steps": len(rewards), "window": window, "reward_first": first, "reward_last": last}


def write_run_config(output_dir: Path, task_args, training_args, model_args) -> Path:
    """run_config.json: the run's task, training and model settings, which `trl-guided report` shows."""
    config = {
        "task": asdict(task_args),
        "training": json.loads(training_args.to_json_string()),
        "model": asdict(model_args),
    }
    path = output_dir / "run_config.json"
    path.write_text(json.dumps(config, indent=2, default=str))
    return path


END_OF_RUN_PLAN_MAX_BYTES = 2 * 1024**3


def end_of_run_report(output_dir: Path) -> Path | None:
    """Write report.html into the run directory, print its path, attach it to an active wandb run."""
    from .report import log_to_wandb, write_report

    # The OT picture loads the final and the reference model on CPU: at the end of a large model's run, leave it to
    # an explicit `trl-guided report` (the page says so).
    weights = sum(p.stat().st_size for p in output_dir.glob("*.safetensors"))
    try:
        path = write_report(output_dir, ot_plan=weights < END_OF_RUN_PLAN_MAX_BYTES)
    except Exception as error:  # noqa: BLE001 - the trained model is saved; a report problem must not fail the run
        logger.warning(
            "No report.html written (%s: %s); try `trl-guided report %s`.", type(error).__name__, error, output_dir
        )
        return None
    print(f"Report: {path}")
    log_to_wandb(path)
    return path


def model_init_kwargs(model_args: ModelConfig) -> dict:
    """The `ModelConfig` fields that reach `from_pretrained`, as TRL's own `grpo.py` forwards them (quantization goes
    to the trainer as `quantization_config`, PEFT as `peft_config`)."""
    kwargs = {"revision": model_args.model_revision}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def validate_model_args(model_args: ModelConfig) -> None:
    """Refuse, in one line, what cannot take effect here instead of failing deep inside model loading."""
    import torch

    if (model_args.load_in_4bit or model_args.load_in_8bit) and not torch.cuda.is_available():
        raise SystemExit(
            "load_in_4bit / load_in_8bit quantize with bitsandbytes, which needs a CUDA GPU; none was found. Remove "
            "them (or set them to false) to train in full precision on this machine."
        )


def _server_errors() -> tuple[type[BaseException], ...]:
    """What TRL's VLLMClient raises when its server is gone (requests comes with the `vllm` extra)."""
    try:
        import requests
    except ImportError:
        return (ConnectionError,)
    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)


SERVER_ERRORS = _server_errors()


def _vllm_url(args: GuidedGRPOConfig) -> str:
    return args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"


def vllm_unreachable(args: GuidedGRPOConfig, model_args: ModelConfig) -> str:
    """One line for a vLLM server that is not up when training starts: where it was looked for, how to start it."""
    serve = (
        f"VLLM_SERVER_DEV_MODE=1 vllm serve {model_args.model_name_or_path} --host {args.vllm_server_host} --port "
        f'{args.vllm_server_port} --weight-transfer-config \'{{"backend":"nccl"}}\' --logprobs-mode '
        "processed_logprobs --max-logprobs -1 --enable-prefix-caching"
    )
    return (
        f"The vLLM server at {_vllm_url(args)} did not answer within vllm_server_timeout={args.vllm_server_timeout:g} "
        f"s. Start it first, e.g. `{serve}` (./launch_train.sh --gpus N starts and stops it for you), or fix "
        "vllm_server_base_url / vllm_server_host / vllm_server_port."
    )


def vllm_lost(args: GuidedGRPOConfig, error: BaseException) -> str:
    """One line for a vLLM server that stopped answering mid-run: what is kept and how to go on."""
    checkpoint, _ = last_complete_checkpoint(args.output_dir)
    kept = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was complete yet"
    return (
        f"The vLLM server at {_vllm_url(args)} stopped answering during training ({type(error).__name__}); training "
        f"stopped and {kept}. Restart the server and resume with --resume_from_checkpoint true."
    )


def check_model(name: str, path: str, model_args: ModelConfig, training_args: GuidedGRPOConfig) -> None:
    """One line when the model cannot be found: which name, where it was looked for, and how to fix it."""
    import os

    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if Path(path).exists():
            where = f"the local folder {path} (no loadable config.json)"
        elif offline:
            where = "the local Hugging Face cache only (HF_HUB_OFFLINE=1: the Hub was not asked)"
        else:
            where = "the Hugging Face Hub and its local cache"
        raise SystemExit(
            f"Cannot load model {name!r}: looked in {where} ({type(error).__name__}). Give a local folder with "
            "config.json and weights, an embedded model (embedded:smollm2-135m-instruct), or a Hub name with network "
            "access (HF_HUB_OFFLINE=0); check the spelling and model_revision."
        ) from None


# Exit status of a run that a stop signal ended early with a checkpoint (enable_jit_checkpoint): 128 + SIGTERM, what a
# shell reports for a process that SIGTERM ended, so job scripts that requeue on it need no new case.
STOPPED_BY_SIGNAL = 143


def stopped_line(step: int, checkpoint: str) -> str:
    return (
        f"Stopped by a signal after step {step}; saved {checkpoint}. Resume: the same command with "
        "--resume_from_checkpoint true (slurm/train.slurm requeues the job and resumes by itself)."
    )


def resume_point(training_args: GuidedGRPOConfig) -> str | bool | None:
    """`resume_from_checkpoint` for Trainer: `auto` is the newest complete checkpoint if there is one, else a start."""
    if training_args.resume_from_checkpoint != "auto":
        return training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if last_complete_checkpoint(output_dir)[0] is None:
        logger.warning("resume_from_checkpoint=auto: %s has no complete checkpoint; starting from step 0.", output_dir)
        return None
    return True  # the trainer resolves it again and warns about the incomplete ones it skips


def main(task_args: TaskArguments, training_args: GuidedGRPOConfig, model_args: ModelConfig) -> dict:
    model_path = resolve_model_path(model_args.model_name_or_path)
    check_model(model_args.model_name_or_path, model_path, model_args, training_args)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    options = task_options(task_args)
    eval_before = evaluate_start(task_args, training_args, model_args.model_name_or_path)
    train_dataset = load_task(task_args.task, "train", **options)
    eval_dataset = load_task(task_args.task, "test", **options) if training_args.eval_strategy != "no" else None
    try:
        trainer = GuidedGRPOTrainer(
            model=model_path,
            reward_funcs=reward_functions(task_args),
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
        )
    except SERVER_ERRORS as error:  # TRL's VLLMClient gives up after vllm_server_timeout
        if "vLLM server" not in str(error):
            raise
        raise SystemExit(vllm_unreachable(training_args, model_args)) from None
    if trainer.accelerator.is_main_process:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        write_run_config(Path(training_args.output_dir), task_args, training_args, model_args)
    try:
        trainer.train(resume_from_checkpoint=resume_point(training_args))
    except SERVER_ERRORS as error:
        if not (training_args.use_vllm and training_args.vllm_mode == "server"):
            raise
        raise SystemExit(vllm_lost(training_args, error)) from None
    if trainer.stop_checkpoint is not None:
        trainer.accelerator.wait_for_everyone()  # every rank's part of the checkpoint is written
        if trainer.accelerator.is_main_process:
            print(stopped_line(trainer.state.global_step, trainer.stop_checkpoint), flush=True)
        raise SystemExit(STOPPED_BY_SIGNAL)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json (the log history) at the top of the run directory

    summary = summarize(trainer.state.log_history, task_args.summary_window)
    if trainer.accelerator.is_main_process:
        output_dir = Path(training_args.output_dir)
        plot = reward_curve(trainer.state.log_history, output_dir / "reward_curve.png")
        summary.update(output_dir=str(output_dir), reward_curve=str(plot) if plot else None)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if "reward_first" in summary:
            print(
                f"\nReward: first {summary['window']} steps {summary['reward_first']:.3f} -> "
                f"last {summary['window']} steps {summary['reward_last']:.3f} ({summary['steps']} steps)."
            )
        print(f"Run saved in {output_dir} (model, checkpoints, trainer_state.json, completions/, summary.json).")
    trainer.accelerator.wait_for_everyone()
    if eval_before is not None:
        summary = evaluate_final(task_args, training_args, eval_before, summary)
    if trainer.accelerator.is_main_process:
        end_of_run_report(Path(training_args.output_dir))  # last: its header shows comparison.json
    return summary


# ------------------------------------------------------------------------------------- before/after evaluation
# Runs on the main process only: the other processes wait at a barrier (the wait is bounded by ddp_timeout, 1800 s by
# default; keep eval_limit small enough). The final model is read back from output_dir, where save_model wrote it in
# full (also under ZeRO-3), so no sharded parameter has to be gathered during generation.


def eval_settings(task_args: TaskArguments, training_args: GuidedGRPOConfig):
    from .evaluate import EvalSettings

    return EvalSettings(
        task=task_args.task,
        split="test",
        limit=task_args.eval_limit,
        num_samples=task_args.eval_num_samples,
        temperature=task_args.eval_temperature,
        top_p=training_args.top_p if task_args.eval_temperature > 0 else 1.0,
        max_new_tokens=task_args.eval_max_new_tokens or training_args.max_completion_length,
        batch_size=32,
        seed=training_args.seed,
        backend="transformers",  # the trainer (and maybe a vLLM engine) holds the GPU memory already
        reward_funcs=list(task_args.reward_funcs),
        task_options=task_options(task_args),
        reward_options=reward_options(task_args),
    )


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def evaluate_start(task_args: TaskArguments, training_args: GuidedGRPOConfig, model_name: str) -> dict | None:
    """With eval_before_after, the starting model's result (main process; None elsewhere and when off)."""
    if not task_args.eval_before_after:
        return None
    from .evaluate import EvalError, evaluate, write_json

    settings = eval_settings(task_args, training_args)
    try:
        settings.check()
    except EvalError as error:
        raise SystemExit(f"eval_before_after: {error}") from None
    result = {}
    if _is_main_process():
        output_dir = Path(training_args.output_dir)
        print(f"Evaluating the starting model {model_name} on the {task_args.task} test split ...")
        result = evaluate(model_name, settings, output_dir / "eval_before.jsonl", progress=False)
        write_json(result, output_dir / "eval_before.json")
    _barrier()
    return result


def evaluate_final(task_args: TaskArguments, training_args: GuidedGRPOConfig, before: dict, summary: dict) -> dict:
    """Evaluate the saved final model, compare it with the start, add the numbers to summary.json and the tracker."""
    from .evaluate import compare, evaluate, headline_metric, summary_line, write_json

    if _is_main_process():
        output_dir = Path(training_args.output_dir)
        settings = eval_settings(task_args, training_args)
        print(f"Evaluating the final model in {output_dir} on the {task_args.task} test split ...")
        after = evaluate(str(output_dir), settings, output_dir / "eval_after.jsonl", progress=False)
        write_json(after, output_dir / "eval_after.json")
        comparison = compare(before, after)
        write_json(comparison, output_dir / "comparison.json")
        line = summary_line(comparison)
        print(f"Held-out evaluation ({after['settings']['problems']} test problems): {line}")
        headline = headline_metric(after)
        summary["eval"] = {
            "summary": line,
            "problems": after["settings"]["problems"],
            "metrics": comparison["metrics"],
            "headline": headline,
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _log_to_trackers(comparison)
    _barrier()
    return summary


def _log_to_trackers(comparison: dict) -> None:
    """Before/after values into the run summary of an active wandb run."""
    try:
        import wandb
    except ImportError:
        return
    if getattr(wandb, "run", None) is None:
        return
    for name, entry in comparison["metrics"].items():
        for key in ("before", "after", "diff"):
            wandb.run.summary[f"eval_{key}/{name}"] = entry[key]


def make_parser() -> TrlParser:
    return TrlParser(
        (TaskArguments, GuidedGRPOConfig, ModelConfig),
        prog="trl-guided train",
        epilog="Recipe: --config RECIPE.yaml, a YAML mapping of the fields above; flags given after it override it.",
    )


DATACLASSES = (TaskArguments, GuidedGRPOConfig, ModelConfig)


def _field_types() -> dict[str, object]:
    types: dict[str, object] = {}
    for cls in DATACLASSES:
        types.update(typing.get_type_hints(cls))
    return {name: kind for name, kind in types.items() if not name.startswith("_")}


def _unknown_keys(strings: list[str], source: str) -> SystemExit:
    names = list(_field_types())
    keys = [s[2:].split("=")[0] for s in strings if s.startswith("--")] or strings
    described = []
    for key in keys:
        close = difflib.get_close_matches(key, names, n=1)
        described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return SystemExit(
        f"{source}: unknown key(s) {', '.join(described)}. Every key must be a field of TaskArguments, "
        "GuidedGRPOConfig or ModelConfig; `trl-guided train --help` lists them."
    )


# Fields that hold library objects: HfArgumentParser would pass a YAML value through unchecked.
OBJECT_FIELDS = {
    "parallelism_config": "it is an accelerate ParallelismConfig; configure parallelism in the accelerate config "
    "(`accelerate launch --config_file ...`) or build GuidedGRPOConfig in Python.",
}


def _check_keys_before_building(argv: list[str], recipe: str | None) -> None:
    """Unknown keys fail before any config is built: TRL's and transformers' own checks run while the configs are
    built and would otherwise report a consequence (e.g. bf16 on a machine without GPU) instead of the typo."""
    names = set(_field_types()) | {"config", "help", "h"}
    given = [t[2:].split("=")[0] for t in argv if t.startswith("--")]
    if recipe is not None:
        config = yaml.safe_load(Path(recipe).read_text()) or {}
        given += list(config) if isinstance(config, dict) else []
    for key in sorted(set(given) & set(OBJECT_FIELDS)):
        raise SystemExit(f"{key} cannot be set from a recipe or the command line: {OBJECT_FIELDS[key]}")
    if recipe is not None:
        config = yaml.safe_load(Path(recipe).read_text()) or {}
        if isinstance(config, dict):
            unknown = [key for key in config if key not in names and key != "env"]
            if unknown:
                raise _unknown_keys(unknown, recipe)
    flags = [token for token in argv if token.startswith("--")]
    unknown = [flag for flag in flags if flag[2:].split("=")[0] not in names]
    if unknown:
        raise _unknown_keys(unknown, "command line")


def _config_error(error: Exception) -> SystemExit:
    """An error raised while TRL / transformers / GuidedGRPOConfig build the configs, as one line with the fix."""
    message = " ".join(str(error).split())  # TRL and transformers spread some messages over several lines
    if "bf16/gpu" in message or ("fp16" in message and "gpu" in message.lower()):
        return SystemExit(
            "No GPU found for this recipe's bf16/fp16 settings: set `use_cpu: true` and `bf16: false` in the recipe "
            "(or pass --use_cpu true --bf16 false), or use a CPU recipe (recipes/smollm2-135m-instruct/*_cpu.yaml)."
        )
    return SystemExit(f"Invalid configuration: {message}")


def _check_recipe_types(recipe: str) -> None:
    """Scalar fields must get scalars of their type: `num_generations: four` fails here, naming key and file."""
    config = yaml.safe_load(Path(recipe).read_text()) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{recipe}: a recipe must be a YAML mapping of field: value.")
    types = _field_types()
    for key, value in config.items():
        annotation = types.get(key)
        union = typing.get_origin(annotation) in (typing.Union, UnionType)
        candidates = typing.get_args(annotation) if union else (annotation,)
        if value is None and annotation is not None and type(None) not in candidates:
            raise SystemExit(f"{recipe}: {key} cannot be null; give a value or leave the key out for its default.")
        candidates = tuple(t for t in candidates if t is not type(None))
        lists = [typing.get_args(t)[0] for t in candidates if typing.get_origin(t) is list and typing.get_args(t)]
        if lists and lists[0] in (int, float, str) and isinstance(value, list):
            wrong = [item for item in value if not isinstance(item, lists[0]) or isinstance(item, bool)]
            if wrong and not (lists[0] is float and all(isinstance(i, int) for i in wrong)):
                raise SystemExit(f"{recipe}: {key} must be a list of {lists[0].__name__}, got {value!r}.")
            continue
        if not all(t in (int, float, bool, str) for t in candidates):
            continue  # dicts, enums, other lists: left to the parser
        allowed = candidates
        if not allowed or value is None:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join(t.__name__ for t in allowed)
            raise SystemExit(f"{recipe}: {key} must be {expected}, got {value!r}.")


def validate(task_args: TaskArguments) -> None:
    """Fail before anything is written when the task, a reward or a data file does not exist."""
    if task_args.task not in TASKS:
        close = difflib.get_close_matches(task_args.task, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SystemExit(f"Unknown task {task_args.task!r}; known tasks: {sorted(TASKS)}.{hint}")
    for name in task_args.reward_funcs:
        try:
            get_reward(name)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if task_args.dataset_path is not None and not Path(task_args.dataset_path).exists():
        raise SystemExit(f"dataset_path={task_args.dataset_path!r} does not exist.")


# Fields that act only while a switch is on. Set while it is off, they are named in one warning rather than refused,
# so that flipping the switch (`--guidance false` for a plain-GRPO baseline) keeps the rest of a recipe.
GUIDED_FIELDS = {f.name for f in fields(GuidedGRPOConfig) if f.name not in {g.name for g in fields(GRPOConfig)}}
SWITCHES = (
    (
        "guidance: false",
        lambda t, c, m: not c.guidance,
        GUIDED_FIELDS - {"guidance"} - {n for n in GUIDED_FIELDS if n.startswith("ot_")},
    ),
    (
        "ot_coef: 0",
        lambda t, c, m: c.ot_coef == 0,
        {n for n in GUIDED_FIELDS if n.startswith("ot_") and n != "ot_coef"},
    ),
    (
        "branch_snap_to_punctuation: false",
        lambda t, c, m: not c.branch_snap_to_punctuation,
        {"branch_snap_window"},
    ),
    (
        "guidance_loss_scope is not guidance_postfix",
        lambda t, c, m: c.guidance_loss_scope != "guidance_postfix",
        {"postfix_decay", "postfix_min_weight"},
    ),
    (
        "use_peft: false",
        lambda t, c, m: not m.use_peft,
        {f.name for f in fields(ModelConfig) if f.name.startswith("lora_")} | {"use_rslora", "use_dora"},
    ),
    (
        "load_in_4bit: false",
        lambda t, c, m: not m.load_in_4bit,
        {"bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"},
    ),
    (
        "eval_before_after: false",
        lambda t, c, m: not t.eval_before_after,
        {"eval_limit", "eval_num_samples", "eval_temperature", "eval_max_new_tokens"},
    ),
)
# Reward options: read only by the reward functions named here.
REWARD_FIELDS = {
    "length_target": ("length", "smooth_length"),
    "length_tolerance": ("smooth_length",),
    "length_scale": ("smooth_length",),
}


def explicit_keys(argv: list[str], recipe: str | None) -> set[str]:
    """The fields the recipe and the command line set."""
    keys = {token[2:].split("=")[0] for token in argv if token.startswith("--")} - {"config"}
    if recipe is not None:
        keys |= set(yaml.safe_load(Path(recipe).read_text()) or {}) - {"env"}
    return keys


def unused_settings(keys: set[str], task_args, training_args, model_args) -> tuple[list[str], list[str]]:
    """(errors, warnings) for set fields that cannot act in this run: a field the task or the rewards never read is an
    error; a field a switch turned off is a warning."""
    errors, warnings_ = [], []
    task_fields = {name for options in TASK_OPTIONS.values() for name in options}
    read = TASK_OPTIONS.get(task_args.task, {})
    for name in sorted(keys & task_fields - set(read)):
        reads = ", ".join(read) or "none of the task options"
        errors.append(f"{name} is not read by task {task_args.task!r} (it reads {reads}); remove it")
    for name in sorted(keys & set(REWARD_FIELDS)):
        if not set(REWARD_FIELDS[name]) & set(task_args.reward_funcs):
            errors.append(
                f"{name} is read by the {' / '.join(REWARD_FIELDS[name])} reward only, which reward_funcs "
                f"({', '.join(task_args.reward_funcs)}) does not include; remove it"
            )
    for switch, is_off, names in SWITCHES:
        unused = sorted(keys & names)
        if unused and is_off(task_args, training_args, model_args):
            warnings_.append(f"{', '.join(unused)} will have no effect ({switch})")
    return errors, warnings_


def parse_args(argv: list[str]):
    """(TaskArguments, GuidedGRPOConfig, ModelConfig) from a command line, after every check; SystemExit with one line
    for anything that is wrong or cannot take effect."""
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if recipe is not None:
        if not Path(recipe).is_file():
            raise SystemExit(f"Recipe file not found: {recipe}")
        _check_recipe_types(recipe)
    _check_keys_before_building(argv, recipe)
    try:
        task_args, training_args, model_args, from_recipe, from_command_line = make_parser().parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError, OSError) as error:  # e.g. accelerator_config: an unknown key, a missing file
        raise _config_error(error) from None
    if from_recipe:
        raise _unknown_keys(from_recipe, recipe or "recipe")
    if from_command_line:
        raise _unknown_keys(from_command_line, "command line")
    validate(task_args)
    validate_model_args(model_args)
    errors, unused = unused_settings(explicit_keys(argv, recipe), task_args, training_args, model_args)
    if errors:
        raise SystemExit("Settings that cannot take effect: " + "; ".join(errors) + ".")
    for line in unused:
        logger.warning("Unused setting: %s.", line)
    check_deepspeed_without_gpu(training_args)
    if str(training_args.resume_from_checkpoint).lower() in ("true", "last"):
        training_args.resume_from_checkpoint = True  # the last checkpoint in output_dir
    elif str(training_args.resume_from_checkpoint).lower() == "auto":
        training_args.resume_from_checkpoint = "auto"  # the last checkpoint if there is one (a requeued job)
    return task_args, training_args, model_args


def check_deepspeed_without_gpu(training_args: GuidedGRPOConfig) -> None:
    """DeepSpeed (`accelerate launch` with a DeepSpeed config) on a machine without a GPU needs `use_cpu`: without it
    the processes disagree on the batch size and DeepSpeed stops with a `train_batch_size` mismatch."""
    import os

    import torch

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or training_args.deepspeed
    if deepspeed and not torch.cuda.is_available() and not training_args.use_cpu:
        raise SystemExit(
            "DeepSpeed on a machine without a GPU: set `use_cpu: true` and `bf16: false` in the recipe (or pass "
            "--use_cpu true --bf16 false), as with recipes/accelerate/zero3_cpu.yaml; on GPUs, check that CUDA is "
            "visible to this process."
        )


def run(argv: list[str] | None = None) -> dict:
    return main(*parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    run(sys.argv[1:])
