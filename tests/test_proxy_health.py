"""Unit tests of the middleware that runs in Ray's HTTP proxy (``server.proxy_health.ProxyErrors``).

The end-to-end proof is ``tests/test_faults.py`` (replica killed) and
``tests/test_multinode.py`` (node killed): there the lost requests must get a JSON 503.
Here each case of the rewrite runs against a small ASGI app that behaves as Ray's proxy
does in that case.
"""

from __future__ import annotations

import asyncio
import json

from server.proxy_health import ProxyErrors

SCOPE = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}


def run(app) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(ProxyErrors(app)(dict(SCOPE), receive, send))
    return sent


def answer(sent: list[dict]) -> tuple[int, dict[bytes, bytes], bytes]:
    start = [m for m in sent if m["type"] == "http.response.start"]
    assert len(start) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start[0]["status"], dict(start[0]["headers"]), body


def respond(status: int, content_type: bytes, *chunks: bytes):
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    return app


def test_a_request_the_proxy_never_answers_gets_a_json_503():
    async def lost(scope, receive, send) -> None:  # Ray's proxy after the replica's actor died
        return None

    status, headers, body = answer(run(lost))
    assert status == 503 and headers[b"content-type"] == b"application/json"
    err = json.loads(body)["error"]
    assert err["type"] == "service_unavailable" and "no replica answered this request" in err["message"]


def test_the_proxys_plain_text_errors_become_json_with_their_status_and_text():
    status, headers, body = answer(run(respond(503, b"text/plain", b"Deployment ", b"unavailable.")))
    assert status == 503 and headers[b"content-type"] == b"application/json"
    err = json.loads(body)["error"]
    assert err["detail"] == "Deployment unavailable." and "Deployment unavailable." in err["message"]
    status, _, body = answer(run(respond(500, b"text/plain", b"Internal Server Error")))
    assert status == 503 and "no replica answered" in json.loads(body)["error"]["message"]


def test_replica_answers_pass_untouched():
    replica_error = json.dumps({"error": {"message": "boom", "type": "internal_error"}}).encode()
    for app, want in ((respond(500, b"application/json", replica_error), (500, replica_error)),
                      (respond(200, b"text/event-stream", b"data: 1\n\n", b"data: [DONE]\n\n"),
                       (200, b"data: 1\n\ndata: [DONE]\n\n")),
                      (respond(404, b"text/plain", b"not here"), (404, b"not here"))):
        status, _, body = answer(run(app))
        assert (status, body) == want
