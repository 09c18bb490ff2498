"""Concept steering: an edit's ``concept`` is looked up in its dictionary's feature index
(``FeatureIndex.search``) and becomes edits of the best matching features, which the
response's ``steering_applied`` names. Unit tests on a test index; on the real engine a
concept edit steers exactly like an edit of the feature the search returns. Bad input over
HTTP and gRPC is in tests/test_bad_input.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sae_runtime.engine.spec import DictionaryInfo, SAERequestSpec, SpecError, resolve_concepts, steering_applied
from sae_runtime.feature_index import INDEX_FILE
from sae_runtime.feature_index.store import FeatureIndex
from sae_wire import convert as conv
from sae_wire.models import SteeringSpec
from tests.steering_helpers import INDEXED_D_SAE, INDEXED_LAYER, make_indexed_dictionary, steered_stream


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = make_indexed_dictionary(tmp_path_factory.mktemp("concepts") / "indexed8")
    idx = FeatureIndex(path / INDEX_FILE)
    yield idx
    idx.close()


def _steering(edits: list[dict]) -> SteeringSpec:
    return SteeringSpec.model_validate({"edits": edits})


def test_a_concept_resolves_to_the_index_search_hits_and_is_reported(index):
    hits = index.search("ocean", limit=2)
    assert len(hits) == 2 and {h.feature for h in hits} == {5, 17}
    s = _steering([{"dictionary": "ix", "feature": 3, "value": 1.0, "unit": "raw"},
                   {"dictionary": "ix", "concept": "ocean", "concept_features": 2, "mode": "clamp", "value": 0.5,
                    "scope": "generated", "when": {"dictionary": "ix", "feature": 1, "above": 0.0}}])
    out = resolve_concepts(s, {"ix": index})
    assert out is not None
    assert [e.feature for e in out.edits] == [3] + [h.feature for h in hits]
    assert all(e.mode == "clamp" and e.value == 0.5 and e.scope == "generated" and e.when == s.edits[1].when
               for e in out.edits[1:])
    info = {"ix": DictionaryInfo(id="ix", hook_point="layers.8", d_sae=INDEXED_D_SAE, k=None,
                                 max_activations=index.max_activations)}
    applied = steering_applied(SAERequestSpec(steering=out), info)
    assert applied is not None
    assert [(a.edit, a.feature, a.concept) for a in applied.edits] == [
        (0, 3, None), (1, hits[0].feature, "ocean"), (1, hits[1].feature, "ocean")]
    assert applied.edits[1].unit == "max" and applied.edits[1].raw_value == pytest.approx(
        0.5 * float(index.max_activations[hits[0].feature]))
    assert resolve_concepts(_steering([{"dictionary": "ix", "feature": 1, "value": 1.0}]), {"ix": index}) is not None


@pytest.mark.parametrize("edit,indexes,field,text", [
    ({"concept": "zeppelins"}, "with", "steering.edits[0].concept", "no feature"),
    ({"concept": "ocean"}, "without", "steering.edits[0].concept", "no feature index"),
    ({"concept": "***"}, "with", "steering.edits[0].concept", "***"),
    ({"concept": "ocean", "dictionary": "nope"}, "with", "steering.edits[0].dictionary", "unknown"),
])
def test_concepts_without_an_index_or_a_match_are_refused_naming_them(index, edit, indexes, field, text):
    s = _steering([{"dictionary": "ix", "value": 1.0, **edit}])
    with pytest.raises(SpecError) as err:
        resolve_concepts(s, {"ix": index if indexes == "with" else None})
    assert err.value.field == field and text in err.value.message


def test_concept_fields_are_checked_and_travel_over_grpc():
    for bad in ({"feature": 1, "concept": "ocean"}, {}, {"feature": 1, "concept_features": 2},
                {"concept": "ocean", "concept_features": 9}, {"concept": ""}):
        with pytest.raises(ValidationError):
            _steering([{"dictionary": "ix", "value": 1.0, **bad}])
    s = _steering([{"dictionary": "ix", "concept": "Paris", "concept_features": 3, "value": 1.0},
                   {"dictionary": "ix", "feature": 0, "value": 2.0}])
    assert SteeringSpec.model_validate(conv.steering_dict(conv.steering_pb(s))) == s


def test_concepts_over_http_on_a_stand_in_engine_are_resolved_and_reported(index):
    """The real HTTP app: the engine gets the resolved feature edits, the response's
    steering_applied names the concept; no match is a 400 naming the concept."""
    from fastapi.testclient import TestClient

    from server.http_api import build_http_app
    from server.service import SAEService
    from tests.test_hardening import DICTS, FakeEngine

    class ConceptEngine(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.specs: list = []
            self.dictionary_info = {"d0": DictionaryInfo(id="d0", hook_point="layers.6", d_sae=2048, k=None,
                                                         max_activations=index.max_activations)}

        def resolve_concepts(self, steering):
            return resolve_concepts(steering, {"d0": index})

        def generate(self, prompt_ids, params, spec=None, request_id=None):
            self.specs.append(spec)
            return super().generate(prompt_ids, params, spec, request_id)

    assert "d0" in DICTS
    engine = ConceptEngine()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "steering": {"edits": [{"dictionary": "d0", "concept": "ocean", "concept_features": 2, "value": 0.5}]}}
    with TestClient(build_http_app(SAEService(engine), 1_000_000)) as http:  # type: ignore[arg-type]
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        hits = [h.feature for h in index.search("ocean", limit=2)]
        assert [e.feature for e in engine.specs[-1].steering.edits] == hits
        applied = r.json()["steering_applied"]["edits"]
        assert [(a["edit"], a["feature"], a["concept"], a["unit"]) for a in applied] == [
            (0, f, "ocean", "max") for f in hits]
        body["steering"]["edits"][0]["concept"] = "zeppelin"
        r = http.post("/v1/chat/completions", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "steering.edits[0].concept"), r.text


@pytest.mark.slow
def test_a_concept_edit_steers_like_an_edit_of_the_feature_the_search_returns(sae_engine):
    eng = sae_engine.engine
    did = sae_engine.ids["indexed"]
    ids = eng.encode_text("The ocean liner sailed from Paris to the sea.")
    edit = {"dictionary": did, "mode": "add", "value": 3.0, "unit": "max"}
    by_concept = eng.resolve_concepts(_steering([{**edit, "concept": "paris"}]))
    (hit,) = eng.registry.get(did).index.search("paris", limit=1)
    assert by_concept is not None and [e.feature for e in by_concept.edits] == [hit.feature] == [41]
    out_concept = sae_engine.run(steered_stream(eng, ids, SAERequestSpec(steering=by_concept), INDEXED_LAYER))
    out_feature = sae_engine.run(steered_stream(
        eng, ids, SAERequestSpec(steering=_steering([{**edit, "feature": hit.feature}])), INDEXED_LAYER))
    plain = sae_engine.run(steered_stream(eng, ids, SAERequestSpec(), INDEXED_LAYER))
    assert float((out_concept - out_feature).abs().max()) == 0.0
    assert float((out_concept - plain).norm(dim=1).min()) > 0.1
