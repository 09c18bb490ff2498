"""API keys (HTTP Bearer, gRPC metadata), the exposure warning, and what a request can never reach.

The key checks run against the real FastAPI app and the real gRPC methods with an
engine-free stand-in service (starting a server costs minutes here), Ray's own gRPC
server with sae-serve's proxy patch, and in-process gRPC servers for the clients. The
end-to-end checks (keys on Ray's own routes and RPCs, keys out of children and
Ray's job table, TLS) run against one real server started with two keys and TLS
(``tls_server``, module-scoped, eager); tests/test_faults.py checks keys end to end too.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import grpc
import pytest
from fastapi.testclient import TestClient

from server.auth import ApiKeys, bearer_token, key_digest
from server.cli import build_parser, config_from_args, exposure_warnings
from server.config import ServeConfig
from server.grpc_service import GrpcRequestError, SAEGrpcMethods
from server.http_api import build_http_app
from server.metrics import ServiceMetrics
from server.models import ExtractRequest, GenerateRequest
from server.service import SAEService

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-test-other-key-42"


class FakeRegistry:
    opened: ClassVar[list[str]] = []

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
    from sae_wire import sae_serve_pb2 as pb

    m = grpc_methods()

    async def call_all():
        results = []
        for name, req, streaming in [
            ("ListDictionaries", pb.ListDictionariesRequest(), False),
            ("GetFeature", pb.GetFeatureRequest(dictionary="d0", feature=1), False),
            ("GetDictionarySummary", pb.GetDictionarySummaryRequest(dictionary="d0"), False),
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
    from grpc_health.v1 import health_pb2

    from sae_wire import sae_serve_pb2 as pb

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
    # direct ingress: the replicas' gRPC servers bind every interface too
    assert not any("40000" in w for w in local)
    assert any("--direct-ingress" in w and "40000" in w for w in exposure_warnings(ServeConfig(direct_ingress=True)))
    assert exposure_warnings(ServeConfig(direct_ingress=True, api_keys=[KEY])) == []


def test_direct_ingress_addresses_leave_out_the_proxies_and_say_the_scheme():
    """The replicas' own addresses (printed once ready, listed in /health?detail=1) from Ray's
    controller target groups: the proxies' ports left out, HTTP on --host unless it binds
    every interface, https and TLS when TLS is on, HTTP first."""
    from server.launcher import direct_ingress_addresses

    def group(protocol: str, *targets: tuple[str, int]):
        return SimpleNamespace(protocol=SimpleNamespace(value=protocol.upper()),
                               targets=[SimpleNamespace(ip=ip, port=port) for ip, port in targets])

    groups = [group("grpc", ("10.0.0.5", 50051), ("10.0.0.5", 40000)),
              group("http", ("10.0.0.5", 8000), ("10.0.0.5", 30001), ("10.0.0.6", 30000))]
    plain = direct_ingress_addresses(ServeConfig(direct_ingress=True), groups)
    assert plain == [{"protocol": "http", "address": "http://127.0.0.1:30000/v1", "tls": False},
                     {"protocol": "http", "address": "http://127.0.0.1:30001/v1", "tls": False},
                     {"protocol": "grpc", "address": "10.0.0.5:40000", "tls": False}]
    cluster = direct_ingress_addresses(ServeConfig(direct_ingress=True, host="0.0.0.0"), groups)
    assert [a["address"] for a in cluster] == ["http://10.0.0.5:30001/v1", "http://10.0.0.6:30000/v1",
                                               "10.0.0.5:40000"]
    assert direct_ingress_addresses(ServeConfig(direct_ingress=True), [group("http", ("10.0.0.5", 8000))]) == []
    # a replica's copy of the config has no TLS files: it passes what the proxies' settings say
    tls = direct_ingress_addresses(ServeConfig(direct_ingress=True), groups, tls=True)
    assert [(a["address"], a["tls"]) for a in tls] == [("https://127.0.0.1:30000/v1", True),
                                                       ("https://127.0.0.1:30001/v1", True), ("10.0.0.5:40000", True)]


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
            for arg in (*getattr(f.annotation, "__args__", ()), f.annotation):
                for inner in (*getattr(arg, "__args__", ()), arg):
                    if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in seen:
                        seen.add(inner)
                        out += annotations(inner, seen)
        return out

    fields = []
    for model in (ChatCompletionRequest, CompletionRequest, ExtractRequest, GenerateRequest, FeatureRequest,
                  SteeringSpec):
        fields += annotations(model, set())
    text = "\n".join(fields)
    checked = text.replace("dict[str, typing.Any]", "")
    for banned in ("Path", "bytes", "Callable", "Any]"):
        assert banned not in checked, [f for f in fields if banned in f]
    # the type `object`, not a string literal such as response_format's 'json_object'
    assert not re.search(r"\bobject\b", checked), [f for f in fields if re.search(r"\bobject\b", f)]


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


# -- keys everywhere they are promised, keys out of children, clients, TLS ---------------

FLAG_KEY = "sk-flag-key-5e1d0c9b8a"  # given as --api-key on the live server's command line


def make_self_signed(directory) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("query", ["detail=1", "d%65tail=1", "%64etail=true", "detail", "x=1&detail=0",
                                   "detail=1&detail=0", "x=1;detail=1".replace(";", "&")])
def test_health_detail_needs_a_key_however_the_query_is_spelled(app_client, query):
    """Regression: ``/health?d%65tail=1`` was answered with the detail (the check looked for the
    bytes ``detail``; Starlette decodes the query)."""
    from server.auth import is_open_http_request

    r = app_client.get(f"/health?{query}")
    assert r.status_code == 401, (query, r.status_code, r.text)
    assert "open_streams" not in r.text
    assert not is_open_http_request({"path": "/health", "query_string": query.encode()})
    for fine in ("", "x=1", "details=1", "de%20tail=1"):  # no 'detail' parameter: plain /health
        r = app_client.get(f"/health?{fine}" if fine else "/health")
        assert r.status_code == 200 and "open_streams" not in r.json(), (fine, r.text)


def _asgi_call(app, path: str, query: bytes = b"", headers=()) -> tuple[int, bytes]:
    out: dict = {"status": None, "body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return out["status"], out["body"]


def test_proxy_refuses_rays_own_routes_without_a_key(monkeypatch):
    """Regression: ``GET /-/routes`` was answered by Ray's proxy without a key. The proxy callback
    now puts the key check in front of everything the proxy answers (outermost middleware)."""
    from server import proxy_auth, proxy_health

    reached: list[str] = []

    async def ray_proxy(scope, receive, send):  # stands for Ray's HTTP proxy (it answers /-/routes itself)
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"/":"sae-serve"}'})

    monkeypatch.setattr(proxy_auth, "load_settings", lambda: {"api_key_digests": [key_digest(KEY)]})
    monkeypatch.setattr(proxy_auth, "_installed", {})
    from ray.serve._private import default_impl

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)  # undone after the test
    middlewares = proxy_health.proxy_middlewares()
    assert middlewares[-1].cls is proxy_auth.ProxyApiKeys  # applied last = runs first
    app = middlewares[-1].cls(ray_proxy, *middlewares[-1].args, **middlewares[-1].kwargs)
    for path in ("/-/routes", "/-/healthz", "/v1/models", "/anything"):
        for headers in ((), ((b"authorization", b"Bearer wrong-key-123"),)):
            status, body = _asgi_call(app, path, headers=headers)
            assert status == 401 and b"authorization" in body, (path, status, body)
    assert _asgi_call(app, "/health", b"d%65tail=1")[0] == 401
    assert reached == []
    assert _asgi_call(app, "/-/routes", headers=((b"authorization", f"Bearer {KEY}".encode()),))[0] == 200
    assert _asgi_call(app, "/health")[0] == 200
    assert reached == ["/-/routes", "/health"]
    # Without keys the proxy lets everything through, as before.
    assert _asgi_call(proxy_auth.ProxyApiKeys(ray_proxy, ApiKeys()), "/-/routes")[0] == 200


def test_grpc_watch_needs_a_key_check_does_not():
    """Regression: ``Health/Watch`` held streams open for anyone; now only ``Check`` is open."""
    from grpc_health.v1 import health_pb2

    m = grpc_methods()

    async def watch(ctx):
        async for resp in m.Watch(health_pb2.HealthCheckRequest(service=""), ctx):
            return resp

    ctx = FakeContext()
    with pytest.raises(GrpcRequestError):
        asyncio.run(watch(ctx))
    assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in ctx.details()
    ok = FakeContext([("authorization", f"Bearer {KEY}")])
    assert asyncio.run(watch(ok)).status == health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(m.Check(health_pb2.HealthCheckRequest(service=""), FakeContext())).status == \
        health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_proxy_grpc_guard_and_tls_on_rays_own_grpc_server(tmp_path, monkeypatch):
    """Ray's gRPC proxy server (``start_grpc_server``, as the proxy actor starts it) with the
    sae-serve patch: Ray's ``ListApplications``/``Healthz`` and ``Health/Watch`` need the key,
    ``Health/Check`` does not; with TLS the port speaks TLS only."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray.serve._private import default_impl
    from ray.serve._private.grpc_util import start_grpc_server
    from ray.serve.config import gRPCOptions
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    from server import proxy_auth
    from server.grpc_service import SERVICER_FUNCTIONS

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)
    monkeypatch.setattr(proxy_auth, "_installed", {})
    cert, key = make_self_signed(tmp_path)
    calls: list[str] = []

    def factory(service_method, streaming_type):  # stands for Ray's gRPCProxy.service_handler_factory
        if getattr(streaming_type, "value", streaming_type) == "unary_stream":
            async def stream(request, context):
                calls.append(service_method)
                yield b""
            return stream

        async def unary(request, context):
            calls.append(service_method)
            return b""
        return unary

    good = (("authorization", f"Bearer {KEY}"),)

    async def probe(tls: bool) -> dict:
        port = _free_port()
        _, server = await start_grpc_server(
            factory, gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS, enable_reflection=False),
            event_loop=asyncio.get_running_loop())
        target = f"127.0.0.1:{port}"
        got = {}
        try:
            creds = grpc.ssl_channel_credentials(open(cert, "rb").read()) if tls else None
            async with (grpc.aio.secure_channel(target, creds) if tls else grpc.aio.insecure_channel(target)) as ch:
                ray_api = serve_pb2_grpc.RayServeAPIServiceStub(ch)
                health = health_pb2_grpc.HealthStub(ch)

                async def watch(md):
                    async for _ in health.Watch(health_pb2.HealthCheckRequest(), metadata=md, timeout=10):
                        return

                for name, call in [
                    ("ListApplications", lambda md: ray_api.ListApplications(serve_pb2.ListApplicationsRequest(),
                                                                             metadata=md, timeout=10)),
                    ("Healthz", lambda md: ray_api.Healthz(serve_pb2.HealthzRequest(), metadata=md, timeout=10)),
                    ("Watch", watch),
                    ("Check", lambda md: health.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)),
                ]:
                    for label, md in (("none", None), ("wrong", (("authorization", "Bearer nope-nope-nope"),)),
                                      ("good", good)):
                        try:
                            await call(md)
                            got[(name, label)] = "OK"
                        except grpc.aio.AioRpcError as exc:
                            got[(name, label)] = exc.code().name
            if tls:  # a plaintext client gets nothing from a TLS port
                async with grpc.aio.insecure_channel(target) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    got["plaintext"] = err.value.code().name
        finally:
            await server.stop(0)
        return got

    for tls in (False, True):
        proxy_auth.install({"api_key_digests": [key_digest(KEY)],
                            "tls": {"cert": cert, "key": key} if tls else None})
        calls.clear()
        got = asyncio.run(probe(tls))
        for name in ("ListApplications", "Healthz", "Watch"):
            assert got[(name, "none")] == got[(name, "wrong")] == "UNAUTHENTICATED", (tls, name, got)
            assert got[(name, "good")] == "OK", (tls, name, got)
        assert got[("Check", "none")] == got[("Check", "good")] == "OK", got
        # Refused calls never reached Ray's handler (that is, never a replica).
        assert sorted(calls) == sorted(["/ray.serve.RayServeAPIService/ListApplications",
                                        "/ray.serve.RayServeAPIService/Healthz", "/grpc.health.v1.Health/Watch"]
                                       + ["/grpc.health.v1.Health/Check"] * 3), calls
        if tls:
            assert got["plaintext"] == "UNAVAILABLE"


def test_keys_leave_the_environment_and_rays_entrypoint(monkeypatch):
    """Regression: the keys stayed in the environment every Ray/vLLM child inherits, and Ray
    recorded ``--api-key K`` as the job's entrypoint."""
    import ray._private.utils as ray_utils

    from server import launcher
    from server.cli import hide_keys

    monkeypatch.setenv("SAE_SERVE_API_KEYS", f"{KEY},{OTHER}")
    monkeypatch.setenv("SAE_SERVE_API_KEY", OTHER)
    config = config_from_args(build_parser().parse_args(["--api-key", FLAG_KEY]))
    assert len(config.api_keys) == 3
    hide_keys(config, rewrite_title=False)
    import os

    assert "SAE_SERVE_API_KEYS" not in os.environ and "SAE_SERVE_API_KEY" not in os.environ
    monkeypatch.setattr(ray_utils, "get_entrypoint_name",
                        lambda: f'"/venv/bin/sae-serve --api-key {FLAG_KEY} --api-key={KEY} --http-port 1" "" ""')
    with launcher.entrypoint_without_keys(config):
        recorded = ray_utils.get_entrypoint_name()
    assert recorded == '"/venv/bin/sae-serve --api-key *** --api-key=*** --http-port 1"'
    assert FLAG_KEY in ray_utils.get_entrypoint_name()  # restored afterwards


class _RecordingServicer:
    """An in-process SAEService gRPC server that records the metadata of each call."""

    def __init__(self, tls: tuple[str, str] | None = None):
        from concurrent import futures

        from sae_wire import sae_serve_pb2 as pb
        from sae_wire import sae_serve_pb2_grpc as pb_grpc

        self.seen: list[dict] = []
        outer = self

        class Servicer(pb_grpc.SAEServiceServicer):
            def ListDictionaries(self, request, context):
                md = dict(context.invocation_metadata())
                outer.seen.append(md)
                if md.get("authorization") != f"Bearer {KEY}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing API key")
                return pb.ListDictionariesResponse(dictionaries=[pb.DictionaryInfo(id="d0", model="m")])

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_SAEServiceServicer_to_server(Servicer(), self.server)
        port = _free_port()
        if tls:
            cert, key = tls
            creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
            self.server.add_secure_port(f"127.0.0.1:{port}", creds)
        else:
            self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.target = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def test_both_python_clients_and_sae_client_send_the_key(monkeypatch, capsys):
    """Regression: neither client could send a key."""
    from clients import cli as client_cli
    from clients.grpc_client import AsyncSAEClient, SAEClient

    server = _RecordingServicer()
    try:
        with SAEClient(server.target, api_key=KEY, retry_attempts=1) as c:
            assert [d.id for d in c.list_dictionaries()] == ["d0"]

        async def async_call():
            async with AsyncSAEClient(server.target, api_key=KEY, retry_attempts=1, application="sae-serve") as c:
                return await c.list_dictionaries()

        assert [d.id for d in asyncio.run(async_call())] == ["d0"]
        assert server.seen[-1]["application"] == "sae-serve"
        with SAEClient(server.target, retry_attempts=1) as c, pytest.raises(grpc.RpcError) as err:
            c.list_dictionaries()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ValueError):
            SAEClient(server.target, api_key="two words")

        monkeypatch.delenv("SAE_SERVE_API_KEY", raising=False)
        assert client_cli.main(["--target", server.target, "dictionaries"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert client_cli.main(["--target", server.target, "--api-key", KEY, "dictionaries"]) == 0
        monkeypatch.setenv("SAE_SERVE_API_KEY", KEY)
        assert client_cli.main(["--target", server.target, "dictionaries"]) == 0
        assert "d0" in capsys.readouterr().out
    finally:
        server.stop()
    assert all(md.get("authorization") in (None, f"Bearer {KEY}") for md in server.seen)


def test_clients_speak_tls_with_a_self_signed_certificate(tmp_path, monkeypatch, capsys):
    from clients import cli as client_cli
    from clients.grpc_client import SAEClient

    cert, key = make_self_signed(tmp_path)
    server = _RecordingServicer(tls=(cert, key))
    try:
        with SAEClient(server.target, api_key=KEY, tls_ca=cert, retry_attempts=1) as c:
            assert [d.id for d in c.list_dictionaries()] == ["d0"]
        with SAEClient(server.target, api_key=KEY, tls_ca=open(cert, "rb").read(), retry_attempts=1) as c:
            assert [d.id for d in c.list_dictionaries()] == ["d0"]
        with SAEClient(server.target, api_key=KEY, retry_attempts=1, timeout_s=5) as c, \
                pytest.raises(grpc.RpcError):
            c.list_dictionaries()  # plaintext to a TLS port
        monkeypatch.setenv("SAE_SERVE_API_KEY", KEY)
        assert client_cli.main(["--target", server.target, "--tls-ca", cert, "dictionaries"]) == 0
        assert "d0" in capsys.readouterr().out
    finally:
        server.stop()


def test_tls_settings_are_checked_at_start(tmp_path):
    cert, key = make_self_signed(tmp_path)
    config = config_from_args(build_parser().parse_args(["--tls-cert", cert, "--tls-key", key]))
    assert config.tls_enabled and config.tls_cert == cert
    assert "cert.pem" not in config.replica_config_json()  # only the proxies use them
    for args in (["--tls-cert", cert], ["--tls-key", key], ["--tls-cert", cert, "--tls-key", str(tmp_path / "no")],
                 ["--tls-cert", key, "--tls-key", cert]):
        with pytest.raises(Exception) as err:
            config_from_args(build_parser().parse_args(args))
        assert "tls" in str(err.value)


# -- the live server: keys (one from SAE_SERVE_API_KEYS, one from --api-key) and TLS ----------------
# One server for all of them, started as a user starts it (eager, to start sooner): the key
# probes of the key checks run against it over HTTPS / gRPC+TLS, so TLS is checked along the way.
# It runs with --direct-ingress, so the replica's own ports get the same checks
# (test_live_direct_ingress_...).

LIVE_ENV_KEY = "sk-live-env-key-3c2b1a0f9e"


@pytest.fixture(scope="module")
def tls_server(default_model_dir, tmp_path_factory):
    from tests.dictionary_factory import make_dictionary
    from tests.server_fixtures import start_server

    tmp = tmp_path_factory.mktemp("sae_serve_tls")
    cert, key = make_self_signed(tmp)
    dictionary = make_dictionary(tmp / "topk6", layer=6, d_sae=512, architecture="topk", k=16, seed=1)
    server = start_server(tmp, dictionary, ("--eager", "--tls-cert", cert, "--tls-key", key, "--api-key", FLAG_KEY,
                                            "--direct-ingress"),
                          {"SAE_SERVE_API_KEYS": LIVE_ENV_KEY}, tls_ca=Path(cert))
    yield server
    _rc, left = server.stop()
    assert not left, f"processes left after SIGTERM: {left}"


LIVE_AUTH = {"Authorization": f"Bearer {LIVE_ENV_KEY}"}


@pytest.mark.slow
def test_live_http_every_route_but_plain_health_needs_a_key(tls_server):
    import httpx

    base = tls_server.base_url
    with httpx.Client(verify=tls_server.verify, timeout=60) as c:
        h = c.get(f"{base}/health")
        assert h.status_code == 200 and "open_streams" not in h.json()
        for path in ("/health?d%65tail=1", "/health?detail=1", "/-/routes", "/-/healthz", "/v1/models", "/metrics"):
            r = c.get(f"{base}{path}")
            assert r.status_code == 401, (path, r.status_code, r.text)
            assert r.json()["error"]["param"] == "authorization"
            assert c.get(f"{base}{path}", headers={"Authorization": "Bearer wrong-key-123"}).status_code == 401
        for auth in (LIVE_AUTH, {"Authorization": f"Bearer {FLAG_KEY}"}):  # the env key and the flag key
            d = c.get(f"{base}/health?d%65tail=1", headers=auth)
            assert d.status_code == 200 and "open_streams" in d.json(), d.text
            assert c.get(f"{base}/-/routes", headers=auth).json() == {"/": "sae-serve"}
            assert c.get(f"{base}/-/healthz", headers=auth).status_code == 200
            assert c.get(f"{base}/v1/models", headers=auth).status_code == 200
    # HTTPS only: plain HTTP to the port gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/health", timeout=10)
    # sae-serve prints its ready line after Ray's proxies answer, so it may still be coming.
    ready = f"https://127.0.0.1:{tls_server.http_port}/v1"
    deadline = time.monotonic() + 120
    while ready not in (log := tls_server.log_path.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ready in log, log[-3000:]
    assert LIVE_ENV_KEY not in log and FLAG_KEY not in log


@pytest.mark.slow
def test_live_grpc_every_rpc_but_check_needs_a_key_over_tls(tls_server, monkeypatch, capsys):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    from clients import cli as client_cli
    from clients.grpc_client import SAEClient

    creds = grpc.ssl_channel_credentials(tls_server.tls_ca.read_bytes())
    good = [("authorization", f"Bearer {LIVE_ENV_KEY}")]
    with grpc.secure_channel(tls_server.grpc_target, creds) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=60).status == \
            health_pb2.HealthCheckResponse.SERVING  # open
        # Watch x40 without a key: every one refused at once, none held open.
        for _ in range(40):
            with pytest.raises(grpc.RpcError) as err:
                next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60, metadata=good)
        assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        ray_api = serve_pb2_grpc.RayServeAPIServiceStub(ch)
        for call, req in ((ray_api.ListApplications, serve_pb2.ListApplicationsRequest()),
                          (ray_api.Healthz, serve_pb2.HealthzRequest())):
            with pytest.raises(grpc.RpcError) as err:
                call(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call(req, timeout=30, metadata=good)
        assert list(ray_api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=30,
                                             metadata=good).application_names) == ["sae-serve"]
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as err:  # reflection is off with keys
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=30, metadata=good))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(tls_server.grpc_target) as plain, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)
    with SAEClient(tls_server.grpc_target, api_key=FLAG_KEY, tls_ca=str(tls_server.tls_ca)) as c:
        assert [d.id for d in c.list_dictionaries()] == [tls_server.dictionary_id]
    with SAEClient(tls_server.grpc_target, tls_ca=str(tls_server.tls_ca), retry_attempts=1) as c, \
            pytest.raises(grpc.RpcError) as err:
        c.list_dictionaries()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv("SAE_SERVE_API_KEY", LIVE_ENV_KEY)
    argv = ["--target", tls_server.grpc_target, "--tls-ca", str(tls_server.tls_ca)]
    assert client_cli.main([*argv, "extract", "Paris is", "-d", tls_server.dictionary_id, "-k", "2"]) == 0
    assert "Paris" in capsys.readouterr().out


def _direct_ingress_ports(server, timeout_s: float = 120) -> tuple[int, int]:
    """The replica's own HTTPS and gRPC ports under --direct-ingress: listed by /health?detail=1
    (through the proxy, with a key) and printed by sae-serve once ready, the same in both."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while "direct ingress: a replica answers gRPC" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, server.log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    health = httpx.get(f"{server.base_url}/health?detail=1", headers=LIVE_AUTH, verify=server.verify, timeout=60)
    assert health.status_code == 200, health.text
    addresses = health.json()["direct_ingress"]
    log = server.log_path.read_text(errors="replace")
    for a in addresses:  # (Ray's forwarded log lines may come between the two)
        where = f"HTTP on {a['address']}" if a["protocol"] == "http" else f"gRPC over TLS on {a['address']}"
        assert f"sae-serve: direct ingress: a replica answers {where}\n" in log, (a, log[-3000:])
    http = [a for a in addresses if a["protocol"] == "http"]
    grpc_ = [a for a in addresses if a["protocol"] == "grpc"]
    assert len(http) == len(grpc_) == 1 and http[0]["tls"] and grpc_[0]["tls"], addresses
    h = re.fullmatch(r"https://127\.0\.0\.1:(\d+)/v1", http[0]["address"])
    g = re.fullmatch(r"[\d.]+:(\d+)", grpc_[0]["address"])
    assert h and g, addresses
    return int(h.group(1)), int(g.group(1))


@pytest.mark.slow
def test_live_direct_ingress_replica_ports_keep_keys_tls_and_answers(tls_server):
    """--direct-ingress: the replica's own HTTPS and gRPC ports (printed once ready) need the
    keys and TLS like the proxy's, and answer what the proxy answers."""
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from clients.grpc_client import SAEClient

    http_port, grpc_port = _direct_ingress_ports(tls_server)
    assert {http_port, grpc_port}.isdisjoint({tls_server.http_port, tls_server.grpc_port})
    replica, proxy = f"https://127.0.0.1:{http_port}", tls_server.base_url
    body = {"model": "default", "prompt": "The history of Paris", "max_tokens": 6, "temperature": 0.0,
            "features": {"dictionaries": [tls_server.dictionary_id], "top_k": 3}}
    with httpx.Client(verify=tls_server.verify, timeout=120) as c:
        h = c.get(f"{replica}/health")
        assert h.status_code == 200 and "open_streams" not in h.json()
        for path in ("/health?detail=1", "/v1/models"):
            r = c.get(f"{replica}{path}")
            assert r.status_code == 401 and r.json()["error"]["param"] == "authorization", (path, r.text)
        assert c.post(f"{replica}/v1/completions", json=body).status_code == 401
        body["model"] = c.get(f"{replica}/v1/models", headers=LIVE_AUTH).json()["data"][0]["id"]
        direct = c.post(f"{replica}/v1/completions", json=body, headers=LIVE_AUTH)
        via_proxy = c.post(f"{proxy}/v1/completions", json=body, headers=LIVE_AUTH)
    assert direct.status_code == via_proxy.status_code == 200, (direct.text, via_proxy.text)
    d, p = direct.json()["choices"][0], via_proxy.json()["choices"][0]
    assert d["text"] == p["text"] and d["text"]
    d_ids = [[f["indices"] for f in t["features"]] for t in d["features"]]
    assert d_ids == [[f["indices"] for f in t["features"]] for t in p["features"]] and len(d_ids) > 5
    with pytest.raises(httpx.HTTPError):  # HTTPS only, as at the proxy
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
    target = f"127.0.0.1:{grpc_port}"
    with SAEClient(target, api_key=FLAG_KEY, tls_ca=str(tls_server.tls_ca)) as c:
        assert [x.id for x in c.list_dictionaries()] == [tls_server.dictionary_id]
    with SAEClient(target, tls_ca=str(tls_server.tls_ca), retry_attempts=1) as c, \
            pytest.raises(grpc.RpcError) as err:
        c.list_dictionaries()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError):  # TLS only
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)


def _environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


@pytest.mark.slow
def test_live_keys_never_reach_children_or_rays_job_table(tls_server):
    """Regression: every Ray and vLLM child inherited SAE_SERVE_API_KEYS, and Ray stored the
    ``--api-key K`` command line as the job's entrypoint."""
    import psutil

    secrets = [LIVE_ENV_KEY.encode(), FLAG_KEY.encode()]
    tree = tls_server.snapshot_tree()
    root, children = tree[0], tree[1:]
    names = []
    for p in children:
        try:
            env, cmd = _environ(p.pid), " ".join(p.cmdline())
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        names.append(cmd)
        for s in secrets:
            assert s not in env, f"key in the environment of {p.pid} {cmd[:100]}"
            assert s.decode() not in cmd, f"key on the command line of {p.pid} {cmd[:100]}"
        assert b"SAE_SERVE_API_KEYS=" not in env and b"SAE_SERVE_API_KEY=" not in env, cmd[:100]
    joined = " ".join(names)
    assert "raylet" in joined and "gcs_server" in joined and "SAEDeployment" in joined and "VLLM" in joined, joined
    # The command itself no longer shows the --api-key value (its title is rewritten), and the
    # rewrite cleared the environment block the kernel kept from its start.
    assert FLAG_KEY not in " ".join(root.cmdline()) and "--api-key ***" in " ".join(root.cmdline())
    assert all(s not in _environ(root.pid) for s in secrets)

    # Ray's job table, read from the GCS of this server.
    import os
    import re
    import subprocess
    import sys

    raylet_cmd = " ".join(next(" ".join(p.cmdline()) for p in children
                               if p.name() == "raylet" or "/raylet " in " ".join(p.cmdline())).split())
    gcs_address = re.search(r"--gcs-address=(\S+)", raylet_cmd).group(1)
    # In a child process: a local ray.init turns on Ray's token authentication (RAY_AUTH_MODE=token
    # in the server's children, the token in ~/.ray/auth_token), which a client must use too.
    script = ("import json, sys\nfrom ray._raylet import GcsClient\n"
              "jobs = GcsClient(address=sys.argv[1]).get_all_job_info()\n"
              "print(json.dumps([[j.entrypoint, j.SerializeToString().hex()] for j in jobs.values()]))\n")
    auth_mode = "token" if any(b"RAY_AUTH_MODE=token" in _environ(p.pid) for p in children
                               if "/raylet " in " ".join(p.cmdline())) else "disabled"
    out = subprocess.run([sys.executable, "-c", script, gcs_address], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RAY_AUTH_MODE=auth_mode))
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = json.loads(out.stdout.strip().splitlines()[-1])
    entrypoints = [e for e, _ in jobs]
    assert any("sae-serve" in e and "--api-key ***" in e for e in entrypoints), entrypoints
    for entrypoint, blob in jobs:
        assert all(s not in bytes.fromhex(blob) for s in secrets), entrypoint
    # Nor anywhere in this Ray session's files (logs, runtime resources).
    session = re.search(r"--session_dir=(\S+)", raylet_cmd)
    assert session, "no --session_dir on the raylet's command line"
    leaked = []
    for path in Path(session.group(1)).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                leaked += [str(path) for s in secrets if s in data]
        except OSError:
            continue
    assert not leaked, leaked
