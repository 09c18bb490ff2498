"""Bounded load run: start sae-serve, run Locust headless against it, stop it, print a summary.

    python benchmarks/load.py                       # 4 users, 90 s, the default deployment
    python benchmarks/load.py --users 8 --duration 120 --server-args "--max-num-seqs 16"
    python benchmarks/load.py --no-server --http-port 8000 --grpc-port 50051   # a server already running

Prints, per route: requests/s, p50/p95/p99 (ms; streams timed to the last token),
failures; plus generated tokens/s from the server's own counter
(``sae_serve_generated_tokens_total`` in /metrics, before vs after). Locust's CSVs land in
``--out`` (default ``benchmarks/results/load-<time>``). Only 127.0.0.1 is ever targeted;
duration is capped at 15 minutes.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_DURATION_S = 900
DEFAULT_DICTIONARY_ID = "layers.12/topk-4608"  # what plain `sae-serve` serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root_pid: int) -> list:
    """``root_pid``'s psutil process and every process under it ([] once it has exited)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def generated_tokens(base: str, headers: dict) -> float:
    try:
        text = httpx.get(f"{base}/metrics", headers=headers, timeout=30).text
    except httpx.HTTPError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sae_serve_generated_tokens_total{"))


def start_server(args, http_port: int, grpc_port: int, out: Path) -> subprocess.Popen:
    cmd = [str(BIN / "sae-serve"), "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--host", "127.0.0.1"]
    if args.dictionary_dir:
        cmd += ["--no-default-dictionary", "--dictionary", args.dictionary_dir, "--dictionary-id", args.dictionary]
    cmd += shlex.split(args.server_args)
    log = open(out / "server.log", "wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out, env=env, start_new_session=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sae-serve exited with {proc.returncode}; see {out / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise SystemExit(f"sae-serve not healthy after {args.start_timeout}s; see {out / 'server.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_locust(out: Path, base: str, grpc_port: int, users: int, duration: int, dictionary: str,
               api_key: str = "", spawn_rate: float = 1.0, extra: list[str] | None = None) -> tuple[int, Path]:
    """Locust headless against ``base`` / ``127.0.0.1:grpc_port``; its CSVs under ``out/locust_*``.

    Returns Locust's exit code (1 when a request failed: the CSVs say which) and the CSV prefix.
    """
    prefix = out / "locust"
    cmd = [str(BIN / "locust"), "-f", str(REPO / "benchmarks" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration}s", "--stop-timeout", "60",
           "--csv", str(prefix), "--host", base, "--grpc-target", f"127.0.0.1:{grpc_port}",
           "--dictionary", dictionary, "--only-summary", *(["--api-key", api_key] if api_key else []),
           *(extra or [])]
    rc = subprocess.run(cmd, cwd=REPO, timeout=duration + 180, env=dict(os.environ, PYTHONPATH=str(REPO)),
                        stdout=open(out / "locust.log", "wb"), stderr=subprocess.STDOUT).returncode
    return rc, prefix


def summary(prefix: Path, duration: float, tokens: float) -> str:
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    lines = [f"{'route':<48} {'reqs':>6} {'fail':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7}  (ms)"]
    for r in rows:
        name = (r["Type"] + " " + r["Name"]).strip() if r["Name"] != "Aggregated" else "all routes"
        lines.append(f"{name[:48]:<48} {r['Request Count']:>6} {r['Failure Count']:>5} {float(r['Requests/s']):>7.2f} "
                     f"{r['50%']:>7} {r['95%']:>7} {r['99%']:>7}")
    lines.append(f"generated tokens: {tokens:.0f} in {duration:.0f}s = {tokens / duration:.1f} tokens/s")
    failures = Path(f"{prefix}_failures.csv")
    if failures.exists():
        for r in list(csv.DictReader(open(failures)))[:5]:
            lines.append(f"failure: {r.get('Method', '')} {r.get('Name', '')}: {r.get('Error', '')[:160]} "
                         f"x{r.get('Occurrences', '')}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--spawn-rate", type=float, default=1.0)
    p.add_argument("--duration", type=int, default=90, help=f"seconds of load (at most {MAX_DURATION_S})")
    p.add_argument("--no-server", action="store_true", help="use a server already running on 127.0.0.1")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--server-args", default="", help="extra sae-serve flags")
    p.add_argument("--dictionary", default=DEFAULT_DICTIONARY_ID,
                   help="dictionary id used by the load (default: the default dictionary)")
    p.add_argument("--dictionary-dir", help="serve this dictionary (instead of the default one) under --dictionary")
    p.add_argument("--api-key", default=os.environ.get("SAE_SERVE_LOAD_API_KEY", ""))
    p.add_argument("--start-timeout", type=int, default=900)
    p.add_argument("--out", type=Path)
    p.add_argument("locust_args", nargs="*", help="passed to locust after --, e.g. -- --w-extract 0")
    args = p.parse_args()
    duration = min(args.duration, MAX_DURATION_S)
    out = (args.out or REPO / "benchmarks" / "results" / time.strftime("load-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    http_port = args.http_port or (8000 if args.no_server else free_port())
    grpc_port = args.grpc_port or (50051 if args.no_server else free_port())
    base = f"http://127.0.0.1:{http_port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc = None
    if not args.no_server:
        print(f"load: starting sae-serve (HTTP {http_port}, gRPC {grpc_port}); log in {out / 'server.log'}", flush=True)
        t0 = time.monotonic()
        proc = start_server(args, http_port, grpc_port, out)
        print(f"load: server ready in {time.monotonic() - t0:.0f}s", flush=True)
    try:
        before = generated_tokens(base, headers)
        print(f"load: {args.users} users for {duration}s", flush=True)
        t0 = time.monotonic()
        rc, prefix = run_locust(out, base, grpc_port, args.users, duration, args.dictionary, args.api_key,
                                args.spawn_rate, args.locust_args)
        took = time.monotonic() - t0
        after = generated_tokens(base, headers)
    finally:
        if proc is not None:
            stop_server(proc)
    text = summary(prefix, took, after - before)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"load: locust exit {rc}; CSVs in {out}")
    return 0 if rc in (0, 1) else rc  # locust exits 1 when some request failed: the summary says so


if __name__ == "__main__":
    raise SystemExit(main())
