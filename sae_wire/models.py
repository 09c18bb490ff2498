"""The wire contract's data: request and response models shared by every transport.

One definition of each field: the HTTP API serialises these directly (FastAPI bodies
and response models), the gRPC server and the Python client convert them to and from
the protobuf messages with :mod:`sae_wire.convert`, and the engine validates the
``features`` / ``steering`` parts against the served dictionaries
(``sae_runtime.engine.spec`` re-exports those). Pure pydantic: importing this module
needs neither torch nor vLLM, so a client installs without them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Scope = Literal["prompt", "generated", "all"]
Normalize = Literal["none", "max"]
EditModeName = Literal["add", "clamp", "scale", "ablate", "project_cap", "orthogonal"]
StrengthUnit = Literal["raw", "max", "residual_norm"]
MAX_STOP_WHEN = 16
"""Conditions one request's ``steering.stop_when`` may list."""
MAX_CONCEPT_FEATURES = 8
"""Features one concept edit may resolve to (``concept_features``)."""
VALUE_UNIT_MODES = ("add", "clamp", "project_cap", "orthogonal")
"""Modes whose value is a coefficient of the decoder row and so takes a strength unit
(scale's value is a factor, ablate has none: their unit is always ``raw``)."""


# -- the SAE request fields: ``features`` and ``steering`` ---------------------------------

class _Strict(BaseModel):
    """Unknown fields are refused (422 naming them) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


class FeatureRequest(_Strict):
    """Which SAE features to return for each token of the request."""

    dictionaries: list[str] = Field(min_length=1, description="dictionary ids to read")
    top_k: int | None = Field(default=None, ge=1, description="return the k strongest features per token")
    feature_ids: list[int] | None = Field(
        default=None, min_length=1, description="return these features' values (with top_k: as well)"
    )
    scope: Scope = "all"
    # Read through the dictionary's feature index (server/README.md, "Feature index"):
    normalize: Normalize = Field(
        default="none", description="'max': each value divided by the feature's max activation in the index"
    )
    labels: bool = Field(default=False, description="a label (from the index) beside each feature id")
    exclude_dense_above: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="leave features whose indexed firing density is above this out of the top k "
        "(the top k among the other features comes back)",
    )

    @model_validator(mode="after")
    def _something_asked(self) -> FeatureRequest:
        # Neither asked: the strongest 8. Both asked: both come back (values aligned with
        # indices for the top-k, feature_values aligned with feature_ids).
        if self.top_k is None and self.feature_ids is None:
            self.top_k = 8
        return self


class FeatureCondition(_Strict):
    """A feature firing: ``feature`` of ``dictionary``, at that dictionary's hook point, has an
    activation above ``above`` (``when`` of an edit; ``stop_when`` of a request's steering)."""

    dictionary: str
    feature: int = Field(ge=0)
    above: float = Field(default=0.0, description="activation threshold (strictly above)")

    @field_validator("above")
    @classmethod
    def _finite_above(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class SteeringEdit(_Strict):
    """One edit of one feature; README.md, "Steering semantics", has each mode's effect."""

    dictionary: str
    feature: int | None = Field(default=None, ge=0, description="the feature (or give concept)")
    concept: str | None = Field(
        default=None, min_length=1, max_length=200, description="instead of feature: words looked up in the "
        "dictionary's feature index (labels and top tokens); the server edits the best concept_features matches")
    concept_features: int = Field(default=1, ge=1, le=MAX_CONCEPT_FEATURES,
                                  description="with concept: how many of the best matching features to edit")
    mode: EditModeName = "add"
    value: float | None = Field(
        default=None, description="v for add/clamp/project_cap/orthogonal, s for scale; unused by ablate")
    unit: StrengthUnit | None = Field(
        default=None, description="unit of v: raw (activation units), max (multiples of the feature's indexed max "
        "activation), residual_norm (fraction of the stream's norm at each token); unset: max when the dictionary "
        "has a feature index, else raw. scale and ablate take raw only")
    scope: Scope = "all"
    when: FeatureCondition | None = Field(
        default=None, description="apply only on tokens where this feature fires (its activation in the same "
        "forward pass, before this request's edits at its hook point); its hook point must not come after the edit's")
    # Set by the server when it resolves concepts (never on the wire): the index of the edit
    # in the request as sent, and the concept a resolved edit came from (steering_applied).
    _source: int | None = PrivateAttr(default=None)
    _concept: str | None = PrivateAttr(default=None)

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number (got NaN or infinity)")
        return v

    @model_validator(mode="after")
    def _value_when_needed(self) -> SteeringEdit:
        if self.value is None:
            if self.mode == "ablate":
                self.value = 0.0
            else:
                raise ValueError(f"mode '{self.mode}' needs a value")
        if (self.feature is None) == (self.concept is None):
            raise ValueError("give either feature or concept")
        if self.concept is None and self.concept_features != 1:
            raise ValueError("concept_features needs concept")
        if self.unit not in (None, "raw") and self.mode not in VALUE_UNIT_MODES:
            raise ValueError(f"unit '{self.unit}' does not apply to mode '{self.mode}' (its value is "
                             f"{'a factor' if self.mode == 'scale' else 'unused'}): leave unit unset or 'raw'")
        return self


class SteeringVector(_Strict):
    """A raw direction added to the residual stream at a hook point: ``x += scale·vector``.

    Either ``vector`` (with ``hook_point``) or ``vector_id``, a stored contrastive vector
    (``POST /v1/steering/vectors``) that the server puts in its place (with its hook point)."""

    hook_point: str | None = Field(default=None, description="required with vector; with vector_id optional "
                                   "(it must then be the stored vector's)")
    vector: list[float] | None = Field(default=None, min_length=1)
    vector_id: str | None = Field(default=None, min_length=1, max_length=64,
                                  description="id of a stored steering vector, instead of vector")
    scale: float = 1.0
    scope: Scope = "all"

    @field_validator("vector")
    @classmethod
    def _finite_vector(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("must hold only finite numbers (found NaN or infinity)")
        return v

    @model_validator(mode="after")
    def _vector_or_id(self) -> SteeringVector:
        if (self.vector is None) == (self.vector_id is None):
            raise ValueError("give either vector (with hook_point) or vector_id, not both or neither")
        if self.vector is not None and self.hook_point is None:
            raise ValueError("hook_point is required with vector")
        return self

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class SteeringSpec(_Strict):
    edits: list[SteeringEdit] = Field(default_factory=list)
    vectors: list[SteeringVector] = Field(default_factory=list)
    stop_when: list[FeatureCondition] = Field(
        default_factory=list, max_length=MAX_STOP_WHEN,
        description="end generation (finish_reason 'feature') at the first generated token on which one of these "
        "fires (its activation after this request's edits, as features report it); that token is the last one "
        "returned")

    @property
    def empty(self) -> bool:
        return not self.edits and not self.vectors and not self.stop_when


class AppliedEdit(BaseModel):
    """What one edit of a request resolved to (the response's ``steering_applied``)."""

    edit: int = Field(description="index of the edit in steering.edits")
    dictionary: str
    feature: int
    mode: EditModeName
    unit: StrengthUnit = Field(description="the unit used, the default made explicit")
    value: float = Field(description="the value as given")
    raw_value: float | None = Field(
        description="the value in raw (activation) units; null for residual_norm (it depends on each token)")
    scope: Scope
    concept: str | None = Field(default=None, description="the concept this feature was found for, when the edit "
                                "gave a concept (one entry per matched feature, all with the edit's index)")


class SteeringApplied(BaseModel):
    """A steered request's edits as the engine applies them."""

    edits: list[AppliedEdit] = Field(default_factory=list)


# -- per-token features (what the engine returns, what every response carries) -------------

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
    labels: list[str] | None = Field(
        default=None, description="with features.labels: the label of each feature of 'values', aligned with it"
    )
    feature_labels: list[str] | None = Field(
        default=None, description="with features.labels: the labels of the feature_ids, aligned with feature_values"
    )


class TokenFeatures(BaseModel):
    """The features of the residual stream at one token position."""

    position: int = Field(description="0-based position in the request: prompt tokens first, then generated")
    token_id: int
    is_prompt: bool
    features: list[DictionaryFeatures]


# -- requests and responses of the feature API -------------------------------------------

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
    def _exactly_one(self) -> PromptInput:
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
    steering_applied: SteeringApplied | None = Field(default=None, description="first chunk of a steered request")


class DictionaryShape(BaseModel):
    """What every description of a served dictionary starts with: its id, model, hook point and shape."""

    id: str
    model: str
    hook_point: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None


class DictionaryInfoOut(DictionaryShape):
    """``GET /v1/dictionaries`` entry and gRPC DictionaryInfo."""

    metrics: dict[str, Any] | None = None


class TrainingLogPoint(BaseModel):
    """One line of a dictionary's ``training_log.jsonl`` (written by ``sae-train`` every
    ``log_every`` steps): the training batch's loss, FVU and L0, and the dead fraction."""

    step: int
    tokens: int = Field(description="training activations seen so far")
    loss: float
    fvu: float
    l0: float
    dead: float = Field(description="fraction of features that did not fire in the dead window")


class DictionarySummary(DictionaryShape):
    """``GET /v1/dictionaries/{id}/summary``: what the playground's dictionary page shows.

    Metrics come from the dictionary's ``metrics.json`` (``sae-train``'s held-out evaluation),
    the density histogram from its feature index, the curves from ``training_log.jsonl``;
    each is absent (null / empty) when the dictionary lacks that file."""

    has_index: bool
    fvu: float | None = Field(default=None, description="fraction of variance unexplained (held out)")
    l0: float | None = Field(default=None, description="mean active features per token (held out)")
    dead_frac: float | None = Field(default=None, description="fraction of features that never fired (held out)")
    ce_loss_recovered: float | None = Field(default=None, description="share of the CE loss gap recovered")
    eval_tokens: int | None = None
    index_tokens: int | None = Field(default=None, description="tokens the index's statistics are over")
    never_fired: int | None = Field(default=None, description="features with no activation in the index")
    density_log10_edges: list[float] = Field(
        default_factory=list, description="edges of the log10-density histogram (len(counts) + 1)")
    density_counts: list[int] = Field(
        default_factory=list, description="features per log10-density bin (features that never fired excluded)")
    training_log: list[TrainingLogPoint] = Field(default_factory=list)


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
    has_index: bool = Field(default=False, description="whether the dictionary has a feature index; "
                            "false: 'index' is null (build one with sae-index)")
    index: FeatureIndexCard | None = Field(default=None, description="what the feature index holds about it")


# -- the feature index: cards, search, search by example -------------------------------------

class TokenCountOut(BaseModel):
    token_id: int
    token: str
    count: float = Field(description="how many of its top examples peak at this token")


class CooccurringFeature(BaseModel):
    feature: int
    jaccard: float = Field(description="Jaccard index of the two features' firing token sets")
    label: str


class FeatureExampleOut(BaseModel):
    """One max-activating context from the index."""

    activation: float = Field(description="the feature's activation at the peak token")
    tokens: list[str]
    token_ids: list[int]
    activations: list[float] = Field(description="the feature's activation at each token, aligned with tokens")
    peak: int = Field(description="index of the peak token in tokens")
    doc: str = Field(description="id of the corpus document")
    position: int = Field(description="position of the peak token in its context")


class FeatureIndexCard(BaseModel):
    """A feature's entry in its dictionary's feature index."""

    label: str
    label_source: str = Field(description="'tokens' (deterministic) or 'explainer:<model>'")
    label_score: float | None = Field(default=None, description="detection balanced accuracy (0.5 = chance)")
    max_activation: float
    density: float = Field(description="fraction of indexed tokens it fires on")
    n_fired: int
    quantile_levels: list[float]
    quantiles: list[float] = Field(description="of its nonzero activations, at quantile_levels")
    histogram: list[int] = Field(description="counts of its nonzero activations in equal bins over (0, histogram_max]")
    histogram_max: float = Field(description="upper edge of the last bin (= max_activation); bin b is "
                                 "(b/B·max, (b+1)/B·max]")
    top_tokens: list[TokenCountOut]
    cooccurring: list[CooccurringFeature]
    examples: list[FeatureExampleOut]


class FeatureSearchHit(BaseModel):
    feature: int
    label: str
    density: float
    max_activation: float


class FeatureSearchResponse(BaseModel):
    """``GET /v1/dictionaries/{id}/features?q=`` and gRPC SearchFeatures."""

    dictionary: str
    query: str
    results: list[FeatureSearchHit]


class SearchByExampleRequest(_Strict):
    """``POST /v1/features/search`` and gRPC SearchByExample."""

    dictionary: str
    texts: list[str] = Field(min_length=1, max_length=64, description="texts the features should fire on")
    contrast_texts: list[str] = Field(default_factory=list, max_length=64,
                                      description="texts whose score is subtracted")
    limit: int = Field(default=20, ge=1, le=1000)
    exclude_dense_above: float | None = Field(default=None, gt=0.0, le=1.0,
                                              description="leave out features denser than this")


class ExampleSearchHit(BaseModel):
    feature: int
    score: float = Field(description="mean over texts of max over tokens of activation / max_activation, "
                         "minus the same over contrast_texts")
    label: str
    max_activation: float
    density: float


class SearchByExampleResponse(BaseModel):
    dictionary: str
    results: list[ExampleSearchHit]
FeatureInfoOut.model_rebuild()


# -- stored contrastive steering vectors (POST/GET/DELETE /v1/steering/vectors) ------------

MAX_CONTRAST_TEXTS = 64
"""Texts (or chats) on each side of one contrastive vector request."""
MAX_STORED_VECTORS = 256
"""Steering vectors one deployment keeps."""

ContrastText = str | list[ChatMessage]


MAX_PROJECTION_TOP_K = 256
"""At most this many dictionary features in a contrastive vector's ``project_onto``."""


class VectorProjection(_Strict):
    """Replace a contrastive vector by its reconstruction through the ``top_k`` features of
    ``dictionary`` whose decoder rows it aligns with most (largest ``|cosine|``): the
    least-squares fit of the vector by those rows (README.md, "Contrastive vectors")."""

    dictionary: str = Field(min_length=1, description="a served dictionary at the vector's hook point")
    top_k: int = Field(ge=1, le=MAX_PROJECTION_TOP_K, description="how many features to keep")


class SteeringVectorCreate(_Strict):
    """A contrastive steering vector: mean residual stream at ``hook_point`` over the scored
    tokens of ``positive`` minus that of ``negative`` (README.md, "Contrastive vectors"),
    optionally projected onto a dictionary's features."""

    hook_point: str = Field(description="where the streams are read and where the vector is added")
    positive: list[ContrastText] = Field(min_length=1, description="texts, or chats (lists of messages)")
    negative: list[ContrastText] = Field(min_length=1, description="texts, or chats (lists of messages)")
    name: str | None = Field(default=None, max_length=200)
    project_onto: VectorProjection | None = Field(default=None, description="store the vector's reconstruction "
                                                  "through its top_k best-aligned features of a dictionary")


class ProjectedFeature(BaseModel):
    """One feature of a projected vector: ``vector = Σ coefficient · W_dec[feature]``."""

    feature: int
    coefficient: float = Field(description="its weight in the least-squares fit")
    cosine: float = Field(description="cosine of the unprojected vector with the feature's decoder row")


class VectorProjectionInfo(BaseModel):
    dictionary: str
    top_k: int
    features: list[ProjectedFeature] = Field(description="by |cosine|, largest first")
    unprojected_norm: float = Field(description="L2 norm of the difference of means before projection")
    explained: float = Field(description="‖projected‖² / ‖unprojected‖², the share of the vector kept")


class SteeringVectorInfo(BaseModel):
    """A stored steering vector's metadata (and the vector itself when asked for)."""

    id: str
    name: str | None = None
    hook_point: str
    d_in: int
    norm: float = Field(description="L2 norm of the vector")
    n_positive: int
    n_negative: int
    positive_tokens: int = Field(description="tokens averaged on the positive side")
    negative_tokens: int = Field(description="tokens averaged on the negative side")
    created_at: float = Field(description="Unix time")
    projection: VectorProjectionInfo | None = Field(default=None, description="set when created with project_onto")
    vector: list[float] | None = Field(default=None, description="only with include_vector")


class SteeringVectorList(BaseModel):
    data: list[SteeringVectorInfo]


class SteeringVectorDeleted(BaseModel):
    id: str
    deleted: bool = True
