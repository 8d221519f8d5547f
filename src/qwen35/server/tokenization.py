"""vLLM's tokenizer routes: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, and `GET /version`.

    POST /tokenize   {"prompt": "Hello"}                          -> {"count", "max_model_len", "tokens"}
    POST /tokenize   {"messages": [...], "add_generation_prompt"}  -> the same, for the chat prompt
    POST /detokenize {"tokens": [9707]}                           -> {"prompt": "Hello"}

A conversation is rendered exactly as the chat route renders it (the chat front end: template, tools, system
messages folded, `chat_template_kwargs` such as enable_thinking), so `count` is the prompt_tokens a chat completion
of the same messages reports. `return_token_strs` adds each token's vocabulary string (byte-level, as vLLM's
`convert_ids_to_tokens`: " world" is "Ġworld"). lm-evaluation-harness looks for
`/tokenizer_info` and, when it answers, tokenizes through /tokenize and /detokenize instead of loading a
tokenizer of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qwen35.server.errors import APIError
from qwen35.server.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from qwen35.server.serving import Serving


class TokenizationHandler:
    def __init__(self, serving: Serving):
        self.s = serving

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        s = self.s
        s.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            ids = await asyncio.to_thread(self._chat_ids, req)
        else:
            ids = await asyncio.to_thread(s.tokenizer.encode, req.prompt)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids}
        if req.return_token_strs:  # vLLM's: the vocabulary's strings (byte-level: "Ġworld"), not decoded text
            out["token_strs"] = [t if t is not None else "" for t in s.tokenizer.convert_ids_to_tokens(ids)]
        return out

    def _chat_ids(self, req: TokenizeChatRequest) -> list[int]:
        """The chat route's prompt ids for these messages (blocking: template, tokenizer, images)."""
        from qwen35.chat.frontend import ChatRequest
        from qwen35.server.chat import convert_messages
        from qwen35.server.chat_session import prepare_chat

        if req.continue_final_message:
            raise APIError("continue_final_message is not supported", 400, param="continue_final_message",
                           code="unsupported_parameter")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        chat = ChatRequest(convert_messages(req.messages), tools=tools, template_kwargs=dict(req.chat_template_kwargs
                                                                                             or {}),
                           add_generation_prompt=req.add_generation_prompt)
        return list(prepare_chat(self.s, chat).prompt_ids)

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        s = self.s
        s.check_model(req.model)
        bad = next((t for t in req.tokens if t >= s.vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary [0, {s.vocab_size})", 400, param="tokens",
                           code="invalid_value")
        return {"prompt": s.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict[str, Any]:
        s = self.s
        tok = s.tokenizer
        eos_ids = getattr(tok, "eos_token_ids", None) or (tok.eos_token_id,)
        pad = tok.pad_token_id
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.id_to_token(eos_ids[0]), "bos_token": None,
                "pad_token": tok.id_to_token(pad) if pad is not None else None, "chat_template": s.chat_template,
                "model_max_length": s.max_model_len}


__all__ = ["TokenizationHandler"]
