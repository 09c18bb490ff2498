"""The README's run command: ``sae-serve`` serves a steered chat, then SIGTERM leaves nothing behind.

Uses the session server (started by the ``sae-serve`` console script, see
tests/server_fixtures.py) and stops it, so this module must run after the other server
test modules (pytest collects files in name order: test_server_grpc, test_server_http,
test_server_shutdown).
"""

from __future__ import annotations

import pytest

from tests.server_fixtures import DICTIONARY_ID

pytestmark = pytest.mark.slow


def test_sae_serve_serves_a_steered_chat_then_stops_cleanly_on_sigterm(live_server):
    from openai import OpenAI

    log = live_server.log_path.read_text(errors="replace")
    assert f"http://127.0.0.1:{live_server.http_port}/v1" in log  # it printed where it serves
    client = OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        extra_body={"steering": {"edits": [{"dictionary": DICTIONARY_ID, "feature": 3, "mode": "add", "value": 8,
                                                  "unit": "raw"}]}})
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1

    tree = live_server.snapshot_tree()
    kinds = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "raylet" in kinds and "VLLM" in kinds  # the tree really holds Ray and the engine
    rc, left = live_server.stop()
    assert rc == 0, live_server.log_tail()
    assert not left, f"processes left after SIGTERM: {left}"
    assert "sae-serve: stopped" in live_server.log_path.read_text(errors="replace")
