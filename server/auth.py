"""Optional API keys: ``Authorization: Bearer KEY`` over HTTP, ``authorization`` metadata over gRPC.

Keys come from ``--api-key`` (repeatable), ``SAE_SERVE_API_KEYS`` (comma-separated) or the
YAML ``api_keys`` list. Only their SHA-256 digests leave the ``sae-serve`` process: the
replicas (whose constructor arguments Ray stores in its control store) compare the digest
of the presented key with each configured digest using :func:`hmac.compare_digest`, always
over every digest, so neither timing nor an early exit tells which key nearly matched. Keys
and presented credentials are never logged; refusals say only "missing" or "invalid".

With keys set, every HTTP route but ``GET /health`` (the plain liveness answer; its
``?detail=1`` form needs a key, however the query is spelled: it is parsed the way
Starlette parses it for the route) and the playground's static page (``GET /``, ``/ui``,
``/ui/...``: no data in it) and every gRPC method but
``grpc.health.v1.Health/Check`` refuse a request without a valid key: 401 /
UNAUTHENTICATED. That holds in the replicas (this module's middleware and
:class:`server.grpc_service.SAEGrpcMethods`) and, for what Ray's proxies answer by
themselves (``/-/routes``, ``/-/healthz``, ``ray.serve.RayServeAPIService``), in the
proxies (:mod:`server.proxy_auth`). gRPC server reflection is turned off when keys are set.

This module imports nothing heavy at the top (it also runs inside Ray's proxy actors).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send


class GrpcCallContext(Protocol):
    """What the key check reads of a gRPC call's context (``grpc.aio.ServicerContext``)."""

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...


OPEN_HTTP_PATHS = frozenset({"/health"})
# gRPC methods answered without a key: the standard health check only (not Watch, which
# holds a stream open, and not Ray's own RayServeAPIService).
OPEN_GRPC_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
INVALID_KEY = "invalid API key"


def is_playground_request(scope: Scope) -> bool:
    """``GET``/``HEAD`` of ``/``, ``/ui`` or a file under ``/ui/`` (the playground's static page,
    which holds no data: its API calls carry the key). A path with a ``..`` segment is not."""
    if scope.get("method") not in ("GET", "HEAD"):
        return False
    path = scope.get("path", "")
    if path in ("/", "/ui"):
        return True
    return path.startswith("/ui/") and ".." not in path.split("/") and "\\" not in path


def is_open_http_request(scope: Scope) -> bool:
    """Whether an HTTP request may pass without a key: plain ``/health`` and the playground's
    static files (:func:`is_playground_request`).

    The query string is parsed exactly as Starlette parses it for the route
    (``parse_qsl(query.decode('latin-1'), keep_blank_values=True)``), so a
    percent-encoded ``d%65tail=1`` is the ``detail`` parameter here too.
    """
    if is_playground_request(scope):
        return True
    if scope.get("path", "") not in OPEN_HTTP_PATHS:
        return False
    query = (scope.get("query_string") or b"").decode("latin-1")
    return not any(name == "detail" for name, _ in parse_qsl(query, keep_blank_values=True))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class ApiKeys:
    """The configured key digests; :meth:`check` raises :class:`ApiError` (401) on a bad credential."""

    def __init__(self, digests: Iterable[str] = ()):
        self.digests = [bytes.fromhex(d) for d in digests]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def valid(self, token: str | None) -> bool:
        if token is None:
            return False
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        ok = False
        for d in self.digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(presented, d)
        return ok

    def problem(self, authorization: str | None) -> str | None:
        """None when the credential is accepted (or no keys are set), else why not (never the key)."""
        if not self.enabled:
            return None
        token = bearer_token(authorization)
        if token is None:
            return MISSING_KEY
        if not self.valid(token):
            return INVALID_KEY
        return None

    def check(self, authorization: str | None) -> None:
        """Accept (return) or raise 401; a no-op when no keys are configured."""
        why = self.problem(authorization)
        if why is not None:
            from server.errors import ApiError, ErrorKind

            raise ApiError(ErrorKind.UNAUTHENTICATED, why, "authorization")

    def check_grpc(self, grpc_context: GrpcCallContext | None) -> None:
        """The gRPC form: the ``authorization`` metadata entry (``Bearer <key>``)."""
        if not self.enabled:
            return
        self.check(grpc_authorization(grpc_context))


def grpc_authorization(grpc_context: GrpcCallContext | None) -> str | None:
    """The ``authorization`` metadata value of a gRPC call, if any."""
    if grpc_context is None:
        return None
    for key, v in grpc_context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return v.decode("latin-1") if isinstance(v, bytes) else v
    return None


def http_authorization(scope: Scope) -> str | None:
    for k, v in scope.get("headers", []):
        if k == b"authorization":
            return v.decode("latin-1")
    return None


async def send_unauthorized(send: Send, why: str) -> None:
    """The 401 answer (OpenAI error envelope, ``WWW-Authenticate: Bearer``)."""
    body = json.dumps({"error": {"message": f"authorization: {why}", "type": "authentication_error",
                                 "param": "authorization", "code": 401}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b'Bearer realm="sae-serve"')]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """ASGI middleware: refuse HTTP requests without a valid key (401, OpenAI error envelope)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or is_open_http_request(scope):
            await self.app(scope, receive, send)
            return
        why = self.keys.problem(http_authorization(scope))
        if why is not None:
            await send_unauthorized(send, why)
            return
        await self.app(scope, receive, send)
