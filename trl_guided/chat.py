"""`trl-guided chat MODEL_OR_RUN_DIR`: multi-turn chat with a model in the terminal, streaming its tokens.

Lines are read from stdin, so a conversation can be scripted (`printf 'Hi\\nAnd then?\\n' | trl-guided chat runs/x`).
`/reset` forgets the conversation (the system prompt stays), `/exit` or the end of input quits. The model sees the
whole conversation through its chat template at every turn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from transformers import TextStreamer, set_seed

from .locate import ModelError, load_model, locate_model


class Chat:
    """A conversation with one model: `send` appends the user turn and the model's streamed answer to `messages`."""

    def __init__(self, spec: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7):
        try:
            source = locate_model(spec)
        except ModelError as error:
            raise SystemExit(f"trl-guided chat: {error}") from None
        self.model, self.tokenizer = load_model(source, device="cpu")
        if self.tokenizer.chat_template is None:
            raise SystemExit(f"{source.path} has no chat template; chat needs an instruction-tuned model's tokenizer.")
        self.path = source.path
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, write: Callable[[str], None] = lambda _: None) -> str:
        """Answer `text` given the conversation so far; `write` receives the answer piece by piece as it is sampled."""

        class Streamer(TextStreamer):
            def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                write(piece)

        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        self.last_prompt_ids = inputs["input_ids"][0].tolist()
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                streamer=Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **sampling,
            )
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].size(1) :], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(chat: Chat, lines: Iterable[str], write: Callable[[str], None], prompt: str = "") -> None:
    """Feed `lines` to `chat` until `/exit` or the end: `/reset` clears the history, empty lines are skipped."""
    if prompt:
        write(prompt)
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            chat.reset()
            write("(conversation cleared)\n")
        elif text:
            chat.send(text, write)
            write("\n")
        if prompt:
            write(prompt)


def run_chat(args) -> int:
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}.")
    if args.seed is not None:
        set_seed(args.seed)
    chat = Chat(args.model, args.system, args.max_new_tokens, args.temperature)
    interactive = sys.stdin.isatty()
    print(f"Chatting with {chat.path}. /reset clears the conversation, /exit quits.", file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        chat_loop(chat, sys.stdin, write, prompt="you> " if interactive else "")
    except KeyboardInterrupt:
        write("\n")
    return 0
