"""Request and response bodies of the OpenAI-compatible API (pydantic models; they also make /openapi.json).

Requests follow OpenAI's Chat Completions and Completions APIs plus vLLM's extras (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, `skip_special_tokens`,
`include_stop_str_in_output`, `chat_template_kwargs`) and a thinking budget (`thinking_budget`, alias
`max_thinking_tokens`). Fields that OpenAI defines but this server does not implement are either accepted
when they ask for nothing (`logit_bias` empty) or refused with a 400 saying so; unknown fields are ignored,
as vLLM does. `response_format` (json_object, json_schema) and vLLM's `structured_outputs` constrain the output
(qwen35.engine.structured).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_PROMPTS = 256

NonNegInt = Annotated[int, Field(ge=0)]
NonEmpty = Field(min_length=1)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ content parts
class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(description="a data: URL (base64), or http(s) / file URL when the server allows it")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Model):
    url: str = Field(description="a data: URL (base64 mp4 / webm / mov), or http(s) / file URL when the server "
                                 "allows it")


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: VideoURL


UserPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


# ------------------------------------------------------------------------------------------ messages
class FunctionCall(_Model):
    name: str
    arguments: str = Field(description="the arguments as a JSON object encoded in a string")


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = Field(None, description="earlier reasoning (kept only where the template "
                                                            "keeps it)")
    reasoning: str | None = Field(None, description="vLLM's name of reasoning_content (either is accepted)")
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(_Model):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# ------------------------------------------------------------------------------------------ tools
class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(False, description="usage in every chunk (vLLM extra)")


class JsonSchemaFormat(_Model):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(_Model):
    type: str = Field(description="\"text\", \"json_object\" or \"json_schema\"")
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Model):
    """vLLM's `structured_outputs`: exactly one of the constraints (qwen35.StructuredOutputsParams)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    json_object: bool | None = Field(None, description="true: any JSON object")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect) or GBNF")


# ------------------------------------------------------------------------------------------ sampling
class _SamplingFields(_Model):
    model: str | None = Field(None, description="the served model name (default: the only model served)")
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (default: what the "
                                                             "context leaves)")
    temperature: float | None = Field(None, ge=0.0, description="default: the checkpoint's generation_config")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extra; 0 or -1: all tokens")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    seed: int | None = Field(None, description="any integer (taken modulo 2^63)")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM extra: a grammar the output "
                                                                           "follows (json, regex, choice, grammar)")
    user: str | None = None


#: the sampling fields every generating route shares (the chat session validates other routes' values with it)
SamplingFields = _SamplingFields

_CHAT_EXAMPLES = [
    {"model": "qwen35", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 6,
     "stream": True, "stream_options": {"include_usage": True}, "chat_template_kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 6, "tool_choice": "auto",
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
     "max_tokens": 6, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5, "seed": 1,
     "logprobs": True, "top_logprobs": 2, "n": 2, "thinking_budget": 2},
]
_COMPLETION_EXAMPLES = [
    {"model": "qwen35", "prompt": "The capital of France is", "max_tokens": 8},
    {"prompt": [1, 2, 3], "max_tokens": 4, "echo": True, "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": ["One", "Two"], "n": 2, "max_tokens": 3, "logprobs": 2, "seed": 7, "temperature": 0.9,
     "stop": ["\n"]},
]


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": _CHAT_EXAMPLES})

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (wins when both "
                                                                        "are given)")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="variables for the chat template, e.g. {\"enable_thinking\": false}")
    thinking_budget: int | None = Field(None, ge=0, description="at most this many reasoning tokens; then "
                                                                "the server closes the think block itself")
    max_thinking_tokens: int | None = Field(None, ge=0, description="alias of thinking_budget")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="\"none\" turns thinking off; the others keep it on (no budget)")


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": _COMPLETION_EXAMPLES})

    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], NonEmpty]
             | Annotated[list[NonNegInt], NonEmpty]
             | Annotated[list[Annotated[list[NonNegInt], NonEmpty]], NonEmpty]) = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most (default: what the context "
                                                             "leaves); 0 only with echo: the prompt alone (with "
                                                             "logprobs, its tokens' logprobs)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the top-N logprobs of each token (with "
                                                                          "echo also of the prompt's tokens)")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema (as vLLM)")


# ------------------------------------------------------------------------------------------ responses
class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(_Model):
    name: str
    arguments: str


class ResponseToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning: str | None = Field(None, description="the reasoning (vLLM's name)")
    reasoning_content: str | None = Field(None, description="the same reasoning (SGLang's and llama.cpp's name)")
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)


class ChatChoice(_Model):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class DeltaToolCall(_Model):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ResponseFunctionCall | None = None


class ChatDelta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Model):
    """One event of a chat stream. Per choice: a first chunk with the role, then content / reasoning_content /
    tool_calls deltas (each tool call whole, with its index), then a chunk with the finish_reason; with
    stream_options.include_usage a last chunk with no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Model):
    """One event of a completion stream (choices as in CompletionResponse, text as it comes)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class StreamError(_Model):
    """An error after the stream started (the status was already 200): one event, then [DONE]."""

    error: dict[str, Any]


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen35"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Model):
    status: Literal["ok"] = "ok"


# ------------------------------------------------------------------------------------------ tokenizer (vLLM's)
class TokenizeCompletionRequest(_Model):
    """`POST /tokenize` with a text prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="accepted for vLLM compatibility: Qwen3.5's tokenizer adds "
                                                       "no special tokens either way")
    return_token_strs: bool = Field(False, description="also return each token's vocabulary string "
                                                       "(byte-level, as vLLM)")


class TokenizeChatRequest(_Model):
    """`POST /tokenize` with a conversation, rendered by the chat template as the chat route renders it."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="not supported: must be false")
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = Field(False, description="accepted for vLLM compatibility (no effect)")
    return_token_strs: bool = False


def _tokenize_kind(body: Any) -> str:
    """Which /tokenize body this is: a conversation when it has `messages`, else a text prompt (whose missing
    `prompt` is then the error). The tags hold a '-' so that error locations name the field alone."""
    has = "messages" in body if isinstance(body, dict) else getattr(body, "messages", None) is not None
    return "chat-messages" if has else "text-prompt"


TokenizeRequest = Annotated[Annotated[TokenizeCompletionRequest, Tag("text-prompt")]
                            | Annotated[TokenizeChatRequest, Tag("chat-messages")], Discriminator(_tokenize_kind)]


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[NonNegInt]


class DetokenizeResponse(_Model):
    prompt: str


class VersionResponse(_Model):
    version: str


class TokenizerInfo(_Model):
    """`GET /tokenizer_info` (vLLM's): what a client needs to tokenize as the server does (lm-evaluation-harness
    looks for it and then tokenizes through /tokenize and /detokenize)."""

    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int


SSE_DESCRIPTION = ("With `stream: true`: server-sent events, one `data: {chunk}` per event (chat.completion.chunk "
                   "or text_completion objects), ended by `data: [DONE]`.")

__all__ = [
    "AssistantMessage", "ChatCompletionRequest", "ChatCompletionResponse", "CompletionRequest",
    "CompletionResponse", "DetokenizeRequest", "DetokenizeResponse", "Health", "ImagePart", "ModelCard",
    "ModelList", "SystemMessage", "TextPart", "TokenizeChatRequest", "TokenizeCompletionRequest", "TokenizeRequest",
    "TokenizeResponse", "TokenizerInfo", "Tool", "ToolMessage", "UserMessage", "Usage", "VersionResponse",
    "VideoPart",
]
