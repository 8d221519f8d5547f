"""Chat format of Qwen3.5: prompt rendering, reasoning / tool-call parsing (whole and streamed), thinking
budget.

>>> from qwen35.chat import render, parse, StreamParser
>>> prompt = render([{"role": "user", "content": "Hi"}], enable_thinking=False)
>>> parse("Hello!", thinking=False).content
'Hello!'
"""

from .budget import ThinkingBudget
from .parser import ParsedOutput, StreamParser, parse, parse_tool_call_block, prompt_opens_thinking
from .template import ChatTemplateError, load_chat_template, normalize_messages, render

__all__ = [
    "ChatTemplateError",
    "ParsedOutput",
    "StreamParser",
    "ThinkingBudget",
    "load_chat_template",
    "normalize_messages",
    "parse",
    "parse_tool_call_block",
    "prompt_opens_thinking",
    "render",
]
