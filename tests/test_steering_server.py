"""The steering fields end to end through the real server (HTTP and gRPC): new modes and
units are accepted, and the response says what the edits resolved to (``steering_applied``).
The formulas themselves are checked on the engine (tests/test_steering_engine.py); bad input
to each field is in tests/test_bad_input.py."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_fixtures import DICTIONARY_ID

pytestmark = pytest.mark.slow

Q = [{"role": "user", "content": "What is the capital of France?"}]
EDITS = [
    {"dictionary": DICTIONARY_ID, "feature": 3, "mode": "orthogonal", "value": 0.5, "unit": "residual_norm"},
    {"dictionary": DICTIONARY_ID, "feature": 4, "mode": "project_cap", "value": 0.0},
    {"dictionary": DICTIONARY_ID, "feature": 5, "mode": "scale", "value": 2.0, "scope": "generated"},
]


def _check_applied(applied: dict) -> None:
    edits = applied["edits"]
    assert [e["edit"] for e in edits] == [0, 1, 2]
    assert [e["mode"] for e in edits] == ["orthogonal", "project_cap", "scale"]
    # the test dictionary has no feature index: the default unit is raw, said explicitly
    assert [e["unit"] for e in edits] == ["residual_norm", "raw", "raw"]
    assert edits[0].get("raw_value") is None and edits[1]["raw_value"] == 0.0 and edits[2]["raw_value"] == 2.0
    assert edits[2]["scope"] == "generated"


def test_http_chat_reports_steering_applied(live_server):
    body = {"messages": Q, "max_tokens": 6, "temperature": 0, "steering": {"edits": EDITS}}
    with httpx.Client(base_url=live_server.base_url, timeout=300) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        _check_applied(r.json()["steering_applied"])
        plain = c.post("/v1/chat/completions", json={"messages": Q, "max_tokens": 6, "temperature": 0}).json()
        assert plain.get("steering_applied") is None
        # streamed: on the first chunk only
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "steering_applied" in chunks[0] and all("steering_applied" not in ch for ch in chunks[1:])
        _check_applied(chunks[0]["steering_applied"])


def test_grpc_generate_reports_steering_applied(live_server):
    from clients.grpc_client import SAEClient

    with SAEClient(live_server.grpc_target) as c:
        chunks = list(c.generate(messages=Q, sampling={"max_tokens": 4, "temperature": 0},
                                 steering={"edits": EDITS}))
    assert chunks[0].steering_applied is not None
    assert all(ch.steering_applied is None for ch in chunks[1:])
    _check_applied(chunks[0].steering_applied.model_dump())
