"""`qwen35 chat MODEL`: an interactive conversation, streamed.

Each line read is a user message (stdin may be a pipe: `printf 'Hi\\n/exit\\n' | qwen35 chat MODEL`). The
answer streams as it is generated; reasoning is shown dimmed on a terminal, and between `<think>` and
`</think>` lines when the output is not a terminal. Commands:
    /think on | /think off   enable or disable thinking for the next turns (default: the template's)
    /reset                   forget the conversation
    /exit                    quit (end of input does too)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from qwen35.commands.generate import add_model_arguments, build_llm, sampling_params

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "commands: /think on|off, /reset, /exit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    p.add_argument("--think", choices=["on", "off"], default=None,
                   help="enable_thinking for the chat template (default: the template's own default)")
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="at most this many reasoning tokens per answer, then the answer is forced")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="dim reasoning with ANSI codes (auto: when stdout is a terminal)")


class _Printer:
    """Writes the streamed parts of one answer: reasoning (dimmed or tagged), then content."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.in_reasoning = False

    def reasoning(self, text: str) -> None:
        if not self.in_reasoning:
            self.out.write(DIM if self.color else "<think>\n")
            self.in_reasoning = True
        self.out.write(text)

    def content(self, text: str) -> None:
        self._close_reasoning()
        self.out.write(text)

    def _close_reasoning(self) -> None:
        if self.in_reasoning:
            self.out.write(RESET + "\n\n" if self.color else "\n</think>\n\n")
            self.in_reasoning = False

    def end(self) -> None:
        self._close_reasoning()
        self.out.write("\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    out, inp = sys.stdout, sys.stdin
    interactive = inp.isatty()
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    llm = build_llm(args)
    params = sampling_params(llm, args, default_max_tokens=4096)
    if args.thinking_budget is not None:
        params = params.clone(thinking_budget=args.thinking_budget)
    think: bool | None = None if args.think is None else args.think == "on"
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(system)
    if interactive:
        print(f"qwen35 chat: {args.model}  ({HELP})", file=sys.stderr)

    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        cmd = text.strip()
        if not cmd:
            continue
        if cmd.startswith("/"):
            word, _, arg = cmd.partition(" ")
            if word in ("/exit", "/quit"):
                break
            if word == "/reset":
                history = list(system)
                print("[conversation reset]", file=sys.stderr)
            elif word == "/think" and arg.strip() in ("on", "off"):
                think = arg.strip() == "on"
                print(f"[thinking {arg.strip()}]", file=sys.stderr)
            else:
                print(f"[unknown command {cmd!r}; {HELP}]", file=sys.stderr)
            continue

        history.append({"role": "user", "content": text})
        kwargs = {} if think is None else {"enable_thinking": think}
        printer = _Printer(out, color)
        reasoning, content, calls = [], [], []
        finish = None
        try:
            for delta in llm.chat_stream(history, params, chat_template_kwargs=kwargs):
                for c in delta.outputs:
                    if c.reasoning_content:
                        reasoning.append(c.reasoning_content)
                        printer.reasoning(c.reasoning_content)
                    if c.content:
                        content.append(c.content)
                        printer.content(c.content)
                    for call in c.tool_calls or ():
                        calls.append(call)
                        fn = call.get("function", {})
                        printer.content(f"\n[tool call] {fn.get('name')}({fn.get('arguments')})\n")
                    finish = c.finish_reason or finish
                out.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            finish = "abort"
        printer.end()
        if finish == "length":
            print("[answer cut at the length limit]", file=sys.stderr)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": c["function"]}
                                     for c in calls]
        history.append(message)
    return 0
