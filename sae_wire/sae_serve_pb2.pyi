from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_PROMPT: _ClassVar[Scope]
    SCOPE_GENERATED: _ClassVar[Scope]
    SCOPE_ALL: _ClassVar[Scope]

class EditMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_MODE_UNSPECIFIED: _ClassVar[EditMode]
    EDIT_MODE_ADD: _ClassVar[EditMode]
    EDIT_MODE_CLAMP: _ClassVar[EditMode]
    EDIT_MODE_SCALE: _ClassVar[EditMode]
    EDIT_MODE_ABLATE: _ClassVar[EditMode]
    EDIT_MODE_PROJECT_CAP: _ClassVar[EditMode]
    EDIT_MODE_ORTHOGONAL: _ClassVar[EditMode]

class Normalize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZE_UNSPECIFIED: _ClassVar[Normalize]
    NORMALIZE_NONE: _ClassVar[Normalize]
    NORMALIZE_MAX: _ClassVar[Normalize]
SCOPE_UNSPECIFIED: Scope
SCOPE_PROMPT: Scope
SCOPE_GENERATED: Scope
SCOPE_ALL: Scope
EDIT_MODE_UNSPECIFIED: EditMode
EDIT_MODE_ADD: EditMode
EDIT_MODE_CLAMP: EditMode
EDIT_MODE_SCALE: EditMode
EDIT_MODE_ABLATE: EditMode
EDIT_MODE_PROJECT_CAP: EditMode
EDIT_MODE_ORTHOGONAL: EditMode
NORMALIZE_UNSPECIFIED: Normalize
NORMALIZE_NONE: Normalize
NORMALIZE_MAX: Normalize

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class FeatureRequest(_message.Message):
    __slots__ = ("dictionaries", "top_k", "feature_ids", "scope", "normalize", "labels", "exclude_dense_above")
    DICTIONARIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURE_IDS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DENSE_ABOVE_FIELD_NUMBER: _ClassVar[int]
    dictionaries: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    feature_ids: _containers.RepeatedScalarFieldContainer[int]
    scope: Scope
    normalize: Normalize
    labels: bool
    exclude_dense_above: float
    def __init__(self, dictionaries: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., feature_ids: _Optional[_Iterable[int]] = ..., scope: _Optional[_Union[Scope, str]] = ..., normalize: _Optional[_Union[Normalize, str]] = ..., labels: _Optional[bool] = ..., exclude_dense_above: _Optional[float] = ...) -> None: ...

class SteeringEdit(_message.Message):
    __slots__ = ("dictionary", "feature", "mode", "value", "scope", "unit", "when", "concept", "concept_features")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    feature: int
    mode: EditMode
    value: float
    scope: Scope
    unit: str
    when: FeatureCondition
    concept: str
    concept_features: int
    def __init__(self, dictionary: _Optional[str] = ..., feature: _Optional[int] = ..., mode: _Optional[_Union[EditMode, str]] = ..., value: _Optional[float] = ..., scope: _Optional[_Union[Scope, str]] = ..., unit: _Optional[str] = ..., when: _Optional[_Union[FeatureCondition, _Mapping]] = ..., concept: _Optional[str] = ..., concept_features: _Optional[int] = ...) -> None: ...

class FeatureCondition(_message.Message):
    __slots__ = ("dictionary", "feature", "above")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ABOVE_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    feature: int
    above: float
    def __init__(self, dictionary: _Optional[str] = ..., feature: _Optional[int] = ..., above: _Optional[float] = ...) -> None: ...

class SteeringVector(_message.Message):
    __slots__ = ("hook_point", "vector", "scale", "scope", "vector_id")
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    hook_point: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    scale: float
    scope: Scope
    vector_id: str
    def __init__(self, hook_point: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., scale: _Optional[float] = ..., scope: _Optional[_Union[Scope, str]] = ..., vector_id: _Optional[str] = ...) -> None: ...

class Steering(_message.Message):
    __slots__ = ("edits", "vectors", "stop_when")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    STOP_WHEN_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[SteeringEdit]
    vectors: _containers.RepeatedCompositeFieldContainer[SteeringVector]
    stop_when: _containers.RepeatedCompositeFieldContainer[FeatureCondition]
    def __init__(self, edits: _Optional[_Iterable[_Union[SteeringEdit, _Mapping]]] = ..., vectors: _Optional[_Iterable[_Union[SteeringVector, _Mapping]]] = ..., stop_when: _Optional[_Iterable[_Union[FeatureCondition, _Mapping]]] = ...) -> None: ...

class AppliedEdit(_message.Message):
    __slots__ = ("edit", "dictionary", "feature", "mode", "unit", "value", "raw_value", "scope", "concept")
    EDIT_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RAW_VALUE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    edit: int
    dictionary: str
    feature: int
    mode: EditMode
    unit: str
    value: float
    raw_value: float
    scope: Scope
    concept: str
    def __init__(self, edit: _Optional[int] = ..., dictionary: _Optional[str] = ..., feature: _Optional[int] = ..., mode: _Optional[_Union[EditMode, str]] = ..., unit: _Optional[str] = ..., value: _Optional[float] = ..., raw_value: _Optional[float] = ..., scope: _Optional[_Union[Scope, str]] = ..., concept: _Optional[str] = ...) -> None: ...

class SteeringApplied(_message.Message):
    __slots__ = ("edits",)
    EDITS_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[AppliedEdit]
    def __init__(self, edits: _Optional[_Iterable[_Union[AppliedEdit, _Mapping]]] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "stop", "seed")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class DictionaryFeatures(_message.Message):
    __slots__ = ("dictionary", "indices", "values", "feature_values", "labels", "feature_labels")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VALUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LABELS_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    feature_values: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[str]
    feature_labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dictionary: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., feature_values: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[str]] = ..., feature_labels: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenFeatures(_message.Message):
    __slots__ = ("position", "token_id", "token", "is_prompt", "features")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    token: str
    is_prompt: bool
    features: _containers.RepeatedCompositeFieldContainer[DictionaryFeatures]
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., token: _Optional[str] = ..., is_prompt: _Optional[bool] = ..., features: _Optional[_Iterable[_Union[DictionaryFeatures, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class ExtractFeaturesRequest(_message.Message):
    __slots__ = ("text", "chat", "features")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: Chat
    features: FeatureRequest
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., features: _Optional[_Union[FeatureRequest, _Mapping]] = ...) -> None: ...

class ExtractFeaturesResponse(_message.Message):
    __slots__ = ("model", "tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    tokens: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    def __init__(self, model: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "chat", "sampling", "features", "steering")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    STEERING_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: Chat
    sampling: SamplingOptions
    features: FeatureRequest
    steering: Steering
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., features: _Optional[_Union[FeatureRequest, _Mapping]] = ..., steering: _Optional[_Union[Steering, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "features", "finished", "finish_reason", "usage", "steering_applied")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STEERING_APPLIED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    features: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    finished: bool
    finish_reason: str
    usage: Usage
    steering_applied: SteeringApplied
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., features: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., steering_applied: _Optional[_Union[SteeringApplied, _Mapping]] = ...) -> None: ...

class ListDictionariesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DictionaryInfo(_message.Message):
    __slots__ = ("id", "model", "hook_point", "architecture", "d_in", "d_sae", "k", "metrics")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    hook_point: str
    architecture: str
    d_in: int
    d_sae: int
    k: int
    metrics: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., hook_point: _Optional[str] = ..., architecture: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., k: _Optional[int] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListDictionariesResponse(_message.Message):
    __slots__ = ("dictionaries",)
    DICTIONARIES_FIELD_NUMBER: _ClassVar[int]
    dictionaries: _containers.RepeatedCompositeFieldContainer[DictionaryInfo]
    def __init__(self, dictionaries: _Optional[_Iterable[_Union[DictionaryInfo, _Mapping]]] = ...) -> None: ...

class GetDictionarySummaryRequest(_message.Message):
    __slots__ = ("dictionary",)
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    def __init__(self, dictionary: _Optional[str] = ...) -> None: ...

class TrainingLogPoint(_message.Message):
    __slots__ = ("step", "tokens", "loss", "fvu", "l0", "dead")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    FVU_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    tokens: int
    loss: float
    fvu: float
    l0: float
    dead: float
    def __init__(self, step: _Optional[int] = ..., tokens: _Optional[int] = ..., loss: _Optional[float] = ..., fvu: _Optional[float] = ..., l0: _Optional[float] = ..., dead: _Optional[float] = ...) -> None: ...

class DictionarySummary(_message.Message):
    __slots__ = ("id", "model", "hook_point", "architecture", "d_in", "d_sae", "k", "has_index", "fvu", "l0", "dead_frac", "ce_loss_recovered", "eval_tokens", "index_tokens", "never_fired", "density_log10_edges", "density_counts", "training_log")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    HAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    FVU_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    DEAD_FRAC_FIELD_NUMBER: _ClassVar[int]
    CE_LOSS_RECOVERED_FIELD_NUMBER: _ClassVar[int]
    EVAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEVER_FIRED_FIELD_NUMBER: _ClassVar[int]
    DENSITY_LOG10_EDGES_FIELD_NUMBER: _ClassVar[int]
    DENSITY_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_LOG_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    hook_point: str
    architecture: str
    d_in: int
    d_sae: int
    k: int
    has_index: bool
    fvu: float
    l0: float
    dead_frac: float
    ce_loss_recovered: float
    eval_tokens: int
    index_tokens: int
    never_fired: int
    density_log10_edges: _containers.RepeatedScalarFieldContainer[float]
    density_counts: _containers.RepeatedScalarFieldContainer[int]
    training_log: _containers.RepeatedCompositeFieldContainer[TrainingLogPoint]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., hook_point: _Optional[str] = ..., architecture: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., k: _Optional[int] = ..., has_index: _Optional[bool] = ..., fvu: _Optional[float] = ..., l0: _Optional[float] = ..., dead_frac: _Optional[float] = ..., ce_loss_recovered: _Optional[float] = ..., eval_tokens: _Optional[int] = ..., index_tokens: _Optional[int] = ..., never_fired: _Optional[int] = ..., density_log10_edges: _Optional[_Iterable[float]] = ..., density_counts: _Optional[_Iterable[int]] = ..., training_log: _Optional[_Iterable[_Union[TrainingLogPoint, _Mapping]]] = ...) -> None: ...

class GetFeatureRequest(_message.Message):
    __slots__ = ("dictionary", "feature", "top_n", "examples")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    feature: int
    top_n: int
    examples: int
    def __init__(self, dictionary: _Optional[str] = ..., feature: _Optional[int] = ..., top_n: _Optional[int] = ..., examples: _Optional[int] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("token_id", "token", "score")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    score: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class FeatureInfo(_message.Message):
    __slots__ = ("dictionary", "feature", "hook_point", "decoder_norm", "top_promoted", "top_suppressed", "density", "has_index", "index")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    DECODER_NORM_FIELD_NUMBER: _ClassVar[int]
    TOP_PROMOTED_FIELD_NUMBER: _ClassVar[int]
    TOP_SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    HAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    feature: int
    hook_point: str
    decoder_norm: float
    top_promoted: _containers.RepeatedCompositeFieldContainer[TokenScore]
    top_suppressed: _containers.RepeatedCompositeFieldContainer[TokenScore]
    density: float
    has_index: bool
    index: FeatureIndexCard
    def __init__(self, dictionary: _Optional[str] = ..., feature: _Optional[int] = ..., hook_point: _Optional[str] = ..., decoder_norm: _Optional[float] = ..., top_promoted: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., top_suppressed: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., density: _Optional[float] = ..., has_index: _Optional[bool] = ..., index: _Optional[_Union[FeatureIndexCard, _Mapping]] = ...) -> None: ...

class TokenCount(_message.Message):
    __slots__ = ("token_id", "token", "count")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    count: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., count: _Optional[float] = ...) -> None: ...

class CooccurringFeature(_message.Message):
    __slots__ = ("feature", "jaccard", "label")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    JACCARD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    feature: int
    jaccard: float
    label: str
    def __init__(self, feature: _Optional[int] = ..., jaccard: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class FeatureExample(_message.Message):
    __slots__ = ("activation", "tokens", "token_ids", "activations", "peak", "doc", "position")
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    PEAK_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    activation: float
    tokens: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    activations: _containers.RepeatedScalarFieldContainer[float]
    peak: int
    doc: str
    position: int
    def __init__(self, activation: _Optional[float] = ..., tokens: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., activations: _Optional[_Iterable[float]] = ..., peak: _Optional[int] = ..., doc: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class FeatureIndexCard(_message.Message):
    __slots__ = ("label", "label_source", "label_score", "max_activation", "density", "n_fired", "quantile_levels", "quantiles", "histogram", "histogram_max", "top_tokens", "cooccurring", "examples")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    N_FIRED_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_LEVELS_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_MAX_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COOCCURRING_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    label: str
    label_source: str
    label_score: float
    max_activation: float
    density: float
    n_fired: int
    quantile_levels: _containers.RepeatedScalarFieldContainer[float]
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    histogram: _containers.RepeatedScalarFieldContainer[int]
    histogram_max: float
    top_tokens: _containers.RepeatedCompositeFieldContainer[TokenCount]
    cooccurring: _containers.RepeatedCompositeFieldContainer[CooccurringFeature]
    examples: _containers.RepeatedCompositeFieldContainer[FeatureExample]
    def __init__(self, label: _Optional[str] = ..., label_source: _Optional[str] = ..., label_score: _Optional[float] = ..., max_activation: _Optional[float] = ..., density: _Optional[float] = ..., n_fired: _Optional[int] = ..., quantile_levels: _Optional[_Iterable[float]] = ..., quantiles: _Optional[_Iterable[float]] = ..., histogram: _Optional[_Iterable[int]] = ..., histogram_max: _Optional[float] = ..., top_tokens: _Optional[_Iterable[_Union[TokenCount, _Mapping]]] = ..., cooccurring: _Optional[_Iterable[_Union[CooccurringFeature, _Mapping]]] = ..., examples: _Optional[_Iterable[_Union[FeatureExample, _Mapping]]] = ...) -> None: ...

class SearchFeaturesRequest(_message.Message):
    __slots__ = ("dictionary", "q", "limit")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    q: str
    limit: int
    def __init__(self, dictionary: _Optional[str] = ..., q: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class FeatureSearchHit(_message.Message):
    __slots__ = ("feature", "label", "density", "max_activation")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    feature: int
    label: str
    density: float
    max_activation: float
    def __init__(self, feature: _Optional[int] = ..., label: _Optional[str] = ..., density: _Optional[float] = ..., max_activation: _Optional[float] = ...) -> None: ...

class SearchFeaturesResponse(_message.Message):
    __slots__ = ("dictionary", "query", "results")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    query: str
    results: _containers.RepeatedCompositeFieldContainer[FeatureSearchHit]
    def __init__(self, dictionary: _Optional[str] = ..., query: _Optional[str] = ..., results: _Optional[_Iterable[_Union[FeatureSearchHit, _Mapping]]] = ...) -> None: ...

class SearchByExampleRequest(_message.Message):
    __slots__ = ("dictionary", "texts", "contrast_texts", "limit", "exclude_dense_above")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_TEXTS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DENSE_ABOVE_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    contrast_texts: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    exclude_dense_above: float
    def __init__(self, dictionary: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., contrast_texts: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., exclude_dense_above: _Optional[float] = ...) -> None: ...

class ExampleSearchHit(_message.Message):
    __slots__ = ("feature", "score", "label", "max_activation", "density")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    feature: int
    score: float
    label: str
    max_activation: float
    density: float
    def __init__(self, feature: _Optional[int] = ..., score: _Optional[float] = ..., label: _Optional[str] = ..., max_activation: _Optional[float] = ..., density: _Optional[float] = ...) -> None: ...

class SearchByExampleResponse(_message.Message):
    __slots__ = ("dictionary", "results")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    results: _containers.RepeatedCompositeFieldContainer[ExampleSearchHit]
    def __init__(self, dictionary: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ExampleSearchHit, _Mapping]]] = ...) -> None: ...

class ContrastText(_message.Message):
    __slots__ = ("text", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: Chat
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ...) -> None: ...

class VectorProjection(_message.Message):
    __slots__ = ("dictionary", "top_k")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    top_k: int
    def __init__(self, dictionary: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class CreateSteeringVectorRequest(_message.Message):
    __slots__ = ("hook_point", "positive", "negative", "name", "project_onto")
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ONTO_FIELD_NUMBER: _ClassVar[int]
    hook_point: str
    positive: _containers.RepeatedCompositeFieldContainer[ContrastText]
    negative: _containers.RepeatedCompositeFieldContainer[ContrastText]
    name: str
    project_onto: VectorProjection
    def __init__(self, hook_point: _Optional[str] = ..., positive: _Optional[_Iterable[_Union[ContrastText, _Mapping]]] = ..., negative: _Optional[_Iterable[_Union[ContrastText, _Mapping]]] = ..., name: _Optional[str] = ..., project_onto: _Optional[_Union[VectorProjection, _Mapping]] = ...) -> None: ...

class ProjectedFeature(_message.Message):
    __slots__ = ("feature", "coefficient", "cosine")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    feature: int
    coefficient: float
    cosine: float
    def __init__(self, feature: _Optional[int] = ..., coefficient: _Optional[float] = ..., cosine: _Optional[float] = ...) -> None: ...

class VectorProjectionInfo(_message.Message):
    __slots__ = ("dictionary", "top_k", "features", "unprojected_norm", "explained")
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    UNPROJECTED_NORM_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_FIELD_NUMBER: _ClassVar[int]
    dictionary: str
    top_k: int
    features: _containers.RepeatedCompositeFieldContainer[ProjectedFeature]
    unprojected_norm: float
    explained: float
    def __init__(self, dictionary: _Optional[str] = ..., top_k: _Optional[int] = ..., features: _Optional[_Iterable[_Union[ProjectedFeature, _Mapping]]] = ..., unprojected_norm: _Optional[float] = ..., explained: _Optional[float] = ...) -> None: ...

class SteeringVectorInfo(_message.Message):
    __slots__ = ("id", "name", "hook_point", "d_in", "norm", "n_positive", "n_negative", "positive_tokens", "negative_tokens", "created_at", "vector", "projection")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    N_POSITIVE_FIELD_NUMBER: _ClassVar[int]
    N_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    hook_point: str
    d_in: int
    norm: float
    n_positive: int
    n_negative: int
    positive_tokens: int
    negative_tokens: int
    created_at: float
    vector: _containers.RepeatedScalarFieldContainer[float]
    projection: VectorProjectionInfo
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., hook_point: _Optional[str] = ..., d_in: _Optional[int] = ..., norm: _Optional[float] = ..., n_positive: _Optional[int] = ..., n_negative: _Optional[int] = ..., positive_tokens: _Optional[int] = ..., negative_tokens: _Optional[int] = ..., created_at: _Optional[float] = ..., vector: _Optional[_Iterable[float]] = ..., projection: _Optional[_Union[VectorProjectionInfo, _Mapping]] = ...) -> None: ...

class ListSteeringVectorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSteeringVectorsResponse(_message.Message):
    __slots__ = ("vectors",)
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[SteeringVectorInfo]
    def __init__(self, vectors: _Optional[_Iterable[_Union[SteeringVectorInfo, _Mapping]]] = ...) -> None: ...

class SteeringVectorRef(_message.Message):
    __slots__ = ("id", "include_vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_vector: bool
    def __init__(self, id: _Optional[str] = ..., include_vector: _Optional[bool] = ...) -> None: ...

class DeleteSteeringVectorResponse(_message.Message):
    __slots__ = ("id", "deleted")
    ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    deleted: bool
    def __init__(self, id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...
