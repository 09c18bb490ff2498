"""The side channel that carries extracted features from the vLLM worker to the API process.

Why a side channel: vLLM's own output path (worker → engine core → API process) has no
room for per-token tensors of a custom kind, and routing them through ``collective_rpc``
would cost a round trip through the engine core's busy loop per step. Instead the worker
pushes one ZeroMQ multipart message per step over a local IPC socket: a small JSON header
followed by the raw numpy buffers (no pickling; the receiver only trusts shapes it checks).
The frame format is :mod:`sae_runtime.protocol.feature_frames`; the worker's PUSH end is
:class:`sae_runtime.worker.feature_sender.FeatureSender`; this module is the API end.

The API process owns the PULL end (:class:`FeatureReceiver`), registers each request that
asked for features, and collects its chunks until the request ends; chunks for requests
that are not registered (aborted, finished) are dropped on arrival, so nothing grows
without bound. Both ends' queues are bounded (``SEND_HWM`` in the sender, :data:`RECEIVE_HWM`
messages); a message the receiver cannot decode is dropped and counted; the receiving task
is supervised (restarted when it stops; after repeated failures the receiver reports itself
unhealthy, which fails the replica's health check so that Ray replaces it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from sae_runtime.protocol.feature_frames import (  # noqa: F401  (re-exported for callers of this module)
    Chunk,
    FeatureChunk,
    FeatureFrameError,
    StreamChunk,
    decode_message,
    encode_message,
)

logger = logging.getLogger("sae_runtime.feature_channel")

# Bound of the receiving end, in messages (one message = one engine step's features); the
# sending end's bounds are in sae_runtime/worker/feature_sender.py.
RECEIVE_HWM = 1000  # queued in the API process
# A receiver that stops this often within the window gives up and marks the replica unhealthy.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


@dataclass
class RequestFeatures:
    """Everything received so far for one request.

    ``rows[kind][dictionary][position]``: kind ``"top"`` holds ``(indices, values)`` of a
    top-k request, kind ``"ids"`` the values of explicitly requested feature ids.
    ``stream_rows[layer][position]``: the raw residual stream row at a hook point asked for
    in ``streams`` (stream chunks). ``watch_rows[dictionary][position]``: the values of the
    request's watched (``stop_when``) features of ``dictionary`` at a generated position
    (watch chunks; positions from ``watch_from`` on).
    """

    dictionaries: list[str]
    kinds: tuple[str, ...] = ("top",)
    rows: dict[str, dict[str, dict[int, tuple[np.ndarray | None, np.ndarray]]]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    streams: tuple[int, ...] = ()
    stream_rows: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    watches: tuple[str, ...] = ()
    watch_from: int = 0
    watch_rows: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def add(self, chunk: Chunk) -> None:
        if isinstance(chunk, StreamChunk):
            if chunk.layer not in self.streams:
                raise ValueError(f"stream of hook point {chunk.layer}, not asked for")
            table_s = self.stream_rows.setdefault(chunk.layer, {})
            for j, pos in enumerate(chunk.positions.tolist()):
                table_s[pos] = chunk.values[j]  # a recomputed position overwrites: same numbers
            self.changed.set()
            return
        if chunk.watch:
            if chunk.dictionary not in self.watches:
                raise ValueError(f"watched features of {chunk.dictionary!r}, not asked for")
            table_w = self.watch_rows.setdefault(chunk.dictionary, {})
            for j, pos in enumerate(chunk.positions.tolist()):
                table_w[pos] = chunk.values[j]
            self.changed.set()
            return
        kind = "ids" if chunk.indices is None else "top"
        table = self.rows.setdefault(kind, {}).setdefault(chunk.dictionary, {})
        for j, pos in enumerate(chunk.positions.tolist()):
            # A recomputed position (preemption, recompute) overwrites: same numbers.
            idx = chunk.indices[j] if chunk.indices is not None else None
            table[pos] = (idx, chunk.values[j])
        self.changed.set()

    def covers(self, positions: range) -> bool:
        return all(
            p in self.rows.get(kind, {}).get(d, {})
            for kind in self.kinds for d in self.dictionaries for p in positions
        ) and all(p in self.stream_rows.get(L, {}) for L in self.streams for p in positions)

    def watched(self, positions: range) -> bool:
        """Whether the watched features of every position in ``positions`` from ``watch_from`` on have arrived."""
        return all(p in self.watch_rows.get(d, {}) for d in self.watches for p in positions if p >= self.watch_from)

    def pop_watch(self, dictionary: str, position: int) -> np.ndarray:
        return self.watch_rows[dictionary].pop(position)

    def stream(self, layer: int, positions: range) -> np.ndarray:
        """``[len(positions), d]`` float32: the stream rows at hook point ``layer``."""
        table = self.stream_rows[layer]
        return np.stack([table[p] for p in positions])

    def pop(self, kind: str, dictionary: str, position: int) -> tuple[np.ndarray | None, np.ndarray] | None:
        if kind not in self.kinds:
            return None
        return self.rows[kind][dictionary].pop(position)


class FeatureReceiver:
    """API end: PULL socket on a private IPC path, drained by a supervised asyncio task.

    A message that cannot be decoded is dropped and counted (``bad_frames``), never fatal.
    If the draining task stops anyway (an unexpected error, a cancellation), it is started
    again at once (``restarts``); messages still queued in the socket are not lost. If it
    keeps stopping (:data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW_S`), the
    receiver gives up and reports itself unhealthy (``healthy`` false, ``failure`` says
    why): the replica's ``/health`` and Ray Serve's health check then fail, and Ray
    replaces the replica.
    """

    def __init__(self, hwm: int | None = None, max_restarts: int | None = None,
                 restart_window_s: float | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="sae-serve-")
        os.chmod(self._dir, 0o700)  # only this user may connect and inject features
        self.address = f"ipc://{self._dir}/features.sock"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM if hwm is None else hwm)
        self._sock.bind(self.address)
        self._requests: dict[str, RequestFeatures] = {}
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._max_restarts = MAX_RESTARTS if max_restarts is None else max_restarts
        self._restart_window_s = RESTART_WINDOW_S if restart_window_s is None else restart_window_s
        self._restart_times: deque[float] = deque()
        self.messages = 0  # messages decoded
        self.dropped_chunks = 0  # chunks of requests no longer registered (finished, aborted)
        self.bad_frames = 0  # messages that could not be decoded, dropped
        self.restarts = 0  # times the draining task was started again
        self.failure: str | None = None  # why the receiver gave up; None while it works

    # -- supervision ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self._closing and self.failure is None:
            self._loop = asyncio.get_running_loop()
            self._spawn()

    def _spawn(self) -> None:
        assert self._loop is not None
        self._task = self._loop.create_task(self._drain(), name="sae-feature-receiver")
        self._task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task) -> None:
        if self._closing or task is not self._task:
            return
        if self._loop is None or self._loop.is_closed():  # the event loop itself is ending
            self._task = None
            return
        reason = "cancelled" if task.cancelled() else f"{type(task.exception()).__name__}: {task.exception()}"
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self._restart_window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= self._max_restarts:
            self._task = None
            self.failure = (f"the feature side channel's receiver stopped {len(self._restart_times) + 1} times "
                            f"within {self._restart_window_s:.0f} s (last: {reason})")
            logger.error("%s; giving up: this replica reports itself unhealthy", self.failure)
            self._wake_all()
            return
        self._restart_times.append(now)
        self.restarts += 1
        logger.error("the feature side channel's receiver stopped (%s); restarting it (restart %d)",
                     reason, self.restarts)
        self._spawn()

    @property
    def healthy(self) -> bool:
        """True while the draining task runs (or is being restarted)."""
        return self.failure is None and not self._closing and self._task is not None

    def _wake_all(self) -> None:
        for req in self._requests.values():
            req.changed.set()  # waiters re-check and see the failure

    # -- receiving --------------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self.handle(frames)

    def handle(self, frames: list[bytes]) -> int:
        """Deliver one message's chunks to their requests; return how many were delivered.

        A message that cannot be decoded is dropped whole and counted in ``bad_frames``.
        """
        try:
            chunks = decode_message(frames)
        except Exception as exc:  # FeatureFrameError, or anything a hostile message provokes
            self.bad_frames += 1
            if self.bad_frames == 1 or self.bad_frames % 100 == 0:
                logger.warning("feature side channel: dropped a message that cannot be decoded (%s: %s); "
                               "%d dropped so far", type(exc).__name__, exc, self.bad_frames)
            return 0
        self.messages += 1
        delivered = 0
        for chunk in chunks:
            req = self._requests.get(chunk.rid)
            if req is None:
                self.dropped_chunks += 1
                continue
            try:
                req.add(chunk)
                delivered += 1
            except Exception as exc:  # e.g. a dictionary the request did not ask for
                self.bad_frames += 1
                logger.warning("feature side channel: dropped a chunk for %s (%s: %s)", chunk.rid,
                               type(exc).__name__, exc)
        return delivered

    def register(self, rid: str, dictionaries: list[str], kinds: tuple[str, ...] = ("top",),
                 streams: tuple[int, ...] = (), watches: tuple[str, ...] = (), watch_from: int = 0
                 ) -> RequestFeatures:
        req = RequestFeatures(dictionaries=list(dictionaries), kinds=kinds, streams=tuple(streams),
                              watches=tuple(watches), watch_from=watch_from)
        self._requests[rid] = req
        return req

    def unregister(self, rid: str) -> None:
        self._requests.pop(rid, None)

    @property
    def live_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "messages": self.messages, "bad_frames": self.bad_frames,
                "dropped_chunks": self.dropped_chunks, "restarts": self.restarts,
                "live_requests": self.live_requests, "failure": self.failure}

    def close(self) -> None:
        self._closing = True
        if self._ctx.closed:
            return
        # (The socket may be closed already, when it failed: the context and the socket's
        # directory must still go.)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._sock.close(linger=0)
        self._ctx.term()
        try:
            os.unlink(self.address[len("ipc://"):])
            os.rmdir(self._dir)
        except OSError:
            pass
