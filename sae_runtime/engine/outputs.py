"""What the engine hands back per request: token deltas with their SAE features.

Pydantic models so that the HTTP and gRPC layers convert the same objects.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from sae_wire.models import DictionaryFeatures, TokenFeatures  # noqa: F401  (the wire contract's)


class GenerationChunk(BaseModel):
    """One streamed update of a request.

    Features lag the text by one token: a generated token's features are those of the
    forward pass that *reads* it, which happens in the step that samples the next token;
    the last generated token of a request is never read by the model, so it has none
    (except the token a ``stop_when`` feature fired on, which ends the request: the model
    has read it).
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
