"""The OpenAI request bodies the API accepts, checked by pydantic, and the response bodies it builds.

Requests are validated into frozen models so that the relay never sees a malformed value;
fields the OpenAI API has but this swarm cannot honour (n > 1, logprobs, penalties, tools)
are refused by name instead of being silently ignored. Responses are plain dicts shaped as
OpenAI's, so that the official clients parse them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.errors import ApiError

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "GenerationRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "new_id",
    "parse_request",
    "usage",
]

MAX_STOP_STRINGS = 4  # as OpenAI


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list (images are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"content parts of type {part.get('type')!r} are not supported", param="messages")
            pieces.append(part["text"])
        return "".join(pieces)


class GenerationRequest(BaseModel):
    """What chat and text completions share: the model, sampling, length and stop conditions."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def refuse_unsupported(self) -> None:
        """OpenAI options this swarm cannot honour are an error, never silently dropped."""
        if self.n != 1:
            raise ApiError("only n=1 is supported", param="n")
        if self.logprobs:
            raise ApiError("logprobs are not supported", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(f"{name} is not supported", param=name)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise ApiError("tools are not supported", param="tools")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError("echo is not supported", param="echo")
        if self.suffix:
            raise ApiError("suffix is not supported", param="suffix")

    def one_prompt(self) -> str | list[int]:
        """The single prompt (text or token ids); a batch of prompts is refused (use several requests)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ApiError("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]  # type: ignore[assignment]
        if not prompt:
            raise ApiError("the prompt is empty", param="prompt")
        return prompt  # type: ignore[return-value]

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse_request(kind: type[GenerationRequest], body: Any) -> Any:
    """Validate a decoded JSON body into `kind`, or ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        problem = "is required" if first["type"] == "missing" else first["msg"]
        raise ApiError(f"{param}: {problem}" if param else problem, param=param) from None
    request.refuse_unsupported()
    return request


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(
    rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk; a usage-only chunk (stream_options.include_usage) has no choices."""
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    chunk["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk


def completion_response(
    rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    rid: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    chunk["choices"] = (
        [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    )
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk
