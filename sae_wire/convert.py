"""The one converter between the protobuf messages (``protos/``) and the wire models.

Both directions live here, side by side, and both sides of the wire use them: the gRPC
server reads requests with ``*_from_pb`` and writes responses with ``*_pb``; the Python
client writes requests with ``*_pb`` and reads responses with ``*_from_pb``.
``tests/test_wire.py`` round-trips every message through both directions, so a field
added to one direction and not the other fails there.

Requests read from a message become plain dicts validated by the same pydantic models
the HTTP API uses (:mod:`sae_wire.models`), so a field that HTTP refuses is refused over
gRPC with the same message (:class:`pydantic.ValidationError`). What pydantic cannot see
(an enum number outside the proto's, no prompt at all, no ``features`` on
ExtractFeatures) raises :class:`WireError` naming the field.

Proto3 cannot tell "unset" from zero for plain scalars, which is why optional fields in
the proto are declared ``optional`` and read with ``HasField``; for repeated fields
"empty" stands for "not asked" (``top_k`` and ``feature_ids`` are never empty when asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

from sae_wire import sae_serve_pb2 as pb
from sae_wire.models import (
    AppliedEdit,
    CooccurringFeature,
    DictionaryFeatures,
    DictionaryInfoOut,
    DictionarySummary,
    ExampleSearchHit,
    ExtractRequest,
    ExtractResponse,
    FeatureCondition,
    FeatureExampleOut,
    FeatureIndexCard,
    FeatureInfoOut,
    FeatureRequest,
    FeatureSearchHit,
    FeatureSearchResponse,
    GenerateChunkOut,
    GenerateRequest,
    ProjectedFeature,
    SamplingOptions,
    SearchByExampleRequest,
    SearchByExampleResponse,
    SteeringApplied,
    SteeringSpec,
    SteeringVectorCreate,
    SteeringVectorInfo,
    TokenCountOut,
    TokenFeaturesOut,
    TokenScore,
    TrainingLogPoint,
    Usage,
    VectorProjectionInfo,
)

# Proto enum values are ints (``pb.Scope`` and ``pb.EditMode`` subclass int): the tables read
# from a message are keyed by int, so any number a message carries can be looked up.
SCOPE_FROM_PB: dict[int, str | None] = {
    pb.SCOPE_UNSPECIFIED: None, pb.SCOPE_PROMPT: "prompt", pb.SCOPE_GENERATED: "generated", pb.SCOPE_ALL: "all"}
SCOPE_TO_PB: dict[str, pb.Scope] = {"prompt": pb.SCOPE_PROMPT, "generated": pb.SCOPE_GENERATED, "all": pb.SCOPE_ALL}
MODE_FROM_PB: dict[int, str | None] = {
    pb.EDIT_MODE_UNSPECIFIED: None, pb.EDIT_MODE_ADD: "add", pb.EDIT_MODE_CLAMP: "clamp",
    pb.EDIT_MODE_SCALE: "scale", pb.EDIT_MODE_ABLATE: "ablate", pb.EDIT_MODE_PROJECT_CAP: "project_cap",
    pb.EDIT_MODE_ORTHOGONAL: "orthogonal"}
MODE_TO_PB: dict[str, pb.EditMode] = {
    "add": pb.EDIT_MODE_ADD, "clamp": pb.EDIT_MODE_CLAMP, "scale": pb.EDIT_MODE_SCALE, "ablate": pb.EDIT_MODE_ABLATE,
    "project_cap": pb.EDIT_MODE_PROJECT_CAP, "orthogonal": pb.EDIT_MODE_ORTHOGONAL}
NORMALIZE_FROM_PB: dict[int, str | None] = {
    pb.NORMALIZE_UNSPECIFIED: None, pb.NORMALIZE_NONE: "none", pb.NORMALIZE_MAX: "max"}
NORMALIZE_TO_PB: dict[str, pb.Normalize] = {"none": pb.NORMALIZE_NONE, "max": pb.NORMALIZE_MAX}
SAMPLING_OPTIONALS = ("max_tokens", "temperature", "top_p", "seed")


class WireError(ValueError):
    """A message that cannot become a request; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _model(cls: Any, value: Any) -> Any:
    """``value`` as a ``cls`` instance (a dict or another model is validated)."""
    if isinstance(value, cls):
        return value
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return cls.model_validate(value)


def _enum(table: dict[int, str | None], value: int, field: str) -> str | None:
    if value not in table:
        raise WireError(field, f"unknown enum value {value}")
    return table[value]


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        d[key] = value


def _scope_pb(value: str | None) -> pb.Scope:
    return SCOPE_TO_PB[value] if value else pb.SCOPE_UNSPECIFIED


# -- requests: message -> dict -> model (the server) ------------------------------------------

def feature_request_dict(msg: pb.FeatureRequest) -> dict[str, Any]:
    d: dict[str, Any] = {"dictionaries": list(msg.dictionaries)}
    if msg.HasField("top_k"):
        d["top_k"] = msg.top_k
    if msg.feature_ids:
        d["feature_ids"] = list(msg.feature_ids)
    _set(d, "scope", _enum(SCOPE_FROM_PB, msg.scope, "features.scope"))
    _set(d, "normalize", _enum(NORMALIZE_FROM_PB, msg.normalize, "features.normalize"))
    if msg.labels:
        d["labels"] = True
    if msg.HasField("exclude_dense_above"):
        d["exclude_dense_above"] = msg.exclude_dense_above
    return d


def steering_dict(msg: pb.Steering) -> dict[str, Any]:
    edits = []
    for i, e in enumerate(msg.edits):
        ed: dict[str, Any] = {"dictionary": e.dictionary}
        if e.concept:
            ed["concept"] = e.concept
            if e.HasField("concept_features"):
                ed["concept_features"] = e.concept_features
        else:
            ed["feature"] = e.feature
        _set(ed, "mode", _enum(MODE_FROM_PB, e.mode, f"steering.edits[{i}].mode"))
        if e.HasField("value"):
            ed["value"] = e.value
        _set(ed, "scope", _enum(SCOPE_FROM_PB, e.scope, f"steering.edits[{i}].scope"))
        if e.unit:
            ed["unit"] = e.unit
        if e.HasField("when"):
            ed["when"] = _condition_dict(e.when)
        edits.append(ed)
    vectors = []
    for i, v in enumerate(msg.vectors):
        vd: dict[str, Any] = {}
        if v.hook_point:
            vd["hook_point"] = v.hook_point
        if v.vector or not v.vector_id:
            vd["vector"] = list(v.vector)
        if v.vector_id:
            vd["vector_id"] = v.vector_id
        if v.HasField("scale"):
            vd["scale"] = v.scale
        _set(vd, "scope", _enum(SCOPE_FROM_PB, v.scope, f"steering.vectors[{i}].scope"))
        vectors.append(vd)
    out: dict[str, Any] = {"edits": edits, "vectors": vectors}
    if msg.stop_when:
        out["stop_when"] = [_condition_dict(c) for c in msg.stop_when]
    return out


def _condition_dict(c: pb.FeatureCondition) -> dict[str, Any]:
    return {"dictionary": c.dictionary, "feature": c.feature, "above": c.above}


def _condition_pb(c: FeatureCondition) -> pb.FeatureCondition:
    return pb.FeatureCondition(dictionary=c.dictionary, feature=c.feature, above=c.above)


def sampling_dict(msg: pb.SamplingOptions) -> dict[str, Any]:
    d: dict[str, Any] = {"stop": list(msg.stop)}
    for name in SAMPLING_OPTIONALS:
        if msg.HasField(name):
            d[name] = getattr(msg, name)
    return d


def _input_dict(msg: Any) -> dict[str, Any]:
    which = msg.WhichOneof("input")
    if which == "text":
        return {"text": msg.text}
    if which == "chat":
        return {"messages": [{"role": m.role, "content": m.content} for m in msg.chat.messages]}
    raise WireError("input", "give 'text' or 'chat'")


def extract_request_dict(msg: pb.ExtractFeaturesRequest) -> dict[str, Any]:
    data = _input_dict(msg)
    if not msg.HasField("features"):
        raise WireError("features", "is required")
    data["features"] = feature_request_dict(msg.features)
    return data


def generate_request_dict(msg: pb.GenerateRequest) -> dict[str, Any]:
    data = _input_dict(msg)
    data["sampling"] = sampling_dict(msg.sampling)
    if msg.HasField("features"):
        data["features"] = feature_request_dict(msg.features)
    if msg.HasField("steering"):
        data["steering"] = steering_dict(msg.steering)
    return data


def search_by_example_request_dict(msg: pb.SearchByExampleRequest) -> dict[str, Any]:
    d: dict[str, Any] = {"dictionary": msg.dictionary, "texts": list(msg.texts),
                         "contrast_texts": list(msg.contrast_texts)}
    if msg.HasField("limit"):
        d["limit"] = msg.limit
    if msg.HasField("exclude_dense_above"):
        d["exclude_dense_above"] = msg.exclude_dense_above
    return d


def search_by_example_request_from_pb(msg: pb.SearchByExampleRequest) -> SearchByExampleRequest:
    """Raises :class:`pydantic.ValidationError` naming the field."""
    return SearchByExampleRequest.model_validate(search_by_example_request_dict(msg))


def search_by_example_request_pb(request: SearchByExampleRequest | dict) -> pb.SearchByExampleRequest:
    r = _model(SearchByExampleRequest, request)
    msg = pb.SearchByExampleRequest(dictionary=r.dictionary, texts=r.texts, contrast_texts=r.contrast_texts,
                                    limit=r.limit)
    if r.exclude_dense_above is not None:
        msg.exclude_dense_above = r.exclude_dense_above
    return msg


def extract_request_from_pb(msg: pb.ExtractFeaturesRequest) -> ExtractRequest:
    """Raises :class:`WireError` or :class:`pydantic.ValidationError`, both naming the field."""
    return ExtractRequest.model_validate(extract_request_dict(msg))


def generate_request_from_pb(msg: pb.GenerateRequest) -> GenerateRequest:
    """Raises :class:`WireError` or :class:`pydantic.ValidationError`, both naming the field."""
    return GenerateRequest.model_validate(generate_request_dict(msg))


# -- requests: model (or dict) -> message (the client) ----------------------------------------

def feature_request_pb(features: FeatureRequest | dict) -> pb.FeatureRequest:
    f = _model(FeatureRequest, features)
    msg = pb.FeatureRequest(dictionaries=f.dictionaries, feature_ids=f.feature_ids or [], scope=_scope_pb(f.scope))
    if f.top_k is not None:  # with feature_ids too: both are asked, both come back
        msg.top_k = f.top_k
    if f.normalize != "none":
        msg.normalize = NORMALIZE_TO_PB[f.normalize]
    msg.labels = f.labels
    if f.exclude_dense_above is not None:
        msg.exclude_dense_above = f.exclude_dense_above
    return msg


def steering_pb(steering: SteeringSpec | dict) -> pb.Steering:
    s = _model(SteeringSpec, steering)
    msg = pb.Steering()
    for e in s.edits:
        edit = pb.SteeringEdit(dictionary=e.dictionary, feature=e.feature or 0, mode=MODE_TO_PB[e.mode],
                               scope=_scope_pb(e.scope))
        if e.concept is not None:
            edit.concept = e.concept
            if e.concept_features != 1:
                edit.concept_features = e.concept_features
        if e.value is not None:
            edit.value = e.value
        if e.unit is not None:
            edit.unit = e.unit
        if e.when is not None:
            edit.when.CopyFrom(_condition_pb(e.when))
        msg.edits.append(edit)
    for v in s.vectors:
        msg.vectors.append(pb.SteeringVector(hook_point=v.hook_point or "", vector=v.vector or [], scale=v.scale,
                                             scope=_scope_pb(v.scope), vector_id=v.vector_id or ""))
    msg.stop_when.extend(_condition_pb(c) for c in s.stop_when)
    return msg


def sampling_pb(sampling: SamplingOptions | dict) -> pb.SamplingOptions:
    s = _model(SamplingOptions, sampling)
    msg = pb.SamplingOptions(stop=s.stop)
    for name in SAMPLING_OPTIONALS:
        value = getattr(s, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def _input_pb(msg: Any, req: ExtractRequest | GenerateRequest) -> None:
    if req.text is not None:
        msg.text = req.text
    else:
        for m in req.messages or []:
            msg.chat.messages.append(pb.ChatMessage(role=m.role, content=m.text()))


def extract_request_pb(request: ExtractRequest | dict) -> pb.ExtractFeaturesRequest:
    req = _model(ExtractRequest, request)
    msg = pb.ExtractFeaturesRequest(features=feature_request_pb(req.features))
    _input_pb(msg, req)
    return msg


def generate_request_pb(request: GenerateRequest | dict) -> pb.GenerateRequest:
    req = _model(GenerateRequest, request)
    msg = pb.GenerateRequest(sampling=sampling_pb(req.sampling))
    if req.features is not None:
        msg.features.CopyFrom(feature_request_pb(req.features))
    if req.steering is not None:
        msg.steering.CopyFrom(steering_pb(req.steering))
    _input_pb(msg, req)
    return msg


# -- responses: model -> message (the server) -------------------------------------------------

def dictionary_features_pb(d: DictionaryFeatures) -> pb.DictionaryFeatures:
    return pb.DictionaryFeatures(dictionary=d.dictionary, indices=d.indices or [], values=d.values,
                                 feature_values=d.feature_values or [], labels=d.labels or [],
                                 feature_labels=d.feature_labels or [])


def token_features_pb(tokens: Sequence[TokenFeaturesOut]) -> list[pb.TokenFeatures]:
    return [
        pb.TokenFeatures(position=t.position, token_id=t.token_id, token=t.token, is_prompt=t.is_prompt,
                         features=[dictionary_features_pb(d) for d in t.features])
        for t in tokens
    ]


def extract_response_pb(resp: ExtractResponse) -> pb.ExtractFeaturesResponse:
    return pb.ExtractFeaturesResponse(model=resp.model, tokens=token_features_pb(resp.tokens))


def generate_chunk_pb(chunk: GenerateChunkOut) -> pb.GenerateResponse:
    out = pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text, features=token_features_pb(chunk.features),
                              finished=chunk.finished, finish_reason=chunk.finish_reason or "")
    if chunk.usage is not None:
        out.usage.CopyFrom(pb.Usage(**chunk.usage.model_dump()))
    if chunk.steering_applied is not None:
        out.steering_applied.CopyFrom(steering_applied_pb(chunk.steering_applied))
    return out


def steering_applied_pb(a: SteeringApplied) -> pb.SteeringApplied:
    out = pb.SteeringApplied()
    for e in a.edits:
        item = pb.AppliedEdit(edit=e.edit, dictionary=e.dictionary, feature=e.feature, mode=MODE_TO_PB[e.mode],
                              unit=e.unit, value=e.value, scope=_scope_pb(e.scope), concept=e.concept or "")
        if e.raw_value is not None:
            item.raw_value = e.raw_value
        out.edits.append(item)
    return out


def steering_applied_from_pb(m: pb.SteeringApplied) -> SteeringApplied:
    return SteeringApplied(edits=[
        AppliedEdit.model_validate({
            "edit": e.edit, "dictionary": e.dictionary, "feature": e.feature, "mode": MODE_FROM_PB[e.mode] or "add",
            "unit": e.unit, "value": e.value, "raw_value": e.raw_value if e.HasField("raw_value") else None,
            "scope": SCOPE_FROM_PB[e.scope] or "all", "concept": e.concept or None})
        for e in m.edits])


def dictionary_pb(d: DictionaryInfoOut) -> pb.DictionaryInfo:
    out = pb.DictionaryInfo(id=d.id, model=d.model, hook_point=d.hook_point, architecture=d.architecture,
                            d_in=d.d_in, d_sae=d.d_sae)
    if d.k is not None:
        out.k = d.k
    if d.metrics is not None:
        out.metrics.CopyFrom(ParseDict(d.metrics, struct_pb2.Struct()))
    return out


_SUMMARY_OPTIONAL = ("k", "fvu", "l0", "dead_frac", "ce_loss_recovered", "eval_tokens", "index_tokens",
                     "never_fired")


def dictionary_summary_pb(d: DictionarySummary) -> pb.DictionarySummary:
    out = pb.DictionarySummary(
        id=d.id, model=d.model, hook_point=d.hook_point, architecture=d.architecture, d_in=d.d_in, d_sae=d.d_sae,
        has_index=d.has_index, density_log10_edges=d.density_log10_edges, density_counts=d.density_counts,
        training_log=[pb.TrainingLogPoint(**p.model_dump()) for p in d.training_log],
    )
    for name in _SUMMARY_OPTIONAL:
        value = getattr(d, name)
        if value is not None:
            setattr(out, name, value)
    return out


def dictionary_summary_from_pb(m: pb.DictionarySummary) -> DictionarySummary:
    return DictionarySummary(
        id=m.id, model=m.model, hook_point=m.hook_point, architecture=m.architecture, d_in=m.d_in, d_sae=m.d_sae,
        has_index=m.has_index, density_log10_edges=list(m.density_log10_edges),
        density_counts=list(m.density_counts),
        training_log=[TrainingLogPoint(step=p.step, tokens=p.tokens, loss=p.loss, fvu=p.fvu, l0=p.l0, dead=p.dead)
                      for p in m.training_log],
        **{name: getattr(m, name) for name in _SUMMARY_OPTIONAL if m.HasField(name)},
    )


def feature_info_pb(f: FeatureInfoOut) -> pb.FeatureInfo:
    out = pb.FeatureInfo(
        dictionary=f.dictionary, feature=f.feature, hook_point=f.hook_point, decoder_norm=f.decoder_norm,
        top_promoted=[pb.TokenScore(**t.model_dump()) for t in f.top_promoted],
        top_suppressed=[pb.TokenScore(**t.model_dump()) for t in f.top_suppressed],
    )
    if f.density is not None:
        out.density = f.density
    out.has_index = f.has_index
    if f.index is not None:
        out.index.CopyFrom(feature_index_card_pb(f.index))
    return out


def feature_index_card_pb(c: FeatureIndexCard) -> pb.FeatureIndexCard:
    out = pb.FeatureIndexCard(
        label=c.label, label_source=c.label_source, max_activation=c.max_activation, density=c.density,
        n_fired=c.n_fired, quantile_levels=c.quantile_levels, quantiles=c.quantiles, histogram=c.histogram,
        histogram_max=c.histogram_max, top_tokens=[pb.TokenCount(**t.model_dump()) for t in c.top_tokens],
        cooccurring=[pb.CooccurringFeature(**f.model_dump()) for f in c.cooccurring],
        examples=[pb.FeatureExample(**e.model_dump()) for e in c.examples])
    if c.label_score is not None:
        out.label_score = c.label_score
    return out


def search_features_response_pb(r: FeatureSearchResponse) -> pb.SearchFeaturesResponse:
    return pb.SearchFeaturesResponse(dictionary=r.dictionary, query=r.query,
                                     results=[pb.FeatureSearchHit(**h.model_dump()) for h in r.results])


def search_by_example_response_pb(r: SearchByExampleResponse) -> pb.SearchByExampleResponse:
    return pb.SearchByExampleResponse(dictionary=r.dictionary,
                                      results=[pb.ExampleSearchHit(**h.model_dump()) for h in r.results])


# -- responses: message -> model (the client) -------------------------------------------------

def dictionary_features_from_pb(d: pb.DictionaryFeatures) -> DictionaryFeatures:
    return DictionaryFeatures(dictionary=d.dictionary, indices=list(d.indices) or None, values=list(d.values),
                              feature_values=list(d.feature_values) or None,
                              labels=list(d.labels) or None,
                              feature_labels=list(d.feature_labels) or None)


def tokens_from_pb(tokens: Sequence[pb.TokenFeatures]) -> list[TokenFeaturesOut]:
    return [
        TokenFeaturesOut(position=t.position, token_id=t.token_id, token=t.token, is_prompt=t.is_prompt,
                         features=[dictionary_features_from_pb(d) for d in t.features])
        for t in tokens
    ]


def extract_response_from_pb(m: pb.ExtractFeaturesResponse) -> ExtractResponse:
    return ExtractResponse(model=m.model, tokens=tokens_from_pb(m.tokens))


def generate_chunk_from_pb(m: pb.GenerateResponse) -> GenerateChunkOut:
    return GenerateChunkOut(
        token_ids=list(m.token_ids), text=m.text, features=tokens_from_pb(m.features), finished=m.finished,
        finish_reason=m.finish_reason or None,
        usage=Usage(prompt_tokens=m.usage.prompt_tokens, completion_tokens=m.usage.completion_tokens,
                    total_tokens=m.usage.total_tokens) if m.HasField("usage") else None,
        steering_applied=steering_applied_from_pb(m.steering_applied) if m.HasField("steering_applied") else None,
    )


def dictionary_from_pb(d: pb.DictionaryInfo) -> DictionaryInfoOut:
    return DictionaryInfoOut(id=d.id, model=d.model, hook_point=d.hook_point, architecture=d.architecture,
                             d_in=d.d_in, d_sae=d.d_sae, k=d.k if d.HasField("k") else None,
                             metrics=MessageToDict(d.metrics) if d.HasField("metrics") else None)


def feature_info_from_pb(f: pb.FeatureInfo) -> FeatureInfoOut:
    def scores(xs: Sequence[pb.TokenScore]) -> list[TokenScore]:
        return [TokenScore(token_id=x.token_id, token=x.token, score=x.score) for x in xs]

    return FeatureInfoOut(dictionary=f.dictionary, feature=f.feature, hook_point=f.hook_point,
                          decoder_norm=f.decoder_norm, top_promoted=scores(f.top_promoted),
                          top_suppressed=scores(f.top_suppressed),
                          density=f.density if f.HasField("density") else None, has_index=f.has_index,
                          index=feature_index_card_from_pb(f.index) if f.HasField("index") else None)


def feature_index_card_from_pb(c: pb.FeatureIndexCard) -> FeatureIndexCard:
    return FeatureIndexCard(
        label=c.label, label_source=c.label_source, label_score=c.label_score if c.HasField("label_score") else None,
        max_activation=c.max_activation, density=c.density, n_fired=c.n_fired,
        quantile_levels=list(c.quantile_levels), quantiles=list(c.quantiles), histogram=list(c.histogram),
        histogram_max=c.histogram_max,
        top_tokens=[TokenCountOut(token_id=t.token_id, token=t.token, count=t.count) for t in c.top_tokens],
        cooccurring=[CooccurringFeature(feature=f.feature, jaccard=f.jaccard, label=f.label) for f in c.cooccurring],
        examples=[FeatureExampleOut(activation=e.activation, tokens=list(e.tokens), token_ids=list(e.token_ids),
                                    activations=list(e.activations), peak=e.peak, doc=e.doc, position=e.position)
                  for e in c.examples])


def search_features_response_from_pb(m: pb.SearchFeaturesResponse) -> FeatureSearchResponse:
    return FeatureSearchResponse(dictionary=m.dictionary, query=m.query, results=[
        FeatureSearchHit(feature=h.feature, label=h.label, density=h.density, max_activation=h.max_activation)
        for h in m.results])


def search_by_example_response_from_pb(m: pb.SearchByExampleResponse) -> SearchByExampleResponse:
    return SearchByExampleResponse(dictionary=m.dictionary, results=[
        ExampleSearchHit(feature=h.feature, score=h.score, label=h.label, max_activation=h.max_activation,
                         density=h.density) for h in m.results])


# -- stored contrastive steering vectors ---------------------------------------------------

def _contrast_text(t: pb.ContrastText, field: str) -> Any:
    which = t.WhichOneof("input")
    if which == "text":
        return t.text
    if which == "chat":
        return [{"role": m.role, "content": m.content} for m in t.chat.messages]
    raise WireError(field, "give 'text' or 'chat'")


def steering_vector_create_from_pb(msg: pb.CreateSteeringVectorRequest) -> SteeringVectorCreate:
    data: dict[str, Any] = {
        "hook_point": msg.hook_point,
        "positive": [_contrast_text(t, f"positive[{i}]") for i, t in enumerate(msg.positive)],
        "negative": [_contrast_text(t, f"negative[{i}]") for i, t in enumerate(msg.negative)],
    }
    if msg.HasField("name"):
        data["name"] = msg.name
    if msg.HasField("project_onto"):
        data["project_onto"] = {"dictionary": msg.project_onto.dictionary, "top_k": msg.project_onto.top_k}
    return _model(SteeringVectorCreate, data)


def steering_vector_create_pb(request: SteeringVectorCreate | dict) -> pb.CreateSteeringVectorRequest:
    req = request if isinstance(request, SteeringVectorCreate) else SteeringVectorCreate.model_validate(request)
    msg = pb.CreateSteeringVectorRequest(hook_point=req.hook_point)
    for side, items in (("positive", req.positive), ("negative", req.negative)):
        out = getattr(msg, side)
        for item in items:
            t = pb.ContrastText()
            if isinstance(item, str):
                t.text = item
            else:
                for m in item:
                    t.chat.messages.append(pb.ChatMessage(role=m.role, content=m.text()))
            out.append(t)
    if req.name is not None:
        msg.name = req.name
    if req.project_onto is not None:
        msg.project_onto.CopyFrom(pb.VectorProjection(dictionary=req.project_onto.dictionary,
                                                      top_k=req.project_onto.top_k))
    return msg


def steering_vector_info_pb(v: SteeringVectorInfo) -> pb.SteeringVectorInfo:
    out = pb.SteeringVectorInfo(id=v.id, hook_point=v.hook_point, d_in=v.d_in, norm=v.norm, n_positive=v.n_positive,
                                n_negative=v.n_negative, positive_tokens=v.positive_tokens,
                                negative_tokens=v.negative_tokens, created_at=v.created_at, vector=v.vector or [])
    if v.name is not None:
        out.name = v.name
    if v.projection is not None:
        p = v.projection
        out.projection.CopyFrom(pb.VectorProjectionInfo(
            dictionary=p.dictionary, top_k=p.top_k, unprojected_norm=p.unprojected_norm, explained=p.explained,
            features=[pb.ProjectedFeature(feature=f.feature, coefficient=f.coefficient, cosine=f.cosine)
                      for f in p.features]))
    return out


def steering_vector_info_from_pb(m: pb.SteeringVectorInfo, with_vector: bool = False) -> SteeringVectorInfo:
    projection = None
    if m.HasField("projection"):
        p = m.projection
        projection = VectorProjectionInfo(
            dictionary=p.dictionary, top_k=p.top_k, unprojected_norm=p.unprojected_norm, explained=p.explained,
            features=[ProjectedFeature(feature=f.feature, coefficient=f.coefficient, cosine=f.cosine)
                      for f in p.features])
    return SteeringVectorInfo(
        id=m.id, name=m.name if m.HasField("name") else None, hook_point=m.hook_point, d_in=m.d_in, norm=m.norm,
        n_positive=m.n_positive, n_negative=m.n_negative, positive_tokens=m.positive_tokens,
        negative_tokens=m.negative_tokens, created_at=m.created_at, projection=projection,
        vector=list(m.vector) if with_vector or m.vector else None)
