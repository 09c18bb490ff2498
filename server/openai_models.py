"""OpenAI-compatible request/response models for ``/v1/chat/completions`` and ``/v1/completions``.

The models are vLLM's own (``vllm.entrypoints.openai.*.protocol``), subclassed: a request
accepts every sampling parameter vLLM's OpenAI server accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``logit_bias``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``,
``bad_words``, ``allowed_token_ids``, ``response_format``/``structured_outputs``...) and is
turned into ``SamplingParams`` by vLLM's ``to_sampling_params``. The subclasses add only
sae-serve's fields (``features``, ``steering``, ``compare``; the SDK sends them via
``extra_body``) and keep sae-serve's limits on a few fields (``n``, ``stop``, ``max_tokens``,
text-only chat messages, finite sampling numbers).

vLLM request fields that need machinery sae-serve does not run (tool parsers, beam search,
prompt logprobs, multimodal inputs, KV transfer...) are listed in :data:`REFUSED_CHAT` /
:data:`REFUSED_COMPLETION` and answered with a 400 naming them when set to anything but
their default; unknown fields get a 400 too: a client must never believe a setting was
applied when it was not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from vllm.entrypoints.generate.base.protocol import DeltaMessage as ChatDelta
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as _VllmChatRequest,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse as _VllmChatResponse,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponseChoice as _VllmChatChoice,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponseStreamChoice as _VllmChatStreamChoice,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionStreamResponse as _VllmChatStream,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatMessage as AssistantMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionLogProbs,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest as _VllmCompletionRequest,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponse as _VllmCompletionResponse,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponseChoice as _VllmCompletionChoice,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponseStreamChoice as _VllmCompletionStreamChoice,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionStreamResponse as _VllmCompletionStream,
)
from vllm.entrypoints.serve.engine.protocol import UsageInfo as Usage

from sae_runtime.engine.spec import FeatureRequest, SteeringSpec
from server.models import ChatMessage, SteeringApplied, TokenFeaturesOut

__all__ = [
    "AssistantMessage", "ChatChoice", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk",
    "ChatCompletionLogProb", "ChatCompletionLogProbs", "ChatCompletionLogProbsContent", "ChatCompletionRequest",
    "ChatDelta", "Completion", "CompletionChoice", "CompletionChunk", "CompletionChunkChoice", "CompletionLogProbs",
    "CompletionRequest", "UnsteeredChat", "UnsteeredCompletion", "Usage",
]

MAX_STOP = 16
# Fields OpenAI's SDK may send that vLLM's models do not declare: informational, accepted and ignored.
IGNORED = ("metadata", "store", "service_tier")

# vLLM request fields sae-serve refuses (400 naming the field) when set to a non-default
# value, with the reason. Everything else vLLM declares is applied through to_sampling_params.
_REFUSED_COMMON = {
    "use_beam_search": "beam search is not supported",
    "length_penalty": "applies to beam search only, which is not supported",
    "prompt_logprobs": "prompt logprobs are not returned by sae-serve",
    "logprob_token_ids": "is not supported; use logprobs / top_logprobs",
    "truncate_prompt_tokens": "is not supported: prompts are never truncated (a prompt over the context is refused)",
    "truncation_side": "is not supported: prompts are never truncated",
    "priority": "priority scheduling is not enabled",
    "cache_salt": "is set by sae-serve itself (steered requests get their own prefix-cache salt)",
    "kv_transfer_params": "disaggregated serving is not supported",
    "ec_transfer_params": "disaggregated serving is not supported",
    "vllm_xargs": "is not supported: extra_args carry sae-serve's own request spec",
    "return_tokens_as_token_ids": "is not supported",
    "return_token_ids": "is not supported",
    "return_token_offsets": "is not supported",
    "mm_payload": "multimodal inputs are not supported",
    "return_mm_kwargs": "multimodal inputs are not supported",
    "routed_experts_prompt_start": "is not supported",
    "thinking_token_budget": "reasoning models are not configured",
    "suffix": "is not supported",
}
REFUSED_CHAT = {
    **_REFUSED_COMMON,
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "tool calling is not supported",
    "function_call": "tool calling is not supported",
    "reasoning_effort": "reasoning models are not configured",
    "echo": "is not supported for chat completions",
    "add_generation_prompt": "the generation prompt is always added",
    "continue_final_message": "is not supported",
    "add_special_tokens": "is not supported for chat completions",
    "documents": "is not supported",
    "chat_template": "only the model's own chat template is used",
    "chat_template_kwargs": "only the model's own chat template is used",
    "media_io_kwargs": "multimodal inputs are not supported",
    "mm_processor_kwargs": "multimodal inputs are not supported",
    "return_prompt_text": "is not supported",
    "audio": "audio is not supported",
    "modalities": "only text is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
REFUSED_COMPLETION = {
    **_REFUSED_COMMON,
    "add_special_tokens": "is not supported: special tokens are always added to a text prompt",
}


class _Ours(BaseModel):
    """sae-serve's fields, on both endpoints."""

    features: FeatureRequest | None = None
    steering: SteeringSpec | None = None
    compare: bool = Field(default=False, description="also return the unsteered completion (field 'unsteered')")


def _check_stops(v: Any) -> Any:
    if isinstance(v, list) and len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings (got {len(v)})")
    return v


class ChatCompletionRequest(_VllmChatRequest, _Ours):
    """vLLM's chat request + ``features``/``steering``/``compare``.

    ``messages`` are text messages rendered with the model's chat template (sae-serve's
    :class:`ChatMessage`: roles system/user/assistant/developer/tool, text content parts).
    """

    messages: list[ChatMessage] = Field(min_length=1)  # type: ignore[assignment]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = Field(default_factory=list, description="at most 16 stop strings")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: Any) -> Any:
        return _check_stops(v)

    def given_max_tokens(self) -> tuple[str, int | None]:
        """(field, value): ``max_completion_tokens`` or ``max_tokens``, which vLLM's model marks
        deprecated (reading it as an attribute warns); OpenAI's SDK still sends it."""
        legacy = self.__dict__.get("max_tokens")
        if legacy is not None and self.max_completion_tokens is not None and legacy != self.max_completion_tokens:
            raise ValueError("differs from max_tokens; give one of them")
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", legacy


class CompletionRequest(_VllmCompletionRequest, _Ours):
    """vLLM's completion request + ``features``/``steering``/``compare``.

    ``prompt``: a text, a list of token ids, or a batch of either (each prompt gets ``n``
    choices, indexed ``prompt_index * n + i`` as in vLLM). Token ids are checked against the
    vocabulary by sae-serve (400 naming ``prompt``).
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = Field(default_factory=list, description="at most 16 stop strings")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    best_of: int | None = Field(default=None, ge=1)
    # vLLM takes serialized tensors here; sae-serve never deserializes client bytes.
    prompt_embeds: None = Field(default=None, description="not supported: send text or token ids")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: Any) -> Any:
        return _check_stops(v)


# -- responses: vLLM's, plus per-token features --------------------------------------------


class ChatChoice(_VllmChatChoice):
    features: list[TokenFeaturesOut] | None = None


class CompletionChoice(_VllmCompletionChoice):
    features: list[TokenFeaturesOut] | None = None


class UnsteeredChat(BaseModel):
    """The same request without its steering (``compare: true``)."""

    choices: list[ChatChoice]
    usage: Usage


class UnsteeredCompletion(BaseModel):
    choices: list[CompletionChoice]
    usage: Usage


_APPLIED = "what the request's steering edits resolved to (units made explicit, values in raw units); on the " \
    "first chunk when streaming"


class ChatCompletion(_VllmChatResponse):
    choices: list[ChatChoice]  # type: ignore[assignment]
    unsteered: UnsteeredChat | None = None
    steering_applied: SteeringApplied | None = Field(default=None, description=_APPLIED)


class Completion(_VllmCompletionResponse):
    choices: list[CompletionChoice]  # type: ignore[assignment]
    unsteered: UnsteeredCompletion | None = None
    steering_applied: SteeringApplied | None = Field(default=None, description=_APPLIED)


_UNSTEERED = "true on the chunks of a compare copy (compare with stream): the same request without its steering"


class ChatChunkChoice(_VllmChatStreamChoice):
    features: list[TokenFeaturesOut] | None = None
    unsteered: bool | None = Field(default=None, description=_UNSTEERED)


class ChatCompletionChunk(_VllmChatStream):
    choices: list[ChatChunkChoice]  # type: ignore[assignment]
    steering_applied: SteeringApplied | None = Field(default=None, description=_APPLIED)


class CompletionChunkChoice(_VllmCompletionStreamChoice):
    features: list[TokenFeaturesOut] | None = None
    unsteered: bool | None = Field(default=None, description=_UNSTEERED)


class CompletionChunk(_VllmCompletionStream):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]  # type: ignore[assignment]
    steering_applied: SteeringApplied | None = Field(default=None, description=_APPLIED)
