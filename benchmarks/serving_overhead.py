"""Serving overhead: features of a 64-token text, in-process vs over HTTP and gRPC, one run.

1. The engine in this process (``SAEEngine`` with the default model and dictionary, the
   default compiled mode): tokenize + ``engine.extract`` (top-8 of every token), one
   request at a time.
2. Then the default deployment (``sae-serve``: Ray Serve, proxies, one replica with the
   same engine configuration), one request at a time over HTTP
   (``POST /v1/features/extract``, a kept-alive connection) and over gRPC
   (``ExtractFeatures``, one channel).

Each path is warmed up, then timed ``--requests`` times; the table prints p50 / p90 /
mean latency (ms) and the ratio of each p50 to the in-process p50. The two parts run one
after the other so they never share the CPU.

    .venv/bin/python benchmarks/serving_overhead.py [--requests 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load

sys.path.insert(0, str(load.REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PASSAGE = ("Sparse autoencoders decompose the activations of a language model into many features, most of "
           "which are zero for any given token. Each feature has a decoder direction in the residual stream, "
           "and steering adds a multiple of that direction while the model generates. Researchers read the "
           "strongest features of every token to see what the model represents, and product teams clamp or "
           "ablate features to change what it writes, without retraining anything at all.")
TOP_K = 8


def text_of_tokens(encode, decode, n: int) -> str:
    """A prefix of PASSAGE that tokenizes to exactly ``n`` tokens (as the server counts them)."""
    ids = encode(PASSAGE)
    assert len(ids) >= n, f"the passage has only {len(ids)} tokens"
    for m in range(n, n + 8):  # decode/encode may merge at the cut; find a cut that gives n
        text = decode(ids[:m])
        if len(encode(text)) == n:
            return text
    raise RuntimeError(f"no prefix of the passage tokenizes to {n} tokens")


def stats(ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ms, n=10)
    return statistics.median(ms), q[8], statistics.fmean(ms)


async def in_process(args) -> tuple[str, list[float]]:
    from sae_runtime.engine.engine import EngineConfig, SAEEngine
    from sae_runtime.engine.spec import FeatureRequest
    from server.config import DEFAULT_DICTIONARY_DIR

    engine = await SAEEngine.start(EngineConfig(dictionaries=[str(DEFAULT_DICTIONARY_DIR)]))
    try:
        tok = engine.llm.tokenizer
        text = text_of_tokens(engine.encode_text, lambda ids: tok.decode(ids), 64)
        request = FeatureRequest(dictionaries=[load.DEFAULT_DICTIONARY_ID], top_k=TOP_K)

        async def once() -> float:
            t0 = time.perf_counter()
            tokens = await engine.extract(engine.encode_text(text), request)
            dt = (time.perf_counter() - t0) * 1000
            assert len(tokens) == 64, len(tokens)
            return dt

        for _ in range(args.warmup):
            await once()
        return text, [await once() for _ in range(args.requests)]
    finally:
        engine.shutdown()


def over_the_wire(args, text: str) -> tuple[list[float], list[float]]:
    import grpc
    import httpx

    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port = load.free_port(), load.free_port()
    ns = argparse.Namespace(dictionary_dir=None, server_args="", start_timeout=900)
    print(f"serving_overhead: starting sae-serve (log {out / 'server.log'})", flush=True)
    proc = load.start_server(ns, http_port, grpc_port, out)
    try:
        body = {"text": text, "features": {"dictionaries": [load.DEFAULT_DICTIONARY_ID], "top_k": TOP_K}}
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
            def http_once() -> float:
                t0 = time.perf_counter()
                r = c.post("/v1/features/extract", json=body)
                dt = (time.perf_counter() - t0) * 1000
                assert r.status_code == 200 and len(r.json()["tokens"]) == 64, r.text[:300]
                return dt

            for _ in range(args.warmup):
                http_once()
            http_ms = [http_once() for _ in range(args.requests)]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.SAEServiceStub(channel)
            req = pb.ExtractFeaturesRequest(text=text, features=pb.FeatureRequest(
                dictionaries=[load.DEFAULT_DICTIONARY_ID], top_k=TOP_K))

            def grpc_once() -> float:
                t0 = time.perf_counter()
                resp = stub.ExtractFeatures(req, timeout=60)
                dt = (time.perf_counter() - t0) * 1000
                assert len(resp.tokens) == 64, len(resp.tokens)
                return dt

            for _ in range(args.warmup):
                grpc_once()
            grpc_ms = [grpc_once() for _ in range(args.requests)]
        return http_ms, grpc_ms
    finally:
        load.stop_server(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=str(load.REPO / "benchmarks" / "results" / time.strftime("overhead-%Y%m%d-%H%M%S")))
    args = p.parse_args()
    text, engine_ms = asyncio.run(in_process(args))
    print(f"serving_overhead: in-process done ({len(engine_ms)} requests)", flush=True)
    http_ms, grpc_ms = over_the_wire(args, text)
    base = statistics.median(engine_ms)
    print(f"# measured: extraction of a 64-token text (top-{TOP_K}, {load.DEFAULT_DICTIONARY_ID}), "
          f"{args.requests} sequential requests each")
    print(f"{'path':<22} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} {'p50 / in-process':>17}")
    for name, ms in (("engine in-process", engine_ms), ("HTTP (Ray Serve)", http_ms), ("gRPC (Ray Serve)", grpc_ms)):
        p50, p90, mean = stats(ms)
        print(f"{name:<22} {p50:>8.1f} {p90:>8.1f} {mean:>8.1f} {p50 / base:>17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
