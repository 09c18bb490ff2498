"""The playground's server side without an engine: the static files and their headers, the
key check leaving them open (and nothing else), the dictionary summary's pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.auth import ApiKeyMiddleware, ApiKeys, is_open_http_request, is_playground_request, key_digest
from server.dictionary_summary import MAX_LOG_POINTS, density_histogram, read_training_log
from server.playground import UI_DIR, mount_playground

KEY = "sk-playground-test-1"


def _app() -> TestClient:
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys([key_digest(KEY)]))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    mount_playground(app)
    return TestClient(app)


def test_static_page_is_served_open_with_a_strict_policy():
    c = _app()
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    assert c.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    page = c.get("/ui/")
    assert page.status_code == 200 and '<script type="module" src="js/main.js">' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for js in sorted((UI_DIR / "js").glob("*.js")):
        r = c.get(f"/ui/js/{js.name}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], js.name
        # no CDN, no network: every import is relative
        for spec in __import__("re").findall(r'from "([^"]+)"', r.text):
            assert spec.startswith("./"), (js.name, spec)
    assert c.get("/ui/missing.js").status_code == 404
    # the data still needs the key
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("method,path,open_", [
    ("GET", "/", True), ("GET", "/ui", True), ("GET", "/ui/", True), ("GET", "/ui/js/api.js", True),
    ("HEAD", "/ui/style.css", True), ("POST", "/ui/", False), ("GET", "/ui/../v1/models", False),
    ("GET", "/uix", False), ("GET", "/v1/models", False),
])
def test_which_requests_pass_without_a_key(method, path, open_):
    scope = {"type": "http", "method": method, "path": path, "query_string": b""}
    assert is_playground_request(scope) is open_
    assert is_open_http_request(scope) is open_


def test_density_histogram_counts_every_feature_that_fired():
    dens = np.array([0.0, 0.0, 2e-5, 3e-4, 0.02, 0.5, 1.0], np.float32)
    edges, counts, never = density_histogram(dens)
    assert never == 2 and sum(counts) == 5
    assert edges[0] == -5 and edges[-1] == 0 and len(edges) == len(counts) + 1
    assert np.allclose(np.diff(edges), 0.25)
    got = np.repeat((np.array(edges[:-1]) + np.array(edges[1:])) / 2, counts)
    assert np.all(np.abs(got - np.log10(dens[2:])) <= 0.125 + 1e-6)  # each in its own bin
    assert density_histogram(np.zeros(4, np.float32)) == ([], [], 4)
    e, c, _ = density_histogram(np.ones(3, np.float32))  # all dense: one decade, still valid bins
    assert e[0] == -1 and sum(c) == 3


def test_training_log_read_skips_bad_lines_and_thins_long_logs(tmp_path: Path):
    assert read_training_log(tmp_path) == [] and read_training_log(None) == []
    point = {"step": 1, "tokens": 10, "loss": 0.5, "fvu": 0.5, "l0": 3.0, "dead": 0.0}
    (tmp_path / "training_log.jsonl").write_text(json.dumps(point) + "\nnot json\n{}\n")
    assert [p.step for p in read_training_log(tmp_path)] == [1]
    n = MAX_LOG_POINTS * 3 + 7
    (tmp_path / "training_log.jsonl").write_text(
        "".join(json.dumps({**point, "step": s}) + "\n" for s in range(1, n + 1)))
    steps = [p.step for p in read_training_log(tmp_path)]
    assert len(steps) == MAX_LOG_POINTS and steps[0] == 1 and steps[-1] == n and steps == sorted(steps)


def test_compare_streams_the_unsteered_copy_marked_in_the_same_stream():
    """What the steer view reads: one SSE stream with both completions, the unsteered one's
    chunks marked ``unsteered: true`` (a stand-in engine answers by whether it is steered)."""
    from server.http_api import build_http_app
    from server.service import SAEService
    from tests.test_hardening import FakeEngine

    class TwoWayEngine(FakeEngine):
        async def generate(self, prompt_ids, params, spec=None, request_id=None):
            from sae_runtime.engine.outputs import GenerationChunk

            word = "steered" if spec is not None and spec.steering is not None else "plain"
            for i, piece in enumerate((word, " end")):
                yield GenerationChunk(request_id="r", token_ids=[i + 1], text=piece, num_generated_tokens=i + 1,
                                      finished=i == 1, finish_reason="length" if i == 1 else None)

    service = SAEService(TwoWayEngine())  # type: ignore[arg-type]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True, "compare": True,
            "steering": {"stop_when": [{"dictionary": "d0", "feature": 1, "above": 0.5}]}}
    with TestClient(build_http_app(service, 1_000_000)) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as s:
            assert s.status_code == 200
            lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        texts: dict[bool, str] = {False: "", True: ""}
        for chunk in lines:
            for choice in chunk["choices"]:
                assert choice["index"] == 0
                texts[choice.get("unsteered", False)] += choice["delta"].get("content") or ""
        assert texts == {False: "steered end", True: "plain end"}
        # without compare nothing is marked
        del body["compare"]
        with http.stream("POST", "/v1/chat/completions", json=body) as s:
            plain = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        assert all("unsteered" not in c for chunk in plain for c in chunk["choices"])
