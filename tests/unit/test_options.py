"""No option is silently ignored: every field of the three dataclasses a recipe or the command line sets either takes
effect (something observable changes) or is refused with one line."""

from __future__ import annotations

import enum
import json
import logging
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from types import UnionType

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl import GRPOConfig, ModelConfig, get_peft_config, get_quantization_config

from trl_guided import GuidedGRPOConfig, cli
from trl_guided.data import DATA_SOURCE, TASK_OPTIONS, load_task
from trl_guided.recipe import model_init_kwargs, parse_args
from trl_guided.sampler import GuidedSampler
from trl_guided.tasks import TaskArguments, reward_functions, task_options
from trl_guided.train import eval_settings, summarize

from .common import group_batch, trainer_for


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model_name_or_path: embedded:smollm2-135m-instruct\ntask: arithmetic\nreward_funcs: [arithmetic_accuracy]\n"
        f"use_cpu: true\nbf16: false\noutput_dir: {tmp_path / 'out'}\nreport_to: none\n"
    )
    return str(path)


def _flag(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _refused(argv: list[str]) -> str | None:
    """The one-line refusal of a command line, or None when it is accepted."""
    try:
        parse_args(argv)
    except SystemExit as error:
        message = str(error)
        assert "\n" not in message.strip(), f"a refusal must be one line: {message!r}"
        return message
    return None


# ------------------------------------------------------------------------------- TRL's and transformers' fields

EXPLICIT_TRL_VALUES = {  # fields the type-driven walk cannot give a value (lists, dicts, objects)
    "liger_kernel_config": {"rope": True},
    "include_for_metrics": "inputs",
    "label_names": "labels",
    "reward_weights": "2.0",
    "parallelism_config": None,  # an accelerate object: not settable from a recipe or the command line
}


def _walk_value(spec, hints):
    kind = hints[spec.name]
    union = typing.get_origin(kind) in (typing.Union, UnionType)
    kinds = [k for k in (typing.get_args(kind) if union else (kind,)) if k is not type(None)]
    default = None if spec.default is MISSING else spec.default
    enums = [k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)]
    if kinds == [bool]:
        return not default
    if kinds == [int]:
        return (default or 0) + 1
    if kinds == [float]:
        return round((default or 0) + 0.25, 4)
    if spec.metadata.get("choices"):
        return next(c for c in spec.metadata["choices"] if c != default)
    if enums:
        return next(m.value for m in enums[0] if m.value != getattr(default, "value", default))
    return "walker" if str in kinds else MISSING


def test_every_trl_field_reaches_the_trainer_config_or_is_refused(recipe):
    """Our layer (recipe loading, key checks, validation) passes each GRPOConfig / TrainingArguments field to TRL
    unchanged, or the configs refuse the value in one line (TRL's and transformers' own errors, reworded)."""
    hints = typing.get_type_hints(GRPOConfig)
    reached, refused = [], []
    for spec in fields(GRPOConfig):
        if not spec.init or spec.name in ("output_dir", "resume_from_checkpoint", "use_cpu", "bf16", "fp16"):
            # output_dir is the recipe's; resume_from_checkpoint has its own tests (test_resume.py); the test kit
            # forces use_cpu/bf16/fp16 (conftest.py), whose refusal on a CPU machine tests/launch/test_train.py checks.
            continue
        value = EXPLICIT_TRL_VALUES.get(spec.name, MISSING)
        if value is MISSING:
            value = _walk_value(spec, hints)
        assert value is not MISSING, f"{spec.name}: give it a value in EXPLICIT_TRL_VALUES"
        if value is None:
            continue
        message = _refused(["--config", recipe, f"--{spec.name}", _flag(value)])
        if message is not None:
            refused.append(spec.name)
            continue
        _, training_args, _ = parse_args(["--config", recipe, f"--{spec.name}", _flag(value)])
        got = getattr(training_args, spec.name)
        got = getattr(got, "value", got)
        if isinstance(got, list) and not isinstance(value, list):
            got = got[0] if len(got) == 1 else got
        assert got == value or str(got) == str(value), f"{spec.name}: set {value!r}, the trainer config has {got!r}"
        reached.append(spec.name)
    assert len(reached) > 150 and "tf32" in refused and "beta" in reached


# ---------------------------------------------------------------------------------------------- our own fields


def _fingerprint(trainer, mode: str = "train"):
    """What a rollout and its update look like on a fixed batch: completion ids, then (train) the loss and the size
    of its gradient, compared exactly (the same computation on CPU gives the same bits)."""
    torch.manual_seed(0)
    trainer.model.train(mode == "train")
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this skips
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    if mode != "train":
        return inputs["completion_ids"].tolist()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    gradient = sum(p.grad.double().abs().sum().item() for p in trainer.model.parameters() if p.grad is not None)
    return inputs["completion_ids"].tolist(), loss.item(), gradient


def _uses_shared_prefix(trainer):
    return trainer._shares_prefix(trainer.model, False, {})


def _has_own_ot_reference(trainer):
    return trainer._ot is not None and trainer._ot.model is not None


def _moves_reference_states_to_cpu(trainer, monkeypatch):
    moved = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: moved.append(1) or original(self, *a, **k))
    _fingerprint(trainer)
    monkeypatch.setattr(torch.Tensor, "cpu", original)
    return len(moved)


def _loss_shapes(trainer):
    """The (rows, columns) and prompts of each micro-batch TRL's loss runs on in one step of two groups (two
    micro-batches) where the first group has advantage 0 and the last 3 columns are padding."""
    torch.manual_seed(0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    generate, compute, shapes = trainer._generate_and_score_completions, trainer._compute_loss, []

    def first_group_untrained(inputs):
        output = generate(inputs)
        output["advantages"][: trainer.num_generations] = 0
        output["completion_mask"][:, -3:] = 0
        return output

    def recording(model, inputs):
        shapes.append((tuple(inputs["completion_ids"].shape), inputs["prompt_ids"].sum(dim=1).tolist()))
        return compute(model, inputs)

    trainer._generate_and_score_completions, trainer._compute_loss = first_group_untrained, recording
    for step in range(2):
        trainer._step = step
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(group_batch(trainer)))
    return shapes


OT = {"ot_coef": 0.1, "beta": 0.0}
SAVED = {"gradient_accumulation_steps": 2}
POSTFIX = {"guidance_loss_scope": "guidance_postfix"}
ENTROPY = {"branch_point": "entropy"}
TREE = {"num_prefixes_per_group": 2}
# field -> (base overrides, the changed value, what is observed). A field missing here fails the walk below.
GUIDED_FIELD_EFFECTS = {
    "guidance": ({}, False, _fingerprint),
    "prefix_min_tokens": ({}, 8, _fingerprint),
    "prefix_max_tokens": ({}, 5, _fingerprint),
    "punctuation": ({}, ["q"], _fingerprint),
    "branch_point": ({}, "entropy", _fingerprint),
    "branch_min_prefix_tokens": (ENTROPY, 9, _fingerprint),
    "branch_snap_to_punctuation": (ENTROPY, True, _fingerprint),
    "branch_snap_window": ({**ENTROPY, "branch_snap_to_punctuation": True}, 1, _fingerprint),
    "num_prefixes_per_group": ({}, 2, _fingerprint),
    "tree_advantage": (TREE, "branch", _fingerprint),
    "prefix_advantage_weight": (TREE, 0.5, _fingerprint),
    "min_guide_tokens": ({}, 4, _fingerprint),
    "max_guide_tokens": ({}, 2, _fingerprint),
    "guidance_loss_scope": ({}, "completion", _fingerprint),
    "guidance_loss_normalization": ({}, "completion", _fingerprint),
    "postfix_decay": (POSTFIX, 0.3, _fingerprint),
    "postfix_min_weight": (POSTFIX, 0.5, _fingerprint),
    "loss_prob_threshold": ({"guidance_loss_scope": "low_prob"}, 0.003, _fingerprint),
    "prefix_eos_retries": ({}, 0, "sampler"),
    "eval_guidance": ({}, False, lambda t: _fingerprint(t, "eval")),
    "shared_prefix_loss": ({}, False, _uses_shared_prefix),
    "skip_zero_advantage_rows": (SAVED, False, _loss_shapes),
    "trim_loss_padding": (SAVED, False, _loss_shapes),
    "group_micro_batches": (SAVED, False, _loss_shapes),
    "ot_coef": ({"beta": 0.0}, 0.1, _fingerprint),
    "ot_window": ({**OT, "ot_epsilon": 1.0}, 1, _fingerprint),  # a wide plan, cut to the diagonal neighbours
    "ot_epsilon": (OT, 1.0, _fingerprint),
    "ot_iterations": (OT, 1, _fingerprint),
    "ot_tolerance": ({**OT, "ot_iterations": 200}, 0.5, _fingerprint),
    "ot_target": (OT, 5.0, _fingerprint),
    "ot_reference": (OT, "old", _has_own_ot_reference),
    "ot_debiased": (OT, True, _fingerprint),
    "ot_reference_on_cpu": (OT, True, "cpu"),
}


def test_the_table_covers_every_guided_field():
    own = {f.name for f in fields(GuidedGRPOConfig)} - {f.name for f in fields(GRPOConfig)}
    assert set(GUIDED_FIELD_EFFECTS) == own


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GUIDED_FIELD_EFFECTS))
def test_every_guided_field_changes_the_rollout_or_the_loss(name, tiny_llama, tmp_path, monkeypatch):
    base, value, observe = GUIDED_FIELD_EFFECTS[name]
    if observe == "refused":
        with pytest.raises(ValueError, match=name):
            trainer_for(tiny_llama, tmp_path, **base, **{name: value})
        return
    if observe == "sampler":
        assert _eos_redraws(base, **{name: value}) != _eos_redraws(base)
        return
    if observe == "cpu":
        observe = lambda t: _moves_reference_states_to_cpu(t, monkeypatch)  # noqa: E731
    default = observe(trainer_for(tiny_llama, tmp_path / "default", **base))
    changed = observe(trainer_for(tiny_llama, tmp_path / "changed", **base, **{name: value}))
    assert changed != default, f"{name}={value!r} changed nothing observable"


def _eos_redraws(base, **overrides) -> int:
    """Phase-1 calls of a sampler whose backend ends every sample with EOS at once."""
    from .common import config

    settings = config("/tmp", **base, **overrides)
    calls = []

    class EndsAtOnce:
        branches_in_one_call = True

        def generate(
            self, prompts, num_generations, max_new_tokens, min_new_tokens=0, shared_prompts=False, row_budgets=None
        ):
            calls.append(len(prompts))
            return [[5, 0, 5] for _ in prompts], None

        def any_process(self, flag):
            return flag

    import random

    sampler = GuidedSampler(settings, _Tokenizer(), [0], random.Random(0), EndsAtOnce())
    sampler.sample_prefixes([[1, 2]])
    return len(calls)


class _Tokenizer:
    all_special_ids = [0]

    def decode(self, ids):
        return "".join("x." if i == 5 else "y" for i in ids)


# ------------------------------------------------------------------------------------------------- task fields


def test_every_task_field_is_read_by_its_tasks_and_refused_by_the_others(recipe):
    defaults = TaskArguments()
    changed = {
        "dataset_path": "prompts.txt",
        "eval_size": 3,
        "dataset_size": 7,
        "dataset_seed": 5,
        "system_prompt": "Be brief.",
        "arithmetic_mode": "expand",
        "arithmetic_terms": 2,
        "arithmetic_max_number": 9,
        "dataset_name": "my-org/my-data",
        "dataset_config": "main",
        "dataset_train_split": "training",
        "dataset_test_split": "validation",
    }
    assert set(changed) == {name for options in TASK_OPTIONS.values() for name in options}
    for task, read in TASK_OPTIONS.items():
        for name, value in changed.items():
            task_args = TaskArguments(task=task, **{name: value})
            if name in read:
                assert task_options(task_args) != task_options(TaskArguments(task=task)), (task, name)
            else:
                assert task_options(task_args) == task_options(TaskArguments(task=task)), (task, name)
    # Generated tasks: the change reaches the rows.
    for task in ("countdown", "arithmetic", "instructions"):
        for name in set(TASK_OPTIONS[task]) - set(DATA_SOURCE):  # instructions from a file: test_constraints.py
            rows = load_task(task, "train", **task_options(TaskArguments(task=task, **{name: changed[name]})))
            assert rows.to_list() != load_task(task, "train", **task_options(defaults.__class__(task=task))).to_list()
    # Set on a task that does not read it: one line.
    message = _refused(["--config", recipe, "--task", "countdown", "--arithmetic_max_number", "9"])
    assert "arithmetic_max_number is not read by task 'countdown'" in message
    message = _refused(["--config", recipe, "--eval_size", "3"])
    assert "eval_size is not read by task 'arithmetic'" in message


def test_the_old_eval_names_of_the_heldout_fields_are_refused_naming_the_new_ones(recipe, tmp_path, capsys):
    """eval_limit & co. looked like transformers' eval_* training fields; a recipe or flag still using one is told
    the new name, in `train` and in `eval --config`."""
    message = _refused(["--config", recipe, "--eval_limit", "4", "--eval-temperature", "0.5"])
    assert "renamed field(s): eval_limit -> heldout_limit, eval_temperature -> heldout_temperature" in message
    old = Path(recipe).read_text() + "eval_before_after: true\neval_num_samples: 2\neval_max_new_tokens: 8\n"
    path = tmp_path / "old.yaml"
    path.write_text(old)
    for refused in (lambda: parse_args(["--config", str(path)]), lambda: cli.main(["eval", "--config", str(path)])):
        with pytest.raises(
            SystemExit, match="eval_num_samples -> heldout_num_samples, eval_max_new_tokens -> heldout_"
        ):
            refused()
    assert _refused(["--config", recipe, "--eval_before_after", "true", "--heldout_limit", "4"]) is None


def test_every_other_task_field_takes_effect_or_is_refused(recipe, tmp_path):
    options = dict(task="length", reward_funcs=["smooth_length"])
    completions = [[{"role": "assistant", "content": "x" * 250}]]
    score = lambda args: reward_functions(args)[0](completions)  # noqa: E731
    assert score(TaskArguments(**options, length_target=250)) != score(TaskArguments(**options))
    assert score(TaskArguments(**options, length_tolerance=60)) != score(TaskArguments(**options))
    assert score(TaskArguments(**options, length_scale=0.5)) != score(TaskArguments(**options))
    assert _refused(["--config", recipe, "--length_scale", "0.5"]).count("smooth_length") == 1
    training_args = parse_args(["--config", recipe])[1]
    for name, value in (("heldout_limit", 5), ("heldout_num_samples", 2), ("heldout_temperature", 0.5)):
        before = eval_settings(TaskArguments(task="arithmetic"), training_args)
        after = eval_settings(TaskArguments(task="arithmetic", **{name: value}), training_args)
        assert before != after, name
    before = eval_settings(TaskArguments(task="arithmetic"), training_args)
    after = eval_settings(TaskArguments(task="arithmetic", heldout_max_new_tokens=7), training_args)
    assert (before.max_new_tokens, after.max_new_tokens) == (training_args.max_completion_length, 7)
    history = [{"step": s, "loss": 0.0, "reward": float(s)} for s in range(1, 11)]
    assert summarize(history, 2) != summarize(history, 4)
    covered = {"task", "reward_funcs", "eval_before_after", "summary_window", "length_target", "length_tolerance"}
    covered |= {
        "length_scale",
        "heldout_limit",
        "heldout_num_samples",
        "heldout_temperature",
        "heldout_max_new_tokens",
    }
    covered |= {name for options in TASK_OPTIONS.values() for name in options}
    assert covered == {f.name for f in fields(TaskArguments)}  # task, reward_funcs, eval_before_after: test_train.py


def test_fields_a_switch_turns_off_are_named_in_one_warning(recipe, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_guided.train"):
        parse_args(["--config", recipe, "--guidance", "false", "--max_guide_tokens", "4", "--lora_r", "8"])
        parse_args(["--config", recipe, "--branch_point", "entropy", "--branch_snap_window", "4"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Unused setting")]
    assert any("max_guide_tokens will have no effect (guidance: false)" in line for line in lines), lines
    assert any("branch_snap_window will have no effect (branch_snap_to_punctuation: false)" in x for x in lines), lines
    assert any("lora_r will have no effect (use_peft: false)" in line for line in lines), lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_guided.train"):
        parse_args(["--config", recipe, "--max_guide_tokens", "4"])
    assert not [r for r in caplog.records if r.getMessage().startswith("Unused setting")]


# ------------------------------------------------------------------------------------------------ model fields


def test_every_model_field_is_forwarded_or_refused(recipe, monkeypatch):
    import trl_guided.recipe as recipe_module

    def effect(name, value):
        argv = ["--config", recipe, f"--{name}", _flag(value)]
        message = _refused(argv)
        if message is not None:
            return "refused"
        _, _, model_args = parse_args(argv)
        return model_init_kwargs(model_args), get_peft_config(model_args), _quantization(model_args)

    def _quantization(model_args):
        config = get_quantization_config(model_args)
        return None if config is None else config.to_dict()

    baseline = effect("dtype", "float32")
    peft = ("--use_peft", "true")
    four_bit = ("--load_in_4bit", "true")
    monkeypatch.setattr(recipe_module, "validate_model_args", lambda model_args: None)  # quantization configs on CPU
    cases = {
        "model_name_or_path": None,  # which model trains: tests/launch/test_train.py
        "model_revision": ((), "v2"),
        "dtype": ((), "bfloat16"),
        "attn_implementation": ((), "eager"),
        "use_peft": ((), True),
        "lora_r": (peft, 4),
        "lora_alpha": (peft, 8),
        "lora_dropout": (peft, 0.2),
        "lora_target_modules": (peft, "q_proj"),
        "lora_target_parameters": (peft, "mlp.experts.down_proj"),
        "lora_modules_to_save": (peft, "lm_head"),
        "lora_task_type": (peft, "SEQ_CLS"),
        "use_rslora": (peft, True),
        "use_dora": (peft, True),
        "load_in_8bit": ((), True),
        "load_in_4bit": ((), True),
        "bnb_4bit_quant_type": (four_bit, "fp4"),
        "use_bnb_nested_quant": (four_bit, True),
        "bnb_4bit_quant_storage": (four_bit, "bfloat16"),
    }
    assert set(cases) == {f.name for f in fields(ModelConfig)}
    for name, case in cases.items():
        if case is None:
            continue
        switch, value = case
        base = ["--config", recipe, *switch]
        _, _, base_args = parse_args(base)
        before = (model_init_kwargs(base_args), get_peft_config(base_args), _quantization(base_args))
        _, _, model_args = parse_args([*base, f"--{name}", _flag(value)])
        after = (model_init_kwargs(model_args), get_peft_config(model_args), _quantization(model_args))
        assert str(after) != str(before), f"{name}={value!r} reaches neither from_pretrained, PEFT nor quantization"
    monkeypatch.undo()
    assert baseline != "refused"
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in _refused(["--config", recipe, "--load_in_4bit", "true"])


# ------------------------------------------------------------------------------------------ any recipe at all

_FIELD_NAMES = sorted({f.name for cls in (TaskArguments, GuidedGRPOConfig, ModelConfig) for f in fields(cls)})
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.sampled_from(["", "x", "Task"]), _values, max_size=4),
    top_level=st.sampled_from(["mapping", "list", "scalar"]),
)
def test_any_recipe_gives_a_valid_config_or_one_line(tmp_path, recipe, entries, top_level):
    """A recipe with any keys and any YAML values: a config, or a one-line refusal; never a traceback."""
    import yaml

    base = yaml.safe_load(open(recipe).read())
    content = {**base, **entries} if top_level == "mapping" else list(entries) if top_level == "list" else "text"
    path = tmp_path / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(content))
    _refused(["--config", str(path)])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("reward_funcs", None, "reward_funcs cannot be null"),
        ("reward_funcs", [None], "reward_funcs must be a list of str"),
        ("punctuation", [".", 3], "punctuation must be a list of str"),
        ("parallelism_config", [1], "parallelism_config cannot be set from a recipe"),
        ("accelerator_config", {"no_such_option": 1}, "Invalid configuration"),
        ("num_generations", None, "Invalid configuration"),  # Optional in GRPOConfig; TRL refuses it, reworded
    ],
)
def test_recipe_values_the_fuzzer_found(recipe, tmp_path, key, value, message):
    import yaml

    path = tmp_path / "found.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(open(recipe).read()), key: value}))
    assert message in _refused(["--config", str(path)])
