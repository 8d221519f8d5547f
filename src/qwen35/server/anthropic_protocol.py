"""Request and response bodies of Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) as
pydantic models; they validate requests and describe the routes in /openapi.json.

What Anthropic defines and a local model can honour is accepted: text, image (base64 or URL) and plain-text
document blocks, `tool_use` / `tool_result`, `thinking` / `redacted_thinking` blocks sent back in history,
client tools with an `input_schema`, `tool_choice`, `thinking` (enabled with a budget, adaptive, disabled),
`stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata`, `output_config.format` (a JSON schema for the
answer). Fields that only mean something on Anthropic's platform (`cache_control`, `service_tier`,
`container`, `mcp_servers`, `context_management`, citations ...) are ignored, as are unknown fields; a few
vLLM sampling extras (`min_p`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`, `seed`) are
accepted too. Besides the roles `user` and `assistant`, `system` messages in `messages` are accepted (some
clients send them mid-conversation).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwen35.server.protocol import MAX_STOP

#: the tool names Anthropic allows (Claude Code's MCP tools are `mcp__server__tool`, up to 128 characters)
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ content blocks
class TextBlock(_Model):
    type: Literal["text"]
    text: str


class Base64ImageSource(_Model):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1, description="the image file, base64")


class URLImageSource(_Model):
    type: Literal["url"]
    url: str = Field(description="an http(s) / file URL where the server allows it, or a data: URL")


class ImageBlock(_Model):
    type: Literal["image"]
    source: Annotated[Base64ImageSource | URLImageSource, Field(discriminator="type")]


class PlainTextSource(_Model):
    type: Literal["text"]
    media_type: Literal["text/plain"] = "text/plain"
    data: str


class DocumentBlock(_Model):
    """A plain-text document (PDFs are not read by this server)."""

    type: Literal["document"]
    source: Annotated[PlainTextSource, Field(discriminator="type")]
    title: str | None = None
    context: str | None = None


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool = False


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                         | RedactedThinkingBlock, Field(discriminator="type")]


class InputMessage(_Model):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


# ------------------------------------------------------------------------------------------ tools
class ToolDef(_Model):
    """A client tool (`input_schema` given; `type` absent or "custom"). Anthropic's own tool types (web search,
    bash_*, text_editor_* ...) have no schema here: the server leaves them out of the prompt, with a warning."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoiceAuto(_Model):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Model):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Model):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Model):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
                       Field(discriminator="type")]


# ------------------------------------------------------------------------------------------ thinking, output
class ThinkingEnabled(_Model):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=0, description="at most this many reasoning tokens (the server's thinking "
                                                 "budget: then it closes the think block itself)")
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Model):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Model):
    type: Literal["disabled"]


ThinkingConfig = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]


class JSONOutputFormat(_Model):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Model):
    effort: str | None = Field(None, description="accepted and ignored")
    format: JSONOutputFormat | None = None


# ------------------------------------------------------------------------------------------ requests
_EXAMPLES = [
    {"model": "qwen35", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello!"}]},
    {"max_tokens": 64, "system": "Be brief.", "stream": True, "thinking": {"type": "enabled", "budget_tokens": 32},
     "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
     "tools": [{"name": "get_weather", "description": "Weather forecast",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
     "tool_choice": {"type": "auto"}},
]


class _Conversation(_Model):
    """What both routes read: the conversation and what shapes its prompt."""

    model: str | None = Field(None, description="the served model name (default: the only model served)")
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = Field(None, description="absent: the chat template's default (thinking on "
                                                              "for Qwen3.5)")
    output_config: OutputConfig | None = None


class MessagesRequest(_Conversation):
    model_config = ConfigDict(json_schema_extra={"examples": _EXAMPLES})

    max_tokens: int = Field(ge=1, description="tokens to generate at most (cut to what the context leaves)")
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, description="default: the checkpoint's generation_config")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: all tokens")
    metadata: dict[str, Any] | None = Field(None, description="accepted and ignored")
    # vLLM's sampling extras
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    seed: int | None = None


class CountTokensRequest(_Conversation):
    pass


# ------------------------------------------------------------------------------------------ responses
class TextOut(_Model):
    type: Literal["text"] = "text"
    text: str


class ThinkingOut(_Model):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = Field(description="opaque; send the block back unchanged")


class ToolUseOut(_Model):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(_Model):
    input_tokens: int = Field(description="prompt tokens not served by the prefix cache")
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = Field(0, description="prompt tokens served by the prefix cache")


class MessageResponse(_Model):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[ThinkingOut | TextOut | ToolUseOut, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"]
    stop_sequence: str | None = None
    usage: MessageUsage


class CountTokensResponse(_Model):
    input_tokens: int


class AnthropicErrorDetail(_Model):
    type: str
    message: str


class AnthropicErrorResponse(_Model):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


__all__ = ["AnthropicErrorResponse", "ContentBlock", "CountTokensRequest", "CountTokensResponse", "DocumentBlock",
           "ImageBlock", "InputMessage", "MessageResponse", "MessagesRequest", "RedactedThinkingBlock",
           "TextBlock", "ThinkingAdaptive", "ThinkingBlock", "ThinkingDisabled", "ThinkingEnabled", "ToolChoiceAny",
           "ToolChoiceNone", "ToolChoiceTool", "ToolDef", "ToolResultBlock", "ToolUseBlock"]
