"""Locust load for sae-serve: an HTTP user (OpenAI routes, steered/unsteered, streaming or
not, feature extraction) and a gRPC user (ExtractFeatures, Generate stream).

Run it through ``benchmarks/load.py`` (starts the server, runs a bounded headless load,
stops the server, prints a summary), or by hand against a running server::

    locust -f benchmarks/locustfile.py --headless -u 4 -r 1 -t 60s --csv /tmp/load \\
        --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051

Task weights: ``--w-chat``, ``--w-chat-stream``, ``--w-steered``, ``--w-steered-stream``,
``--w-extract`` (HTTP user) and ``--w-grpc-extract``, ``--w-grpc-generate`` (gRPC user); 0
disables a task. ``--http-weight`` / ``--grpc-weight`` set the mix of users (or name one
class on the command line: ``SAEHttpUser`` or ``SAEGrpcUser``). ``--api-key`` is sent as a
Bearer token on both transports.
Streaming requests are timed to the last token; the name of a steered request ends in
``[steered]``. Only 127.0.0.1 is accepted as a target.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

from locust import HttpUser, User, between, events, task

try:  # gRPC under gevent (Locust's concurrency) needs this before any channel exists
    from grpc.experimental import gevent as grpc_gevent

    grpc_gevent.init_gevent()
except Exception:  # pragma: no cover - grpc without gevent support
    pass

import grpc

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a sparse autoencoder is in one paragraph.",
    "Write a haiku about the sea.",
]
TEXT_64 = ("Sparse autoencoders decompose the activations of a language model into many features, "
           "most of which are zero for any given token. Each feature has a decoder direction in the "
           "residual stream, and steering adds a multiple of that direction while the model generates.")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="gRPC host:port (127.0.0.1 only)")
    parser.add_argument("--dictionary", default="layers.12/topk-4608",
                        help="dictionary id to extract/steer with (default: the default dictionary)")
    parser.add_argument("--feature", type=int, default=3, help="feature to steer")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per generation")
    parser.add_argument("--api-key", default="", help="Bearer key (when the server requires one)")
    parser.add_argument("--http-weight", type=int, default=1, help="relative number of HTTP users")
    parser.add_argument("--grpc-weight", type=int, default=1, help="relative number of gRPC users")
    for name, default in (("chat", 3), ("chat-stream", 2), ("steered", 2), ("steered-stream", 1), ("extract", 3),
                          ("grpc-extract", 3), ("grpc-generate", 2)):
        parser.add_argument(f"--w-{name}", type=int, default=default, help=f"weight of the {name} task")


@events.test_start.add_listener
def _check_target(environment, **_kw) -> None:
    opts = environment.parsed_options
    for url in (environment.host or "", f"//{opts.grpc_target}"):
        host = urlparse(url).hostname
        if host not in (None, "127.0.0.1", "localhost"):
            raise SystemExit(f"refusing to load {host}: this benchmark targets 127.0.0.1 only")


@events.init.add_listener
def _user_weights(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is not None:
        SAEHttpUser.weight = opts.http_weight
        SAEGrpcUser.weight = opts.grpc_weight


class _WeightedPlan:
    """Cycles through a user's tasks in proportion to their weights (deterministic mix)."""

    plan: list[str]
    i: int

    def _set_plan(self, weights: dict[str, int]) -> None:
        self.plan = [name for name, w in weights.items() for _ in range(max(0, w))]
        self.i = 0

    def _next_kind(self) -> str | None:
        if not self.plan:
            return None
        kind = self.plan[self.i % len(self.plan)]
        self.i += 1
        return kind


class SAEHttpUser(_WeightedPlan, HttpUser):
    """OpenAI-compatible chat (plain/steered, streaming or not) and /v1/features/extract."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.o = o
        if o.api_key:
            self.client.headers["Authorization"] = f"Bearer {o.api_key}"
        self.steering = {"edits": [{"dictionary": o.dictionary, "feature": o.feature, "mode": "add", "value": 8.0}]}
        weights = {"chat": o.w_chat, "chat-stream": o.w_chat_stream, "steered": o.w_steered,
                   "steered-stream": o.w_steered_stream, "extract": o.w_extract}
        self._set_plan(weights)

    def _body(self, steered: bool, stream: bool) -> dict:
        q = QUESTIONS[self.i % len(QUESTIONS)]
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": self.o.max_tokens, "temperature": 0.7,
                "seed": self.i}
        if steered:
            body["steering"] = self.steering
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _chat(self, steered: bool) -> None:
        name = "/v1/chat/completions" + (" [steered]" if steered else "")
        with self.client.post("/v1/chat/completions", json=self._body(steered, False), name=name,
                              catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("choices"):
                r.failure(f"{r.status_code}: {r.text[:200]}")

    def _chat_stream(self, steered: bool) -> None:
        name = "/v1/chat/completions stream" + (" [steered]" if steered else "")
        t0 = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self._body(steered, True), name=name, stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            done = False
            for line in r.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                elif b'"error"' in line:
                    r.failure(line.decode()[:200])
                    return
            if not done:
                r.failure("stream ended without [DONE]")
            else:
                r.request_meta["response_time"] = (time.perf_counter() - t0) * 1000  # to the last token
                r.success()

    def _extract(self) -> None:
        body = {"text": TEXT_64, "features": {"dictionaries": [self.o.dictionary], "top_k": 8}}
        with self.client.post("/v1/features/extract", json=body, name="/v1/features/extract",
                              catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("tokens"):
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task
    def step(self) -> None:
        kind = self._next_kind()
        if kind is None:
            return
        if kind == "extract":
            self._extract()
        elif kind.endswith("stream"):
            self._chat_stream(kind.startswith("steered"))
        else:
            self._chat(kind == "steered")


class SAEGrpcUser(_WeightedPlan, User):
    """gRPC ExtractFeatures (unary) and Generate (server stream, timed to the last message)."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        from sae_wire import sae_serve_pb2 as pb
        from sae_wire import sae_serve_pb2_grpc as pb_grpc

        o = self.environment.parsed_options
        self.o, self.pb = o, pb
        self.channel = grpc.insecure_channel(o.grpc_target)
        self.stub = pb_grpc.SAEServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {o.api_key}")] if o.api_key else None
        self._set_plan({"extract": o.w_grpc_extract, "generate": o.w_grpc_generate})

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, name: str, t0: float, length: int, exc: Exception | None) -> None:
        elapsed_ms = (time.perf_counter() - t0) * 1000
        self.environment.events.request.fire(request_type="grpc", name=name, response_time=elapsed_ms,
                                             response_length=length, exception=exc, context={})

    @task
    def step(self) -> None:
        kind = self._next_kind()
        if kind is None:
            return
        pb = self.pb
        t0 = time.perf_counter()
        if kind == "extract":
            try:
                resp = self.stub.ExtractFeatures(pb.ExtractFeaturesRequest(
                    text=TEXT_64, features=pb.FeatureRequest(dictionaries=[self.o.dictionary], top_k=8)),
                    timeout=120, metadata=self.metadata)
                self._fire("ExtractFeatures", t0, resp.ByteSize(), None if resp.tokens else RuntimeError("no tokens"))
            except grpc.RpcError as exc:
                self._fire("ExtractFeatures", t0, 0, exc)
            return
        req = pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=QUESTIONS[self.i % len(QUESTIONS)])]),
            sampling=pb.SamplingOptions(max_tokens=self.o.max_tokens, temperature=0.7, seed=self.i))
        try:
            n, finished = 0, False
            for msg in self.stub.Generate(req, timeout=120, metadata=self.metadata):
                n += len(msg.token_ids)
                finished = finished or msg.finished
            self._fire("Generate stream", t0, n, None if finished else RuntimeError("stream ended unfinished"))
        except grpc.RpcError as exc:
            self._fire("Generate stream", t0, 0, exc)

