"""The per-request SAE spec: which features to return and which steering edits to apply.

The pydantic models of the request fields ``features`` and ``steering`` are the wire
contract's (:mod:`sae_wire.models`; README.md, "Steering semantics"); HTTP and gRPC conversion code
build them, and the engine validates them against the served dictionaries *in the API
process*, before anything reaches vLLM. What crosses into the worker is only the
already-checked :class:`~sae_runtime.protocol.WorkerSpec` made by :func:`to_worker_spec`,
encoded as a plain dict (numbers, strings and lists: never code or pickles).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from sae_runtime.hook_points import parse_hook_point
from sae_runtime.protocol.worker_spec import (
    ConditionSpec,
    EditSpec,
    FeatureSpec,
    VectorSpec,
    WatchSpec,
    WorkerSpec,
)

# The request fields themselves are the wire contract's (one definition, shared with the
# gRPC converter and the client); this module adds the checks against what is served.
from sae_wire.models import (  # noqa: F401
    VALUE_UNIT_MODES,
    AppliedEdit,
    EditModeName,
    FeatureCondition,
    FeatureRequest,
    Scope,
    SteeringApplied,
    SteeringEdit,
    SteeringSpec,
    SteeringVector,
    StrengthUnit,
)

# Defaults for the limits; the server can lower or raise them per deployment.
DEFAULT_MAX_EDITS = 256
DEFAULT_MAX_VECTORS = 32
DEFAULT_MAX_TOP_K = 256
DEFAULT_MAX_FEATURE_IDS = 1024
# Feature values one response may carry (tokens x values per token x dictionaries x choices).
# At ~5 bytes (a mostly-zero value of an explicit feature id) to ~25 bytes (a top-k index and
# its value) of JSON each, 2,000,000 values are 10-50 MB of response body built in the
# replica's memory and event loop; every single-choice request with top_k <= 256 on a
# 2048-token context stays below it.
DEFAULT_MAX_RESPONSE_FEATURE_VALUES = 2_000_000

# float32 is what the worker computes in: a steering number beyond its largest finite value
# becomes inf there (the output turns to NaN: empty text, null logprobs). Larger steering
# contributions than FLOAT32_NORM_MAX overflow the next layer's normalisation (it sums squares).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_NORM_MAX = math.sqrt(FLOAT32_MAX)  # ~1.8e19


class SpecError(ValueError):
    """A request spec that cannot be served.

    ``field`` names the offending field (``steering.edits[2].feature``); ``not_found`` is
    true when it names something that does not exist (an unknown dictionary), which the
    HTTP layer maps to 404 and gRPC to NOT_FOUND, everything else to 400/INVALID_ARGUMENT.
    """

    def __init__(self, field: str, message: str, *, not_found: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.not_found = not_found


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SAERequestSpec(_Strict):
    """Everything SAE-related one request asks for."""

    features: FeatureRequest | None = None
    steering: SteeringSpec | None = None

    @property
    def wants_features(self) -> bool:
        return self.features is not None

    @property
    def has_steering(self) -> bool:
        return self.steering is not None and not self.steering.empty


@dataclass(frozen=True)
class DictionaryInfo:
    """What validation needs to know about one served dictionary."""

    id: str
    hook_point: str
    d_sae: int
    k: int | None
    decoder_norm_max: float | None = None
    """Largest L2 norm of a decoder row (``W_dec[i]``), to bound steering edits; None = unknown."""
    max_activations: Any = field(default=None, compare=False)
    """Per-feature max activation from the dictionary's feature index (float ``[d_sae]``), or
    None when it has no index (then edits default to ``raw`` units and ``max`` is refused)."""

    @property
    def has_index(self) -> bool:
        return self.max_activations is not None


def edit_unit(e: SteeringEdit, info: DictionaryInfo) -> StrengthUnit:
    """The unit an edit's value is in, its default made explicit: ``max`` when the dictionary
    has a feature index, else ``raw``; always ``raw`` for scale and ablate."""
    if e.mode not in VALUE_UNIT_MODES:
        return "raw"
    if e.unit is not None:
        return e.unit
    return "max" if info.has_index else "raw"


def raw_edit_value(i: int, e: SteeringEdit, info: DictionaryInfo) -> float | None:
    """The edit's value in raw (activation) units; None for ``residual_norm`` (per token, in
    the worker). :class:`SpecError` on ``steering.edits[i].unit`` for ``max`` without an index."""
    value = float(e.value or 0.0)
    unit = edit_unit(e, info)
    if unit == "residual_norm":
        return None
    if unit == "max":
        if not info.has_index:
            raise SpecError(f"steering.edits[{i}].unit", f"'max' needs the feature index of '{info.id}', which "
                            "has none (build one with sae-index, or give unit 'raw' or 'residual_norm')")
        top = float(info.max_activations[e.feature])
        if top <= 0.0:
            raise SpecError(f"steering.edits[{i}].unit", f"feature {e.feature} of '{info.id}' never fired while "
                            "its feature index was built (indexed max 0), so 'max' units give no strength; "
                            "give unit 'raw' or 'residual_norm'")
        return value * top
    return value


@dataclass(frozen=True)
class SpecLimits:
    max_edits: int = DEFAULT_MAX_EDITS
    max_vectors: int = DEFAULT_MAX_VECTORS
    max_top_k: int = DEFAULT_MAX_TOP_K
    max_feature_ids: int = DEFAULT_MAX_FEATURE_IDS
    max_response_feature_values: int = DEFAULT_MAX_RESPONSE_FEATURE_VALUES


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int


def validate_spec(
    spec: SAERequestSpec,
    dictionaries: dict[str, DictionaryInfo],
    shape: ModelShape,
    limits: SpecLimits = SpecLimits(),
) -> None:
    """Check ``spec`` against what is served; raise :class:`SpecError` naming the field."""

    def unknown(field: str, name: str) -> SpecError:
        known = ", ".join(sorted(dictionaries)) or "none"
        return SpecError(field, f"unknown dictionary '{name}' (served: {known})", not_found=True)

    if spec.features is not None:
        f = spec.features
        for i, name in enumerate(f.dictionaries):
            if name not in dictionaries:
                raise unknown(f"features.dictionaries[{i}]", name)
        if len(set(f.dictionaries)) != len(f.dictionaries):
            raise SpecError("features.dictionaries", "lists a dictionary more than once")
        if f.top_k is not None and f.top_k > limits.max_top_k:
            raise SpecError("features.top_k", f"at most {limits.max_top_k} (got {f.top_k})")
        if f.top_k is not None:
            # More than a dictionary has would silently return fewer than asked.
            narrowest = min(f.dictionaries, key=lambda n: dictionaries[n].d_sae)
            if f.top_k > dictionaries[narrowest].d_sae:
                raise SpecError("features.top_k", f"at most d_sae={dictionaries[narrowest].d_sae} of "
                                f"'{narrowest}' (got {f.top_k})")
        if f.feature_ids is not None:
            if len(f.feature_ids) > limits.max_feature_ids:
                got = len(f.feature_ids)
                raise SpecError("features.feature_ids", f"at most {limits.max_feature_ids} ids (got {got})")
            smallest = min(dictionaries[n].d_sae for n in f.dictionaries)
            for j, fid in enumerate(f.feature_ids):
                if not 0 <= fid < smallest:
                    raise SpecError(f"features.feature_ids[{j}]", f"feature {fid} out of range [0, {smallest})")

    if spec.steering is not None:
        s = spec.steering
        if len(s.edits) > limits.max_edits:
            raise SpecError("steering.edits", f"at most {limits.max_edits} edits per request (got {len(s.edits)})")
        if len(s.vectors) > limits.max_vectors:
            raise SpecError(
                "steering.vectors", f"at most {limits.max_vectors} vectors per request (got {len(s.vectors)})"
            )
        for i, e in enumerate(s.edits):
            info = dictionaries.get(e.dictionary)
            if info is None:
                raise unknown(f"steering.edits[{i}].dictionary", e.dictionary)
            if e.feature is None:
                raise SpecError(f"steering.edits[{i}].concept", "concepts are looked up by the server "
                                "(resolve_concepts) before the engine sees the request")
            if e.feature >= info.d_sae:
                raise SpecError(
                    f"steering.edits[{i}].feature",
                    f"feature {e.feature} out of range for '{e.dictionary}' (d_sae={info.d_sae})",
                    not_found=True,
                )
            _check_edit_float32(i, e, info)
            if e.when is not None:
                _check_condition(f"steering.edits[{i}].when", e.when, dictionaries, info)
        for i, c in enumerate(s.stop_when):
            _check_condition(f"steering.stop_when[{i}]", c, dictionaries)
        for i, v in enumerate(s.vectors):
            if v.vector is None or v.hook_point is None:
                raise SpecError(f"steering.vectors[{i}].vector_id", "a stored vector is put in place by the server "
                                "(SAEService.resolve_steering) before the engine sees the request")
            try:
                layer = parse_hook_point(v.hook_point)
            except ValueError as exc:
                raise SpecError(f"steering.vectors[{i}].hook_point", str(exc)) from None
            if layer >= shape.num_layers:
                raise SpecError(
                    f"steering.vectors[{i}].hook_point",
                    f"'{v.hook_point}' does not exist: the model has layers 0..{shape.num_layers - 1}",
                    not_found=True,
                )
            if len(v.vector) != shape.hidden_size:
                raise SpecError(
                    f"steering.vectors[{i}].vector",
                    f"has {len(v.vector)} values; the residual stream has {shape.hidden_size}",
                )
            _check_vector_float32(i, v)


# A residual_norm value is a fraction of the stream's norm: beyond this it is surely a mistake.
MAX_RESIDUAL_NORM_VALUE = 1e4


def _check_condition(where: str, c: FeatureCondition, dictionaries: dict[str, DictionaryInfo],
                     edited: DictionaryInfo | None = None) -> None:
    """A condition's dictionary and feature exist, and (for an edit's ``when``) its hook point
    comes no later than the edit's: a later one is not computed yet when the edit applies."""
    info = dictionaries.get(c.dictionary)
    if info is None:
        known = ", ".join(sorted(dictionaries)) or "none"
        raise SpecError(f"{where}.dictionary", f"unknown dictionary '{c.dictionary}' (served: {known})",
                        not_found=True)
    if c.feature >= info.d_sae:
        raise SpecError(f"{where}.feature", f"feature {c.feature} out of range for '{c.dictionary}' "
                        f"(d_sae={info.d_sae})", not_found=True)
    if edited is not None and parse_hook_point(info.hook_point) > parse_hook_point(edited.hook_point):
        raise SpecError(where, f"'{c.dictionary}' is at {info.hook_point}, after the edit's hook point "
                        f"{edited.hook_point}: its activation is not known yet when the edit applies "
                        "(a condition must be at the same hook point or an earlier one)")


def _check_edit_float32(i: int, e: SteeringEdit, info: DictionaryInfo) -> None:
    """Refuse an edit value that overflows float32 in the worker, alone or times its decoder row."""
    raw = raw_edit_value(i, e, info)
    if raw is None:
        if abs(float(e.value or 0.0)) > MAX_RESIDUAL_NORM_VALUE:
            raise SpecError(f"steering.edits[{i}].value", f"{e.value:.3g} times the stream's norm: unit "
                            f"'residual_norm' takes values up to {MAX_RESIDUAL_NORM_VALUE:g}")
        return
    value = raw
    if abs(value) > FLOAT32_MAX:
        raise SpecError(
            f"steering.edits[{i}].value", f"{value:.3g} overflows float32 (largest finite value {FLOAT32_MAX:.4g})"
        )
    if e.mode in VALUE_UNIT_MODES and info.decoder_norm_max is not None:
        added = abs(value) * info.decoder_norm_max
        if added > FLOAT32_NORM_MAX:
            raise SpecError(
                f"steering.edits[{i}].value",
                f"{value:.3g} times the decoder direction (norm up to {info.decoder_norm_max:.3g}) adds "
                f"a vector of norm {added:.3g} to the residual stream: beyond {FLOAT32_NORM_MAX:.3g} "
                "the next layer's normalisation overflows float32",
            )


def _check_vector_float32(i: int, v: SteeringVector) -> None:
    """Refuse a raw steering vector whose entries, scale or ``scale·vector`` overflow float32."""
    assert v.vector is not None  # validate_spec checked
    vector = v.vector
    largest = max((abs(x) for x in vector), default=0.0)
    if largest > FLOAT32_MAX:
        j = next(j for j, x in enumerate(vector) if abs(x) > FLOAT32_MAX)
        raise SpecError(
            f"steering.vectors[{i}].vector[{j}]",
            f"{vector[j]:.3g} overflows float32 (largest finite value {FLOAT32_MAX:.4g})",
        )
    if abs(v.scale) > FLOAT32_MAX:
        raise SpecError(
            f"steering.vectors[{i}].scale", f"{v.scale:.3g} overflows float32 (largest finite value {FLOAT32_MAX:.4g})"
        )
    if largest * abs(v.scale) > FLOAT32_MAX:
        raise SpecError(
            f"steering.vectors[{i}].scale",
            f"scale {v.scale:.3g} times the vector's largest entry {largest:.3g} overflows float32 "
            f"(largest finite value {FLOAT32_MAX:.4g})",
        )
    # ‖scale·vector‖, computed without overflowing float64 either (entries may be ~1e38).
    norm = abs(v.scale) * largest * math.sqrt(math.fsum((x / largest) ** 2 for x in vector)) if largest else 0.0
    if norm > FLOAT32_NORM_MAX:
        raise SpecError(
            f"steering.vectors[{i}].scale",
            f"scale·vector has norm {norm:.3g}: beyond {FLOAT32_NORM_MAX:.3g} the next layer's "
            "normalisation overflows float32 (lower scale or the vector's values)",
        )


def response_feature_values(
    features: FeatureRequest, prompt_tokens: int, max_tokens: int, choices: int = 1
) -> tuple[int, int, int, int]:
    """``(tokens, values per token per dictionary, dictionaries, total)`` a response may carry.

    Tokens are the prompt's (when the scope includes the prompt) plus ``max_tokens`` (when it
    includes generated tokens); ``choices`` counts every sequence returned (``n``, doubled by
    ``compare``).
    """
    tokens = (prompt_tokens if features.scope in ("prompt", "all") else 0) + (
        max_tokens if features.scope in ("generated", "all") else 0
    )
    values = (features.top_k or 0) + len(features.feature_ids or ())
    dicts = len(features.dictionaries)
    return tokens, values, dicts, tokens * values * dicts * choices


def check_response_budget(
    features: FeatureRequest | None,
    prompt_tokens: int,
    max_tokens: int,
    choices: int,
    limit: int,
    *,
    tokens_note: str = "",
    lower: str = "lower max_tokens, n, top_k or feature_ids",
) -> None:
    """Raise :class:`SpecError` (field ``features``) when the response would carry more than
    ``limit`` feature values (the ``max_response_feature_values`` limit)."""
    if features is None:
        return
    tokens, values, dicts, total = response_feature_values(features, prompt_tokens, max_tokens, choices)
    if total <= limit:
        return
    raise SpecError(
        "features",
        f"{tokens:,} tokens{tokens_note} × {values:,} values × {dicts} dictionar{'y' if dicts == 1 else 'ies'} × "
        f"{choices} choice{'' if choices == 1 else 's'} = {total:,} feature values exceeds the response budget of "
        f"{limit:,} (max_response_feature_values); {lower}",
    )


def steering_applied(spec: SAERequestSpec | None, dictionaries: dict[str, DictionaryInfo]) -> SteeringApplied | None:
    """What a validated request's edits resolve to (units made explicit, values in raw units);
    None for a request without edits."""
    if spec is None or spec.steering is None or not spec.steering.edits:
        return None
    edits = []
    for i, e in enumerate(spec.steering.edits):
        info = dictionaries[e.dictionary]
        edits.append(AppliedEdit(edit=i if e._source is None else e._source, dictionary=e.dictionary,
                                 feature=e.feature or 0, mode=e.mode, unit=edit_unit(e, info),
                                 value=float(e.value or 0.0), raw_value=raw_edit_value(i, e, info), scope=e.scope,
                                 concept=e._concept))
    return SteeringApplied(edits=edits)


def resolve_concepts(steering: SteeringSpec | None, indexes: dict[str, Any]) -> SteeringSpec | None:
    """``steering`` with each concept edit replaced by edits of the ``concept_features`` best
    matching features of its dictionary's feature index (``FeatureIndex.search``, best
    first), each with the edit's mode, value, unit, scope and condition. ``indexes``:
    dictionary id → its ``FeatureIndex`` or None. :class:`SpecError` naming
    ``steering.edits[i].concept`` when the dictionary has no index or nothing matches."""
    if steering is None or not any(e.concept is not None for e in steering.edits):
        return steering
    edits: list[SteeringEdit] = []
    for i, e in enumerate(steering.edits):
        if e.concept is None:
            kept = e.model_copy()
            kept._source = i
            edits.append(kept)
            continue
        where = f"steering.edits[{i}].concept"
        if e.dictionary not in indexes:
            known = ", ".join(sorted(indexes)) or "none"
            raise SpecError(f"steering.edits[{i}].dictionary", f"unknown dictionary '{e.dictionary}' (served: {known})",
                            not_found=True)
        index = indexes[e.dictionary]
        if index is None:
            raise SpecError(where, f"cannot look '{e.concept}' up: '{e.dictionary}' has no feature index (build one "
                            "with sae-index, or give feature)")
        try:
            hits = index.search(e.concept, limit=e.concept_features)
        except ValueError as exc:
            raise SpecError(where, f"'{e.concept}': {exc}") from None
        if not hits:
            raise SpecError(where, f"no feature of '{e.dictionary}' matches '{e.concept}' (its labels and top tokens)")
        for hit in hits:
            r = e.model_copy(update={"feature": int(hit.feature), "concept": None, "concept_features": 1})
            r._source, r._concept = i, e.concept
            edits.append(r)
    return steering.model_copy(update={"edits": edits})


def steering_salt(spec: SAERequestSpec) -> str | None:
    """The prefix-cache salt for a steered request, ``None`` for an unsteered one.

    KV blocks computed under one steering must never serve a request with another, so a
    steered request salts its cache keys with a digest of its steering: requests with the
    same steering still share blocks, plain requests keep sharing theirs.
    """
    steering = spec.steering
    if steering is None or steering.empty:  # spec.has_steering, spelled out for the type checker
        return None
    canonical = json.dumps(steering.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sae-steer-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _edit_spec(e: SteeringEdit, i: int, info: DictionaryInfo) -> EditSpec:
    if e.value is None:  # SteeringEdit's validation gives every edit a value (ablate: 0.0)
        raise SpecError(f"steering.edits[{i}].value", f"mode '{e.mode}' needs a value")
    raw = raw_edit_value(i, e, info)
    when = None if e.when is None else ConditionSpec(e.when.dictionary, e.when.feature, e.when.above)
    if e.feature is None:  # validate_spec refuses unresolved concepts
        raise SpecError(f"steering.edits[{i}].concept", "is not resolved")
    if raw is None:
        return EditSpec(dictionary=e.dictionary, feature=e.feature, mode=e.mode, value=float(e.value),
                        scope=e.scope, unit="residual_norm", when=when)
    return EditSpec(dictionary=e.dictionary, feature=e.feature, mode=e.mode, value=raw, scope=e.scope,
                    when=when)


def to_worker_spec(spec: SAERequestSpec, rid: str, dictionaries: dict[str, DictionaryInfo]) -> WorkerSpec:
    """What the worker needs of a validated request (its ``encode()`` goes into
    ``SamplingParams.extra_args[protocol.SPEC_KEY]``).

    Hook points are resolved to layer numbers here so the worker does no parsing.
    """
    features = None
    if spec.features is not None:
        f = spec.features
        features = FeatureSpec(dicts=list(f.dictionaries), top_k=f.top_k, feature_ids=f.feature_ids, scope=f.scope)
    edits: list[EditSpec] = []
    vectors: list[VectorSpec] = []
    s = spec.steering
    if s is not None and not s.empty:  # spec.has_steering, spelled out for the type checker
        edits = [_edit_spec(e, i, dictionaries[e.dictionary]) for i, e in enumerate(s.edits)]
        vectors = [
            VectorSpec(layer=parse_hook_point(v.hook_point or ""), vector=v.vector or [], scale=v.scale, scope=v.scope)
            for v in s.vectors
        ]
    watch = watch_specs(s.stop_when) if s is not None else []
    return WorkerSpec(rid=rid, features=features, edits=edits, vectors=vectors, watch=watch)


def watch_specs(stop_when: list[FeatureCondition]) -> list[WatchSpec]:
    """The features the worker must send back for ``stop_when``: one entry per dictionary (in
    first-mention order), each feature once."""
    by_dict: dict[str, list[int]] = {}
    for c in stop_when:
        feats = by_dict.setdefault(c.dictionary, [])
        if c.feature not in feats:
            feats.append(c.feature)
    return [WatchSpec(dictionary=d, features=f) for d, f in by_dict.items()]
