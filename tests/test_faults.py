"""Faults: clients that leave mid-stream, a killed vLLM engine process, a killed replica actor,
the feature side channel's receiver killed under load.

Disconnect tests use the session server. The kill tests use a second server
(``fault_server``: started once with an API key, ``--max-concurrent-streams 2`` and
``--max-edits 4``, so the same start also checks keys and limits end to end, and with
fault injection on for the side-channel kills). Every wait is bounded; a request that
hangs fails the test.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from sae_runtime.engine.feature_channel import MAX_RESTARTS
from tests.server_fixtures import DICTIONARY_ID, FAULT_API_KEY, FAULT_FEATURE_TIMEOUT_S, ServerHandle

pytestmark = pytest.mark.slow

Q = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook."}]
FEATS = {"dictionaries": [DICTIONARY_ID], "top_k": 4}
AUTH = {"Authorization": f"Bearer {FAULT_API_KEY}"}


def detail(base_url: str, headers: dict | None = None) -> dict:
    r = httpx.get(f"{base_url}/health", params={"detail": 1}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def busy(d: dict) -> int:
    return d["engine_unfinished_requests"] + sum(w["tracked_requests"] for w in d["workers"]) + d["open_streams"]


def wait_idle(base_url: str, headers: dict | None = None, timeout: float = 20) -> tuple[float, dict]:
    t0 = time.monotonic()
    while True:
        d = detail(base_url, headers)
        if busy(d) == 0:
            return time.monotonic() - t0, d
        assert time.monotonic() - t0 < timeout, f"the engine still holds the request after {timeout}s: {d}"
        time.sleep(0.3)


def metric(base_url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- client disconnects (session server) --------------------------------------------------------


def test_http_client_leaving_an_sse_stream_aborts_it_in_the_engine(live_server):
    base = live_server.base_url
    wait_idle(base)
    gen0 = metric(base, "sae_serve_generated_tokens_total")
    outcomes0 = {o: metric(base, "sae_serve_requests_total", endpoint="chat.completions", transport="http", outcome=o)
                 for o in ("cancelled", "error")}
    body = {"messages": Q, "max_tokens": 400, "temperature": 1.0, "seed": 1, "stream": True, "features": FEATS}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # a few chunks: the request is running
            assert all(g.startswith("data: ") or g == "" for g in got)
            during = detail(base)
            assert during["engine_unfinished_requests"] >= 1 and during["open_streams"] >= 1, during
            assert sum(w["tracked_requests"] for w in during["workers"]) >= 1, during
        # leaving the `with` closes the connection mid-stream
    _took, after = wait_idle(base)
    assert after["open_streams"] == 0
    # Nothing more is generated for it, and far fewer than the 400 tokens asked for were.
    gen = metric(base, "sae_serve_generated_tokens_total")
    assert gen - gen0 < 400
    time.sleep(1.0)
    assert metric(base, "sae_serve_generated_tokens_total") == gen
    # The replica saw a client that left, not a failure of its own (counted once the
    # stream's clean-up has finished, which may be just after the slot was released).
    deadline = time.monotonic() + 10
    while True:
        outcomes = {o: metric(base, "sae_serve_requests_total", endpoint="chat.completions", transport="http",
                              outcome=o) for o in ("cancelled", "error")}
        if outcomes != outcomes0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert outcomes["cancelled"] == outcomes0["cancelled"] + 1, (outcomes0, outcomes)
    assert outcomes["error"] == outcomes0["error"], (outcomes0, outcomes)


def test_grpc_client_cancelling_a_generate_stream_aborts_it_in_the_engine(live_server):
    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    base = live_server.base_url
    wait_idle(base)
    cancelled = metric(base, "sae_serve_requests_total", endpoint="generate.stream", outcome="cancelled")
    req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=Q[0]["content"])]),
                             sampling=pb.SamplingOptions(max_tokens=400, temperature=1.0, seed=1),
                             features=pb.FeatureRequest(dictionaries=[DICTIONARY_ID], top_k=4))
    with grpc.insecure_channel(live_server.grpc_target) as ch:
        call = pb_grpc.SAEServiceStub(ch).Generate(req, timeout=120)
        for i, _ in enumerate(call):
            if i == 3:
                break
        during = detail(base)
        assert during["engine_unfinished_requests"] >= 1 and during["open_streams"] >= 1, during
        call.cancel()
    wait_idle(base)
    deadline = time.monotonic() + 10
    while metric(base, "sae_serve_requests_total", endpoint="generate.stream", outcome="cancelled") < cancelled + 1:
        assert time.monotonic() < deadline, "the replica never saw the cancellation"
        time.sleep(0.3)


# -- the feature side channel under attack (session server) ------------------------------------


def feature_socket(server: ServerHandle) -> str:
    """The replica's feature side-channel address (the IPC socket its receiver binds)."""
    replica = find(server, "ServeReplica:sae-serve:SAEDeployment")
    for conn in replica.net_connections(kind="unix"):
        if isinstance(conn.laddr, str) and conn.laddr.endswith("features.sock"):
            return f"ipc://{conn.laddr}"
    raise AssertionError("the replica has no feature side-channel socket")


def garbage_messages() -> list[list[bytes]]:
    """Messages the receiver cannot decode (each one used to end its receiving task)."""
    entry = {"rid": "nobody", "dict": DICTIONARY_ID, "n": 4, "m": 4, "has_idx": True}
    return [
        [b"\xff\xfe not json"],
        [b'{"a": 1}'],
        [json.dumps([entry]).encode(), b"\0" * 3],
        [json.dumps([{**entry, "n": -1}]).encode(), b"", b""],
        [json.dumps([{**entry, "rid": 7}]).encode()],
        [json.dumps([entry]).encode(), b"\0" * 16, b"\0" * 64, b"\0" * 64, b"extra"],
    ]


def test_feature_side_channel_survives_undecodable_frames_mid_load(live_server: ServerHandle):
    """Chaos: feed the replica's feature socket frames it cannot decode while feature requests
    run. Every request ends within a bound (success, or a clear 503), the frames are counted,
    and the replica keeps serving features. The first such frame used to end the
    receiving task: every feature request then waited 60 s and got a 500 while /health
    stayed green."""
    import zmq

    base = live_server.base_url
    wait_idle(base)
    address = feature_socket(live_server)
    bad0 = metric(base, "sae_serve_feature_channel_bad_frames_total")
    bound_s = 45.0
    outcomes: list[tuple[str, float]] = []

    def one(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Count to {i + 20}."}], "max_tokens": 24,
                "temperature": 1.0, "seed": i, "features": FEATS}
        t0 = time.monotonic()
        try:
            with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as c:
                if i % 2:
                    r = c.post(f"{base}/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and len(r.json()["choices"][0]["features"]) >= 1
                    outcome = "ok" if ok else f"http {r.status_code} {r.text[:200]}"
                else:
                    with c.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as r:
                        outcome = f"http {r.status_code}"
                        if r.status_code == 200:
                            last = ""
                            for line in r.iter_lines():
                                if line.startswith("data: "):
                                    last = line[6:]
                                    if "error" in last and "service_unavailable" in last:
                                        outcome = "sse 503"
                            outcome = "ok" if last == "[DONE]" and outcome == "http 200" else \
                                (outcome if outcome == "sse 503" else f"sse-end {last[:200]}")
        except httpx.HTTPError as exc:
            outcome = f"transport {type(exc).__name__}"
        outcomes.append((outcome, time.monotonic() - t0))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while detail(base)["engine_unfinished_requests"] < 1:
        assert time.monotonic() < deadline, "the load never reached the engine"
        time.sleep(0.2)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    sock.connect(address)
    sent = 0
    try:
        for _ in range(5):  # spread over the load
            for msg in garbage_messages():
                sock.send_multipart(msg)
                sent += 1
            time.sleep(0.3)
    finally:
        sock.close(linger=2000)
        ctx.term()
    join_by = time.monotonic() + bound_s + 30
    for t in threads:
        t.join(max(0.0, join_by - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"requests still hanging; ended: {outcomes}"
    assert len(outcomes) == 6
    slow = [(o, round(d, 1)) for o, d in outcomes if d > bound_s]
    assert not slow, f"requests took longer than {bound_s}s: {slow}"
    assert all(o in ("ok", "http 503", "sse 503") for o, _ in outcomes), outcomes
    # Dropped and counted, and the channel keeps delivering features.
    assert metric(base, "sae_serve_feature_channel_bad_frames_total") >= bad0 + sent
    assert metric(base, "sae_serve_feature_channel_up") == 1
    h = httpx.get(f"{base}/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
                         "features": FEATS})
    assert r.status_code == 200 and len(r.json()["choices"][0]["features"]) >= 1, r.text
    assert detail(base)["feature_channel"]["restarts"] == 0  # decode errors never stopped the receiver
    wait_idle(base)


def test_the_fault_injection_route_exists_only_with_its_variable(live_server: ServerHandle):
    """The session server starts without SAE_SERVE_FAULT_INJECTION: no way to kill its channel."""
    r = httpx.post(f"{live_server.base_url}/debug/faults/feature-channel", json={"kill": "socket"}, timeout=30)
    assert r.status_code == 404, r.text
    assert detail(live_server.base_url)["feature_channel"]["healthy"]


# -- the fault server: keys and limits end to end ----------------------------------------------


def test_api_key_end_to_end_and_never_logged(fault_server: ServerHandle):
    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    base = fault_server.base_url
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # open
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer wrong-key-000"}
    assert httpx.get(f"{base}/v1/models", headers=wrong, timeout=30).status_code == 401
    assert httpx.get(f"{base}/health?detail=1", timeout=30).status_code == 401
    assert httpx.get(f"{base}/v1/models", headers=AUTH, timeout=30).status_code == 200
    with grpc.insecure_channel(fault_server.grpc_target) as ch:
        stub = pb_grpc.SAEServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListDictionaries(pb.ListDictionariesRequest(), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.ListDictionaries(
            pb.ListDictionariesRequest(), timeout=60, metadata=[("authorization", f"Bearer {FAULT_API_KEY}")]
        )
        assert [d.id for d in ok.dictionaries] == [DICTIONARY_ID]
    # Never in the server's output, nor anywhere in Ray's logs of this session.
    assert FAULT_API_KEY not in fault_server.log_path.read_text(errors="replace")
    logs = Path("/tmp/ray/session_latest/logs")
    if logs.is_dir():
        for f in logs.rglob("*"):
            if f.is_file() and f.stat().st_size < 50 * 2**20:
                assert FAULT_API_KEY.encode() not in f.read_bytes(), f


def test_limits_from_flags_end_to_end(fault_server: ServerHandle):
    base = fault_server.base_url
    edit = {"dictionary": DICTIONARY_ID, "feature": 3, "mode": "add", "value": 1.0}
    r = httpx.post(
        f"{base}/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        json={"messages": Q, "max_tokens": 2, "steering": {"edits": [edit] * 5}},
    )
    assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"], r.text
    # --max-concurrent-streams 2: a third stream is refused with 429 (and RESOURCE_EXHAUSTED).
    body = {"messages": Q, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=120, headers=AUTH) as c:
        with (
            c.stream("POST", f"{base}/v1/chat/completions", json=body) as s1,
            c.stream("POST", f"{base}/v1/chat/completions", json=body) as s2,
        ):
            assert s1.status_code == 200 and s2.status_code == 200
            r3 = c.post(f"{base}/v1/chat/completions", json=body)
            assert r3.status_code == 429 and r3.json()["error"]["param"] == "stream", r3.text
            from sae_wire import sae_serve_pb2 as pb
            from sae_wire import sae_serve_pb2_grpc as pb_grpc

            with grpc.insecure_channel(fault_server.grpc_target) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    list(
                        pb_grpc.SAEServiceStub(ch).Generate(
                            pb.GenerateRequest(text="hi"),
                            timeout=60,
                            metadata=[("authorization", AUTH["Authorization"])],
                        )
                    )
                assert (
                    err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and "max_concurrent_streams" in err.value.details()
                )
            # non-streaming requests are not streams: still served
            assert c.post(f"{base}/v1/chat/completions", json={"messages": Q, "max_tokens": 1}).status_code == 200
    wait_idle(base, AUTH)


# -- the feature side channel's receiver killed under load (fault server) ---------------------
#
# How the receiver is killed: through the fault-injection route (server/faults.py), which
# exists only because the fault server starts with SAE_SERVE_FAULT_INJECTION=1 and needs its
# API key. The receiver is an asyncio task on a ZeroMQ socket inside the replica process:
# nothing at the OS level stops only that (unlinking the IPC socket file leaves the open
# connection working; killing the process is the replica-actor test below), so the route
# does in the replica what the two real failures do: end the receiving task ("task", as an
# unexpected exception would) or close its socket ("socket", a receiver that cannot come
# back). The load is four feature requests over HTTP and gRPC, streaming and not.

CHAOS_PROMPT = Q[0]["content"]
CHAOS_TOKENS = 96
REFERENCE = {
    "messages": [{"role": "user", "content": "Name three colours."}],
    "max_tokens": 4,
    "temperature": 0,
    "features": FEATS,
}


def feature_rows(features: list[dict]) -> list[tuple[int, int, list[int], list[float]]]:
    return [(t["position"], t["token_id"], t["features"][0]["indices"], t["features"][0]["values"]) for t in features]


def reference_features(base: str) -> list[tuple[int, int, list[int], list[float]]]:
    r = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, json=REFERENCE, timeout=120)
    assert r.status_code == 200, r.text
    rows = feature_rows(r.json()["choices"][0]["features"])
    assert len(rows) >= 5, rows  # prompt tokens and generated ones
    return rows


def assert_same_features(got: list, want: list) -> None:
    assert [(p, t) for p, t, _, _ in got] == [(p, t) for p, t, _, _ in want]
    for (p, _, gi, gv), (_, _, wi, wv) in zip(got, want, strict=True):
        assert gi == wi, f"position {p}: features {gi} != {wi} before the fault"
        assert all(abs(a - b) <= 1e-3 + 1e-3 * abs(b) for a, b in zip(gv, wv, strict=True)), (p, gv, wv)


class FeatureLoad:
    """Feature requests in flight at once: HTTP chat (whole and SSE), HTTP completions, gRPC
    Generate (a stream). Each records how it ended and when: ``ok`` (all its features),
    ``unavailable: MESSAGE`` (503 / UNAVAILABLE / an SSE error event of that type), or
    anything else verbatim (which fails the test)."""

    KINDS = ("http-chat", "http-chat-stream", "http-completions", "grpc-generate")

    def __init__(self, base: str, grpc_target: str):
        self.base, self.grpc_target = base, grpc_target
        self.ended: dict[str, tuple[str, float]] = {}
        self.features_seen = {k: 0 for k in self.KINDS}  # streams: token features received so far
        self.threads = [threading.Thread(target=self._run, args=(k, i), daemon=True) for i, k in enumerate(self.KINDS)]

    def _run(self, kind: str, seed: int) -> None:
        try:
            outcome = getattr(self, "_" + kind.replace("-", "_"))(seed)
        except Exception as exc:  # a transport failure or a broken body: recorded, fails the test
            outcome = f"{type(exc).__name__}: {exc}"[:300]
        self.ended[kind] = (outcome, time.monotonic())

    @staticmethod
    def _http_error(r: httpx.Response) -> str:
        try:
            err = r.json()["error"]
        except Exception:
            return f"http {r.status_code}: {r.text[:300]}"
        if r.status_code == 503 and err["type"] == "service_unavailable":
            return f"unavailable: {err['message']}"
        return f"http {r.status_code}: {err}"

    def _body(self, seed: int) -> dict:
        return {"max_tokens": CHAOS_TOKENS, "temperature": 1.0, "seed": seed, "features": FEATS}

    def _http_chat(self, seed: int) -> str:
        r = httpx.post(
            f"{self.base}/v1/chat/completions",
            headers=AUTH,
            timeout=httpx.Timeout(180, connect=10),
            json={"messages": Q, **self._body(seed)},
        )
        if r.status_code != 200:
            return self._http_error(r)
        choice = r.json()["choices"][0]
        n = r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] - 1
        return "ok" if len(choice["features"]) == n else f"features for {len(choice['features'])} of {n} tokens"

    def _http_completions(self, seed: int) -> str:
        r = httpx.post(
            f"{self.base}/v1/completions",
            headers=AUTH,
            timeout=httpx.Timeout(180, connect=10),
            json={"prompt": CHAOS_PROMPT, **self._body(seed)},
        )
        if r.status_code != 200:
            return self._http_error(r)
        body = r.json()
        n = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] - 1
        got = len(body["choices"][0]["features"])
        return "ok" if got == n else f"features for {got} of {n} tokens"

    def _http_chat_stream(self, seed: int) -> str:
        with httpx.Client(timeout=httpx.Timeout(180, connect=10), headers=AUTH) as c:
            with c.stream(
                "POST", f"{self.base}/v1/chat/completions", json={"messages": Q, "stream": True, **self._body(seed)}
            ) as r:
                if r.status_code != 200:
                    r.read()
                    return self._http_error(r)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return "ok"
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]
                        return (
                            f"unavailable: {err['message']}"
                            if err["type"] == "service_unavailable"
                            else f"sse error {err}"
                        )
                    self.features_seen["http-chat-stream"] += len(event["choices"][0].get("features") or [])
        return "cut: the stream ended without [DONE] or an error event"

    def _grpc_generate(self, seed: int) -> str:
        from sae_wire import sae_serve_pb2 as pb
        from sae_wire import sae_serve_pb2_grpc as pb_grpc

        req = pb.GenerateRequest(
            text=CHAOS_PROMPT,
            sampling=pb.SamplingOptions(max_tokens=CHAOS_TOKENS, temperature=1.0, seed=seed),
            features=pb.FeatureRequest(dictionaries=[DICTIONARY_ID], top_k=4),
        )
        with grpc.insecure_channel(self.grpc_target) as ch:
            try:
                for msg in pb_grpc.SAEServiceStub(ch).Generate(
                    req, timeout=180, metadata=[("authorization", AUTH["Authorization"])]
                ):
                    self.features_seen["grpc-generate"] += len(msg.features)
                    if msg.finished:
                        return "ok"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return f"unavailable: {err.details()}"
                return f"grpc {err.code().name}: {err.details()}"
        return "cut: the stream ended without a finished message"

    def start(self) -> FeatureLoad:
        for t in self.threads:
            t.start()
        return self

    def wait_mid_flight(self, timeout: float = 120) -> bool:
        """Until every request runs in the engine and both streams have had features: True
        then; False if one of them ended first (on a busy machine a short request can finish
        before the last one reaches the engine). Fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ended:
                return False
            d = detail(self.base, AUTH)
            if (
                d["engine_unfinished_requests"] >= len(self.KINDS)
                and self.features_seen["http-chat-stream"] > 0
                and self.features_seen["grpc-generate"] > 0
            ):
                return not self.ended
            assert time.monotonic() < deadline, (
                f"the load never ran all at once: {d['engine_unfinished_requests']} in the engine, {self.ended}"
            )
            time.sleep(0.1)

    @classmethod
    def mid_flight(cls, base: str, grpc_target: str, attempts: int = 3) -> FeatureLoad:
        """A load with all its requests in flight at once. An attempt where one request
        ended before the others were in the engine is let finish (every request must end
        ``ok``: nothing was wrong yet) and started again."""
        for _ in range(attempts):
            load = cls(base, grpc_target).start()
            if load.wait_mid_flight():
                return load
            ended = load.join(by=time.monotonic() + 180)
            assert all(o == "ok" for o, _ in ended.values()), f"a request failed before any fault: {ended}"
        raise AssertionError(f"the load's {len(cls.KINDS)} requests never ran all at once in {attempts} attempts")

    def join(self, by: float) -> dict[str, tuple[str, float]]:
        for t in self.threads:
            t.join(max(0.0, by - time.monotonic()))
        hung = [k for k, t in zip(self.KINDS, self.threads, strict=True) if t.is_alive()]
        assert not hung, f"requests still hanging: {hung}; ended: {self.ended}"
        return self.ended


def kill_receiver(server: ServerHandle, kill: str) -> dict:
    r = httpx.post(f"{server.base_url}/debug/faults/feature-channel", headers=AUTH, json={"kill": kill}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_killing_the_receivers_task_under_load_restarts_it_in_place(fault_server: ServerHandle):
    """The receiving task dies mid-load: its supervisor restarts it at once, on the same
    replica, which never reports itself unhealthy; the requests in flight get their
    features (the restarted task reads what was queued meanwhile), none hangs."""
    base = fault_server.base_url
    wait_idle(base, AUTH)
    want = reference_features(base)
    before = detail(base, AUTH)["feature_channel"]
    restarts0 = metric(base, "sae_serve_feature_channel_restarts_total", AUTH)
    load = FeatureLoad.mid_flight(base, fault_server.grpc_target)
    killed = kill_receiver(fault_server, "task")
    t_kill = time.monotonic()
    assert killed["feature_channel_before"]["healthy"], killed
    # /health stays 200 throughout: a restart in place is not an outage.
    statuses = []
    while any(t.is_alive() for t in load.threads) and time.monotonic() < t_kill + FAULT_FEATURE_TIMEOUT_S + 20:
        statuses.append(httpx.get(f"{base}/health", timeout=15).status_code)
        time.sleep(0.5)
    ended = load.join(by=t_kill + FAULT_FEATURE_TIMEOUT_S + 20)
    assert set(statuses) <= {200}, statuses
    # Every request ended within the feature wait's bound, with all its features or a clear
    # 503 (only if the kill hit a message the task had in hand: its features are lost).
    late = {k: round(t - t_kill, 1) for k, (_, t) in ended.items() if t - t_kill > FAULT_FEATURE_TIMEOUT_S + 10}
    assert not late, f"ended too late after the kill: {late}"
    bad = {
        k: o
        for k, (o, _) in ended.items()
        if o != "ok" and not (o.startswith("unavailable: ") and "feature_timeout_s" in o)
    }
    assert not bad, bad
    assert sum(o == "ok" for o, _ in ended.values()) >= len(FeatureLoad.KINDS) - 1, ended
    # Restarted once, on the same replica, and counted.
    after = detail(base, AUTH)
    assert after["replica"] == killed["replica"], "the replica was replaced; the receiver should restart in place"
    assert after["feature_channel"]["healthy"] and after["feature_channel"]["failure"] is None, after
    assert after["feature_channel"]["restarts"] == before["restarts"] + 1, after["feature_channel"]
    assert metric(base, "sae_serve_feature_channel_restarts_total", AUTH) == restarts0 + 1
    assert metric(base, "sae_serve_feature_channel_up", AUTH) == 1
    # And it serves the same features as before the fault.
    assert_same_features(reference_features(base), want)
    wait_idle(base, AUTH)


def test_closing_the_receivers_socket_under_load_gets_the_replica_replaced(fault_server: ServerHandle):
    """The receiver's socket is closed mid-load: every restart fails at once, the receiver
    gives up, the replica reports itself unhealthy (feature requests in flight and new
    ones: a 503 / UNAVAILABLE within a second, naming the side channel), Ray Serve's
    health check replaces the replica, and the new one serves the same features."""
    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    base = fault_server.base_url
    wait_idle(base, AUTH)
    want = reference_features(base)
    restarts0 = metric(base, "sae_serve_feature_channel_restarts_total", AUTH)
    load = FeatureLoad.mid_flight(base, fault_server.grpc_target)
    killed = kill_receiver(fault_server, "socket")
    t_kill = time.monotonic()
    # The replica says why it is down, at once.
    h = httpx.get(f"{base}/health", timeout=15)
    assert h.status_code == 503 and "feature side channel" in h.json()["reason"], h.text
    h = httpx.get(f"{base}/health", params={"detail": 1}, headers=AUTH, timeout=15)
    assert h.status_code == 503, h.text
    d = h.json()
    assert d["replica"] == killed["replica"] and not d["feature_channel"]["healthy"], d
    # It gave up after MAX_RESTARTS restarts within the window (the window may still hold an
    # earlier test's restart, so how many of them this kill caused depends on the order).
    assert f"stopped {MAX_RESTARTS + 1} times" in d["feature_channel"]["failure"], d["feature_channel"]
    # Its counters: the failed restarts, and the channel down.
    assert metric(base, "sae_serve_feature_channel_restarts_total", AUTH) > restarts0
    assert metric(base, "sae_serve_feature_channel_up", AUTH) == 0
    # In-flight requests end at once with 503 / UNAVAILABLE naming the side channel.
    ended = load.join(by=t_kill + 10)
    assert all(o.startswith("unavailable: ") and "feature side channel" in o for o, _ in ended.values()), ended
    # A new feature request meanwhile: refused at once, over gRPC too (unary ExtractFeatures).
    with grpc.insecure_channel(fault_server.grpc_target) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SAEServiceStub(ch).ExtractFeatures(
                pb.ExtractFeaturesRequest(text="Hello there", features=pb.FeatureRequest(dictionaries=[DICTIONARY_ID])),
                timeout=30,
                metadata=[("authorization", AUTH["Authorization"])],
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "feature side channel" in err.value.details()
        assert time.monotonic() - t0 < 5
    # Ray Serve replaces the replica (its health check fails), and the new one serves features.
    _took, seen = recover(fault_server)
    assert -1 not in seen, f"/health hung instead of answering: {seen}"
    d = detail(base, AUTH)
    assert d["replica"] != killed["replica"], "the replica with the dead receiver is still serving"
    assert d["feature_channel"]["healthy"] and d["feature_channel"]["restarts"] == 0, d["feature_channel"]
    assert_same_features(reference_features(base), want)
    assert metric(base, "sae_serve_feature_channel_up", AUTH) == 1
    assert fault_server.proc.poll() is None
    wait_idle(base, AUTH)


# -- kills under load ---------------------------------------------------------------------------


class Load:
    """A few concurrent clients (streaming and not) that record how each request ended."""

    def __init__(self, base: str, n: int = 4):
        self.base = base
        self.results: list[str] = []
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True) for i in range(n)]

    def _one(self, i: int) -> None:
        body = {"messages": Q, "max_tokens": 300, "temperature": 1.0, "seed": i}
        try:
            with httpx.Client(timeout=httpx.Timeout(120, connect=10), headers=AUTH) as c:
                if i % 2:
                    r = c.post(f"{self.base}/v1/chat/completions", json=body)
                    self.results.append(f"http {r.status_code}")
                    return
                with c.stream("POST", f"{self.base}/v1/chat/completions", json={**body, "stream": True}) as r:
                    if r.status_code != 200:
                        self.results.append(f"http {r.status_code}")
                        return
                    last = ""
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            last = line[6:]
                    self.results.append(
                        "done" if last == "[DONE]" else "sse-error" if "error" in json.loads(last or "{}") else "cut"
                    )
        except httpx.HTTPError as exc:
            self.results.append(f"transport {type(exc).__name__}")

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = sum(t.is_alive() for t in self.threads)
        assert not hung, f"{hung} request(s) still hanging {timeout:.0f}s after the kill; ended: {self.results}"


def running_load(server: ServerHandle) -> Load:
    load = Load(server.base_url).start()
    deadline = time.monotonic() + 60
    while detail(server.base_url, AUTH)["engine_unfinished_requests"] < 2:
        assert time.monotonic() < deadline, "the load never reached the engine"
        time.sleep(0.3)
    return load


def find(server: ServerHandle, needle: str) -> psutil.Process:
    for p in server.snapshot_tree():
        try:
            if needle in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process matching {needle!r} in the server's tree")


def recover(server: ServerHandle, timeout: float = 420) -> tuple[float, list[int]]:
    """Poll /health until 200; return how long it took and the statuses seen."""
    t0 = time.monotonic()
    seen = []
    while time.monotonic() - t0 < timeout:
        try:
            status = httpx.get(f"{server.base_url}/health", timeout=15).status_code
        except httpx.TimeoutException:
            status = -1  # a hang counts against the test below
        seen.append(status)
        if status == 200 and 503 in seen:
            return time.monotonic() - t0, seen
        time.sleep(0.5)
    raise AssertionError(f"not healthy again after {timeout}s; statuses: {sorted(set(seen))}\n{server.log_tail()}")


def assert_serves(server: ServerHandle) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers=AUTH,
        timeout=120,
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "features": FEATS},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


@pytest.mark.parametrize(
    "victim", ["VLLM::EngineCore", "ServeReplica:sae-serve:SAEDeployment"], ids=["engine-process", "replica-actor"]
)
def test_killed_under_load_the_deployment_recovers_by_itself(fault_server: ServerHandle, victim: str):
    assert_serves(fault_server)
    load = running_load(fault_server)
    proc = find(fault_server, victim)
    proc.send_signal(signal.SIGKILL)
    _took, seen = recover(fault_server)
    load.join(timeout=60)
    assert -1 not in seen, f"/health hung instead of answering 503: {seen}"
    assert seen[0] == 503 or 503 in seen[:20], seen  # unhealthy at once, not only after Ray noticed
    # Every in-flight request ended, and those cut short ended with an error status or event.
    assert len(load.results) == 4, load.results
    assert any(r != "done" and r != "http 200" for r in load.results), load.results
    # (A lost replica's requests get 503 from the proxy too: server.proxy_health.ProxyErrors.)
    assert all(
        r in ("done", "http 200", "http 503", "sse-error", "cut") or r.startswith("transport") for r in load.results
    ), load.results
    assert_serves(fault_server)
    assert fault_server.proc.poll() is None  # sae-serve itself never went down
