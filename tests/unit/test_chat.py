"""`trl-guided chat`: a scripted conversation on the tiny model keeps its history; /reset and /exit work."""

from __future__ import annotations

import io
import sys

import pytest

from trl_guided import cli
from trl_guided.chat import Chat, chat_loop


def test_scripted_two_turn_conversation_keeps_the_history(tiny_llama):
    chat = Chat(tiny_llama, system="You are terse.", max_new_tokens=6, temperature=0.0)
    pieces: list[str] = []
    first = chat.send("Name a colour.", pieces.append)
    assert pieces and "".join(pieces).strip() == first.strip()  # streamed as it was sampled
    second = chat.send("And another one?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in chat.messages[1:]] == ["Name a colour.", first, "And another one?", second]
    # The second turn's prompt is the whole conversation through the chat template, the first answer included.
    expected = chat.tokenizer.apply_chat_template(chat.messages[:4], add_generation_prompt=True, tokenize=False)
    assert chat.tokenizer.decode(chat.last_prompt_ids) == expected
    assert "Name a colour." in expected and "You are terse." in expected

    output: list[str] = []
    chat_loop(chat, ["/reset\n", "\n", "Hello\n", "/exit\n", "never read\n"], output.append)
    assert [m["content"] for m in chat.messages] == ["You are terse.", "Hello", chat.messages[-1]["content"]]
    assert "(conversation cleared)\n" in output


def test_cli_chat_reads_stdin(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nWhat did I say?\n/exit\nnever read\n"))
    assert cli.main(["chat", tiny_llama, "--max-new-tokens", "4", "--temperature", "0", "--system", "Be kind."]) == 0
    captured = capsys.readouterr()
    assert "/reset clears the conversation" in captured.err
    assert captured.out.count("\n") >= 2  # two answers, each ended by a newline; no "you>" prompt when piped
    assert "you>" not in captured.out
    with pytest.raises(SystemExit, match="holds no model"):
        cli.main(["chat", str(tmp_path)])
    with pytest.raises(SystemExit, match="--temperature must be >= 0"):
        cli.main(["chat", tiny_llama, "--temperature", "-1"])
