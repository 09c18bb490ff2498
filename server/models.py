"""Transport-neutral request and response models of the feature API.

HTTP serialises these directly (FastAPI request bodies and response models); gRPC
converts its messages into and out of them (:mod:`server.grpc_convert`), so both
transports run exactly the same validation and the same service code. The SAE-specific
request parts are the engine's own models (:class:`FeatureRequest`,
:class:`SteeringSpec`): there is one definition of those fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_runtime.engine.outputs import TokenFeatures
from sae_runtime.engine.spec import FeatureRequest, SteeringSpec


class _Strict(BaseModel):
    """Unknown fields are refused (422 naming them) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    """One chat turn. Extra OpenAI keys (``name``...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; OpenAI's list-of-parts form is accepted for text parts only."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"only text content parts are supported (got type {part.get('type')!r})")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class PromptInput(_Strict):
    """Exactly one of ``text`` (raw text, special tokens added) or ``messages`` (chat template)."""

    text: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptInput":
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of 'text' or 'messages'")
        return self


class ExtractRequest(PromptInput):
    """``POST /v1/features/extract`` and gRPC ExtractFeatures."""

    features: FeatureRequest


class TokenFeaturesOut(TokenFeatures):
    """The engine's per-token features plus the token's text, so clients need no tokenizer."""

    token: str


class ExtractResponse(BaseModel):
    model: str
    tokens: list[TokenFeaturesOut]


class SamplingOptions(_Strict):
    """Sampling knobs shared by gRPC Generate (OpenAI requests map onto vLLM directly)."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)


class GenerateRequest(PromptInput):
    """gRPC Generate: one prompt, sampling, and the optional SAE parts."""

    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    features: FeatureRequest | None = None
    steering: SteeringSpec | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateChunkOut(BaseModel):
    """One streamed piece of a generation (gRPC Generate; HTTP builds OpenAI chunks)."""

    token_ids: list[int]
    text: str
    features: list[TokenFeaturesOut] = Field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None


class DictionaryInfoOut(BaseModel):
    """``GET /v1/dictionaries`` entry and gRPC DictionaryInfo."""

    id: str
    model: str
    hook_point: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    metrics: dict[str, Any] | None = None


class DictionaryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DictionaryInfoOut]


class TokenScore(BaseModel):
    token_id: int
    token: str
    score: float


class FeatureInfoOut(BaseModel):
    """``GET /v1/dictionaries/{id}/features/{i}`` and gRPC GetFeature.

    ``top_promoted``/``top_suppressed`` are the tokens whose logits the feature's decoder
    direction raises/lowers most, read through the model's final norm gain and its
    unembedding (a logit-lens view: exact for the last layer, indicative for earlier ones).
    """

    dictionary: str
    feature: int
    hook_point: str
    decoder_norm: float
    top_promoted: list[TokenScore]
    top_suppressed: list[TokenScore]
    density: float | None = Field(default=None, description="fraction of tokens it fires on, when recorded")


class ModelCard(BaseModel):
    """OpenAI's model object plus what a client needs to know before it sends a request."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sae-serve"
    max_model_len: int | None = Field(default=None, description="context length in tokens")
    supports_chat: bool = Field(
        default=True, description="whether /v1/chat/completions (and chat prompts) can be served: "
        "false for a model without a chat template (GPT-2, Pythia); use /v1/completions then")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """OpenAI-style error envelope: ``{"error": {message, type, param, code}}``."""

    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
