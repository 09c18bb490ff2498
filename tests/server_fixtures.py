"""The session's sae-serve server: the real ``sae-serve`` command, started once.

Starting a replica (vLLM on CPU) takes one to several minutes on the shared 2-core test
machines, so every server test shares one server. It is started exactly as a user starts
it (the ``sae-serve`` console script: Ray on 127.0.0.1, Ray Serve's HTTP and gRPC
proxies, one replica with an eager engine on the default model) with a small test
dictionary and free ports. ``tests/test_server_shutdown.py`` ends it with SIGTERM and
checks that no process of its tree is left; if that test did not run, the fixture's
teardown does the same check.

``tests/conftest.py`` registers this module as a pytest plugin, so its fixtures
(``sae_server``, ``live_server``, ...) are available to every test module by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SAE_SERVE = Path(sys.executable).parent / "sae-serve"
DICTIONARY_ID = "topk6"
START_TIMEOUT_S = float(os.environ.get("SAE_SERVE_TEST_START_TIMEOUT", "900"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    dictionary_dir: Path
    log_path: Path
    dictionary_id: str = DICTIONARY_ID
    stopped: bool = False
    tree: list[psutil.Process] = field(default_factory=list)
    tls_ca: Path | None = None  # set for a server started with --tls-cert: HTTPS, and trust this certificate

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def verify(self) -> Any:
        """httpx's ``verify=`` for this server."""
        if self.tls_ca is None:
            return True
        import ssl

        return ssl.create_default_context(cafile=str(self.tls_ca))

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def snapshot_tree(self) -> list[psutil.Process]:
        """The server and every descendant (Ray's GCS/raylet/workers, vLLM processes)."""
        root = psutil.Process(self.proc.pid)
        self.tree = [root, *root.children(recursive=True)]
        return self.tree

    def stop(self, timeout_s: float = 120) -> tuple[int | None, list[str]]:
        """SIGTERM the server; return its exit code and any process of its tree still alive."""
        if self.stopped:
            return self.proc.returncode, []
        self.stopped = True
        tree = self.snapshot_tree() if self.proc.poll() is None else self.tree
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        _, alive = psutil.wait_procs(tree, timeout=30)
        left = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        for p in alive:  # never leave them behind for the rest of the session
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return rc, left


def start_server(tmp: Path, dictionary_dir: Path, extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None, tls_ca: Path | None = None) -> ServerHandle:
    http_port, grpc_port = free_port(), free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    log_path = tmp / "sae-serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    cmd = [str(SAE_SERVE), "--no-default-dictionary", "--dictionary", str(dictionary_dir),
           "--dictionary-id", DICTIONARY_ID, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
           "--max-model-len", "512", "--max-num-seqs", "8", "--max-request-bytes", "200000", *extra_args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
    server = ServerHandle(proc, http_port, grpc_port, dictionary_dir, log_path, tls_ca=tls_ca)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sae-serve exited with {proc.returncode} before it was ready:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=5, verify=server.verify).status_code == 200:
                server.snapshot_tree()
                return server
        except httpx.HTTPError:
            pass
        time.sleep(2)
    server.stop()
    raise RuntimeError(f"sae-serve not healthy after {START_TIMEOUT_S:.0f}s:\n{server.log_tail()}")


# Each test module that imports the fixture gets its own fixture definition, and pytest
# would run a session-scoped fixture once per definition: the servers are kept here so
# that every module shares one process per kind (conftest.py, which would avoid this, is
# not ours to change).
_SERVERS: dict[str, ServerHandle] = {}


def shared_server(name: str, tmp_path_factory, extra_args: tuple[str, ...] = (),
                  extra_env: dict[str, str] | None = None, config: dict | None = None,
                  index_model_dir: Path | None = None) -> ServerHandle:
    """The ``name`` server of this session, started on first use with the test dictionary
    (and ``config`` as its ``--config`` YAML file, for settings without a flag; with
    ``index_model_dir``, the dictionary gets a feature index built from that model's real
    activations, ``tests/index_factory.py``)."""
    from tests.dictionary_factory import make_dictionary

    if name not in _SERVERS or _SERVERS[name].stopped:  # a module that needed it stopped it: start again
        tmp = tmp_path_factory.mktemp(name)
        if config:
            import yaml

            (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
            extra_args = ("--config", str(tmp / "serve.yaml"), *extra_args)
        # Same seed and shape as conftest's "topk" dictionary, under an explicit id.
        dictionary = make_dictionary(tmp / "topk6", layer=6, d_sae=512, architecture="topk", k=16, seed=1)
        if index_model_dir is not None:
            from tests.index_factory import write_index

            write_index(dictionary, index_model_dir, DICTIONARY_ID)
        _SERVERS[name] = start_server(tmp, dictionary, extra_args, extra_env)
    return _SERVERS[name]


def stop_shared(name: str) -> None:
    """Stop it (idempotent: the first teardown stops it, later ones see it stopped)."""
    _rc, left = _SERVERS[name].stop()
    assert not left, f"processes left after SIGTERM: {left}"


# The session server's response budget: low enough that one request on its 512-token
# context can exceed it (tests/test_bad_input.py), far above what the other tests ask for.
SESSION_MAX_RESPONSE_FEATURE_VALUES = 300_000


@pytest.fixture(scope="session")
def sae_server(default_model_dir, tmp_path_factory) -> ServerHandle:
    """One running ``sae-serve`` for the session (see the module docstring); its dictionary
    has a feature index (``tests/index_factory.py``)."""
    yield shared_server("sae_serve", tmp_path_factory,
                        config={"max_response_feature_values": SESSION_MAX_RESPONSE_FEATURE_VALUES},
                        index_model_dir=default_model_dir)
    stop_shared("sae_serve")


@pytest.fixture
def live_server(sae_server: ServerHandle) -> ServerHandle:
    """The session server, asserted to be still running (the shutdown test stops it)."""
    if sae_server.stopped:
        pytest.fail("the session sae-serve was already stopped (tests/test_server_shutdown.py runs last)")
    if sae_server.proc.poll() is not None:
        pytest.fail(f"sae-serve died (exit {sae_server.proc.returncode}):\n{sae_server.log_tail()}")
    return sae_server


# A second server for tests/test_faults.py (it kills the engine, the replica and the feature
# side channel's receiver): started with an API key and small limits, so it also checks
# those end to end, with fault injection on (server/faults.py) and a short feature wait, so
# that a request whose features never come ends within seconds. Stopped by that module's
# fixture; started at most once per session.
FAULT_API_KEY = "sk-fault-test-7f3a9c1e5b"
FAULT_FEATURE_TIMEOUT_S = 15.0


def _fault_server(tmp_path_factory) -> ServerHandle:
    return shared_server("sae_serve_faults", tmp_path_factory,
                         ("--eager", "--max-concurrent-streams", "2", "--max-edits", "4"),
                         {"SAE_SERVE_API_KEYS": FAULT_API_KEY, "SAE_SERVE_FAULT_INJECTION": "1"},
                         config={"engine": {"feature_timeout_s": FAULT_FEATURE_TIMEOUT_S}})


@pytest.fixture(scope="module")
def fault_server(default_model_dir, tmp_path_factory) -> ServerHandle:
    yield _fault_server(tmp_path_factory)
    stop_shared("sae_serve_faults")


@pytest.fixture(scope="session")
def keyed_server(default_model_dir, tmp_path_factory) -> ServerHandle:
    """The same server as ``fault_server`` (API key ``FAULT_API_KEY``), for tests that only need
    a server with a key and leave it running for tests/test_faults.py (whose module fixture
    stops it); stopped at the end of the session if that module did not run."""
    yield _fault_server(tmp_path_factory)
    stop_shared("sae_serve_faults")
