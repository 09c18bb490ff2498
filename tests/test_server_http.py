"""The HTTP API of the running server: the official openai SDK, feature endpoints, errors.

Numbers are checked against a transformers forward pass on the same checkpoint and the
dictionary's own encode (the same reference the engine tests use), over HTTP and gRPC.
"""

from __future__ import annotations

import os

import grpc
import httpx
import pytest
import torch

from tests.feature_reference import assert_close_where_decided, assert_topk_extraction_matches, decided
from tests.server_fixtures import DICTIONARY_ID

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Feature 3 of the test dictionary, added strongly at layer 6, visibly changes the answer.
STEER = {"edits": [{"dictionary": DICTIONARY_ID, "feature": 3, "mode": "add", "value": 40.0, "unit": "raw"}]}


@pytest.fixture
def client(live_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=300) as c:
        yield c


def test_health_models_and_dictionaries(http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["dictionaries"] == [DICTIONARY_ID]
    # the replica's engine bound its worker to every CPU (the server's default binding,
    # engine.cpu_threads_bind "all"), unless this environment sets the variable itself
    (worker,) = http.get("/health", params={"detail": 1}).json()["workers"]
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "all")
    every_cpu = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    assert worker["cpu_threads_bind"] == (every_cpu if bind == "all" else bind)
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert models[0]["supports_chat"] is True and models[0]["max_model_len"] == 512  # tests/server_fixtures.py
    (d,) = http.get("/v1/dictionaries").json()["data"]
    assert (d["id"], d["hook_point"], d["architecture"], d["d_sae"], d["k"]) == (
        DICTIONARY_ID,
        "layers.6",
        "topk",
        512,
        16,
    )


def test_chat_non_streaming_greedy_answer_and_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert r.choices[0].message.content.startswith("The capital of France is Paris")
    assert r.usage.prompt_tokens > 10 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_steered_with_compare_and_features(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body={"steering": STEER, "compare": True, "features": {"dictionaries": [DICTIONARY_ID], "top_k": 3}},
    )
    steered = r.choices[0].message.content
    unsteered = r.model_extra["unsteered"]["choices"][0]["message"]["content"]
    assert unsteered.startswith("The capital of France is Paris")
    assert steered != unsteered  # the edit changed the completion
    feats = r.choices[0].model_extra["features"]
    # Every prompt token and every generated token but the last, each with 3 features.
    assert len(feats) == r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert all(len(f["features"][0]["indices"]) == 3 for f in feats)
    assert [f["position"] for f in feats] == list(range(len(feats)))


def test_chat_streaming_with_and_without_steering(client):
    def run(extra):
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return chunks, text

    plain_chunks, plain = run({"features": {"dictionaries": [DICTIONARY_ID], "top_k": 2}})
    assert plain.startswith("The capital of France is")
    assert plain_chunks[-1].usage.completion_tokens in range(1, 9)
    per_chunk = [len((c.choices[0].model_extra or {}).get("features") or []) for c in plain_chunks if c.choices]
    assert per_chunk[0] == plain_chunks[-1].usage.prompt_tokens  # the first chunk carries the prompt's
    assert all(n == 1 for n in per_chunk[1:])  # then one token per chunk
    _, steered = run({"steering": STEER})
    assert steered != plain


def test_completions_endpoint_with_logprobs_seed_and_n(client):
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0.8, seed=7, n=2, logprobs=2
    )
    assert len(r.choices) == 2 and r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert all(
        len(tl) <= 2 and lp <= 0
        for c in r.choices
        for tl, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs, strict=True)
    )
    again = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0.8, seed=7, n=2
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible


def _reference(live_server, text: str) -> tuple[list[int], torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.default_model import prepare_default_model
    from sae_runtime.dictionary import SparseDictionary

    model_dir = prepare_default_model(progress=False)
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d = SparseDictionary.load(live_server.dictionary_dir)
    captured = {}
    handle = model.model.layers[d.layer].register_forward_hook(
        lambda m, a, out: captured.__setitem__("x", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    return ids, d, captured["x"][0].float()


def test_extraction_over_http_and_grpc_matches_reference(live_server, http):
    from clients.grpc_client import SAEClient

    text = "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in"
    ids, d, x = _reference(live_server, text)
    body = {"text": text, "features": {"dictionaries": [DICTIONARY_ID], "top_k": 8}}
    over_http = http.post("/v1/features/extract", json=body).json()["tokens"]
    with SAEClient(live_server.grpc_target) as c:
        over_grpc = c.extract(text, features=body["features"]).tokens
    assert [t["token_id"] for t in over_http] == ids == [t.token_id for t in over_grpc]
    assert [t["position"] for t in over_http] == list(range(len(ids)))
    # Against the reference (robust to rounding at the top-k boundary: tests/feature_reference.py).
    checked = assert_topk_extraction_matches(
        [t["features"][0]["values"] for t in over_http], [t["features"][0]["indices"] for t in over_http], d, x
    )
    assert checked > 50
    for t_http, t_grpc in zip(over_http, over_grpc, strict=True):
        (f,) = t_http["features"]
        # gRPC carries float32: the same numbers as HTTP to float32 precision (same engine).
        assert t_grpc.features[0].indices == f["indices"]
        torch.testing.assert_close(
            torch.tensor(t_grpc.features[0].values), torch.tensor(f["values"]), atol=1e-5, rtol=1e-6
        )
    fids = [0, 5, 300]
    by_id = http.post(
        "/v1/features/extract", json={"text": text, "features": {"dictionaries": [DICTIONARY_ID], "feature_ids": fids}}
    ).json()["tokens"]
    got = torch.tensor([t["features"][0]["values"] for t in by_id])
    assert_close_where_decided(got, d.encode(x)[:, fids], decided(d, x)[:, fids])


def test_feature_info_reads_the_unembedding(http):
    info = http.get(f"/v1/dictionaries/{DICTIONARY_ID}/features/3", params={"top_n": 4}).json()
    assert info["decoder_norm"] == pytest.approx(1.0, abs=1e-4)  # the factory's rows are unit vectors
    assert len(info["top_promoted"]) == 4 and len(info["top_suppressed"]) == 4
    assert info["top_promoted"][0]["score"] > 0 > info["top_suppressed"][0]["score"]
    assert info["top_promoted"][0]["score"] >= info["top_promoted"][-1]["score"]


def test_metrics_count_requests_tokens_and_steering(http, client):
    client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, temperature=0, extra_body={"steering": STEER}
    )
    text = http.get("/metrics").text
    for series in (
        "sae_serve_requests_total",
        "sae_serve_request_latency_seconds_bucket",
        "sae_serve_generated_tokens_total",
        "sae_serve_steered_requests_total",
        "sae_serve_extracted_tokens_total",
    ):
        assert series in text
    steered = [line for line in text.splitlines() if line.startswith("sae_serve_steered_requests_total")]
    assert float(steered[0].rsplit(" ", 1)[1]) >= 1


@pytest.mark.parametrize(
    "body,status,param",
    [
        (
            {"steering": {"edits": [{"dictionary": "nope", "feature": 1, "value": 1.0}]}},
            404,
            "steering.edits[0].dictionary",
        ),
        (
            {"steering": {"edits": [{"dictionary": DICTIONARY_ID, "feature": 4096, "value": 1.0}]}},
            404,
            "steering.edits[0].feature",
        ),
        (
            {"steering": {"edits": [{"dictionary": DICTIONARY_ID, "feature": 1, "mode": "add"}]}},
            422,
            "steering.edits.0",
        ),
        (
            {"steering": {"vectors": [{"hook_point": "layers.6", "vector": [1.0, 2.0]}]}},
            400,
            "steering.vectors[0].vector",
        ),
        ({"features": {"dictionaries": [DICTIONARY_ID], "top_k": 100000}}, 400, "features.top_k"),
        ({"temperature": 7}, 422, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"bogus_field": 1}, 400, "bogus_field"),
        ({"model": "gpt-4"}, 404, "model"),
        ({"max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "prompt"),
        ({"compare": True}, 400, "compare"),
    ],
)
def test_bad_chat_requests_are_refused_with_the_field_named(http, body, status, param):
    r = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_bad_feature_requests_and_oversized_bodies(http):
    assert http.get("/v1/dictionaries/nope/features/1").status_code == 404
    assert http.get(f"/v1/dictionaries/{DICTIONARY_ID}/features/512").status_code == 404
    r = http.post(
        "/v1/features/extract", json={"text": "hi", "messages": QUESTION, "features": {"dictionaries": [DICTIONARY_ID]}}
    )
    assert r.status_code == 422
    r = http.post(
        "/v1/features/extract",
        content=b'{"text": "' + b"a" * 300_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    r = http.post("/v1/features/extract", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # ...and the server still serves.
    ok = http.post("/v1/features/extract", json={"text": "hi", "features": {"dictionaries": [DICTIONARY_ID]}})
    assert ok.status_code == 200 and len(ok.json()["tokens"]) >= 1


def test_grpc_status_codes_for_bad_input(live_server):
    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(live_server.grpc_target) as ch:
        stub = pb_grpc.SAEServiceStub(ch)
        cases = [
            (
                pb.ExtractFeaturesRequest(text="x", features=pb.FeatureRequest(dictionaries=["nope"])),
                grpc.StatusCode.NOT_FOUND,
                "features.dictionaries[0]",
            ),
            (pb.ExtractFeaturesRequest(text="x"), grpc.StatusCode.INVALID_ARGUMENT, "features"),
            (
                pb.ExtractFeaturesRequest(text="word " * 600, features=pb.FeatureRequest(dictionaries=[DICTIONARY_ID])),
                grpc.StatusCode.INVALID_ARGUMENT,
                "tokens; the model's context",
            ),
            (
                pb.ExtractFeaturesRequest(text="a" * 300_000, features=pb.FeatureRequest(dictionaries=[DICTIONARY_ID])),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "limit",
            ),
        ]
        for req, code, needle in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.ExtractFeatures(req, timeout=120)
            assert err.value.code() == code and needle in err.value.details(), err.value.details()
        bad_edit = pb.GenerateRequest(
            text="x", steering=pb.Steering(edits=[pb.SteeringEdit(dictionary=DICTIONARY_ID, feature=99999, value=1.0)])
        )
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(bad_edit, timeout=120))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "steering.edits[0].feature" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.GetFeature(pb.GetFeatureRequest(dictionary="nope", feature=1), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Still serving.
        assert len(stub.ListDictionaries(pb.ListDictionariesRequest(), timeout=60).dictionaries) == 1
