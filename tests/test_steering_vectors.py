"""Stored contrastive steering vectors: the record format (plain float32, never pickle),
``vector_id`` resolution, and end to end on the real server (HTTP and gRPC): the stored
vector is the difference of mean residual streams computed with transformers
(``sae_runtime.hf_streams``), and steering by its id equals steering by the same raw vector.
Bad input to each field is in tests/test_bad_input.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from sae_wire.models import SteeringSpec, SteeringVectorInfo
from server.errors import ApiError
from server.service import SAEService
from server.vector_store import MemoryVectorStore, VectorRecordError, decode_record, encode_record

INFO = SteeringVectorInfo(id="vec-0123456789abcdef", name="t", hook_point="layers.6", d_in=3, norm=1.0,
                          n_positive=1, n_negative=1, positive_tokens=2, negative_tokens=3, created_at=1.0)


def test_records_are_json_and_float32_and_refuse_anything_else():
    vec = np.array([1.0, -2.5, 0.25], np.float32)
    data = encode_record(INFO, vec)
    head, _, body = data.partition(b"\n")
    assert json.loads(head)["id"] == INFO.id and body == vec.astype("<f4").tobytes()
    back = decode_record(data)
    assert back.info == INFO and back.vector.tolist() == vec.tolist()
    for bad in (data[:-1], head, b"\x80\x04K\x01." + data, data.replace(b'"d_in":3', b'"d_in":4')):
        with pytest.raises(VectorRecordError):
            decode_record(bad)
    with pytest.raises(ValueError):
        encode_record(INFO, np.zeros(4, np.float32))


def test_vector_ids_resolve_to_the_stored_vector_and_unknown_ones_are_404():
    service = SAEService(SimpleNamespace(), vectors=MemoryVectorStore())  # type: ignore[arg-type]
    vec = np.array([1.0, -2.5, 0.25], np.float32)
    asyncio.run(service.vectors.put(INFO, vec))
    spec = SteeringSpec.model_validate({"vectors": [
        {"hook_point": "layers.2", "vector": [0.0, 1.0, 0.0]},
        {"vector_id": INFO.id, "scale": 2.0, "scope": "generated"}]})
    out = asyncio.run(service.resolve_steering(spec))
    assert out is not None and out.vectors[0] == spec.vectors[0]
    v = out.vectors[1]
    assert (v.hook_point, v.vector, v.scale, v.scope, v.vector_id) == ("layers.6", vec.tolist(), 2.0, "generated", None)
    for vectors, status, field in (
        ([{"vector_id": "vec-ffffffffffffffff"}], 404, "steering.vectors[0].vector_id"),
        ([{"vector_id": "../etc"}], 404, "steering.vectors[0].vector_id"),
        ([{"vector_id": INFO.id, "hook_point": "layers.3"}], 400, "steering.vectors[0].hook_point"),
    ):
        with pytest.raises(ApiError) as err:
            asyncio.run(service.resolve_steering(SteeringSpec.model_validate({"vectors": vectors})))
        assert (err.value.http_status, err.value.field) == (status, field)
    assert asyncio.run(service.delete_vector(INFO.id)).deleted
    assert asyncio.run(service.list_vectors()).data == []


# -- the real HTTP app on a stand-in engine (seconds, no vLLM) ----------------------------


def _fake_service():
    from sae_runtime.engine.engine import SAEEngine
    from sae_runtime.engine.spec import ModelShape
    from server.metrics import ServiceMetrics
    from tests.test_hardening import FakeEngine

    class VectorEngine(FakeEngine):
        """Streams: row p of a text is ``ids[p] + p/10`` in every entry (hidden size 8)."""

        shape = ModelShape(num_layers=30, hidden_size=8)
        last_layer = None  # every layer runs (not a harvest engine)
        stream_layers = SAEEngine.stream_layers

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer.all_special_ids = [0]
            self.specs: list = []

        async def harvest_streams(self, token_id_lists, hook_points):
            layers = self.stream_layers(hook_points)
            return [{L: torch.tensor([[float(t) + p / 10] * 8 for p, t in enumerate(ids)]) for L in layers}
                    for ids in token_id_lists]

        def generate(self, prompt_ids, params, spec=None, request_id=None):
            self.specs.append(spec)
            return super().generate(prompt_ids, params, spec, request_id)

        def encode_text(self, text: str) -> list[int]:
            return [0, *(len(w) for w in text.split())]  # 0 is "BOS", a special token

    engine = VectorEngine()
    return engine, SAEService(engine, ServiceMetrics("test"), vectors=MemoryVectorStore())  # type: ignore[arg-type]


def _mean(texts: list[str]) -> float:
    rows = [len(w) + p / 10 for t in texts for p, w in enumerate(t.split(), start=1)]
    return sum(rows) / len(rows)


def test_vector_routes_and_vector_id_steering_over_http_on_a_stand_in_engine():
    from fastapi.testclient import TestClient

    from server.http_api import build_http_app

    engine, service = _fake_service()
    pos, neg = ["aaa bbbb", "cc"], ["d eeeee ffffff"]
    with TestClient(build_http_app(service, 1_000_000)) as http:
        r = http.post("/v1/steering/vectors", json={"hook_point": "blocks.6.hook_resid_post", "positive": pos,
                                                    "negative": neg})
        assert r.status_code == 200, r.text
        info = r.json()
        assert (info["hook_point"], info["positive_tokens"], info["negative_tokens"]) == ("layers.6", 3, 3)
        full = http.get(f"/v1/steering/vectors/{info['id']}?include_vector=true").json()
        assert full["vector"] == pytest.approx([_mean(pos) - _mean(neg)] * 8, rel=1e-6)
        assert [v["id"] for v in http.get("/v1/steering/vectors").json()["data"]] == [info["id"]]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = http.post("/v1/chat/completions", json={**chat, "steering": {"vectors": [
            {"vector_id": info["id"], "scale": 3.0, "scope": "generated"}]}})
        assert r.status_code == 200, r.text
        (v,) = engine.specs[-1].steering.vectors
        assert (v.hook_point, v.scale, v.scope, v.vector_id) == ("layers.6", 3.0, "generated", None)
        assert v.vector == pytest.approx(full["vector"])
        for body, status, param in (
            ({"hook_point": "layers.30", "positive": pos, "negative": neg}, 404, "hook_point"),
            ({"hook_point": "layers.6", "positive": [""], "negative": neg}, 400, "positive"),
            ({"hook_point": "layers.6", "positive": ["x"] * 65, "negative": neg}, 400, "positive"),
            ({"hook_point": "layers.6", "positive": pos, "negative": []}, 422, "negative"),
        ):
            r = http.post("/v1/steering/vectors", json=body)
            assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
        assert http.delete(f"/v1/steering/vectors/{info['id']}").status_code == 200
        r = http.post("/v1/chat/completions", json={**chat, "steering": {"vectors": [{"vector_id": info["id"]}]}})
        assert (r.status_code, r.json()["error"]["param"]) == (404, "steering.vectors[0].vector_id")


def test_vector_grpc_methods_on_a_stand_in_engine():
    import grpc

    from sae_wire import convert as conv
    from sae_wire import sae_serve_pb2 as pb
    from server.grpc_service import GrpcRequestError
    from tests.test_hardening import FakeContext, grpc_methods

    _engine, service = _fake_service()
    m = grpc_methods(service)
    chat = [{"role": "user", "content": "x y"}]
    made = asyncio.run(m.CreateSteeringVector(conv.steering_vector_create_pb(
        {"hook_point": "layers.6", "positive": ["aaa bbbb", chat], "negative": ["d eeeee"], "name": "n"}),
        FakeContext()))
    assert made.name == "n" and made.n_positive == 2 and made.d_in == 8 and not made.vector
    listed = asyncio.run(m.ListSteeringVectors(pb.ListSteeringVectorsRequest(), FakeContext()))
    assert [v.id for v in listed.vectors] == [made.id]
    shown = asyncio.run(m.GetSteeringVector(pb.SteeringVectorRef(id=made.id, include_vector=True), FakeContext()))
    assert len(shown.vector) == 8 and conv.steering_vector_info_from_pb(shown).norm == pytest.approx(made.norm)
    assert asyncio.run(m.DeleteSteeringVector(pb.SteeringVectorRef(id=made.id), FakeContext())).deleted
    for call, request, code in (
        (m.GetSteeringVector, pb.SteeringVectorRef(id=made.id), grpc.StatusCode.NOT_FOUND),
        (m.CreateSteeringVector, pb.CreateSteeringVectorRequest(hook_point="layers.6"),
         grpc.StatusCode.INVALID_ARGUMENT),
        (m.CreateSteeringVector, pb.CreateSteeringVectorRequest(
            hook_point="mlp", positive=[pb.ContrastText(text="a b")], negative=[pb.ContrastText(text="c d")]),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):
        ctx = FakeContext()
        with pytest.raises(GrpcRequestError):
            asyncio.run(call(request, ctx))
        assert ctx.code() == code, ctx.details()


def test_finish_reason_feature_reaches_http_responses_whole_and_streamed():
    from fastapi.testclient import TestClient

    from server.http_api import build_http_app
    from tests.test_hardening import FakeEngine

    class StoppingEngine(FakeEngine):
        async def generate(self, prompt_ids, params, spec=None, request_id=None):
            from sae_runtime.engine.outputs import GenerationChunk

            yield GenerationChunk(request_id="r", token_ids=[1], text="a", num_generated_tokens=1)
            yield GenerationChunk(request_id="r", token_ids=[], text="", num_generated_tokens=1, finished=True,
                                  finish_reason="feature")

    service = SAEService(StoppingEngine())  # type: ignore[arg-type]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "steering": {"stop_when": [{"dictionary": "d0", "feature": 1, "above": 0.5}]}}
    with TestClient(build_http_app(service, 1_000_000)) as http:
        whole = http.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["finish_reason"] == "feature"
        assert whole.json()["usage"]["completion_tokens"] == 1
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        assert [c["choices"][0].get("finish_reason") for c in lines if c["choices"]][-1] == "feature"


# -- on the real server ------------------------------------------------------------------

POSITIVE = ["I love this, it is wonderful and makes me happy.", "What a delightful, joyful day!"]
NEGATIVE = ["I hate this, it is awful and makes me sad.", "What a miserable, gloomy day."]
HOOK = "layers.6"


def _reference(default_model_dir, texts: list[str]) -> torch.Tensor:
    """Mean stream at layers.6 over every token but position 0 and special tokens, with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime import hf_streams

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    special = set(tok.all_special_ids)
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=True)["input_ids"]
            x = hf_streams.residual_streams(model, torch.tensor([ids]), [6])[6][0]
            rows.append(x[[p for p in range(1, len(ids)) if ids[p] not in special]])
    return torch.cat(rows).double().mean(0)


@pytest.mark.slow
def test_contrastive_vector_is_the_difference_of_means_and_steers_like_the_raw_vector(live_server,
                                                                                     default_model_dir):
    with httpx.Client(base_url=live_server.base_url, timeout=300) as c:
        r = c.post("/v1/steering/vectors", json={"hook_point": HOOK, "positive": POSITIVE, "negative": NEGATIVE,
                                                 "name": "joy"})
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["id"].startswith("vec-") and info["hook_point"] == HOOK and info["name"] == "joy"
        assert "vector" not in info
        full = c.get(f"/v1/steering/vectors/{info['id']}", params={"include_vector": "true"}).json()
        got = torch.tensor(full["vector"], dtype=torch.float64)
        mean_pos, mean_neg = _reference(default_model_dir, POSITIVE), _reference(default_model_dir, NEGATIVE)
        ref = mean_pos - mean_neg
        assert got.shape == ref.shape
        # vLLM's rows are transformers' within STREAM_RTOL of their norm (tests/feature_reference.py)
        assert float((got - ref).norm()) <= 1e-3 * float(mean_pos.norm() + mean_neg.norm())
        assert float(ref.norm()) > 0.05 * float(mean_pos.norm())  # the two sides do differ
        assert full["norm"] == pytest.approx(float(got.norm()), rel=1e-5)
        assert info["id"] in [v["id"] for v in c.get("/v1/steering/vectors").json()["data"]]

        def chat(vector: dict) -> dict:
            body = {"messages": [{"role": "user", "content": "Tell me about your day."}], "max_tokens": 8,
                    "temperature": 0, "logprobs": True, "steering": {"vectors": [{**vector, "scale": 6.0}]}}
            resp = c.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]

        by_id = chat({"vector_id": info["id"]})
        by_value = chat({"hook_point": HOOK, "vector": full["vector"]})
        assert by_id["message"]["content"] == by_value["message"]["content"]
        lp_id = [t["logprob"] for t in by_id["logprobs"]["content"]]
        lp_value = [t["logprob"] for t in by_value["logprobs"]["content"]]
        assert lp_id == pytest.approx(lp_value, abs=1e-5)
        plain = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me about your "
                                                                   "day."}], "max_tokens": 8, "temperature": 0,
                                                     "logprobs": True}).json()["choices"][0]
        assert [t["logprob"] for t in plain["logprobs"]["content"]] != pytest.approx(lp_id, abs=1e-3)

        assert c.delete(f"/v1/steering/vectors/{info['id']}").json() == {"id": info["id"], "deleted": True}
        gone = c.get(f"/v1/steering/vectors/{info['id']}")
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "vector_id"
        steered = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 2,
                                                       "steering": {"vectors": [{"vector_id": info["id"]}]}})
        assert steered.status_code == 404 and steered.json()["error"]["param"] == "steering.vectors[0].vector_id"


@pytest.mark.slow
def test_grpc_creates_lists_shows_and_deletes_vectors(live_server):
    import grpc

    from clients.grpc_client import SAEClient
    from sae_wire import sae_serve_pb2 as pb

    with SAEClient(live_server.grpc_target, timeout_s=300) as c:
        chat = [{"role": "user", "content": "Be cheerful."}]
        made = c.create_steering_vector({"hook_point": HOOK, "positive": [chat, "Sunshine and laughter all day."],
                                         "negative": ["Rain and grey skies all day."]})
        assert made.id.startswith("vec-") and made.n_positive == 2 and made.d_in == 576 and made.vector is None
        assert made.id in [v.id for v in c.list_steering_vectors()]
        shown = c.get_steering_vector(made.id, include_vector=True)
        assert shown.vector is not None and len(shown.vector) == 576
        assert float(np.linalg.norm(np.array(shown.vector, np.float64))) == pytest.approx(made.norm, rel=1e-5)
        gen = list(c.generate("Hi", sampling={"max_tokens": 2},
                              steering={"vectors": [{"vector_id": made.id, "scale": 2.0}]}))
        assert gen[-1].finished
        assert c.delete_steering_vector(made.id)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.GetSteeringVector(pb.SteeringVectorRef(id=made.id), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "id" in (err.value.details() or "")


def _projection_reference(v: np.ndarray, w_dec: np.ndarray, top_k: int) -> tuple[list[int], np.ndarray]:
    """README's project_onto: the top_k decoder rows by |cosine| with v (ties: lower index),
    and v's least-squares reconstruction from them."""
    v = v.astype(np.float64)
    w = w_dec.astype(np.float64)
    cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (v / np.linalg.norm(v))
    chosen = sorted(range(len(cos)), key=lambda i: (-abs(cos[i]), i))[:top_k]
    basis = w[chosen].T
    coef = np.linalg.solve(basis.T @ basis, basis.T @ v)  # normal equations: a different route than the server's
    return chosen, basis @ coef


@pytest.mark.slow
def test_project_onto_stores_the_reconstruction_through_the_best_aligned_features(live_server):
    from safetensors.numpy import load_file

    from clients.grpc_client import SAEClient

    w_dec = load_file(str(live_server.dictionary_dir / "sae_weights.safetensors"))["W_dec"]
    top_k = 8
    with httpx.Client(base_url=live_server.base_url, timeout=300) as c:
        body = {"hook_point": HOOK, "positive": POSITIVE, "negative": NEGATIVE}
        plain = c.post("/v1/steering/vectors", json=body).json()
        r = c.post("/v1/steering/vectors", json={**body, "project_onto": {"dictionary": live_server.dictionary_id,
                                                                          "top_k": top_k}})
        assert r.status_code == 200, r.text
        info = r.json()
        assert "projection" not in plain
        full_plain = c.get(f"/v1/steering/vectors/{plain['id']}", params={"include_vector": "true"}).json()
        full = c.get(f"/v1/steering/vectors/{info['id']}", params={"include_vector": "true"}).json()
        for vid in (plain["id"], info["id"]):
            c.delete(f"/v1/steering/vectors/{vid}")
    v = np.array(full_plain["vector"], np.float64)
    got = np.array(full["vector"], np.float64)
    chosen, ref = _projection_reference(v, w_dec, top_k)
    p = info["projection"]
    assert (p["dictionary"], p["top_k"]) == (live_server.dictionary_id, top_k)
    assert [f["feature"] for f in p["features"]] == chosen
    assert float(np.linalg.norm(got - ref)) <= 1e-4 * float(np.linalg.norm(v))
    assert float(np.linalg.norm(got - v)) > 0.01 * float(np.linalg.norm(v))  # the projection did change it
    assert p["unprojected_norm"] == pytest.approx(float(np.linalg.norm(v)), rel=1e-4)
    assert p["explained"] == pytest.approx(float(ref @ ref) / float(v @ v), rel=1e-3)
    assert info["norm"] == pytest.approx(float(np.linalg.norm(got)), rel=1e-5)
    recon = sum(f["coefficient"] * w_dec[f["feature"]].astype(np.float64) for f in p["features"])
    assert float(np.linalg.norm(recon - got)) <= 1e-4 * float(np.linalg.norm(v))

    # gRPC: the same field and the same answer
    with SAEClient(live_server.grpc_target, timeout_s=300) as g:
        made = g.create_steering_vector({**body, "project_onto": {"dictionary": live_server.dictionary_id,
                                                                  "top_k": top_k}})
        assert made.projection is not None and [f.feature for f in made.projection.features] == chosen
        assert made.norm == pytest.approx(info["norm"], rel=1e-4)
        assert g.delete_steering_vector(made.id)


def test_project_onto_travels_over_grpc_both_ways():
    from sae_wire import convert as conv
    from sae_wire.models import SteeringVectorCreate

    req = SteeringVectorCreate.model_validate({"hook_point": "layers.6", "positive": ["a"], "negative": ["b"],
                                               "project_onto": {"dictionary": "d0", "top_k": 3}})
    assert conv.steering_vector_create_from_pb(conv.steering_vector_create_pb(req)) == req
    plain = req.model_copy(update={"project_onto": None})
    assert not conv.steering_vector_create_pb(plain).HasField("project_onto")
    info = INFO.model_copy(update={"projection": {
        "dictionary": "d0", "top_k": 2, "unprojected_norm": 2.0, "explained": 0.5,
        "features": [{"feature": 7, "coefficient": -1.5, "cosine": -0.75}, {"feature": 2, "coefficient": 0.5,
                                                                            "cosine": 0.25}]}})
    info = SteeringVectorInfo.model_validate(info.model_dump())
    assert conv.steering_vector_info_from_pb(conv.steering_vector_info_pb(info)) == info
    assert conv.steering_vector_info_from_pb(conv.steering_vector_info_pb(INFO)).projection is None


def test_projection_formula_on_a_known_basis():
    from server.service import project_onto_features

    w = np.zeros((4, 3))
    w[0], w[1], w[2] = [2.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, 0.0]  # row 3 is dead (norm 0)
    v = np.array([3.0, 1.0, 5.0])
    out, info = project_onto_features(v, w, "d", 2)
    # |cos|: row 1 5/√35 (negative, the largest), row 0 3/√35, row 2 4/√70, row 3 0
    assert [f.feature for f in info.features] == [1, 0]
    assert [f.cosine for f in info.features] == pytest.approx([-5 / 35 ** 0.5, 3 / 35 ** 0.5])
    assert out == pytest.approx([3.0, 0.0, 5.0])  # the span of rows 1 and 0 is the x-z plane
    assert [f.coefficient for f in info.features] == pytest.approx([-5.0, 1.5])
    assert info.explained == pytest.approx(34 / 35) and info.unprojected_norm == pytest.approx(35 ** 0.5)
    out, info = project_onto_features(np.zeros(3), w, "d", 1)  # a zero difference stays zero
    assert out == pytest.approx([0.0, 0.0, 0.0]) and info.explained == 0.0
