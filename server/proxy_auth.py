"""API keys and TLS in Ray Serve's proxies, for what the proxies answer by themselves.

The replicas check keys on every route and RPC of ours, but Ray Serve's proxies answer some
requests without a replica: HTTP ``/-/routes`` and ``/-/healthz``, and gRPC
``ray.serve.RayServeAPIService/ListApplications`` and ``/Healthz``. Ray 2.60 has no
setting to turn those off or to protect them, so sae-serve puts its own checks in front,
from inside the proxy actor:

- HTTP: :class:`ProxyApiKeys`, an ASGI middleware installed through Ray Serve's
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook (see :mod:`server.proxy_health`): with
  keys set, every request but plain ``GET /health`` needs ``Authorization: Bearer KEY``
  (401 otherwise), Ray's ``/-/*`` routes included; requests without a valid key never
  reach a replica.
- gRPC: Ray's proxy builds its gRPC server with no interceptors and adds its port with
  ``ray.serve._private.default_impl.add_grpc_address``. The same hook (which runs in the
  proxy actor's constructor, before its gRPC server starts) replaces that function with
  :func:`_add_grpc_address`, which wraps the server's per-method handler factory with a
  key check (every method but ``grpc.health.v1.Health/Check``: UNAUTHENTICATED) and, with
  TLS configured, adds the port with ``add_secure_port``. Ray's passthrough services
  (server reflection) bypass that factory, so :mod:`server.launcher` turns reflection off
  when keys are set.

What the proxies need (the keys' SHA-256 digests, never the keys; the TLS certificate and
key *paths*) is published by :func:`publish` in Ray's internal key-value store (the GCS)
before ``serve.start``, and read once by each proxy when it starts: so it reaches the
proxies on every node of a cluster, and nothing secret goes through environments. A proxy
that cannot read it fails to start (Ray retries it) rather than serve without keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth import (
    OPEN_GRPC_METHODS,
    ApiKeys,
    grpc_authorization,
    http_authorization,
    is_open_http_request,
    send_unauthorized,
)

if TYPE_CHECKING:
    from ray.serve._private.grpc_util import gRPCGenericServer

logger = logging.getLogger("sae_serve.proxy_auth")

KV_NAMESPACE = "sae-serve"
KV_KEY = b"proxy_security"


def settings_json(digests: list[str], tls_cert: str | None = None, tls_key: str | None = None) -> str:
    return json.dumps({"api_key_digests": list(digests),
                       "tls": {"cert": tls_cert, "key": tls_key} if tls_cert and tls_key else None})


def publish(digests: list[str], tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Driver side, after ``ray.init`` and before ``serve.start``."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(KV_KEY, settings_json(digests, tls_cert, tls_key), overwrite=True, namespace=KV_NAMESPACE)


def load_settings() -> dict[str, Any]:
    """Proxy side: what :func:`publish` stored ({} when sae-serve's launcher did not start this Serve)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        raise RuntimeError("sae-serve proxy security: not connected to Ray's GCS; refusing to start without keys")
    raw = _internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else {}


_installed: dict[str, Any] = {}


def install(settings: dict[str, Any] | None = None) -> ApiKeys:
    """In the proxy actor: read the settings, patch Ray's gRPC proxy, return the keys for HTTP."""
    if settings is None:
        settings = load_settings()
    keys = ApiKeys(settings.get("api_key_digests") or [])
    tls = settings.get("tls") or None
    _installed.update(keys=keys, tls=(tls["cert"], tls["key"]) if tls else None)
    from ray.serve._private import default_impl

    if not getattr(default_impl.add_grpc_address, "_sae_serve", False):
        _installed["original_add_grpc_address"] = default_impl.add_grpc_address
        default_impl.add_grpc_address = _add_grpc_address
    if keys.enabled or tls:
        logger.info("sae-serve proxy: API keys %s, gRPC TLS %s", "on" if keys.enabled else "off",
                    "on" if tls else "off")
    return keys


def _add_grpc_address(grpc_server: gRPCGenericServer, server_address: str) -> None:
    """Replaces ``default_impl.add_grpc_address`` in the proxy (see the module docstring)."""
    import grpc

    keys: ApiKeys = _installed.get("keys") or ApiKeys()
    if keys.enabled:
        grpc_server.service_handler_factory = guarded_handler_factory(grpc_server.service_handler_factory, keys)
    tls = _installed.get("tls")
    if tls:
        cert_path, key_path = tls
        with open(cert_path, "rb") as f:
            cert = f.read()
        with open(key_path, "rb") as f:
            key = f.read()
        grpc_server.add_secure_port(server_address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        _installed["original_add_grpc_address"](grpc_server, server_address)


_add_grpc_address._sae_serve = True  # type: ignore[attr-defined]


def guarded_handler_factory(factory: Callable[..., Any], keys: ApiKeys) -> Callable[..., Any]:
    """Wrap Ray's gRPC handler factory: each method but the open ones checks the key first."""
    import grpc

    async def refuse_if_bad(context: Any) -> None:
        why = keys.problem(grpc_authorization(context))
        if why is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {why}")

    def make(service_method: str, streaming_type: Any) -> Callable[..., Any]:
        inner = factory(service_method=service_method, streaming_type=streaming_type)
        if service_method in OPEN_GRPC_METHODS:
            return inner
        kind = getattr(streaming_type, "value", streaming_type)
        if kind in ("unary_unary", "stream_unary"):
            async def unary(request: Any, context: Any) -> Any:
                await refuse_if_bad(context)
                return await inner(request, context)

            return unary

        async def streaming(request: Any, context: Any) -> Any:
            await refuse_if_bad(context)
            async for message in inner(request, context):
                yield message

        return streaming

    return make


class ProxyApiKeys:
    """ASGI middleware in Ray's HTTP proxy: with keys set, only plain ``/health`` passes without one."""

    def __init__(self, app: ASGIApp, keys: ApiKeys | None = None):
        self.app = app
        self.keys = keys if keys is not None else ApiKeys()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or not self.keys.enabled \
                or (kind == "http" and is_open_http_request(scope)):
            await self.app(scope, receive, send)
            return
        why = self.keys.problem(http_authorization(scope))
        if why is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send_unauthorized(send, why)
