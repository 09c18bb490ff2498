"""The per-request SAE spec: which features to return and which steering edits to apply.

These pydantic models are the one definition of the request fields ``features`` and
``steering`` (design notes, "HTTP"); HTTP and gRPC conversion code build them, and the
engine validates them against the served dictionaries *in the API process*, before
anything reaches vLLM. What crosses into the worker is only the plain, already-checked
dict made by :func:`to_worker_spec` (numbers, strings and lists: never code or pickles).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sae_runtime.hook_points import parse_hook_point

Scope = Literal["prompt", "generated", "all"]
EditModeName = Literal["add", "clamp", "scale", "ablate"]

# Defaults for the limits; the server can lower or raise them per deployment.
DEFAULT_MAX_EDITS = 256
DEFAULT_MAX_VECTORS = 32
DEFAULT_MAX_TOP_K = 256
DEFAULT_MAX_FEATURE_IDS = 1024


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


class FeatureRequest(_Strict):
    """Which SAE features to return for each token of the request."""

    dictionaries: list[str] = Field(min_length=1, description="dictionary ids to read")
    top_k: int | None = Field(default=None, ge=1, description="return the k strongest features per token")
    feature_ids: list[int] | None = Field(
        default=None, min_length=1, description="return these features' values (with top_k: as well)"
    )
    scope: Scope = "all"

    @model_validator(mode="after")
    def _something_asked(self) -> "FeatureRequest":
        # Neither asked: the strongest 8. Both asked: both come back (values aligned with
        # indices for the top-k, feature_values aligned with feature_ids).
        if self.top_k is None and self.feature_ids is None:
            self.top_k = 8
        return self


class SteeringEdit(_Strict):
    """One edit of one feature; see the design notes' table for each mode's effect."""

    dictionary: str
    feature: int = Field(ge=0)
    mode: EditModeName = "add"
    value: float | None = Field(default=None, description="v for add/clamp, s for scale; unused by ablate")
    scope: Scope = "all"

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number (got NaN or infinity)")
        return v

    @model_validator(mode="after")
    def _value_when_needed(self) -> "SteeringEdit":
        if self.value is None:
            if self.mode == "ablate":
                self.value = 0.0
            else:
                raise ValueError(f"mode '{self.mode}' needs a value")
        return self


class SteeringVector(_Strict):
    """A raw direction added to the residual stream at a hook point: ``x += scale·vector``."""

    hook_point: str
    vector: list[float] = Field(min_length=1)
    scale: float = 1.0
    scope: Scope = "all"

    @field_validator("vector")
    @classmethod
    def _finite_vector(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("must hold only finite numbers (found NaN or infinity)")
        return v

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class SteeringSpec(_Strict):
    edits: list[SteeringEdit] = Field(default_factory=list)
    vectors: list[SteeringVector] = Field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.edits and not self.vectors


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


@dataclass(frozen=True)
class SpecLimits:
    max_edits: int = DEFAULT_MAX_EDITS
    max_vectors: int = DEFAULT_MAX_VECTORS
    max_top_k: int = DEFAULT_MAX_TOP_K
    max_feature_ids: int = DEFAULT_MAX_FEATURE_IDS


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
                raise SpecError("features.feature_ids", f"at most {limits.max_feature_ids} ids (got {len(f.feature_ids)})")
            smallest = min(dictionaries[n].d_sae for n in f.dictionaries)
            for j, fid in enumerate(f.feature_ids):
                if not 0 <= fid < smallest:
                    raise SpecError(f"features.feature_ids[{j}]", f"feature {fid} out of range [0, {smallest})")

    if spec.steering is not None:
        s = spec.steering
        if len(s.edits) > limits.max_edits:
            raise SpecError("steering.edits", f"at most {limits.max_edits} edits per request (got {len(s.edits)})")
        if len(s.vectors) > limits.max_vectors:
            raise SpecError("steering.vectors", f"at most {limits.max_vectors} vectors per request (got {len(s.vectors)})")
        for i, e in enumerate(s.edits):
            info = dictionaries.get(e.dictionary)
            if info is None:
                raise unknown(f"steering.edits[{i}].dictionary", e.dictionary)
            if e.feature >= info.d_sae:
                raise SpecError(
                    f"steering.edits[{i}].feature",
                    f"feature {e.feature} out of range for '{e.dictionary}' (d_sae={info.d_sae})",
                    not_found=True,
                )
        for i, v in enumerate(s.vectors):
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


def steering_salt(spec: SAERequestSpec) -> str | None:
    """The prefix-cache salt for a steered request, ``None`` for an unsteered one.

    KV blocks computed under one steering must never serve a request with another, so a
    steered request salts its cache keys with a digest of its steering: requests with the
    same steering still share blocks, plain requests keep sharing theirs.
    """
    if not spec.has_steering:
        return None
    canonical = json.dumps(spec.steering.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sae-steer-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def to_worker_spec(spec: SAERequestSpec, rid: str, dictionaries: dict[str, DictionaryInfo]) -> dict[str, Any]:
    """The plain dict carried in ``SamplingParams.extra_args['sae']`` to the worker.

    Hook points are resolved to layer numbers here so the worker does no parsing.
    """
    out: dict[str, Any] = {"rid": rid}
    if spec.features is not None:
        f = spec.features
        out["features"] = {
            "dicts": list(f.dictionaries),
            "top_k": f.top_k,
            "feature_ids": f.feature_ids,
            "scope": f.scope,
        }
    if spec.has_steering:
        s = spec.steering
        out["edits"] = [
            {"dict": e.dictionary, "feature": e.feature, "mode": e.mode, "value": float(e.value), "scope": e.scope}
            for e in s.edits
        ]
        out["vectors"] = [
            {"layer": parse_hook_point(v.hook_point), "vector": v.vector, "scale": v.scale, "scope": v.scope}
            for v in s.vectors
        ]
    return out
