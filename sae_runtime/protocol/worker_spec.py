"""What the engine tells the worker: the per-request spec and the install configuration.

Both travel through vLLM as plain data (the spec inside ``SamplingParams.extra_args``, the
install configuration as a ``collective_rpc`` argument), so each type here has an
``encode()`` to a plain dict of numbers, strings and lists (never code or pickles) and a
``decode()`` that checks every field and raises :class:`WorkerSpecError` naming the first
one that is wrong. The engine validates requests against the served dictionaries before
encoding (``sae_runtime/engine/spec.py``); decoding checks only the shape of the data.

Encoded request spec (``SamplingParams.extra_args["sae"]``)::

    {"rid": str,
     "features": {"dicts": [str], "top_k": int | None, "feature_ids": [int] | None,
                  "scope": "prompt" | "generated" | "all"},          # only when features are asked
     "edits": [{"dict": str, "feature": int, "mode": "add" | "clamp" | "scale" | "ablate"
                        | "project_cap" | "orthogonal",
                "value": float, "scope": ...,
                "unit": "raw" | "residual_norm",                    # optional, default raw
                "when": {"dict": str, "feature": int, "above": float}}],  # optional
                                                                    # edits and vectors: only
     "vectors": [{"layer": int, "vector": [float], "scale": float,  # when there is steering
                  "scope": ...}],
     "streams": [int],                                              # only when raw streams are asked
     "watch": [{"dict": str, "features": [int]}]}                    # only with stop_when

``streams`` asks for the raw residual stream rows of the request's prompt tokens at hook
points given as layer numbers (``L >= 0`` after decoder layer ``L``, ``-1`` the
embeddings); hook points need no dictionary. The engine checks them against the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCOPES = ("prompt", "generated", "all")
"""Which tokens a feature request, edit or vector applies to."""
EDIT_MODES = ("add", "clamp", "scale", "ablate", "project_cap", "orthogonal")
"""Steering edit modes by name (the kernels' ``EditMode`` members, lower case)."""
WORKER_UNITS = ("raw", "residual_norm")
"""Strength units the worker applies: ``raw`` values are used as they are; ``residual_norm``
values are multiplied per token by ``||x|| / ||d_i||`` (so ``v·d_i`` has norm ``v·||x||``). The
API process resolves ``max`` into ``raw`` before a spec is encoded."""


class WorkerSpecError(ValueError):
    """Encoded worker data that does not have the documented shape; the message names the
    field (``sae.edits[2].mode``)."""


# ------------------------------------------------------------------------- field checks


def _need(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WorkerSpecError(f"{where}: expected a dict, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise WorkerSpecError(f"{where}.{key}: missing")
    return data[key]


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise WorkerSpecError(f"{where}: expected a string, got {v!r}")
    return v


def _int(v: Any, where: str, minimum: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise WorkerSpecError(f"{where}: expected an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise WorkerSpecError(f"{where}: must be >= {minimum}, got {v}")
    return v


def _float(v: Any, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise WorkerSpecError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _choice(v: Any, choices: tuple[str, ...], where: str) -> str:
    if v not in choices:
        raise WorkerSpecError(f"{where}: expected one of {', '.join(choices)}, got {v!r}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, (list, tuple)):
        raise WorkerSpecError(f"{where}: expected a list, got {type(v).__name__}")
    return list(v)


# ------------------------------------------------------------------------- request spec


@dataclass(frozen=True)
class FeatureSpec:
    """Which features the worker extracts for a request and sends over the side channel."""

    dicts: list[str]
    """Client-facing ids of the dictionaries to read (as loaded by ``sae_install``)."""
    top_k: int | None
    """Send the ``top_k`` strongest features per token (indices and values), or None."""
    feature_ids: list[int] | None
    """Send these features' values per token, or None."""
    scope: str
    """Tokens whose features are sent: ``"prompt"``, ``"generated"`` or ``"all"``."""

    def encode(self) -> dict[str, Any]:
        return {"dicts": list(self.dicts), "top_k": self.top_k,
                "feature_ids": None if self.feature_ids is None else list(self.feature_ids), "scope": self.scope}

    @classmethod
    def decode(cls, data: Any, where: str = "features") -> FeatureSpec:
        d = _need(data, where)
        dicts = [_str(x, f"{where}.dicts[{i}]") for i, x in enumerate(_list(_get(d, "dicts", where), f"{where}.dicts"))]
        top_k = d.get("top_k")
        ids = d.get("feature_ids")
        return cls(
            dicts=dicts,
            top_k=None if top_k is None else _int(top_k, f"{where}.top_k", 1),
            feature_ids=None if ids is None else [
                _int(x, f"{where}.feature_ids[{i}]", 0) for i, x in enumerate(_list(ids, f"{where}.feature_ids"))],
            scope=_choice(_get(d, "scope", where), SCOPES, f"{where}.scope"),
        )


@dataclass(frozen=True)
class ConditionSpec:
    """A feature firing: ``feature`` of ``dictionary`` (at its hook point, before the request's
    edits there) has an activation above ``above``."""

    dictionary: str
    feature: int
    above: float

    def encode(self) -> dict[str, Any]:
        return {"dict": self.dictionary, "feature": self.feature, "above": float(self.above)}

    @classmethod
    def decode(cls, data: Any, where: str = "when") -> ConditionSpec:
        d = _need(data, where)
        return cls(dictionary=_str(_get(d, "dict", where), f"{where}.dict"),
                   feature=_int(_get(d, "feature", where), f"{where}.feature", 0),
                   above=_float(_get(d, "above", where), f"{where}.above"))


@dataclass(frozen=True)
class EditSpec:
    """One steering edit of one feature of one dictionary (applied at its hook point)."""

    dictionary: str
    """Client-facing id of the dictionary (encoded as ``"dict"``)."""
    feature: int
    """Feature index in the dictionary."""
    mode: str
    """One of :data:`EDIT_MODES`."""
    value: float
    """The edit's number (added amount, clamp target or scale factor; unused by ablate)."""
    scope: str
    """Tokens it applies to: ``"prompt"``, ``"generated"`` or ``"all"``."""
    unit: str = "raw"
    """One of :data:`WORKER_UNITS` (encoded only when not ``raw``)."""
    when: ConditionSpec | None = None
    """Apply only on tokens where this condition holds (None: every token in scope)."""

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dict": self.dictionary, "feature": self.feature, "mode": self.mode,
                               "value": float(self.value), "scope": self.scope}
        if self.unit != "raw":
            out["unit"] = self.unit
        if self.when is not None:
            out["when"] = self.when.encode()
        return out

    @classmethod
    def decode(cls, data: Any, where: str = "edits[0]") -> EditSpec:
        d = _need(data, where)
        return cls(
            dictionary=_str(_get(d, "dict", where), f"{where}.dict"),
            feature=_int(_get(d, "feature", where), f"{where}.feature", 0),
            mode=_choice(_get(d, "mode", where), EDIT_MODES, f"{where}.mode"),
            value=_float(_get(d, "value", where), f"{where}.value"),
            scope=_choice(_get(d, "scope", where), SCOPES, f"{where}.scope"),
            unit=_choice(d.get("unit", "raw"), WORKER_UNITS, f"{where}.unit"),
            when=None if d.get("when") is None else ConditionSpec.decode(d["when"], f"{where}.when"),
        )


@dataclass(frozen=True)
class VectorSpec:
    """One steering vector added to the residual stream at one hook point."""

    layer: int
    """Hook point as a layer number: ``L >= 0`` after decoder layer ``L``, ``-1`` the
    embeddings (resolved from the hook point name by the engine)."""
    vector: list[float]
    """The vector, of the model's hidden size (the worker checks the size)."""
    scale: float
    """Factor the vector is multiplied by."""
    scope: str
    """Tokens it applies to: ``"prompt"``, ``"generated"`` or ``"all"``."""

    def encode(self) -> dict[str, Any]:
        return {"layer": self.layer, "vector": list(self.vector), "scale": self.scale, "scope": self.scope}

    @classmethod
    def decode(cls, data: Any, where: str = "vectors[0]") -> VectorSpec:
        d = _need(data, where)
        vector = _list(_get(d, "vector", where), f"{where}.vector")
        for i, x in enumerate(vector):
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise WorkerSpecError(f"{where}.vector[{i}]: expected a number, got {x!r}")
        return cls(
            layer=_int(_get(d, "layer", where), f"{where}.layer", -1),
            vector=vector,
            scale=_float(_get(d, "scale", where), f"{where}.scale"),
            scope=_choice(_get(d, "scope", where), SCOPES, f"{where}.scope"),
        )


@dataclass(frozen=True)
class WatchSpec:
    """Features of one dictionary whose values the worker sends back for every generated
    token it reads (after the request's edits at that hook point, like extracted features):
    the engine ends the request when one of them exceeds its ``stop_when`` threshold."""

    dictionary: str
    features: list[int]
    """Feature ids, no repeats (their values travel in this order)."""

    def encode(self) -> dict[str, Any]:
        return {"dict": self.dictionary, "features": list(self.features)}

    @classmethod
    def decode(cls, data: Any, where: str = "watch[0]") -> WatchSpec:
        d = _need(data, where)
        feats = [_int(x, f"{where}.features[{i}]", 0)
                 for i, x in enumerate(_list(_get(d, "features", where), f"{where}.features"))]
        if not feats or len(set(feats)) != len(feats):
            raise WorkerSpecError(f"{where}.features: expected distinct feature ids, got {feats}")
        return cls(dictionary=_str(_get(d, "dict", where), f"{where}.dict"), features=feats)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the worker needs to know about one request (a request without one is
    left alone by the SAE step)."""

    rid: str
    """The id the worker puts on this request's feature chunks (the receiver's key)."""
    features: FeatureSpec | None = None
    """Features to extract, or None."""
    edits: list[EditSpec] = field(default_factory=list)
    """Steering edits, in request order."""
    vectors: list[VectorSpec] = field(default_factory=list)
    """Steering vectors, in request order."""
    streams: list[int] = field(default_factory=list)
    """Hook points (layer numbers, ``-1`` = embeddings) whose raw residual stream rows of the
    prompt tokens the worker sends back (sorted, no repeats); empty: none."""
    watch: list[WatchSpec] = field(default_factory=list)
    """Features whose values on generated tokens the worker sends back (``stop_when``), one
    entry per dictionary; empty: none."""

    def encode(self) -> dict[str, Any]:
        """The plain dict carried in ``SamplingParams.extra_args[SPEC_KEY]``."""
        out: dict[str, Any] = {"rid": self.rid}
        if self.features is not None:
            out["features"] = self.features.encode()
        if self.edits or self.vectors:
            out["edits"] = [e.encode() for e in self.edits]
            out["vectors"] = [v.encode() for v in self.vectors]
        if self.streams:
            out["streams"] = list(self.streams)
        if self.watch:
            out["watch"] = [w.encode() for w in self.watch]
        return out

    @classmethod
    def decode(cls, data: Any, where: str = "sae") -> WorkerSpec:
        """The spec from its encoding; :class:`WorkerSpecError` names the first bad field."""
        d = _need(data, where)
        feats = d.get("features")
        return cls(
            rid=_str(_get(d, "rid", where), f"{where}.rid"),
            features=None if feats is None else FeatureSpec.decode(feats, f"{where}.features"),
            edits=[EditSpec.decode(e, f"{where}.edits[{i}]")
                   for i, e in enumerate(_list(d.get("edits") or [], f"{where}.edits"))],
            vectors=[VectorSpec.decode(v, f"{where}.vectors[{i}]")
                     for i, v in enumerate(_list(d.get("vectors") or [], f"{where}.vectors"))],
            streams=_streams(d.get("streams"), f"{where}.streams"),
            watch=[WatchSpec.decode(w, f"{where}.watch[{i}]")
                   for i, w in enumerate(_list(d.get("watch") or [], f"{where}.watch"))],
        )


def _streams(data: Any, where: str) -> list[int]:
    """Hook point layer numbers of ``WorkerSpec.streams``: integers >= -1, no repeats."""
    if data is None:
        return []
    layers = [_int(x, f"{where}[{i}]", -1) for i, x in enumerate(_list(data, where))]
    if len(set(layers)) != len(layers):
        raise WorkerSpecError(f"{where}: hook points repeat ({layers})")
    return sorted(layers)


# ------------------------------------------------------------------------- installation


@dataclass(frozen=True)
class DictionaryToLoad:
    """One dictionary the worker loads at install."""

    id: str
    """Client-facing id (what specs and feature chunks call it)."""
    path: str
    """Where to load it from: a directory or a source name the API process already checked."""


@dataclass(frozen=True)
class InstallConfig:
    """The argument of the ``sae_install`` RPC."""

    dictionaries: list[DictionaryToLoad]
    """Dictionaries to load, in registry order."""
    feature_address: str | None
    """ZeroMQ address of the API process's feature receiver; None sends no features."""
    dtype: str | None = None
    """torch dtype name to load the dictionaries in; None keeps their own."""

    def encode(self) -> dict[str, Any]:
        return {"dictionaries": [{"id": d.id, "path": d.path} for d in self.dictionaries],
                "feature_address": self.feature_address, "dtype": self.dtype}

    @classmethod
    def decode(cls, data: Any, where: str = "install") -> InstallConfig:
        d = _need(data, where)
        dicts = []
        for i, e in enumerate(_list(_get(d, "dictionaries", where), f"{where}.dictionaries")):
            w = f"{where}.dictionaries[{i}]"
            e = _need(e, w)
            dict_id, path = _str(_get(e, "id", w), f"{w}.id"), _str(_get(e, "path", w), f"{w}.path")
            dicts.append(DictionaryToLoad(id=dict_id, path=path))
        address = d.get("feature_address")
        dtype = d.get("dtype")
        return cls(
            dictionaries=dicts,
            feature_address=None if address is None else _str(address, f"{where}.feature_address"),
            dtype=None if dtype is None else _str(dtype, f"{where}.dtype"),
        )
