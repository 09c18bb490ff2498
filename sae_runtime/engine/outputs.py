"""What the engine hands back per request: token deltas with their SAE features.

Pydantic models so that the HTTP and gRPC layers convert the same objects.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class DictionaryFeatures(BaseModel):
    """One token's features from one dictionary."""

    dictionary: str
    indices: list[int] | None = Field(
        default=None, description="feature ids, strongest first (top-k requests); None when only feature_ids were asked"
    )
    values: list[float] = Field(
        description="activations, aligned with indices; when only feature_ids were asked, with the feature_ids"
    )
    feature_values: list[float] | None = Field(
        default=None, description="activations of the requested feature_ids when top_k was asked as well"
    )


class TokenFeatures(BaseModel):
    """The features of the residual stream at one token position."""

    position: int = Field(description="0-based position in the request: prompt tokens first, then generated")
    token_id: int
    is_prompt: bool
    features: list[DictionaryFeatures]


class GenerationChunk(BaseModel):
    """One streamed update of a request.

    Features lag the text by one token: a generated token's features are those of the
    forward pass that *reads* it, which happens in the step that samples the next token;
    the last generated token of a request is never read by the model, so it has none.
    """

    request_id: str
    token_ids: list[int] = Field(description="new generated token ids in this chunk")
    text: str = Field(description="new text in this chunk")
    finished: bool = False
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = Field(default=None, description="set on the first chunk only")
    num_generated_tokens: int = 0
    num_cached_tokens: int | None = Field(default=None, description="prompt tokens served from the prefix cache")
    logprobs: list[dict[int, float]] | None = Field(
        default=None, description="per new token: token id -> logprob (when the sampling params asked for them)"
    )
    features: list[TokenFeatures] = Field(default_factory=list)
