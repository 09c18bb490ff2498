"""Two Ray nodes on this machine (Ray's ``ray.cluster_utils.Cluster``), one replica on each.

The real ``sae-serve`` joins the cluster (``--ray-address``) with two replicas, at most one
per node, and Serve's proxies on the head. Under a steady load from a few client threads,
the worker node is removed the hard way (its raylet and every process under it killed):
requests that were on it fail with a clean 5xx answer (none hangs), and every request
after a short recovery window succeeds on the head node's replica. At the end nothing of
the cluster is left running.

This is the closest this 2-core machine gets to a node failure of a real cluster; the
README's "Multi-node" section says how to run on one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server_fixtures import DICTIONARY_ID, SAE_SERVE, free_port

pytestmark = pytest.mark.slow

START_TIMEOUT_S = float(os.environ.get("SAE_SERVE_TEST_START_TIMEOUT", "900"))
REQUEST_TIMEOUT_S = 120.0  # a request that takes longer counts as a hang
RECOVERY_S = 45.0  # after the node is gone, every request started later than this must succeed


@contextmanager
def node_environment():
    """Variables the cluster's node processes (started from this process) must inherit.

    On a real cluster they are set where ``ray start`` runs (see the README): the proxies
    read them at import. With the proxy on the head only, Serve would otherwise send every
    request to the head node's replica while it has room (it prefers replicas on the
    proxy's node), and the worker node's replica would never serve.
    """
    wanted = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
              "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "server.proxy_health.proxy_middlewares",
              "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def descendants(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def node_pids(node) -> list[int]:
    """Processes Ray started for one node (raylet, GCS, ... ; workers hang under the raylet)."""
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None]


def replicas_seen(base: str, want: int, timeout: float) -> set[str]:
    """Distinct replica ids answering ``/health?detail=1`` (routed by Serve) until ``want`` are seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/health", params={"detail": 1}, timeout=30)
            if r.status_code == 200:
                seen.add(r.json()["replica"])
        except httpx.HTTPError:
            pass
    return seen


class Load:
    """A few client threads sending short chats and extractions in a loop; every outcome kept."""

    def __init__(self, base: str, threads: int = 3):
        self.base = base
        self.results: list[tuple[float, float, int | str]] = []  # (start, end, 200 / "status body" / exception)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
            while not self.stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    if (i + n) % 2:
                        r = c.post(f"{self.base}/v1/features/extract",
                                   json={"text": "The sea was calm and the sky was blue.",
                                         "features": {"dictionaries": [DICTIONARY_ID], "top_k": 4}})
                        ok = r.status_code == 200 and r.json()["tokens"]
                    else:
                        r = c.post(f"{self.base}/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": f"Count to {n}."}], "max_tokens": 8,
                                         "temperature": 0})
                        ok = r.status_code == 200 and r.json()["choices"]
                    outcome: int | str = 200 if ok else f"{r.status_code} {r.text[:2000]}"
                except Exception as exc:  # timeouts (hangs) and dropped connections land here
                    outcome = f"{type(exc).__name__}: {exc}"
                self.results.append((t0, time.monotonic(), outcome))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT_S + 10)


def test_a_replica_on_each_node_and_losing_one_node_keeps_serving(tmp_path: Path, default_model_dir) -> None:
    from ray.cluster_utils import Cluster

    from tests.dictionary_factory import make_dictionary

    dictionary = make_dictionary(tmp_path / "topk6", layer=6, d_sae=512, architecture="topk", k=16, seed=1)
    http_port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    with node_environment():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=1)
    server = None
    cluster_procs: list[psutil.Process] = []
    try:
        cluster.wait_for_nodes()
        log = open(tmp_path / "sae-serve.log", "wb")
        server = subprocess.Popen(
            [str(SAE_SERVE), "--ray-address", cluster.address, "--replicas", "2", "--max-replicas-per-node", "1",
             "--proxy-location", "HeadOnly", "--eager", "--no-default-dictionary", "--dictionary", str(dictionary),
             "--dictionary-id", DICTIONARY_ID, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
             "--max-model-len", "512", "--max-num-seqs", "8"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def log_tail() -> str:
            return "\n".join((tmp_path / "sae-serve.log").read_text(errors="replace").splitlines()[-40:])

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # serve.run returns once both replicas are up; the CLI then says "ready"
            assert server.poll() is None, f"sae-serve exited with {server.returncode}:\n{log_tail()}"
            if b"sae-serve: ready" in (tmp_path / "sae-serve.log").read_bytes():
                break
            assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT_S:.0f}s:\n{log_tail()}"
            time.sleep(2)
        cluster_procs = descendants(node_pids(cluster.head_node) + node_pids(worker))

        # One replica per node: two distinct replicas answer.
        seen = replicas_seen(base, 2, timeout=60)
        assert len(seen) == 2, f"only {seen} answered"
        worker_tree = descendants(node_pids(worker))
        assert any("SAEDeployment" in " ".join(p.cmdline()) for p in worker_tree if p.is_running()), \
            "no replica runs on the worker node"

        with Load(base) as load:
            time.sleep(20)  # steady load over both replicas
            before = len(load.results)
            t_kill = time.monotonic()
            cluster.remove_node(worker, allow_graceful=False)
            time.sleep(RECOVERY_S + 30)
        assert before >= 6, f"too little load before the node went away: {load.results}"
        bad_before = [r for r in load.results if r[0] < t_kill and r[1] < t_kill and r[2] != 200]
        assert not bad_before, f"failures with both nodes up: {bad_before}"
        # During the transition a request that was on the lost node fails, but with a clean
        # answer (503, JSON naming the problem), never a hang or a dropped connection.
        transition = [r for r in load.results if r[1] >= t_kill and r[0] < t_kill + RECOVERY_S]
        failed = [r for r in transition if r[2] != 200]
        for r in failed:
            assert isinstance(r[2], str) and r[2].startswith("503 "), failed
            assert "no replica answered this request" in json.loads(r[2][4:])["error"]["message"], failed
        after = [r for r in load.results if r[0] >= t_kill + RECOVERY_S]
        assert len(after) >= 5, f"too few requests after recovery: {load.results[-10:]}"
        assert all(r[2] == 200 for r in after), f"failures after the node was gone: {[r for r in after if r[2] != 200]}"
        assert all(r[1] - r[0] < REQUEST_TIMEOUT_S for r in load.results)
        # The survivor is the head node's replica, and health says so.
        assert len(replicas_seen(base, 2, timeout=10)) == 1
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        cluster_procs += descendants(node_pids(cluster.head_node)) if cluster.head_node else []
        cluster.shutdown()
    assert server.returncode == 0, f"sae-serve exit {server.returncode}"
    _, alive = psutil.wait_procs(cluster_procs, timeout=60)
    left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not left, f"processes of the cluster left running: {left}"
