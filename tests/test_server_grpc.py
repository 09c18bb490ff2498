"""The gRPC API of the running server: Generate streams, health, reflection, the clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.server_fixtures import DICTIONARY_ID

pytestmark = pytest.mark.slow

STEER = {"edits": [{"dictionary": DICTIONARY_ID, "feature": 3, "mode": "add", "value": 40.0, "unit": "raw"}]}


def test_generate_stream_with_features_and_steering(live_server):
    from clients.grpc_client import SAEClient

    with SAEClient(live_server.grpc_target) as c:
        chunks = list(c.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                 sampling={"max_tokens": 8, "temperature": 0},
                                 features={"dictionaries": [DICTIONARY_ID], "top_k": 2, "scope": "generated"}))
        assert len(chunks) >= 2  # streamed, not one message
        text = "".join(ch.text for ch in chunks)
        assert text.startswith("The capital of France is Paris")
        last = chunks[-1]
        assert last.finished and last.usage is not None and last.usage.completion_tokens == sum(
            len(ch.token_ids) for ch in chunks)
        feats = [f for ch in chunks for f in ch.features]
        assert feats and all(not f.is_prompt and len(f.features[0].indices) == 2 for f in feats)
        assert len(feats) == last.usage.completion_tokens - 1  # the last token is never read
        steered = "".join(ch.text for ch in c.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            sampling={"max_tokens": 8, "temperature": 0}, steering=STEER))
        assert steered != text


def test_top_k_and_feature_ids_together_come_back_over_grpc_as_over_http(live_server):
    """Asked together, top_k and feature_ids both come back over gRPC (the top-k in
    indices/values, the asked ids' values in feature_values), equal to HTTP's answer."""
    import httpx

    from clients.grpc_client import SAEClient
    from sae_wire.models import ExtractResponse

    text = "The Eiffel Tower is in Paris"

    def http_extract(features: dict) -> ExtractResponse:
        r = httpx.post(f"{live_server.base_url}/v1/features/extract", json={"text": text, "features": features},
                       timeout=120, verify=live_server.verify)
        assert r.status_code == 200, r.text
        return ExtractResponse.model_validate(r.json())

    # Ask for features that fire (the strongest two of the last token) and one that may not.
    strongest = http_extract({"dictionaries": [DICTIONARY_ID], "top_k": 2}).tokens[-1].features[0].indices
    features = {"dictionaries": [DICTIONARY_ID], "top_k": 3, "feature_ids": [*strongest, 511]}
    expected = http_extract(features)
    with SAEClient(live_server.grpc_target) as c:
        got = c.extract(text, features=features)
        chunks = list(c.generate(text, sampling={"max_tokens": 3, "temperature": 0},
                                 features={**features, "scope": "generated"}))

    assert len(got.tokens) == len(expected.tokens) > 2
    for g, e in zip(got.tokens, expected.tokens, strict=True):
        (gd,), (ed,) = g.features, e.features
        assert gd.feature_values is not None, f"gRPC dropped feature_values (token {g.position})"
        assert len(gd.indices) == 3 and len(gd.values) == 3 and len(gd.feature_values) == 3
        assert (g.position, g.token_id, gd.indices) == (e.position, e.token_id, ed.indices)
        assert gd.values == pytest.approx(ed.values, rel=1e-6)
        assert gd.feature_values == pytest.approx(ed.feature_values, rel=1e-6)
    last = got.tokens[-1].features[0]
    assert last.feature_values[:2] == pytest.approx(last.values[:2], rel=1e-6)  # the same features, both ways
    streamed = [d for ch in chunks for t in ch.features for d in t.features]
    assert streamed and all(len(d.indices) == 3 and len(d.feature_values or []) == 3 for d in streamed)


def test_async_client_lists_dictionaries_and_features(live_server):
    from clients.grpc_client import AsyncSAEClient

    async def go():
        async with AsyncSAEClient(live_server.grpc_target) as c:
            dicts = await c.list_dictionaries()
            info = await c.get_feature(DICTIONARY_ID, 3, top_n=3)
            tokens = [t async for t in c.generate("Paris is", sampling={"max_tokens": 3, "temperature": 0})]
            return dicts, info, tokens

    dicts, info, chunks = asyncio.run(go())
    assert [(d.id, d.hook_point, d.d_sae, d.k) for d in dicts] == [(DICTIONARY_ID, "layers.6", 512, 16)]
    assert len(info.top_promoted) == 3 and info.decoder_norm == pytest.approx(1.0, abs=1e-4)
    assert sum(len(ch.token_ids) for ch in chunks) == 3


def test_standard_health_service_and_reflection(live_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(live_server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "sae_serve.v1.SAEService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (listing,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=60))
        names = {s.name for s in listing.list_services_response.service}
        assert {"sae_serve.v1.SAEService", "grpc.health.v1.Health"} <= names
        (desc,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="sae_serve.v1.SAEService")]), timeout=60))
        assert desc.file_descriptor_response.file_descriptor_proto  # the proto is discoverable


def test_sae_client_cli_prints_tokens_with_features(live_server):
    cli = Path(sys.executable).parent / "sae-client"
    out = subprocess.run([str(cli), "--target", live_server.grpc_target, "extract", "Hello world",
                          "-d", DICTIONARY_ID, "-k", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and "'Hello'" in lines[0] and f"[{DICTIONARY_ID}] #" in lines[0]
    bad = subprocess.run([str(cli), "--target", live_server.grpc_target, "extract", "x", "-d", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    steer = subprocess.run([str(cli), "--target", live_server.grpc_target, "steer", "The capital of France is",
                            "-e", f"{DICTIONARY_ID}:3:add:40", "--unit", "raw", "--max-tokens", "4", "--compare"],
                           capture_output=True, text=True, timeout=120)
    assert steer.returncode == 0 and "--- steered" in steer.stdout and "--- unsteered" in steer.stdout
