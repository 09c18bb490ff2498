"""Serving efficiency: the deployed server against its own engine in-process, side by side.

The same chat requests (the default model's chat template, greedy, ``ignore_eos``, the same
number of new tokens) at each concurrency, with and without top-8 features on every token,
go through:

1. the in-process engine: ``SAEEngine`` with the server's default engine settings, driven
   from this process (no HTTP, no Ray, no JSON);
2. the default deployment: ``sae-serve`` (Ray Serve proxy → replica → the same engine),
   streamed chat completions over HTTP from this process (``stream=true``, features in
   each chunk when asked for), every token read.

Both run at once (the server started first, then the engine in this process; an idle vLLM
engine parks its processes) and take turns: after a warm-up of every configuration,
``--repeats`` rounds of one batch of each, so a change in the machine's speed falls on both
sides alike. tokens/s is generated tokens over wall time for the whole batch; the median of
the rounds. Where the time goes: over the timed batches of each configuration, the CPU
seconds of every process (this one, and every process under it or under ``sae-serve``:
Ray's proxy, controller and replica, vLLM's engine core and worker, Ray's own daemons) per
wall second, grouped by role; two cores give at most 2.0. The ratio server/engine is what
the deployment costs. ``--bind`` runs the
whole comparison once per CPU thread binding (``VLLM_CPU_OMP_THREADS_BIND``; ``default`` =
what sae-serve does with no setting), since the binding decides how the engine shares the
cores with the API process, Ray's proxy and vLLM's engine core.

``--direct-ingress`` starts the server with ``--direct-ingress`` and sends the streams to the
replica's own port (Ray Serve's direct ingress) instead of through Ray's proxy.

Run: ``.venv/bin/python benchmarks/serving_efficiency.py [--concurrency 8,32] [--bind default,0-1]
[--direct-ingress]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from load import free_port, process_tree, start_server, stop_server  # noqa: E402  (benchmarks/load.py)
from rounds import interleaved  # noqa: E402  (benchmarks/rounds.py)

TOPICS = ["rivers", "bread", "clocks", "bridges", "music", "maps", "glass", "paper"]


ROLES = [  # (role, substring of the process's command line), first match wins
    ("vLLM worker", "VLLM::Worker"),
    ("vLLM engine core", "VLLM::EngineCore"),
    ("Serve replica (API + engine client)", "ServeReplica"),
    ("Serve proxy (HTTP/gRPC)", "ProxyActor"),
    ("Serve controller", "ServeController"),
    ("Ray daemons (GCS, raylet, agents...)", "ray"),
    ("sae-serve driver", "sae-serve"),
]
CPU_USAGE: dict[tuple[str, int, bool], dict[str, float]] = {}
"""(side, streams, features) -> role -> CPU seconds per wall second over the timed batches."""


def _role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "other"
    for role, marker in ROLES:
        if marker in cmd:
            return role
    return "this process (client)" if p.pid == os.getpid() else "other"


def cpu_times(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds) for ``root_pid`` and every process under it."""
    out = {}
    for p in process_tree(root_pid):
        try:
            t = p.cpu_times()
            out[p.pid] = (_role(p), t.user + t.system)
        except psutil.Error:
            continue
    return out


def usage(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float) -> dict[str, float]:
    """CPU seconds per wall second of each role between two :func:`cpu_times` snapshots."""
    out: dict[str, float] = {}
    for pid, (role, t) in after.items():
        out[role] = out.get(role, 0.0) + (t - before.get(pid, (role, 0.0))[1]) / wall
    return out


def _snap(roots: tuple[list[int], list[int]]) -> dict[int, tuple[str, float]]:
    """:func:`cpu_times` of the processes under ``roots[0]`` but not under ``roots[1]``."""
    out: dict[int, tuple[str, float]] = {}
    for r in roots[0]:
        out.update(cpu_times(r))
    for r in roots[1]:
        for pid in cpu_times(r):
            out.pop(pid, None)
    return out


async def rounds(batches: dict, repeats: int, roots: dict) -> dict:
    """Median tokens/s of every batch function of ``batches`` (key -> ``async () -> tokens/s``)
    measured in turn (:func:`rounds.interleaved`). Records the CPU use of the processes of
    ``roots[key]`` (:func:`_snap`) over the key's timed runs in ``CPU_USAGE``."""
    cpu: dict = {k: {} for k in batches}
    wall: dict = {k: 0.0 for k in batches}

    @contextlib.contextmanager
    def cpu_of(key) -> Iterator[None]:
        before, t0 = _snap(roots[key]), time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        wall[key] += dt
        for role, v in usage(before, _snap(roots[key]), dt).items():
            cpu[key][role] = cpu[key].get(role, 0.0) + v * dt

    rates = await interleaved(batches, repeats, around=cpu_of)
    for key in batches:
        CPU_USAGE[key] = {role: v / wall[key] for role, v in cpu[key].items()}
    return {k: statistics.median(v) for k, v in rates.items()}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write about the history of {TOPICS[i % len(TOPICS)]} (note {i})."}]


async def start_engine(args) -> object:
    """The in-process engine with the server's default engine settings (and its dictionary)."""
    from sae_runtime.engine.engine import SAEEngine
    from server.config import ServeConfig

    config = ServeConfig().engine
    if not config.dictionaries:
        config = config.model_copy(update={"dictionaries": [str(REPO / "sae_runtime/data/default_dictionary")]})
    if args.eager:
        config = config.model_copy(update={"enforce_eager": True})
    if args.stream_interval is not None:
        config = config.model_copy(update={"stream_interval": args.stream_interval})
    return await SAEEngine.start(config)


def engine_batches(args, eng, concurrencies: list[int]) -> dict:
    """(\"engine\", streams, features) -> an ``async () -> tokens/s`` batch on the in-process engine."""
    from vllm import SamplingParams

    from sae_runtime.engine.spec import SAERequestSpec

    did = eng.registry.ids()[0]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    features = SAERequestSpec.model_validate({"features": {"dictionaries": [did], "top_k": 8, "scope": "generated"}})
    out = {}
    for n in concurrencies:
        ids = [eng.encode_chat(messages(i)) for i in range(n)]
        for with_features in (False, True):
            spec = features if with_features else None

            async def batch(ids=ids, spec=spec) -> float:
                t0 = time.perf_counter()
                outs = await asyncio.gather(*[eng.complete(x, params, spec) for x in ids])
                total = sum(o.num_generated_tokens for o in outs)
                assert total == len(ids) * args.tokens, total
                return total / (time.perf_counter() - t0)

            out[("engine", n, with_features)] = batch
    return out


async def stream_chat(client: httpx.AsyncClient, base: str, i: int, args, did: str | None) -> int:
    """Generated tokens of one streamed chat completion, every chunk read (and, with
    features, a check that each generated token the model read came with its features)."""
    body: dict = {"model": args.model_name, "messages": messages(i), "max_tokens": args.tokens,
                  "temperature": 0.0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
    if did is not None:
        body["features"] = {"dictionaries": [did], "top_k": 8, "scope": "generated"}
    with_features = 0
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                with_features += len(choice.get("features") or [])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                # every generated token but the last, which the model never reads (README)
                if did is not None and with_features != tokens - 1:
                    raise RuntimeError(f"{tokens} tokens but {with_features} with features")
                return tokens
    raise RuntimeError("stream ended without usage")


def server_batches(args, client, base: str, did: str, concurrencies: list[int]) -> dict:
    """(\"server\", streams, features) -> an ``async () -> tokens/s`` batch of streamed chats."""
    out = {}
    for n in concurrencies:
        for with_features in (False, True):
            want = did if with_features else None

            async def batch(n=n, want=want) -> float:
                t0 = time.perf_counter()
                counts = await asyncio.gather(*[stream_chat(client, base, i, args, want) for i in range(n)])
                total = sum(counts)
                assert total == n * args.tokens, (total, n * args.tokens)
                return total / (time.perf_counter() - t0)

            out[("server", n, with_features)] = batch
    return out


def replica_base(base: str, log: Path, timeout_s: float = 120.0) -> str:
    """The replica's own HTTP address under ``--direct-ingress``, from ``/health?detail=1``
    (``direct_ingress``; the replica's servers come up a moment after sae-serve's ready line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        addresses = httpx.get(f"{base}/health?detail=1", timeout=30).json().get("direct_ingress") or []
        http = [a["address"] for a in addresses if a["protocol"] == "http"]
        if http:
            return http[0].removesuffix("/v1")
        time.sleep(1)
    raise SystemExit(f"--direct-ingress: /health?detail=1 lists no replica address; see {log}")


async def compare(args, bind: str | None, concurrencies: list[int], out_dir: Path) -> dict:
    """The server and the in-process engine at once (an idle vLLM engine parks its processes
    after a second), their batches in turn (:func:`rounds`): (side, streams, features) -> tokens/s."""
    from server.config import ServeConfig

    # the in-process engine gets what the server's replica gets (sae-serve's default: "all")
    engine_bind = bind or ServeConfig().engine.cpu_threads_bind
    if engine_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = engine_bind
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    http_port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    extra = ["--cpu-threads-bind", bind] if bind else []
    if args.eager:
        extra.append("--eager")
    if args.stream_interval is not None:
        extra += ["--stream-interval", str(args.stream_interval)]
    if args.direct_ingress:
        extra.append("--direct-ingress")
    server_args = argparse.Namespace(
        dictionary_dir=None, dictionary=None, server_args=" ".join(extra), start_timeout=args.start_timeout
    )
    proc = start_server(server_args, http_port, grpc_port, out_dir)
    eng = None
    try:
        if args.direct_ingress:
            base = replica_base(base, out_dir / "server.log")
            print(f"direct ingress: the replica answers at {base}", flush=True)
        dicts = httpx.get(f"{base}/v1/dictionaries", timeout=30).json()["data"]
        args.model_name = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        eng = await start_engine(args)
        limits = httpx.Limits(max_connections=max(concurrencies) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            batches = {**engine_batches(args, eng, concurrencies),
                       **server_batches(args, client, base, dicts[0]["id"], concurrencies)}
            # the engine's side: this process's tree less the server's (idle meanwhile); the server's: both
            roots = {k: ([os.getpid()], [proc.pid]) if k[0] == "engine" else ([os.getpid(), proc.pid], [])
                     for k in batches}
            return await rounds(batches, args.repeats, roots)
    finally:
        if eng is not None:
            eng.shutdown()
        stop_server(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="8,32", help="comma-separated numbers of concurrent chat streams")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--bind",
        default="default",
        help="comma-separated VLLM_CPU_OMP_THREADS_BIND values; 'default' = sae-serve's default",
    )
    p.add_argument("--eager", action="store_true", help="both sides in vLLM's eager mode (starts faster)")
    p.add_argument("--stream-interval", type=int, default=None,
                   help="both sides' engine.stream_interval (tokens per streamed chunk); default: sae-serve's")
    p.add_argument("--direct-ingress", action="store_true",
                   help="the server with --direct-ingress (Ray Serve's direct ingress); "
                        "the streams go to the replica's own HTTP port, not through the proxy")
    p.add_argument("--start-timeout", type=float, default=900.0)
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    binds = [None if b == "default" else b for b in args.bind.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bind in binds:
            label = bind or "default"
            print(f"binding {label}: sae-serve and the in-process engine, in turn", flush=True)
            rates = asyncio.run(compare(args, bind, concurrencies, Path(tmp)))
            for n in concurrencies:
                for feats in (False, True):
                    rows.append((label, n, feats, rates[("engine", n, feats)], rates[("server", n, feats)]))
    print(
        f"\n{args.tokens} new tokens per request, greedy, chat template, "
        f"{'eager' if args.eager else 'compiled'} mode, stream_interval "
        f"{args.stream_interval or 'default'}, median of {args.repeats}\n"
    )
    print("| binding | streams | features | engine tokens/s | server tokens/s | server / engine |")
    print("|---|---:|---|---:|---:|---:|")
    for label, n, feats, e, s in rows:
        print(f"| {label} | {n} | {'top-8' if feats else 'none'} | {e:.1f} | {s:.1f} | {s / e:.2f} |")
    roles = [r for r, _ in ROLES] + ["this process (client)", "other"]
    print("\nCPU seconds per wall second over the timed batches (last binding run), by process role:\n")
    keys = sorted(CPU_USAGE)
    print("| role | " + " | ".join(f"{side} n={n} {'top-8' if f else 'none'}" for side, n, f in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for role in roles:
        vals = [CPU_USAGE[k].get(role, 0.0) for k in keys]
        if any(v >= 0.005 for v in vals):
            print(f"| {role} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print("| total | " + " | ".join(f"{sum(CPU_USAGE[k].values()):.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
