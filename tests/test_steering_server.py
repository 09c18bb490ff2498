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
STORY = [{"role": "user", "content": "Write a long story about a ship at sea."}]
EDITS = [
    {"dictionary": DICTIONARY_ID, "feature": 3, "mode": "orthogonal", "value": 0.5, "unit": "residual_norm"},
    {"dictionary": DICTIONARY_ID, "feature": 4, "mode": "project_cap", "value": 0.0, "unit": "raw"},
    {"dictionary": DICTIONARY_ID, "feature": 5, "mode": "scale", "value": 2.0, "scope": "generated"},
]


def _check_applied(applied: dict) -> None:
    edits = applied["edits"]
    assert [e["edit"] for e in edits] == [0, 1, 2]
    assert [e["mode"] for e in edits] == ["orthogonal", "project_cap", "scale"]
    # scale takes raw units only, said explicitly (the unit defaults are tested on the engine)
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


def test_stop_when_finishes_with_reason_feature_over_http_and_grpc(live_server):
    """The features of a plain generation pick a feature that first fires on generated token
    k; with ``stop_when`` on it the generation ends there with finish_reason "feature" over
    HTTP (whole and streamed, same text) and gRPC (same tokens)."""
    import torch

    from clients.grpc_client import SAEClient
    from tests.steering_helpers import pick_stop

    sampling = {"max_tokens": 16, "temperature": 0}
    every = {"dictionaries": [DICTIONARY_ID], "feature_ids": list(range(512)), "scope": "generated"}
    with SAEClient(live_server.grpc_target) as c:
        base = list(c.generate(messages=STORY, sampling=sampling, features=every))
    base_tokens = [t for ch in base for t in ch.token_ids]
    assert len(base_tokens) >= 8 and base[-1].finished
    values = torch.tensor([t.features[0].values for ch in base for t in ch.features])  # all but the last token
    assert values.shape == (len(base_tokens) - 1, 512)
    g, above, k = pick_stop(values, last=min(6, len(base_tokens) - 3))
    steering = {"stop_when": [{"dictionary": DICTIONARY_ID, "feature": g, "above": above}]}

    with SAEClient(live_server.grpc_target) as c:
        got = list(c.generate(messages=STORY, sampling=sampling, steering=steering))
    assert [t for ch in got for t in ch.token_ids] == base_tokens[:k + 1]
    assert got[-1].finished and got[-1].finish_reason == "feature"
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == k + 1

    body = {"messages": STORY, **sampling, "steering": steering}
    with httpx.Client(base_url=live_server.base_url, timeout=300) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        whole = r.json()
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    assert whole["choices"][0]["finish_reason"] == "feature"
    assert whole["usage"]["completion_tokens"] == k + 1
    assert whole["choices"][0]["message"]["content"] == "".join(ch.text for ch in got)
    reasons = [ch["choices"][0].get("finish_reason") for ch in chunks if ch["choices"]]
    assert reasons[-1] == "feature" and not any(reasons[:-1])
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
