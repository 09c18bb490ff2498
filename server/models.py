"""Request and response models of the feature API.

The transport-neutral ones (requests, per-token features, dictionaries) are the wire
contract's, :mod:`sae_wire.models`, re-exported here: HTTP serialises them directly
(FastAPI request bodies and response models) and gRPC converts its messages into and out
of them with :mod:`sae_wire.convert`, so both transports run exactly the same validation
and the same service code. The models defined here are HTTP's alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# The transport-neutral models are the wire contract's (sae_wire/models.py); the ones
# below are HTTP's alone (OpenAI's model list and error envelope).
from sae_wire.models import (  # noqa: F401
    MAX_CONTRAST_TEXTS,
    MAX_STORED_VECTORS,
    ChatMessage,
    DictionaryInfoOut,
    DictionarySummary,
    ExampleSearchHit,
    ExtractRequest,
    ExtractResponse,
    FeatureInfoOut,
    FeatureRequest,
    FeatureSearchResponse,
    GenerateChunkOut,
    GenerateRequest,
    ProjectedFeature,
    PromptInput,
    SamplingOptions,
    SearchByExampleRequest,
    SearchByExampleResponse,
    SteeringApplied,
    SteeringSpec,
    SteeringVector,
    SteeringVectorCreate,
    SteeringVectorDeleted,
    SteeringVectorInfo,
    SteeringVectorList,
    TokenFeatures,
    TokenFeaturesOut,
    TokenScore,
    Usage,
    VectorProjection,
    VectorProjectionInfo,
)


class DictionaryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DictionaryInfoOut]


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
