"""`trl-guided chat MODEL_OR_RUN_DIR`: multi-turn chat with a model in the terminal, streaming its tokens.

Lines are read from stdin, so a conversation can be scripted (`printf 'Hi\\nAnd then?\\n' | trl-guided chat runs/x`).
`/reset` forgets the conversation (the system prompt stays), `/exit` or the end of input quits. The model sees the
whole conversation through its chat template at every turn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .models import EMBEDDED_PREFIX, resolve_model_path


def model_dir(spec: str) -> Path:
    """The folder to load for `spec`: an embedded name, a model folder, or a run folder (its saved model, else its
    last checkpoint)."""
    if spec.startswith(EMBEDDED_PREFIX):
        return Path(resolve_model_path(spec))
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(
            f"{spec} is not a folder or an embedded model name ({EMBEDDED_PREFIX}NAME); give a run folder."
        )
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    numbered = [p for p in path.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    checkpoints = sorted(numbered, key=lambda p: int(p.name.removeprefix("checkpoint-")))
    for checkpoint in reversed(checkpoints):
        if (checkpoint / "config.json").is_file() or (checkpoint / "adapter_config.json").is_file():
            return checkpoint
    raise SystemExit(f"{spec} holds no model (no config.json, adapter_config.json or checkpoint-N with one).")


class Chat:
    """A conversation with one model: `send` appends the user turn and the model's streamed answer to `messages`."""

    def __init__(self, spec: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_dir(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.chat_template is None:
            raise SystemExit(f"{path} has no chat template; chat needs an instruction-tuned model's tokenizer.")
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            self.model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.path = path
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, write: Callable[[str], None] = lambda _: None) -> str:
        """Answer `text` given the conversation so far; `write` receives the answer piece by piece as it is sampled."""
        import torch
        from transformers import TextStreamer

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
        from transformers import set_seed

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
