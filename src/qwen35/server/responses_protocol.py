"""Request bodies of OpenAI's Responses API (`POST /v1/responses`), as pydantic models (they also make
/openapi.json). The shapes follow the `openai` SDK's `types/responses` params.

What is read: `input` (a string, or items: messages of role user / assistant / system / developer with text and
image parts, `function_call`, `function_call_output`, `reasoning`), `instructions`, function `tools` (other tool
types are kept apart and ignored by the route, with a warning), `tool_choice`, `parallel_tool_calls`,
`reasoning.effort`, `text.format`, `max_output_tokens`, the sampling fields, `stream`, `store`,
`previous_response_id`, `truncation`. Accepted and not used: `metadata` (echoed), `user`, `include`,
`service_tier`, `prompt_cache_key`, `safety_identifier`, `stream_options`, `max_tool_calls` (it counts built-in
tool calls, which this server has none of). Unknown fields are ignored, as on the other routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _tag(default: str | None) -> Any:
    """A discriminator on `type` that also works for dicts without one (`default`) and for other values."""

    def item_type(v: Any) -> str | None:  # the name shows in pydantic's message for an unknown type
        t = v.get("type", default) if isinstance(v, dict) else getattr(v, "type", default)
        return t if isinstance(t, str) else None

    return Discriminator(item_type)


# ------------------------------------------------------------------------------------------ content parts
class InputText(_Model):
    type: Literal["input_text"]
    text: str


class OutputText(_Model):
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(_Model):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Model):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="a data: URL (base64), or http(s) / file URL when the server "
                                                    "allows it")
    file_id: str | None = Field(None, description="not supported (there is no Files API): give image_url")
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputFile(_Model):
    type: Literal["input_file"]
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None


def _str_or_list(v: Any) -> str:
    return "str" if isinstance(v, str) else "list"


def text_or(items: Any) -> Any:
    """A string or a list of `items`, told apart by the value's type, so that an error inside the list names
    its place (input[2].content[0]) without a second message about the string."""
    return Annotated[Annotated[str, Tag("str")] | Annotated[list[items], Tag("list")], Discriminator(_str_or_list)]


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text")] | Annotated[OutputText, Tag("output_text")]
    | Annotated[Refusal, Tag("refusal")] | Annotated[InputImage, Tag("input_image")]
    | Annotated[InputFile, Tag("input_file")],
    _tag(None)]


# ------------------------------------------------------------------------------------------ input items
class MessageItem(_Model):
    """A message: the SDK's EasyInputMessage (no `type`), input message or output message alike."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: text_or(ContentPart)
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str = Field(description="the arguments as a JSON object encoded in a string")
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: text_or(ContentPart)
    id: str | None = None
    status: str | None = None


class SummaryText(_Model):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(_Model):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Model):
    """Earlier reasoning: its `content` text (else its summary) becomes the assistant turn's reasoning."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = Field(None, description="ignored (this server never encrypts reasoning)")
    status: str | None = None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    _tag("message")]


# ------------------------------------------------------------------------------------------ tools
class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(_Model):
    """A built-in or provider tool (web_search, file_search, computer, mcp, namespace, ...): not run here."""

    model_config = ConfigDict(extra="allow")
    type: str


def _tool_tag(v: Any) -> str:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "function" if t == "function" else "other"


ToolDef = Annotated[Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
                    Discriminator(_tool_tag)]


class FunctionToolChoice(_Model):
    type: Literal["function"]
    name: str


class AllowedToolRef(_Model):
    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None


class AllowedToolsChoice(_Model):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedToolRef]


class OtherToolChoice(_Model):
    """A tool choice naming a built-in tool type (refused: those tools do not run here)."""

    model_config = ConfigDict(extra="allow")
    type: str


def _choice_tag(v: Any) -> str:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return t if t in ("function", "allowed_tools") else "other"


ToolChoice = Annotated[
    Annotated[FunctionToolChoice, Tag("function")] | Annotated[AllowedToolsChoice, Tag("allowed_tools")]
    | Annotated[OtherToolChoice, Tag("other")],
    Discriminator(_choice_tag)]


# ------------------------------------------------------------------------------------------ options
class ReasoningConfig(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="'none': thinking off; 'minimal' / 'low' / 'medium': a thinking budget of 256 / 1024 / "
                          "8192 tokens; 'high' and above: no budget")
    summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="accepted; the reasoning "
                                                                                     "comes back whole as content")
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormatText(_Model):
    type: Literal["text"]


class TextFormatJSONSchema(_Model):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextFormatJSONObject(_Model):
    type: Literal["json_object"]


TextFormat = Annotated[TextFormatText | TextFormatJSONSchema | TextFormatJSONObject, Field(discriminator="type")]


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


_EXAMPLES = [
    {"model": "qwen35", "input": "Hello!", "max_output_tokens": 16},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}],
     "instructions": "Be brief.", "max_output_tokens": 16, "reasoning": {"effort": "none"}, "tool_choice": "auto",
     "tools": [{"type": "function", "name": "get_weather", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]},
    {"input": [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                "arguments": "{\"city\": \"Paris\"}"},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
     "max_output_tokens": 16, "stream": True, "store": False},
]


class ResponsesRequest(_Model):
    model_config = ConfigDict(json_schema_extra={"examples": _EXAMPLES})

    model: str | None = Field(None, description="the served model name (default: the only model served)")
    input: text_or(InputItem) | None = Field(None, description="the new input: text, or items")
    instructions: str | None = Field(None, description="a system message before the input (not carried over by "
                                                       "previous_response_id)")
    previous_response_id: str | None = Field(None, description="continue a stored response's conversation")
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, description="tokens to generate at most, reasoning "
                                                                  "included (default: what the context leaves)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default: the checkpoint's "
                                                                        "generation_config")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # vLLM's sampling extras, as on the other routes
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    seed: int | None = None
    thinking_budget: int | None = Field(None, ge=0, description="at most this many reasoning tokens (wins over "
                                                                "reasoning.effort)")
    stream: bool = False
    store: bool = Field(True, description="keep the response (in memory, bounded) for previous_response_id and "
                                          "GET /v1/responses/{id}")
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = Field(None, description="'auto': drop the oldest turns "
                                                                         "to fit the context; 'disabled' (default): "
                                                                         "400 when it does not fit")
    include: list[str] | None = None
    background: bool | None = Field(None, description="not supported: must be false")
    conversation: Any = Field(None, description="not supported (no Conversations API)")
    prompt: Any = Field(None, description="not supported (no stored prompt templates)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported: must be 0")
    max_tool_calls: int | None = Field(None, ge=0)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    stream_options: dict[str, Any] | None = None




# ------------------------------------------------------------------------------------------ answers (for the docs)
class ResponseObject(BaseModel):
    """The response object (also the `response` of the stream's lifecycle events); items as OpenAI's."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed", "cancelled"]
    model: str
    output: list[dict[str, Any]] = Field(description="reasoning, message and function_call items")
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool


__all__ = ["FunctionCallItem", "FunctionCallOutputItem", "FunctionTool", "InputImage", "InputItem", "MessageItem",
           "OtherTool", "ReasoningItem", "ResponseDeleted", "ResponseObject", "ResponsesRequest",
           "TextFormatJSONSchema"]
