"""Tiny causal LMs for tests and benchmarks: built locally in a fraction of a second, deterministic by seed.

A byte-level BPE tokenizer trained on a small built-in corpus (with a ChatML chat template) and a 2-layer Llama or
Qwen2 on top of it. Nothing is downloaded.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from .models import CHATML_TEMPLATE

TINY_CORPUS = [
    "The cat sat on the mat. Then it slept, and the dog barked!",
    "What is 12 plus 30? The answer is 42.",
    "First, add the numbers. Second, check the result. Finally, write it down.",
    'She said: "Hello, world!" and smiled (quietly), then left.',
    "Is the sky blue? Yes, it is blue; sometimes grey.",
    "Step 1: read the problem.\nStep 2: solve it.\nStep 3: answer #### 7.",
    "Summarize the post in one short sentence, please.",
    "A long time ago, in a small town, there lived a baker who made bread every day.",
    "<think>Let me think about it.</think><answer>18</answer>",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) , . ! ? ; :",
]
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a small built-in corpus, with a ChatML chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: str | os.PathLike, arch: str = "llama", seed: int = 0, hidden_size: int = 32, tied: bool = False
) -> str:
    """Build and save a 2-layer causal LM (`arch` = "llama" or "qwen2") with the tiny tokenizer; return the path.
    `tied`: the output layer shares the embedding matrix (as in SmolLM2), so checkpoints hold no lm_head weight."""
    tokenizer = build_tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in configs:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {sorted(configs)}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[arch](**common))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
