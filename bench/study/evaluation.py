"""The study's evaluations: a run's planned evaluations (each snapshot on the first test problems, then the final
model), the vLLM evaluation round (every waiting run of a phase in one kept engine,
`trl_guided.vllm_engine.kept_vllm_engine`) and the starting model's evaluation. Each runs in a child process; the
vLLM ones with the vLLM venv's python."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from trl_guided.evaluate import evaluate, read_records, write_records
from trl_guided.stats import headline_metric
from trl_guided.train import eval_settings, parse_args
from trl_guided.vllm_engine import kept_vllm_engine

from .ledger import discard_models, load_json, save_json
from .plan import argv_for, identity


def planned_evaluations(spec: dict, snapshots: list[dict], final: Path, train_seconds: float) -> list[dict]:
    """A run's evaluations: each snapshot on the first `curve_problems` test problems, then the final model."""
    todo = [
        {
            "folder": point["folder"],
            "seconds": point["seconds"],
            "step": point["step"],
            "records": f"eval-{point['step']}.jsonl",
            "split": "test",
            "limit": spec["curve_problems"],
            "subset": True,
        }
        for point in snapshots
    ]
    if spec["eval"] is not None:
        split, limit, records = spec["eval"]["split"], spec["eval"]["limit"], spec["eval"]["records"]
        todo.append(
            {"folder": str(final), "seconds": train_seconds, "step": None, "records": records, "split": split,
             "limit": limit}
        )  # fmt: skip
    return todo


def evaluate_planned(spec: dict, parsed: tuple, todo: list[dict]) -> tuple[list[dict], float]:
    """Run a run's planned evaluations (`parsed`: its recipe's task and training arguments); returns their entries for
    run.json and the seconds they took."""
    started = time.perf_counter()
    task_args, training_args = parsed[:2]
    evals = []
    for item in todo:
        # Fluency (the starting model's NLL of the answers) only for the test evaluations the table reports.
        quality = item["split"] == "test" and not item.get("subset")
        settings = study_eval_settings(task_args, training_args, spec, item["split"], item["limit"], quality)
        entry = {"seconds": item["seconds"], "step": item["step"], "records": item["records"]}
        entry.update({"subset": True} if item.get("subset") else {"split": item["split"]})
        entry.update(evaluate_into(item["folder"], settings, Path(spec["run_dir"]) / item["records"]))
        evals.append(entry)
    return evals, time.perf_counter() - started


def finish_record(record: dict, evals: list[dict]) -> None:
    record["evals"] = evals
    if evals and evals[-1]["step"] is None:
        evals[-1]["step"] = record["steps"]


def evaluate_runs(spec_paths: list[str]) -> None:
    """An evaluation round (vLLM): every listed run's pending evaluations in one engine, which loads each model's
    weights in place; then each run's run.json, and its models are deleted."""
    with kept_vllm_engine():
        for spec_path in spec_paths:
            spec = load_json(Path(spec_path))
            run_dir = Path(spec["run_dir"])
            record = load_json(run_dir / "trained.json")
            evals, seconds = evaluate_planned(spec, parse_args(argv_for(spec)), record.pop("pending"))
            finish_record(record, evals)
            record["eval_seconds"] = round(seconds, 2)
            record["process_seconds"] = round(record["process_seconds"] + seconds, 2)
            save_json(run_dir / "run.json", record)  # the run is complete
            discard_models(run_dir)
            print(f"[learning] evaluated {spec['phase']}/{spec['name']} in {seconds:.0f} s", flush=True)


def evaluate_start(spec: dict) -> None:
    """The starting model, evaluated once on the test split (the shared `before` of every arm) and, when the study
    tunes learning rates, on the validation split (one vLLM engine for both, with that backend)."""
    process_start = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    task_args, training_args, model_args = parse_args(argv_for(spec))
    model, run_dir = model_args.model_name_or_path, Path(spec["run_dir"])
    settings = study_eval_settings(task_args, training_args, spec, "test", spec["eval"]["limit"], quality=True)
    result = {}
    with kept_vllm_engine():
        evals = [
            {"seconds": 0.0, "step": 0, "records": "eval.jsonl",
             **evaluate_into(model, settings, run_dir / "eval.jsonl", result)}
        ]  # fmt: skip
        record = {"model": result["model"], "settings": result["settings"], "versions": result["versions"]}
        record["identity"] = identity(spec)
        record["evals"] = evals
        if spec.get("validation") is not None:
            limit = spec["validation"]["limit"]
            settings = study_eval_settings(task_args, training_args, spec, "validation", limit, quality=False)
            path = run_dir / "validation.jsonl"
            record["validation"] = {"records": path.name, **evaluate_into(model, settings, path)}
    record["eval_seconds"] = record["process_seconds"] = round(time.perf_counter() - process_start, 2)
    save_json(run_dir / "run.json", record)


def study_eval_settings(task_args, training_args, spec: dict, split: str, limit: int | None, quality: bool):
    """The recipe's evaluation settings with the study's split, backend, limit, fluency scoring and bootstrap seed."""
    settings = eval_settings(task_args, training_args)
    settings.split = split
    settings.backend = spec.get("eval_backend", "transformers")
    if limit is not None:
        settings.limit = limit
    # Fluency (the starting model's NLL of the answers) only for the test evaluations the table reports.
    settings.quality_model = spec["quality_model"] if quality else None
    settings.quality_limit = spec.get("quality_problems") if settings.quality_model else None
    settings.seed = 0  # the bootstrap seed of the eval result, not the training seed: same for every run
    return settings


def evaluate_into(model: str, settings, records_path: Path, result_out: dict | None = None) -> dict:
    """Evaluate `model`, keep compact per-problem records at `records_path`, return the summary metrics."""
    result = evaluate(model, settings, records_path, progress=False)
    write_records([compact(r) for r in read_records(records_path)], records_path)
    if result_out is not None:
        result_out.update(result)
    return {"problems": result["settings"]["problems"], **summary(result)}


def compact(record: dict) -> dict:
    """An eval record without the prompt (the problem id names it): what the statistics need, a tenth of the size."""
    return {key: value for key, value in record.items() if key != "prompt"}


def summary(result: dict) -> dict:
    keys = (headline_metric(result["settings"]["reward_funcs"]), "nll_per_token", "truncated", "completion_tokens")
    keys += ("repetition",)
    return {key: result["metrics"][key]["value"] for key in keys if key in result["metrics"]}
