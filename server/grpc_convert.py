"""Conversion between the gRPC messages (``protos/``) and the shared pydantic models.

Requests are turned into plain dicts and validated by the *same* pydantic models the
HTTP API uses (:mod:`server.models`, :mod:`sae_runtime.engine.spec`), so a field that
HTTP refuses is refused over gRPC with the same message. Proto3 cannot tell "unset"
from zero for plain scalars, which is why optional fields in the proto are declared
``optional`` and read with ``HasField``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict
from pydantic import ValidationError

from clients.proto import sae_serve_pb2 as pb
from server.errors import ApiError
from server.models import (
    DictionaryInfoOut,
    ExtractRequest,
    ExtractResponse,
    FeatureInfoOut,
    GenerateChunkOut,
    GenerateRequest,
    TokenFeaturesOut,
)

SCOPES = {pb.SCOPE_UNSPECIFIED: None, pb.SCOPE_PROMPT: "prompt", pb.SCOPE_GENERATED: "generated", pb.SCOPE_ALL: "all"}
SCOPE_TO_PB = {"prompt": pb.SCOPE_PROMPT, "generated": pb.SCOPE_GENERATED, "all": pb.SCOPE_ALL}
MODES = {pb.EDIT_MODE_UNSPECIFIED: None, pb.EDIT_MODE_ADD: "add", pb.EDIT_MODE_CLAMP: "clamp",
         pb.EDIT_MODE_SCALE: "scale", pb.EDIT_MODE_ABLATE: "ablate"}
MODE_TO_PB = {"add": pb.EDIT_MODE_ADD, "clamp": pb.EDIT_MODE_CLAMP, "scale": pb.EDIT_MODE_SCALE,
              "ablate": pb.EDIT_MODE_ABLATE}


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        d[key] = value


def _enum(table: dict[int, str | None], value: int, field: str) -> str | None:
    if value not in table:
        raise ApiError.invalid(field, f"unknown enum value {value}")
    return table[value]


def feature_request_dict(msg: pb.FeatureRequest) -> dict[str, Any]:
    d: dict[str, Any] = {"dictionaries": list(msg.dictionaries)}
    if msg.HasField("top_k"):
        d["top_k"] = msg.top_k
    if msg.feature_ids:
        d["feature_ids"] = list(msg.feature_ids)
    _set(d, "scope", _enum(SCOPES, msg.scope, "features.scope"))
    return d


def steering_dict(msg: pb.Steering) -> dict[str, Any]:
    edits = []
    for i, e in enumerate(msg.edits):
        ed: dict[str, Any] = {"dictionary": e.dictionary, "feature": e.feature}
        _set(ed, "mode", _enum(MODES, e.mode, f"steering.edits[{i}].mode"))
        if e.HasField("value"):
            ed["value"] = e.value
        _set(ed, "scope", _enum(SCOPES, e.scope, f"steering.edits[{i}].scope"))
        edits.append(ed)
    vectors = []
    for i, v in enumerate(msg.vectors):
        vd: dict[str, Any] = {"hook_point": v.hook_point, "vector": list(v.vector)}
        if v.HasField("scale"):
            vd["scale"] = v.scale
        _set(vd, "scope", _enum(SCOPES, v.scope, f"steering.vectors[{i}].scope"))
        vectors.append(vd)
    return {"edits": edits, "vectors": vectors}


def _input_dict(msg: Any) -> dict[str, Any]:
    which = msg.WhichOneof("input")
    if which == "text":
        return {"text": msg.text}
    if which == "chat":
        return {"messages": [{"role": m.role, "content": m.content} for m in msg.chat.messages]}
    raise ApiError.invalid("input", "give 'text' or 'chat'")


def _validate(model: Any, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError.from_validation_error(exc) from None


def extract_request(msg: pb.ExtractFeaturesRequest) -> ExtractRequest:
    data = _input_dict(msg)
    if not msg.HasField("features"):
        raise ApiError.invalid("features", "is required")
    data["features"] = feature_request_dict(msg.features)
    return _validate(ExtractRequest, data)


def generate_request(msg: pb.GenerateRequest) -> GenerateRequest:
    data = _input_dict(msg)
    s = msg.sampling
    sampling: dict[str, Any] = {"stop": list(s.stop)}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if s.HasField(name):
            sampling[name] = getattr(s, name)
    data["sampling"] = sampling
    if msg.HasField("features"):
        data["features"] = feature_request_dict(msg.features)
    if msg.HasField("steering"):
        data["steering"] = steering_dict(msg.steering)
    return _validate(GenerateRequest, data)


def token_features_pb(tokens: list[TokenFeaturesOut]) -> list[pb.TokenFeatures]:
    return [
        pb.TokenFeatures(
            position=t.position, token_id=t.token_id, token=t.token, is_prompt=t.is_prompt,
            features=[pb.DictionaryFeatures(dictionary=d.dictionary, indices=d.indices or [], values=d.values)
                      for d in t.features],
        )
        for t in tokens
    ]


def extract_response_pb(resp: ExtractResponse) -> pb.ExtractFeaturesResponse:
    return pb.ExtractFeaturesResponse(model=resp.model, tokens=token_features_pb(resp.tokens))


def generate_chunk_pb(chunk: GenerateChunkOut) -> pb.GenerateResponse:
    out = pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text, features=token_features_pb(chunk.features),
                              finished=chunk.finished, finish_reason=chunk.finish_reason or "")
    if chunk.usage is not None:
        out.usage.CopyFrom(pb.Usage(**chunk.usage.model_dump()))
    return out


def dictionary_pb(d: DictionaryInfoOut) -> pb.DictionaryInfo:
    out = pb.DictionaryInfo(id=d.id, model=d.model, hook_point=d.hook_point, architecture=d.architecture,
                            d_in=d.d_in, d_sae=d.d_sae)
    if d.k is not None:
        out.k = d.k
    if d.metrics is not None:
        out.metrics.CopyFrom(ParseDict(d.metrics, struct_pb2.Struct()))
    return out


def feature_info_pb(f: FeatureInfoOut) -> pb.FeatureInfo:
    out = pb.FeatureInfo(
        dictionary=f.dictionary, feature=f.feature, hook_point=f.hook_point, decoder_norm=f.decoder_norm,
        top_promoted=[pb.TokenScore(**t.model_dump()) for t in f.top_promoted],
        top_suppressed=[pb.TokenScore(**t.model_dump()) for t in f.top_suppressed],
    )
    if f.density is not None:
        out.density = f.density
    return out
