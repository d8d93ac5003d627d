"""Train with Guided GRPO from a recipe: `trl-guided train --config recipes/<model>/<task>.yaml [--key value ...]`.

`trl_guided.recipe` reads and checks the recipe and the flags (unknown keys are an error, not silently ignored); this
module runs the training, writes the run folder (model, `run_config.json`, `summary.json`, `report.html`) and, with
`eval_before_after`, evaluates the starting and the final model.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig
from trl import ModelConfig, get_peft_config, get_quantization_config

from .checkpoints import last_complete_checkpoint
from .config import GuidedGRPOConfig
from .data import DataError, load_task
from .evaluate import EvalError, EvalSettings, evaluate, write_json
from .locate import ModelError, ModelSource, locate_start
from .plots import reward_curve
from .recipe import make_parser, model_init_kwargs, parse_args
from .report import log_to_wandb, write_report
from .rundir import first_last_reward
from .stats import compare, headline_metric, summary_line
from .tasks import TaskArguments, reward_functions, reward_options, task_options
from .trainer import GuidedGRPOTrainer

__all__ = ["build_trainer", "make_parser", "parse_args", "run", "starting_model", "task_inputs"]

logger = logging.getLogger("trl_guided.train")
# TRL 1.16 calls transformers' renamed gradient-checkpointing helpers on every step; keep the progress output readable.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def summarize(log_history: list[dict], window: int) -> dict:
    """Mean reward over the first and the last `window` logged training steps (`rundir.first_last_reward`)."""
    return first_last_reward(log_history, window)


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


def _server_errors() -> tuple[type[BaseException], ...]:
    """What TRL's VLLMClient raises when its server is gone (requests comes with the `vllm` extra)."""
    try:
        import requests  # optional: comes with the `vllm` extra (TRL's VLLMClient)
    except ImportError:
        return (ConnectionError,)
    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)


SERVER_ERRORS = _server_errors()


def _vllm_url(args: GuidedGRPOConfig) -> str:
    return args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"


def vllm_unreachable(args: GuidedGRPOConfig, model_path: str) -> str:
    """One line for a vLLM server that is not up when training starts: where it was looked for, how to start it (on
    the folder the trainer starts from)."""
    serve = (
        f"VLLM_SERVER_DEV_MODE=1 vllm serve {model_path} --host {args.vllm_server_host} --port "
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


def starting_model(model_args: ModelConfig, training_args: GuidedGRPOConfig) -> ModelSource:
    """The model a run starts from, found as `trl-guided eval --model` finds it (`locate.locate_start`: a run folder
    means its final model, else its newest complete checkpoint; a LoRA adapter is refused), and checked loadable.
    One line, not a traceback, when it cannot be: which name, where it was looked for, and how to fix it."""
    name = model_args.model_name_or_path
    try:
        source = locate_start(name)
    except ModelError as error:
        raise SystemExit(f"Cannot train from model {name!r}: {error}.") from None
    try:
        AutoConfig.from_pretrained(
            source.path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if Path(source.path).exists():
            where = f"the local folder {source.path} (no loadable config.json)"
        elif offline:
            where = "the local Hugging Face cache only (HF_HUB_OFFLINE=1: the Hub was not asked)"
        else:
            where = "the Hugging Face Hub and its local cache"
        raise SystemExit(
            f"Cannot load model {name!r}: looked in {where} ({type(error).__name__}). Give a local folder with "
            "config.json and weights, an embedded model (embedded:smollm2-135m-instruct), or a Hub name with network "
            "access (HF_HUB_OFFLINE=0); check the spelling and model_revision."
        ) from None
    return source


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


def task_inputs(task_args: TaskArguments, training_args: GuidedGRPOConfig) -> dict:
    """The trainer arguments a recipe's task fields make: its rewards, its train split and, with `eval_strategy`, its
    test split (the benchmarks give the same to their vanilla `trl.GRPOTrainer`)."""
    options = task_options(task_args)
    return {
        "reward_funcs": reward_functions(task_args),
        "train_dataset": load_task(task_args.task, "train", **options),
        "eval_dataset": load_task(task_args.task, "test", **options) if training_args.eval_strategy != "no" else None,
    }


def build_trainer(
    task_args: TaskArguments,
    training_args: GuidedGRPOConfig,
    model_args: ModelConfig,
    callbacks: list | None = None,
    start: ModelSource | None = None,
) -> GuidedGRPOTrainer:
    """The one place a parsed recipe becomes a `GuidedGRPOTrainer` (the CLI, the study's worker and the benchmarks
    call it): the starting model located and checked (`starting_model`), the task's rewards and splits
    (`task_inputs`), PEFT and quantization from the model arguments. A vLLM server that does not answer is one line,
    not a traceback. `start`: the starting model when the caller has located it already (`starting_model`)."""
    source = start or starting_model(model_args, training_args)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    try:
        return GuidedGRPOTrainer(
            model=source.path,
            args=training_args,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
            callbacks=callbacks,
            **task_inputs(task_args, training_args),
        )
    except SERVER_ERRORS as error:  # TRL's VLLMClient gives up after vllm_server_timeout
        if "vLLM server" not in str(error):
            raise
        raise SystemExit(vllm_unreachable(training_args, source.path)) from None


def main(task_args: TaskArguments, training_args: GuidedGRPOConfig, model_args: ModelConfig) -> dict:
    # The starting model is evaluated before the trainer exists (the evaluation has the memory to itself), and the
    # trainer starts from the very folder that was evaluated.
    start = starting_model(model_args, training_args)
    eval_before = evaluate_start(task_args, training_args, start)
    trainer = build_trainer(task_args, training_args, model_args, start=start)
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
        leave_process_group()
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
    trainer.accelerator.wait_for_everyone()
    leave_process_group()
    return summary


def leave_process_group() -> None:
    """Every rank leaves the process group before it exits: left to interpreter shutdown, gloo's threads can abort a
    finished run (SIGABRT, "terminate called without an active exception"; seen once in 2 CPU processes), which a
    scheduler reads as a failed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- before/after evaluation
# Runs on the main process only: the other processes wait at a barrier (the wait is bounded by ddp_timeout, 1800 s by
# default; keep heldout_limit small enough). The final model is read back from output_dir, where save_model wrote it in
# full (also under ZeRO-3), so no sharded parameter has to be gathered during generation.


def eval_settings(task_args: TaskArguments, training_args: GuidedGRPOConfig) -> EvalSettings:
    return EvalSettings(
        task=task_args.task,
        split="test",
        limit=task_args.heldout_limit,
        num_samples=task_args.heldout_num_samples,
        temperature=task_args.heldout_temperature,
        top_p=training_args.top_p if task_args.heldout_temperature > 0 else 1.0,
        max_new_tokens=task_args.heldout_max_new_tokens or training_args.max_completion_length,
        batch_size=32,
        seed=training_args.seed,
        backend="transformers",  # the trainer (and maybe a vLLM engine) holds the GPU memory already
        reward_funcs=list(task_args.reward_funcs),
        task_options=task_options(task_args),
        reward_options=reward_options(task_args),
    )


def _is_main_process() -> bool:
    return PartialState().is_main_process


def _barrier() -> None:
    PartialState().wait_for_everyone()


def evaluate_start(task_args: TaskArguments, training_args: GuidedGRPOConfig, source: ModelSource) -> dict | None:
    """With eval_before_after, the starting model's result (main process; None elsewhere and when off)."""
    if not task_args.eval_before_after:
        return None
    settings = eval_settings(task_args, training_args)
    try:
        settings.check()
    except EvalError as error:
        raise SystemExit(f"eval_before_after: {error}") from None
    result = {}
    if _is_main_process():
        output_dir = Path(training_args.output_dir)
        print(f"Evaluating the starting model {source.name} ({source.path}) on the {task_args.task} test split ...")
        result = evaluate(source, settings, output_dir / "eval_before.jsonl", progress=False)
        write_json(result, output_dir / "eval_before.json")
    _barrier()
    return result


def evaluate_final(task_args: TaskArguments, training_args: GuidedGRPOConfig, before: dict, summary: dict) -> dict:
    """Evaluate the saved final model, compare it with the start, add the numbers to summary.json and the tracker."""
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
        headline = headline_metric(after["settings"]["reward_funcs"])
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
        import wandb  # optional: the `wandb` extra
    except ImportError:
        return
    if getattr(wandb, "run", None) is None:
        return
    for name, entry in comparison["metrics"].items():
        for key in ("before", "after", "diff"):
            wandb.run.summary[f"eval_{key}/{name}"] = entry[key]


def run(argv: list[str] | None = None) -> dict:
    arguments = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return main(*arguments)
    except DataError as error:  # raised while the task's data loads, before anything is trained
        raise SystemExit(f"Cannot load the data of task {arguments[0].task!r}: {error}") from None


if __name__ == "__main__":
    run(sys.argv[1:])
