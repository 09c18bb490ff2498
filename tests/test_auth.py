"""API keys (HTTP Bearer, gRPC metadata), the exposure warning, and what a request can never reach.

The key checks run against the real FastAPI app and the real gRPC methods with an
engine-free stand-in service (starting a server costs minutes here); the end-to-end check
against a real server started with a key is in tests/test_faults.py, which needs its own
server anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from types import SimpleNamespace

import grpc
import pytest
from fastapi.testclient import TestClient

from server.auth import ApiKeys, bearer_token, key_digest
from server.cli import build_parser, config_from_args, exposure_warnings
from server.config import ServeConfig
from server.grpc_service import SAEGrpcMethods
from server.http_api import build_http_app
from server.metrics import ServiceMetrics
from server.models import ExtractRequest, GenerateRequest
from server.service import SAEService

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-test-other-key-42"


class FakeRegistry:
    opened: list[str] = []

    def ids(self) -> list[str]:
        return ["d0"]

    def get(self, name: str):
        from sae_runtime.registry import UnknownDictionaryError

        self.opened.append(name)
        raise UnknownDictionaryError(name)

    def describe(self) -> list[dict]:
        return [{"id": "d0", "model": "m", "hook_point": "layers.6", "architecture": "topk", "d_in": 8, "d_sae": 16,
                 "k": 4}]


def fake_service() -> SAEService:
    engine = SimpleNamespace(model_name="m", registry=FakeRegistry(), config=SimpleNamespace(max_model_len=64),
                             llm=SimpleNamespace(errored=False))
    return SAEService(engine, ServiceMetrics("test"), max_concurrent_streams=2)  # type: ignore[arg-type]


@pytest.fixture
def app_client():
    app = build_http_app(fake_service(), 100_000, ApiKeys([key_digest(KEY), key_digest(OTHER)]))
    with TestClient(app) as c:
        yield c


def test_bearer_parsing_and_constant_time_check():
    assert bearer_token(f"Bearer {KEY}") == KEY and bearer_token(f"bearer  {KEY} ") == KEY
    assert bearer_token(KEY) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    keys = ApiKeys([key_digest(KEY)])
    assert keys.valid(KEY) and not keys.valid(KEY[:-1]) and not keys.valid("") and not keys.valid(None)
    assert not ApiKeys().enabled and ApiKeys().check(None) is None  # no keys: everything passes
    src = inspect.getsource(ApiKeys.valid)
    assert "compare_digest" in src and "return" not in src.split("for d in")[1].split("\n")[1]  # no early exit


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/v1/dictionaries"), ("GET", "/metrics"),
                                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/features/extract"), ("GET", "/v1/dictionaries/d0/features/1"),
                                         ("GET", "/health?detail=1"), ("GET", "/docs"), ("GET", "/openapi.json")])
def test_http_routes_refuse_missing_or_wrong_keys(app_client, headers, method, path):
    r = app_client.request(method, path, headers=headers, json={"messages": []} if method == "POST" else None)
    assert r.status_code == 401, (path, r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == "authorization" and err["type"] == "authentication_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert KEY not in r.text and "wrong-key" not in r.text  # never echoed


def test_http_accepts_either_key_and_health_stays_open(app_client):
    for key in (KEY, OTHER):
        r = app_client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
    h = app_client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and "open_streams" not in h.json()
    d = app_client.get("/health?detail=1", headers={"Authorization": f"Bearer {KEY}"})
    assert d.status_code == 200 and d.json()["open_streams"] == 0
    # Authenticated but malformed: the normal validation answer, not 401.
    bad = app_client.post("/v1/features/extract", content=b"{x",
                          headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert bad.status_code == 422


class FakeContext:
    def __init__(self, metadata=()):
        self.metadata = list(metadata)
        self._code, self._details = None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details


def grpc_methods() -> SAEGrpcMethods:
    m = SAEGrpcMethods()
    m.service = fake_service()
    m.api_keys = ApiKeys([key_digest(KEY)])
    m.max_request_bytes = 100_000
    return m


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope-nope-nope"),), (("authorization", KEY),),
                                      (("x-api-key", KEY),)])
def test_grpc_methods_refuse_missing_or_wrong_keys(metadata):
    from clients.proto import sae_serve_pb2 as pb

    m = grpc_methods()

    async def call_all():
        results = []
        for name, req, streaming in [
            ("ListDictionaries", pb.ListDictionariesRequest(), False),
            ("GetFeature", pb.GetFeatureRequest(dictionary="d0", feature=1), False),
            ("ExtractFeatures", pb.ExtractFeaturesRequest(text="x"), False),
            ("Generate", pb.GenerateRequest(text="x"), True),
        ]:
            ctx = FakeContext(metadata)
            with pytest.raises(Exception) as err:
                if streaming:
                    async for _ in getattr(m, name)(req, ctx):
                        pass
                else:
                    await getattr(m, name)(req, ctx)
            results.append((name, ctx.code(), ctx.details(), str(err.value)))
        return results

    for name, code, details, _ in asyncio.run(call_all()):
        assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, details)
        assert "authorization" in details and KEY not in details
    assert m.service.open_streams == 0  # a refused Generate holds no stream slot


def test_grpc_accepts_the_key_and_health_check_stays_open():
    from clients.proto import sae_serve_pb2 as pb
    from grpc_health.v1 import health_pb2

    m = grpc_methods()
    ctx = FakeContext([("authorization", f"Bearer {KEY}")])
    resp = asyncio.run(m.ListDictionaries(pb.ListDictionariesRequest(), ctx))
    assert [d.id for d in resp.dictionaries] == ["d0"] and ctx.code() is None
    health = asyncio.run(m.Check(health_pb2.HealthCheckRequest(service=""), FakeContext()))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    m.service.engine.llm.errored = True  # a dead engine reads NOT_SERVING
    health = asyncio.run(m.Check(health_pb2.HealthCheckRequest(service=""), FakeContext()))
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_keys_from_flags_env_and_file_reach_replicas_as_digests_only(tmp_path, monkeypatch, capsys):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# comment\n{OTHER}\n")
    monkeypatch.setenv("SAE_SERVE_API_KEYS", f" {KEY} ,another-key-777")
    config = config_from_args(build_parser().parse_args(["--api-key", "flag-key-99999", "--api-key-file",
                                                         str(key_file)]))
    assert {k.get_secret_value() for k in config.api_keys} == {KEY, OTHER, "another-key-777", "flag-key-99999"}
    shipped = config.replica_config_json() + json.dumps(config.api_key_digests())
    for k in config.api_keys:
        assert k.get_secret_value() not in shipped and k.get_secret_value() not in repr(config)
    assert hashlib.sha256(KEY.encode()).hexdigest() in config.api_key_digests()
    assert ServeConfig.model_validate_json(config.replica_config_json()).api_keys == []
    with pytest.raises(Exception) as err:
        ServeConfig(api_keys=["short"])
    assert "short" not in str(err.value)  # a refused key is not echoed either
    assert exposure_warnings(config) == []


def test_binding_beyond_loopback_without_keys_warns():
    exposed = exposure_warnings(ServeConfig(host="0.0.0.0"))
    assert any("WARNING" in w and "0.0.0.0" in w for w in exposed)
    local = exposure_warnings(ServeConfig())
    assert not any("WARNING" in w for w in local)  # only the note about Ray's gRPC bind address
    assert exposure_warnings(ServeConfig(host="0.0.0.0", api_keys=[KEY])) == []


def test_no_request_field_is_code_a_pickle_or_a_path():
    """Request models hold only plain data, and no field names a file: dictionaries and the
    model are ids looked up among what was loaded at start, never opened from a request."""
    from pydantic import BaseModel

    from sae_runtime.engine.spec import FeatureRequest, SteeringSpec
    from server.openai_models import ChatCompletionRequest, CompletionRequest

    def annotations(model: type[BaseModel], seen: set) -> list[str]:
        out = []
        for name, f in model.model_fields.items():
            out.append(f"{model.__name__}.{name}: {f.annotation}")
            for arg in getattr(f.annotation, "__args__", ()) + (f.annotation,):
                for inner in getattr(arg, "__args__", ()) + (arg,):
                    if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in seen:
                        seen.add(inner)
                        out += annotations(inner, seen)
        return out

    fields = []
    for model in (ChatCompletionRequest, CompletionRequest, ExtractRequest, GenerateRequest, FeatureRequest,
                  SteeringSpec):
        fields += annotations(model, set())
    text = "\n".join(fields)
    for banned in ("Path", "bytes", "Callable", "Any]", "object"):
        assert banned not in text.replace("dict[str, typing.Any]", ""), [f for f in fields if banned in f]


def test_dictionary_and_model_fields_are_ids_not_paths(app_client):
    """A path in the dictionary/model field is only an unknown id: 404, nothing opened."""
    h = {"Authorization": f"Bearer {KEY}"}
    for path in ("/etc/passwd", "../../etc/passwd", "d0/../../../etc"):
        r = app_client.get(f"/v1/dictionaries/{path}/features/1", headers=h)
        assert r.status_code == 404, r.text
    # The real registry: a lookup in the dict of dictionaries loaded at start, nothing else.
    from sae_runtime.registry import DictionaryRegistry

    src = inspect.getsource(DictionaryRegistry.get)
    assert "open(" not in src and "Path(" not in src and "load" not in src
