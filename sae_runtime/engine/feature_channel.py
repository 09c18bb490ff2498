"""The side channel that carries extracted features from the vLLM worker to the API process.

Why a side channel: vLLM's own output path (worker → engine core → API process) has no
room for per-token tensors of a custom kind, and routing them through ``collective_rpc``
would cost a round trip through the engine core's busy loop per step. Instead the worker
pushes one ZeroMQ multipart message per step over a local IPC socket: a small JSON header
followed by the raw numpy buffers (no pickling; the receiver only trusts shapes it checks).

The API process owns the PULL end (:class:`FeatureReceiver`), registers each request that
asked for features, and collects its chunks until the request ends; chunks for requests
that are not registered (aborted, finished) are dropped on arrival, so nothing grows
without bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.asyncio


@dataclass
class FeatureChunk:
    """Features of some tokens of one request, from one dictionary, computed in one step."""

    rid: str
    dictionary: str
    positions: np.ndarray
    """``[n]`` int32: token positions in the request (prompt tokens first, then generated)."""
    indices: np.ndarray | None
    """``[n, k]`` int32 feature ids (top-k requests), or ``None`` for explicit feature ids."""
    values: np.ndarray
    """``[n, k]`` float32 activations, sorted descending for top-k; ``[n, m]`` for explicit ids."""


def encode_message(chunks: list[FeatureChunk]) -> list[bytes | memoryview]:
    """One step's chunks → ZeroMQ frames (header + contiguous buffers)."""
    header = []
    frames: list[bytes | memoryview] = [b""]
    for c in chunks:
        entry = {"rid": c.rid, "dict": c.dictionary, "n": int(c.positions.shape[0]), "m": int(c.values.shape[1])}
        entry["has_idx"] = c.indices is not None
        frames.append(np.ascontiguousarray(c.positions, dtype=np.int32).data)
        if c.indices is not None:
            frames.append(np.ascontiguousarray(c.indices, dtype=np.int32).data)
        frames.append(np.ascontiguousarray(c.values, dtype=np.float32).data)
        header.append(entry)
    frames[0] = json.dumps(header).encode()
    return frames


def decode_message(frames: list[bytes]) -> list[FeatureChunk]:
    header = json.loads(frames[0])
    out = []
    i = 1
    for e in header:
        n, m = e["n"], e["m"]
        positions = np.frombuffer(frames[i], dtype=np.int32)
        i += 1
        indices = None
        if e["has_idx"]:
            indices = np.frombuffer(frames[i], dtype=np.int32).reshape(n, m)
            i += 1
        values = np.frombuffer(frames[i], dtype=np.float32).reshape(n, m)
        i += 1
        if positions.shape[0] != n:
            raise ValueError("feature message: position count does not match header")
        out.append(FeatureChunk(e["rid"], e["dict"], positions, indices, values))
    return out


class FeatureSender:
    """Worker end: PUSH socket connected to the API process's receiver."""

    def __init__(self, address: str):
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        # Never drop features silently: a full queue blocks the worker (back-pressure), and
        # the receiver drains continuously.
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)

    def send(self, chunks: list[FeatureChunk]) -> None:
        if chunks:
            self._sock.send_multipart(encode_message(chunks), copy=False)

    def close(self) -> None:
        self._sock.close(linger=0)


@dataclass
class RequestFeatures:
    """Everything received so far for one request.

    ``rows[kind][dictionary][position]``: kind ``"top"`` holds ``(indices, values)`` of a
    top-k request, kind ``"ids"`` the values of explicitly requested feature ids.
    """

    dictionaries: list[str]
    kinds: tuple[str, ...] = ("top",)
    rows: dict[str, dict[str, dict[int, tuple[np.ndarray | None, np.ndarray]]]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, chunk: FeatureChunk) -> None:
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
        )

    def pop(self, kind: str, dictionary: str, position: int) -> tuple[np.ndarray | None, np.ndarray] | None:
        if kind not in self.kinds:
            return None
        return self.rows[kind][dictionary].pop(position)


class FeatureReceiver:
    """API end: PULL socket on a private IPC path, drained by an asyncio task."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="sae-serve-")
        os.chmod(self._dir, 0o700)  # only this user may connect and inject features
        self.address = f"ipc://{self._dir}/features.sock"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.address)
        self._requests: dict[str, RequestFeatures] = {}
        self._task: asyncio.Task | None = None
        self.dropped_chunks = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            for chunk in decode_message(frames):
                req = self._requests.get(chunk.rid)
                if req is None:
                    self.dropped_chunks += 1
                else:
                    req.add(chunk)

    def register(self, rid: str, dictionaries: list[str], kinds: tuple[str, ...] = ("top",)) -> RequestFeatures:
        req = RequestFeatures(dictionaries=list(dictionaries), kinds=kinds)
        self._requests[rid] = req
        return req

    def unregister(self, rid: str) -> None:
        self._requests.pop(rid, None)

    @property
    def live_requests(self) -> int:
        return len(self._requests)

    def close(self) -> None:
        if self._sock.closed:
            return
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
