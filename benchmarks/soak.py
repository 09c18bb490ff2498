"""Soak: a steady moderate load for ten minutes while sampling the memory of every server process.

    python benchmarks/soak.py                     # 3 users, 600 s
    python benchmarks/soak.py --users 4 --duration 600 --bound-mib 64

Starts sae-serve (as benchmarks/load.py does), runs Locust headless, and every
``--every`` seconds records the RSS of each process in the server's tree (sae-serve, Ray's
GCS/raylet/controller/proxy, the replica, vLLM's engine core and worker). Memory counts as
flat when, for every process, the largest RSS of the last third of the run exceeds the
largest RSS of the middle third by less than ``--bound-mib`` (the first third is warm-up:
caches, the tokenizer, allocator arenas). Exit 1 on failures or growth. Not part of
``make test``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load


def sample_tree(root_pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in load.process_tree(root_pid):
        try:
            name = " ".join(p.cmdline())[:60] or p.name()
            key = f"{p.pid} {name}"
            out[key] = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--duration", type=int, default=600)
    p.add_argument("--every", type=float, default=15.0)
    p.add_argument("--bound-mib", type=float, default=64.0)
    p.add_argument("--server-args", default="")
    args = p.parse_args()
    out = load.REPO / "benchmarks" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port = load.free_port(), load.free_port()
    # The default deployment: default model and dictionary, default limits.
    ns = argparse.Namespace(dictionary_dir=None, server_args=args.server_args, start_timeout=900)
    print(f"soak: starting sae-serve (HTTP {http_port}, gRPC {grpc_port}); log in {out / 'server.log'}", flush=True)
    proc = load.start_server(ns, http_port, grpc_port, out)
    print(f"soak: {args.users} users for {args.duration}s, memory sampled every {args.every:.0f}s", flush=True)
    samples: list[tuple[float, dict[str, float]]] = []
    stop = threading.Event()

    def sampler() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, sample_tree(proc.pid)))
            stop.wait(args.every)

    thread = threading.Thread(target=sampler, daemon=True)
    base = f"http://127.0.0.1:{http_port}"
    tokens_before = load.generated_tokens(base, {})
    tokens_after = float("nan")
    try:
        thread.start()
        rc, prefix = load.run_locust(out, base, grpc_port, args.users, min(args.duration, 3600),
                                     load.DEFAULT_DICTIONARY_ID)
        tokens_after = load.generated_tokens(base, {})
    finally:
        stop.set()
        thread.join(30)
        load.stop_server(proc)
    (out / "memory.json").write_text(json.dumps(samples))
    n = len(samples)
    grew = []
    print(f"{'process':<70} {'start':>8} {'mid max':>8} {'end max':>8}  MiB")
    for key in samples[-1][1] if samples else {}:
        series = [s.get(key) for _, s in samples]
        mid = [v for v in series[n // 3: 2 * n // 3] if v is not None]
        end = [v for v in series[2 * n // 3:] if v is not None]
        first = next((v for v in series if v is not None), 0.0)
        if not mid or not end:
            continue
        flag = max(end) - max(mid) >= args.bound_mib
        grew += [key] if flag else []
        print(f"{key[:70]:<70} {first:>8.0f} {max(mid):>8.0f} {max(end):>8.0f}{'  GREW' if flag else ''}")
    text = load.summary(prefix, args.duration, tokens_after - tokens_before)
    print(text)
    failures = sum(int(r["Failure Count"]) for r in csv.DictReader(open(f"{prefix}_stats.csv"))
                   if r["Name"] == "Aggregated")
    print(f"soak: {failures} failures, {len(grew)} process(es) grew by >= {args.bound_mib:.0f} MiB; locust exit {rc}")
    return 0 if failures == 0 and not grew else 1


if __name__ == "__main__":
    raise SystemExit(main())
