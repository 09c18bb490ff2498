"""Hardening: the response budget, float32 overflow, the supervised feature side channel,
cancellation and error paths. Engine-free: the real FastAPI app, OpenAI handler, gRPC methods
and side-channel receiver run against a stand-in engine, so these run in seconds. The same
behaviour against a real server: tests/test_bad_input.py (budget and overflow cases) and
tests/test_faults.py (the side channel under load).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import zmq
from fastapi.testclient import TestClient

from sae_runtime.engine.engine import EngineConfig, FeatureTimeoutError, SAEEngine
from sae_runtime.engine.feature_channel import FeatureReceiver
from sae_runtime.engine.outputs import GenerationChunk
from sae_runtime.engine.spec import (
    FLOAT32_MAX,
    DictionaryInfo,
    FeatureRequest,
    ModelShape,
    SAERequestSpec,
    SpecError,
    SpecLimits,
    SteeringSpec,
    check_response_budget,
    validate_spec,
)
from sae_runtime.protocol import FeatureChunk, decode_message, encode_message
from sae_runtime.worker.feature_sender import FeatureSender
from server.errors import ApiError, translate
from server.grpc_service import GrpcRequestError, SAEGrpcMethods
from server.http_api import build_http_app
from server.metrics import ServiceMetrics
from server.openai_handler import OpenAIHandler
from server.openai_models import ChatCompletionRequest
from server.service import SAEService

D = "d0"
DICTS = {D: DictionaryInfo(id=D, hook_point="layers.6", d_sae=2048, k=None, decoder_norm_max=1.0)}
SHAPE = ModelShape(num_layers=30, hidden_size=8)


# -- a stand-in engine ----------------------------------------------------------------------------


class FakeEngine:
    """Enough of SAEEngine for the service: 1 token per word, streams scripted per choice."""

    model_name = "m"
    has_chat_template = True

    def __init__(self, max_model_len: int = 512, limits: SpecLimits | None = None, script: Any = None):
        self.config = SimpleNamespace(max_model_len=max_model_len)
        self.limits = limits or SpecLimits()
        self.llm = SimpleNamespace(errored=False)
        self.registry = SimpleNamespace(ids=lambda: [D])
        self.tokenizer = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
        self.script = script or (lambda index, n: n)  # per choice: how many chunks (or an exception)
        self.started: list[int] = []
        self.closed: list[int] = []
        self.receiver: Any = None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return list(range(sum(len(m["content"].split()) for m in messages) + 3))

    def encode_text(self, text: str) -> list[int]:
        return list(range(len(text.split()) + 1))

    def validate(self, spec: SAERequestSpec | None) -> None:
        if spec is not None:
            validate_spec(spec, DICTS, SHAPE, self.limits)

    async def generate(self, prompt_ids, params, spec=None, request_id=None):
        index = (params.seed or 0)
        self.started.append(index)
        try:
            plan = self.script(index, params.max_tokens)
            for i in range(10**9):
                if isinstance(plan, BaseException) and i == 1:
                    raise plan
                if isinstance(plan, int) and i >= plan:
                    return
                if plan == "forever" and i >= 1:
                    await asyncio.Event().wait()
                await asyncio.sleep(0)
                yield GenerationChunk(request_id=str(index), token_ids=[i], text=f"t{i}", num_generated_tokens=i + 1,
                                      finished=isinstance(plan, int) and i == plan - 1,
                                      finish_reason="length" if isinstance(plan, int) and i == plan - 1 else None)
        finally:
            self.closed.append(index)


def service_for(engine: FakeEngine, streams: int | None = 4) -> SAEService:
    return SAEService(engine, ServiceMetrics("test"), max_concurrent_streams=streams)  # type: ignore[arg-type]


# -- response budget ------------------------------------------------------------------------------


def test_budget_counts_tokens_values_dictionaries_and_choices():
    f = FeatureRequest(dictionaries=[D], top_k=64, feature_ids=list(range(1024)))
    with pytest.raises(SpecError) as err:
        check_response_budget(f, 300, 64, 16, 2_000_000)
    assert err.value.field == "features"
    msg = err.value.message
    assert "364 tokens × 1,088 values × 1 dictionary × 16 choices = 6,336,512 feature values" in msg, msg
    assert "max_response_feature_values" in msg and "2,000,000" in msg
    check_response_budget(f, 300, 64, 1, 2_000_000)  # one choice fits: 396,032
    # scope: prompt counts only the prompt, generated only max_tokens
    check_response_budget(f.model_copy(update={"scope": "prompt"}), 300, 10_000, 16, 300 * 1088 * 16)
    with pytest.raises(SpecError):
        check_response_budget(f.model_copy(update={"scope": "generated"}), 1, 300, 16, 300 * 1088 * 16 - 1)


def chat_req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "a b c d e f g"}], **kw)


FEATS_BIG = {"dictionaries": [D], "top_k": 64, "feature_ids": list(range(1024))}
STEER = {"edits": [{"dictionary": D, "feature": 1, "value": 2.0}]}


def test_budget_is_checked_before_generation_with_n_and_compare():
    engine = FakeEngine(limits=SpecLimits(max_response_feature_values=100_000))
    handler = OpenAIHandler(service_for(engine))
    # 10 prompt tokens + 8 = 18 tokens × 1088 values × 1 × 4 choices (n=2, compare) = 78,336: fits
    handler.plan_chat(chat_req(max_tokens=8, n=2, compare=True, steering=STEER, features=FEATS_BIG))
    with pytest.raises(ApiError) as err:  # n=4 with compare: 8 choices = 156,672
        handler.plan_chat(chat_req(max_tokens=8, n=4, compare=True, steering=STEER, features=FEATS_BIG))
    assert err.value.http_status == 400 and err.value.field == "features"
    assert "8 choices" in err.value.message and "lower max_tokens, n, top_k or feature_ids" in err.value.message
    assert engine.started == []  # nothing reached the engine


def test_budget_uses_the_context_when_max_tokens_is_absent():
    engine = FakeEngine(max_model_len=512, limits=SpecLimits(max_response_feature_values=100_000))
    handler = OpenAIHandler(service_for(engine))
    with pytest.raises(ApiError) as err:  # 10 prompt + 502 default max_tokens = 512 tokens × 1088
        handler.plan_chat(chat_req(features=FEATS_BIG))
    assert "512 tokens (10 prompt + 502 max_tokens (not given: the rest of the 512-token context))" in \
        err.value.message, err.value.message


def test_budget_over_http_streaming_and_extract_and_grpc():
    engine = FakeEngine(limits=SpecLimits(max_response_feature_values=10_000))
    service = service_for(engine)
    with TestClient(build_http_app(service, 100_000)) as http:
        for path, body in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                                      "stream": True, "features": FEATS_BIG}),
            ("/v1/completions", {"prompt": "hi there", "max_tokens": 20, "features": FEATS_BIG}),
            ("/v1/features/extract", {"text": "word " * 20, "features": FEATS_BIG}),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "features" and "max_response_feature_values" in r.text
    assert service.open_streams == 0 and engine.started == []
    from sae_wire import sae_serve_pb2 as pb

    m = grpc_methods(service)
    ctx = FakeContext()

    async def call():
        req = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=20),
                                 features=pb.FeatureRequest(dictionaries=[D], top_k=64, feature_ids=list(range(1024))))
        return [c async for c in m.Generate(req, ctx)]

    with pytest.raises(GrpcRequestError):
        asyncio.run(call())
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.max_tokens" in ctx.details()
    assert "max_response_feature_values" in ctx.details()


def test_budget_is_configurable():
    from server.config import ServeConfig

    cfg = ServeConfig(max_response_feature_values=1234)
    assert cfg.resolved_engine().limits["max_response_feature_values"] == 1234
    assert SpecLimits(**cfg.resolved_engine().limits).max_response_feature_values == 1234
    assert SpecLimits().max_response_feature_values == 2_000_000


# -- float32 overflow -----------------------------------------------------------------------------


@pytest.mark.parametrize("steering,field", [
    ({"vectors": [{"hook_point": "layers.6", "vector": [1e39] * 8}]}, "steering.vectors[0].vector[0]"),
    ({"vectors": [{"hook_point": "layers.6", "vector": [1.0] * 8, "scale": -1e39}]}, "steering.vectors[0].scale"),
    ({"vectors": [{"hook_point": "layers.6", "vector": [1e30] * 8, "scale": 1e10}]}, "steering.vectors[0].scale"),
    ({"vectors": [{"hook_point": "layers.6", "vector": [1e19] * 8}]}, "steering.vectors[0].scale"),  # norm 2.8e19
    ({"edits": [{"dictionary": D, "feature": 1, "value": 1e39}]}, "steering.edits[0].value"),
    ({"edits": [{"dictionary": D, "feature": 1, "mode": "scale", "value": -1e39}]}, "steering.edits[0].value"),
    ({"edits": [{"dictionary": D, "feature": 1, "mode": "clamp", "value": 1e30}]}, "steering.edits[0].value"),
])
def test_steering_numbers_that_overflow_float32_are_refused(steering, field):
    spec = SAERequestSpec(steering=SteeringSpec.model_validate(steering))
    with pytest.raises(SpecError) as err:
        validate_spec(spec, DICTS, SHAPE)
    assert err.value.field == field and not err.value.not_found
    assert "float32" in err.value.message


def test_large_but_representable_steering_is_served():
    for steering in ({"vectors": [{"hook_point": "layers.6", "vector": [1e9] * 8, "scale": 100.0}]},
                     {"edits": [{"dictionary": D, "feature": 1, "value": 1e6}]},
                     {"edits": [{"dictionary": D, "feature": 1, "mode": "scale", "value": 1e30}]}):
        validate_spec(SAERequestSpec(steering=SteeringSpec.model_validate(steering)), DICTS, SHAPE)
    assert FLOAT32_MAX == float(np.finfo(np.float32).max)


def test_overflow_over_http_is_400_naming_the_field():
    with TestClient(build_http_app(service_for(FakeEngine()), 1_000_000)) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                    "steering": {"vectors": [{"hook_point": "layers.6",
                                                                              "vector": [1e39] * 8}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].vector[0]", r.text


# -- the feature side channel ---------------------------------------------------------------------


def chunk(rid: str, positions: list[int], k: int = 2) -> FeatureChunk:
    n = len(positions)
    return FeatureChunk(rid, D, np.array(positions, dtype=np.int32), np.zeros((n, k), dtype=np.int32),
                        np.ones((n, k), dtype=np.float32))


@pytest.mark.parametrize("frames", [
    [b"not json", b""],
    [b"{}", b""],
    [json.dumps([{"rid": "r", "dict": D, "n": 2, "m": 2, "has_idx": True}]).encode(), b"\0" * 8],  # body short
    [json.dumps([{"rid": "r", "dict": D, "n": 1, "m": 2, "has_idx": False}]).encode(), b"\0" * 11],
    [json.dumps([{"rid": 5, "dict": D, "n": 0, "m": 0, "has_idx": False}]).encode(), b""],
    [json.dumps([{"rid": "r", "dict": D, "n": -1, "m": 2, "has_idx": False}]).encode(), b""],
    [json.dumps([]).encode(), b"extra"],  # body longer than the header says
    [json.dumps([{"rid": "r", "dict": D, "n": 1, "m": 1, "has_idx": False}]).encode(), b"\0" * 8, b""],  # 3 frames
    [json.dumps([]).encode()],  # no body
    [],
])
def test_decode_refuses_malformed_messages_with_one_error_type(frames):
    from sae_runtime.protocol import FeatureFrameError

    with pytest.raises(FeatureFrameError):
        decode_message(frames)


def test_decode_round_trip():
    out = decode_message([bytes(f) for f in encode_message([chunk("r", [3, 4])])])
    assert out[0].rid == "r" and out[0].positions.tolist() == [3, 4] and out[0].values.shape == (2, 2)


async def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_receiver_drops_and_counts_an_undecodable_frame_and_keeps_delivering():
    async def run():
        receiver = FeatureReceiver()
        receiver.start()
        sender = FeatureSender(receiver.address)
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(receiver.address)
        try:
            req = receiver.register("r1", [D])
            raw.send_multipart([b"\xff garbage"])
            raw.send_multipart([json.dumps([{"rid": "r1", "dict": D, "n": 5, "m": 2, "has_idx": True}]).encode()])
            sender.send([chunk("r1", [0, 1])])
            await _wait(lambda: req.covers(range(0, 2)))
            assert receiver.bad_frames == 2 and receiver.healthy and receiver.restarts == 0
            sender.send([chunk("r1", [2])])
            await _wait(lambda: req.covers(range(0, 3)))
        finally:
            raw.close(0)
            sender.close()
            receiver.close()

    asyncio.run(run())


def test_a_killed_receiver_restarts_itself_and_delivers_what_was_queued():
    async def run():
        receiver = FeatureReceiver()
        receiver.start()
        sender = FeatureSender(receiver.address)
        try:
            req = receiver.register("r1", [D])
            receiver._task.cancel()  # the receiving task dies
            sender.send([chunk("r1", [0])])  # sent while it is down
            await _wait(lambda: req.covers(range(0, 1)))
            assert receiver.restarts == 1 and receiver.healthy
        finally:
            sender.close()
            receiver.close()

    asyncio.run(run())


def test_a_receiver_that_keeps_dying_turns_the_replica_unhealthy():
    async def run():
        receiver = FeatureReceiver(max_restarts=2)
        receiver.start()
        service = service_for(FakeEngine())
        service.engine.receiver = receiver
        try:
            for _ in range(3):
                task = receiver._task
                task.cancel()
                await _wait(lambda task=task: task.done() and receiver._task is not task)
            assert not receiver.healthy and "stopped 3 times" in receiver.failure
            assert not service.engine_alive()  # what /health, gRPC health and Ray's check_health read
            body = await service.health(detail=True)
            assert body["status"] == "unhealthy" and "feature side channel" in body["reason"]
            assert body["feature_channel"]["restarts"] == 2
            with pytest.raises(ApiError) as err:  # feature requests: 503 at once
                service.check_engine(needs_features=True)
            assert err.value.http_status == 503
            service.check_engine()  # plain generation still runs until Ray replaces the replica
        finally:
            receiver.close()

    asyncio.run(run())


def test_fault_injection_route_exists_only_when_enabled_needs_a_key_and_kills_the_receiver(monkeypatch):
    """The hook tests/test_faults.py uses against a real server (server/faults.py)."""
    import httpx

    from server import deployment, faults
    from server.auth import ApiKeys, key_digest
    from server.config import ServeConfig

    key = "sk-fault-unit-0123"
    route = faults.FEATURE_CHANNEL_ROUTE
    monkeypatch.delenv(faults.FAULT_INJECTION_ENV, raising=False)
    assert not faults.enabled() and faults.FAULT_INJECTION_ENV not in deployment.replica_env(ServeConfig())
    monkeypatch.setenv(faults.FAULT_INJECTION_ENV, "1")
    assert deployment.replica_env(ServeConfig())[faults.FAULT_INJECTION_ENV] == "1"  # reaches every replica

    async def run():
        receiver = FeatureReceiver()
        receiver.start()
        engine = FakeEngine()
        engine.receiver = receiver
        service = service_for(engine)
        auth = {"Authorization": f"Bearer {key}"}
        plain = build_http_app(service, 100_000, ApiKeys([key_digest(key)]))
        faulty = build_http_app(service, 100_000, ApiKeys([key_digest(key)]), fault_injection=True)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="http://r") as c:
                assert (await c.post(route, json={"kill": "task"}, headers=auth)).status_code == 404
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=faulty), base_url="http://r") as c:
                assert (await c.post(route, json={"kill": "task"})).status_code == 401
                assert (await c.post(route, json={"kill": "everything"}, headers=auth)).status_code == 422
                r = await c.post(route, json={"kill": "task"}, headers=auth)
                assert r.status_code == 200 and r.json()["feature_channel_before"]["restarts"] == 0, r.text
                await _wait(lambda: receiver.restarts == 1 and receiver.healthy and not receiver._task.done())
                assert (await c.get("/health")).status_code == 200
                r = await c.post(route, json={"kill": "socket"}, headers=auth)
                assert r.status_code == 200, r.text
                await _wait(lambda: not receiver.healthy)
                h = await c.get("/health")
                assert h.status_code == 503 and "feature side channel" in h.json()["reason"], h.text
                r = await c.post(route, json={"kill": "task"}, headers=auth)  # nothing left to kill
                assert r.status_code == 503 and "not running" in r.json()["error"]["message"], r.text
        finally:
            receiver.close()
        # A receiver whose socket failed still releases its context and directory.
        assert receiver._ctx.closed and not os.path.exists(receiver._dir)

    asyncio.run(run())


def test_feature_channel_metrics_are_exported():
    async def run():
        receiver = FeatureReceiver()
        receiver.start()
        try:
            receiver.handle([b"junk"])
            engine = FakeEngine()
            engine.receiver = receiver
            text = service_for(engine).metrics.render().decode()
        finally:
            receiver.close()
        return text

    text = asyncio.run(run())
    assert 'sae_serve_feature_channel_bad_frames_total{replica="test"} 1.0' in text
    assert 'sae_serve_feature_channel_up{replica="test"} 1.0' in text


def test_channel_queues_are_bounded_and_a_full_one_drops_instead_of_blocking_forever(tmp_path):
    receiver_side = FeatureReceiver()
    try:
        assert receiver_side._sock.getsockopt(zmq.RCVHWM) > 0
    finally:
        receiver_side.close()
    # Nobody receives: the sender queues up to its high-water mark, then drops (counted).
    sender = FeatureSender(f"ipc://{tmp_path}/nobody.sock")
    assert sender._sock.getsockopt(zmq.SNDHWM) > 0
    sender._sock.setsockopt(zmq.SNDHWM, 2)
    sender._sock.setsockopt(zmq.SNDTIMEO, 20)
    t0 = time.monotonic()
    for _ in range(6):
        sender.send([chunk("r", [0])])
    sender.close()
    assert sender.dropped_messages >= 1 and time.monotonic() - t0 < 5


def test_a_feature_wait_that_times_out_is_a_503():
    async def run(healthy: bool):
        receiver = SimpleNamespace(healthy=healthy, failure=None if healthy else "the receiver stopped")
        engine = SAEEngine.__new__(SAEEngine)
        engine.config = EngineConfig(feature_timeout_s=0.2)
        engine.receiver = receiver
        from sae_runtime.engine.feature_channel import RequestFeatures

        t0 = time.monotonic()
        with pytest.raises(FeatureTimeoutError) as err:
            await engine._wait_for(RequestFeatures(dictionaries=[D]), range(0, 3))
        return err.value, time.monotonic() - t0

    exc, took = asyncio.run(run(True))
    api = translate(exc)
    assert api is not None and api.http_status == 503 and api.grpc_code == grpc.StatusCode.UNAVAILABLE
    assert "feature_timeout_s" in api.message and took < 2
    exc, took = asyncio.run(run(False))  # a failed channel fails the wait at once
    assert translate(exc).http_status == 503 and "receiver stopped" in str(exc) and took < 0.5
    # End to end through the app: a JSON 503, and an in-band 503 event in a stream.
    engine = FakeEngine(script=lambda i, n: FeatureTimeoutError("features did not arrive (feature_timeout_s)"))
    with TestClient(build_http_app(service_for(engine), 100_000), raise_server_exceptions=False) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and "feature_timeout_s" in r.json()["error"]["message"], r.text
        r = http.post("/v1/chat/completions", json={**body, "stream": True})
        assert r.status_code == 200 and '"type": "service_unavailable"' in r.text and "feature_timeout_s" in r.text


# -- cancellation and errors ----------------------------------------------------------------------


def test_a_stream_cancelled_before_its_body_starts_releases_its_slot_and_aborts_the_engine():
    engine = FakeEngine(script=lambda i, n: "forever")
    service = service_for(engine)
    app = build_http_app(service, 100_000)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
                       "n": 2, "seed": 0}).encode()

    async def run():
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
        sent = [{"type": "http.request", "body": body, "more_body": False}]
        started = asyncio.Event()

        async def receive():
            return sent.pop(0) if sent else await asyncio.Event().wait()

        async def send(message):
            if message["type"] == "http.response.start":
                started.set()
                await asyncio.Event().wait()  # the client is gone before the headers went out

        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(started.wait(), 10)
        assert service.open_streams == 1 and sorted(engine.started) == [0, 1]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert service.open_streams == 0
    assert sorted(engine.closed) == [0, 1]  # both engine requests aborted
    cancelled = service.metrics.requests.labels("test", "chat.completions", "http", "cancelled")._value.get()
    assert cancelled == 1


def test_one_failed_choice_cancels_its_siblings():
    engine = FakeEngine(script=lambda i, n: RuntimeError("choice 0 failed") if i == 0 else "forever")
    handler = OpenAIHandler(service_for(engine))
    req = chat_req(max_tokens=5, n=3, seed=0)

    async def run():
        plan = handler.plan_chat(req)
        with pytest.raises(RuntimeError, match="choice 0 failed"):
            await asyncio.wait_for(handler.chat(req, plan), 10)
        await asyncio.sleep(0.05)
        # The siblings were cancelled and their engine requests closed (aborted), not left
        # generating until the end of the event loop.
        assert sorted(engine.closed) == [0, 1, 2]

    asyncio.run(run())


class FakeContext:
    def __init__(self):
        self._code, self._details = None, None

    def invocation_metadata(self):
        return []

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details


def grpc_methods(service: SAEService) -> SAEGrpcMethods:
    m = SAEGrpcMethods()
    m.service = service
    m.max_request_bytes = 100_000
    return m


def test_unexpected_grpc_errors_are_internal_with_a_short_message(caplog):
    from sae_wire import sae_serve_pb2 as pb

    service = service_for(FakeEngine())

    async def boom(req):
        raise RuntimeError("secret detail at /srv/private/path")

    service.extract = boom  # type: ignore[method-assign]
    ctx = FakeContext()
    with caplog.at_level("ERROR", logger="sae_serve.grpc"):
        with pytest.raises(GrpcRequestError):
            asyncio.run(
                grpc_methods(service).ExtractFeatures(
                    pb.ExtractFeaturesRequest(text="hi", features=pb.FeatureRequest(dictionaries=[D])), ctx
                )
            )
    assert ctx.code() == grpc.StatusCode.INTERNAL
    assert ctx.details() == "internal error (RuntimeError); the server log has the details"
    assert "secret detail" in caplog.text and "Traceback" in caplog.text  # kept server-side


def test_an_oversized_chunked_body_is_413():
    with TestClient(build_http_app(service_for(FakeEngine()), 100_000)) as http:

        def chunks():
            yield b'{"text": "'
            for _ in range(30):
                yield b"a" * 10_000
            yield b'", "features": {"dictionaries": ["d0"]}}'

        r = http.post("/v1/features/extract", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "request_too_large"

        def small():  # a chunked body under the limit still reaches the route
            yield b'{"text": "hi", '
            yield b'"features": {"dictionaries": ["nope"]}}'

        r = http.post("/v1/features/extract", content=small(), headers={"content-type": "application/json"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "features.dictionaries[0]", r.text
