"""``GET /health`` that answers even while no replica is running (in Ray Serve's HTTP proxy).

Ray Serve's proxy queues a request for a deployment that has no running replica until one
is up, so while a replica restarts (its actor died, or it failed its health check because
its vLLM engine died) a plain ``/health`` route would hang for the minute a replica takes to
start. This ASGI middleware runs *inside the proxy* (installed through Ray Serve's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook, which :mod:`server.launcher` sets
before Ray starts): for ``/health`` it asks the Serve controller (cached for a second)
whether the deployment has a RUNNING replica. If none, it answers ``503`` at once with
the replica states; otherwise it forwards the request to a replica, whose own ``/health``
checks its engine (503 while the engine is dead), and answers ``503`` itself if the
replica does not answer within :data:`FORWARD_TIMEOUT_S`.

A second middleware, :class:`ProxyErrors`, gives the answers that Ray's proxy makes
itself the same JSON shape as the replicas' errors. When the replica serving a request
is lost (its process or its node died) Ray's proxy sends no response and uvicorn answers
a bare ``500 Internal Server Error``; clients get ``503`` (retryable) with
``{"error": {"message", "type": "service_unavailable", ...}}`` instead. Answers from
replicas (always JSON, or a 200 stream) pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from starlette.middleware import Middleware

APP_NAME = "sae-serve"  # = server.config.APP_NAME (not imported: keep the proxy's import light)
DEPLOYMENT_NAME = "SAEDeployment"
CACHE_S = 1.0
FORWARD_TIMEOUT_S = 10.0
PROXY_ERROR_STATUSES = (408, 429, 500, 502, 503, 504)  # what Ray's proxy answers by itself


def proxy_middlewares() -> list[Middleware]:
    """The callback Ray Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``).

    It also installs sae-serve's API-key checks and gRPC TLS in the proxy
    (:mod:`server.proxy_auth`; it raises, so the proxy does not start, when the settings
    cannot be read). Ray applies the list in order, each wrapping the previous: the key
    check (last) runs first.
    """
    from starlette.middleware import Middleware

    from server import proxy_auth

    keys = proxy_auth.install()
    return [Middleware(ProxyErrors), Middleware(HealthGate), Middleware(proxy_auth.ProxyApiKeys, keys=keys)]


async def replica_states() -> dict[str, int]:
    """Replica state -> count for the sae-serve deployment, from the Serve controller."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = await controller.get_serve_instance_details.remote()
    app = (details.get("applications") or {}).get(APP_NAME) or {}
    dep = (app.get("deployments") or {}).get(DEPLOYMENT_NAME) or {}
    states: dict[str, int] = {}
    for r in dep.get("replicas") or []:
        state = str(r.get("state", "UNKNOWN")).rsplit(".", 1)[-1]
        states[state] = states.get(state, 0) + 1
    return states


class HealthGate:
    def __init__(self, app: ASGIApp):
        self.app = app
        self._cached: tuple[float, dict[str, int]] | None = None

    async def _states(self) -> dict[str, int]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > CACHE_S:
            self._cached = (now, await asyncio.wait_for(replica_states(), 5.0))
        return self._cached[1]

    @staticmethod
    async def _answer(send: Send, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/health":
            await self.app(scope, receive, send)
            return
        try:
            states = await self._states()
        except Exception as exc:  # controller unreachable: say so rather than guess
            reason = f"serve controller: {type(exc).__name__}"
            await self._answer(send, 503, {"status": "unavailable", "reason": reason})
            return
        if not states.get("RUNNING"):
            await self._answer(send, 503, {"status": "unavailable", "reason": "no replica is running",
                                           "replicas": states})
            return
        # Forward to a replica, buffering its answer so that a timeout can still send a 503.
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, capture), FORWARD_TIMEOUT_S)
        except Exception as exc:
            if not any(m["type"] == "http.response.start" for m in messages):
                reason = "the replica did not answer in time" if isinstance(exc, asyncio.TimeoutError) \
                    else f"the replica failed: {type(exc).__name__}"
                await self._answer(send, 503, {"status": "unavailable", "reason": reason, "replicas": states})
                return
        for m in messages:
            await send(m)


class ProxyErrors:
    """Answer in sae-serve's JSON error shape where Ray's proxy has no proper answer.

    Two cases, both outside any replica: the request's replica was lost (Ray's proxy then
    sends no response at all, and uvicorn would answer a bare ``500 Internal Server
    Error``), and the proxy's own plain-text errors (503 while no replica is available,
    429 / 408). Replicas' answers (JSON errors, 200 bodies and streams) pass untouched.
    """

    LOST = ("no replica answered this request: the one serving it was lost (its process or node stopped) or "
            "could not be reached; retry the request")

    def __init__(self, app: ASGIApp):
        self.app = app

    @staticmethod
    async def _error(send: Send, status: int, message: str, detail: str) -> None:
        await HealthGate._answer(send, status, {"error": {"message": message, "type": "service_unavailable",
                                                          "param": None, "code": status, "detail": detail}})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None
        body = b""

        async def forward(message: Message) -> None:
            nonlocal started, held, body
            if message["type"] == "http.response.start":
                started = True
                headers = dict((k.lower(), v) for k, v in message.get("headers", []))
                if message["status"] in PROXY_ERROR_STATUSES \
                        and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held = message  # the proxy's own plain-text error: rewrite once its body is complete
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body += message.get("body", b"")
                if message.get("more_body"):
                    return
                text = body.decode(errors="replace").strip()[:300] or f"HTTP {held['status']}"
                status = 503 if held["status"] == 500 else held["status"]
                await self._error(send, status, self.LOST if held["status"] == 500 else
                                  f"the server could not serve the request: {text}", text)
                return
            await send(message)

        try:
            await self.app(scope, receive, forward)
        except Exception as exc:
            if started:
                raise
            await self._error(send, 503, self.LOST, f"{type(exc).__name__}: {exc}"[:300])
            return
        if not started:  # the proxy gave up on the request without answering it
            await self._error(send, 503, self.LOST, "the proxy sent no response")
