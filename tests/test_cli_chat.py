"""`qwen35 chat` with stdin piped: turns, commands, streaming, reasoning display."""

from __future__ import annotations

import io

import pytest
import test_engine_support  # noqa: F401  (one torch thread)
from test_engine_support import write_config

from qwen35.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("chat") / "tiny", vocab_size=248320)


def _chat(folder, monkeypatch, capsys, script: str, *flags: str):
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc = main(["chat", str(folder), "--load-format", "dummy", "--max-tokens", "5", "--temperature", "0",
               "--ignore-eos", *flags])
    return rc, capsys.readouterr()


def test_chat_piped_session(tiny_folder, monkeypatch, capsys):
    rc, cap = _chat(tiny_folder, monkeypatch, capsys,
                    "Hello!\n/think off\nAnd now?\n/think on\n\n/reset\n/bogus\nAgain\n/exit\nnever read\n")
    assert rc == 0
    assert "[thinking off]" in cap.err and "[thinking on]" in cap.err
    assert "[conversation reset]" in cap.err and "unknown command" in cap.err
    assert cap.err.count("length limit") == 3  # three answers, each cut at --max-tokens


def test_chat_end_of_input_and_history(tiny_folder, monkeypatch, capsys):
    import qwen35.engine.llm as llm_mod

    seen = []
    original = llm_mod.LLM.chat_stream

    def spy(self, messages, *a, **kw):
        seen.append(([dict(m) for m in messages], kw.get("chat_template_kwargs")))
        return original(self, messages, *a, **kw)

    monkeypatch.setattr(llm_mod.LLM, "chat_stream", spy)
    rc, cap = _chat(tiny_folder, monkeypatch, capsys, "one\n/think off\ntwo\n", "--system", "Be brief.",
                    "--thinking-budget", "2")
    assert rc == 0
    assert [m["role"] for m in seen[0][0]] == ["system", "user"]
    assert [m["role"] for m in seen[1][0]] == ["system", "user", "assistant", "user"]
    assert seen[0][1] == {} and seen[1][1] == {"enable_thinking": False}


def test_chat_shows_reasoning(monkeypatch, capsys):
    from qwen35.commands.chat import DIM, RESET, _Printer

    out = io.StringIO()
    p = _Printer(out, color=False)
    p.reasoning("hmm")
    p.content("Answer")
    p.end()
    assert out.getvalue() == "<think>\nhmm\n</think>\n\nAnswer\n"
    out = io.StringIO()
    p = _Printer(out, color=True)
    p.reasoning("hmm")
    p.content("Answer")
    p.end()
    assert out.getvalue() == f"{DIM}hmm{RESET}\n\nAnswer\n"
