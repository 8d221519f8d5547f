"""The tags of Qwen3.5's chat format, in one place (the template, the parsers, the engine's thinking budget and
the server all read them from here)."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
#: what follows CALL_OPEN in a call: ``<function=NAME>`` then ``<parameter=P>`` blocks
FUNCTION_OPEN = "<function="
TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE)

__all__ = ["CALL_CLOSE", "CALL_OPEN", "FUNCTION_OPEN", "TAGS", "THINK_CLOSE", "THINK_OPEN"]
