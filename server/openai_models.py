"""OpenAI-compatible request/response models for ``/v1/chat/completions`` and ``/v1/completions``.

Requests accept what the official ``openai`` SDK sends, plus sae-serve's extra fields
(``features``, ``steering``, ``compare``; the SDK sends them via ``extra_body``). OpenAI
parameters that sae-serve does not implement (tools, response_format, logit_bias...) are
refused with a 400 naming them rather than silently ignored, and unknown fields get a 422:
a client must never believe a setting was applied when it was not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sae_runtime.engine.spec import FeatureRequest, SteeringSpec
from server.models import ChatMessage, TokenFeaturesOut, Usage

# Known OpenAI parameters that are not implemented: refused with a 400 when set.
UNSUPPORTED_CHAT = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                    "parallel_tool_calls", "audio", "modalities", "prediction", "reasoning_effort",
                    "web_search_options")
UNSUPPORTED_COMPLETION = ("suffix", "logit_bias")
MAX_STOP = 16
IGNORED = ("user", "metadata", "store", "service_tier")  # informational; accepted and ignored


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(extra="allow")  # extras are checked by check_extras (clear messages)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = Field(default=None, description="at most 16 stop strings")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 9, description="a signed 64-bit integer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # sae-serve extras
    features: FeatureRequest | None = None
    steering: SteeringSpec | None = None
    compare: bool = Field(default=False, description="also return the unsteered completion (field 'unsteered')")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings (got {len(v)})")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)


# -- responses ------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    features: list[TokenFeaturesOut] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    features: list[TokenFeaturesOut] | None = None


class UnsteeredChat(BaseModel):
    """The same request without its steering (``compare: true``)."""

    choices: list[ChatChoice]
    usage: Usage


class UnsteeredCompletion(BaseModel):
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    unsteered: UnsteeredChat | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    unsteered: UnsteeredCompletion | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    features: list[TokenFeaturesOut] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None
    features: list[TokenFeaturesOut] | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
