"""Inputs that cannot be guided as configured: a tokenizer without the punctuation marks, steps where no group gets a
prefix, prompts that leave too little context. Each gives one warning and a metric; training goes on, aligned."""

from __future__ import annotations

import logging

from datasets import Dataset

import trl_guided.trainer as trainer_module
from trl_guided.guidance import representable_marks

from .common import G, trainer_for


class _Tokenizer:
    """Writes letters; everything else becomes the unknown token 0."""

    unk_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) if c.isalpha() else 0 for c in text]

    def decode(self, ids):
        return "".join(chr(i) if i else "<unk>" for i in ids)


def test_representable_marks_leaves_out_what_the_tokenizer_cannot_write():
    assert representable_marks(_Tokenizer(), [".", "a", "!", "bc"]) == ["a", "bc"]
    assert representable_marks(_Tokenizer(), [".", ","]) == []


def test_a_tokenizer_without_the_marks_is_named_at_start(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "representable_marks", lambda tokenizer, marks: [])
    with caplog.at_level(logging.WARNING, logger="trl_guided.trainer"):
        trainer_for(tiny_llama, tmp_path)
    assert "cannot write any of the punctuation marks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_guided.trainer"):
        trainer_for(tiny_llama, tmp_path, branch_point="entropy")  # no punctuation involved: nothing to say
    assert "punctuation marks" not in caplog.text


def _segments_align(trainer, seen):
    for completion_ids, segments in seen:
        for row, ids in enumerate(completion_ids):
            assert segments.prefix[row] + segments.guidance[row] + segments.postfix[row] == len(ids)


def _recording_reward(trainer_box, seen):
    def reward(completions, completion_ids, **kwargs):
        seen.append((completion_ids, trainer_box[0]._segments))
        return [float(len(c[0]["content"]) % 7) for c in completions]

    return reward


def test_steps_without_any_prefix_warn_once_and_train(tiny_llama, tmp_path, caplog):
    box, seen = [], []
    trainer = trainer_for(tiny_llama, tmp_path, reward=_recording_reward(box, seen), punctuation=["§"], max_steps=2)
    box.append(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_guided.trainer"):
        trainer.train()
    assert caplog.text.count("No group of step") == 1
    assert [e["guidance/empty_prefix_ratio"] for e in trainer.state.log_history if "loss" in e] == [1.0, 1.0]
    _segments_align(trainer, seen)


def test_prompts_longer_than_the_context_warn_count_and_train(tiny_llama, tmp_path, caplog):
    long_prompt = [{"role": "user", "content": "count " * 260}]  # over the tiny model's 512 positions
    rows = [long_prompt, [{"role": "user", "content": "Count to 3 " + "and on " * 240}]]
    box, seen = [], []
    trainer = trainer_for(tiny_llama, tmp_path, reward=_recording_reward(box, seen), max_steps=2)
    trainer.train_dataset = Dataset.from_dict({"prompt": rows * 4})
    box.append(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_guided.trainer"):
        trainer.train()
    assert caplog.text.count("leave less than max_completion_length") == 1
    counted = [e["guidance/long_prompts"] for e in trainer.state.log_history if "guidance/long_prompts" in e]
    assert counted == [1.0, 1.0]
    assert all(len(ids) == G for ids, _ in seen)
    _segments_align(trainer, seen)
