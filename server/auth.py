"""Optional API keys: ``Authorization: Bearer KEY`` over HTTP, ``authorization`` metadata over gRPC.

Keys come from ``--api-key`` (repeatable), ``SAE_SERVE_API_KEYS`` (comma-separated) or the
YAML ``api_keys`` list. Only their SHA-256 digests leave the ``sae-serve`` process: the
replicas (whose constructor arguments Ray stores in its control store) compare the digest
of the presented key with each configured digest using :func:`hmac.compare_digest`, always
over every digest, so neither timing nor an early exit tells which key nearly matched. Keys
and presented credentials are never logged; refusals say only "missing" or "invalid".

With keys set, every HTTP route but ``GET /health`` (the plain liveness answer; its
``?detail=1`` form needs a key) and every gRPC method but ``grpc.health.v1.Health``
refuse a request without a valid key: 401 / UNAUTHENTICATED. gRPC server reflection is
answered by Ray's proxy itself and stays open (it only describes the public proto).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ApiError, ErrorKind

OPEN_HTTP_PATHS = frozenset({"/health"})


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

    def check(self, authorization: str | None) -> None:
        """Accept (return) or raise 401; a no-op when no keys are configured."""
        if not self.enabled:
            return
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(ErrorKind.UNAUTHENTICATED,
                           "missing API key: send the header 'Authorization: Bearer <key>'", "authorization")
        if not self.valid(token):
            raise ApiError(ErrorKind.UNAUTHENTICATED, "invalid API key", "authorization")

    def check_grpc(self, grpc_context: Any) -> None:
        """The gRPC form: the ``authorization`` metadata entry (``Bearer <key>``)."""
        if not self.enabled:
            return
        value = None
        if grpc_context is not None:
            for key, v in grpc_context.invocation_metadata() or ():
                if key.lower() == "authorization":
                    value = v.decode("latin-1") if isinstance(v, bytes) else v
                    break
        self.check(value)


class ApiKeyMiddleware:
    """ASGI middleware: refuse HTTP requests without a valid key (401, OpenAI error envelope)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or self._open(scope):
            await self.app(scope, receive, send)
            return
        header = None
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        try:
            self.keys.check(header)
        except ApiError as exc:
            body = json.dumps({"error": {"message": str(exc), "type": exc.kind.value, "param": exc.field,
                                         "code": exc.http_status}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Bearer realm="sae-serve"')]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _open(scope: Scope) -> bool:
        path = scope.get("path", "")
        if path not in OPEN_HTTP_PATHS:
            return False
        return b"detail" not in (scope.get("query_string") or b"")
