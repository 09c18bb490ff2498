"""The frame format of the feature side channel (worker → API process).

One ZeroMQ message of two frames per engine step: frame 0 is a JSON header, a list with one
entry per :class:`FeatureChunk`::

    {"rid": str, "dict": str, "n": int, "m": int, "has_idx": bool,    # a FeatureChunk
     "watch": true}                                                   # (only on watch chunks)
    {"rid": str, "kind": "stream", "layer": int, "n": int, "m": int}  # a StreamChunk

frame 1 (the body) holds, for each entry in order, its raw buffers one after the other in
the host's byte order (both ends run on one machine): ``positions`` (``n`` int32),
``indices`` (``n*m`` int32, only when ``has_idx``), ``values`` (``n*m`` float32). One body
rather than a frame per buffer: a decode step of 32 requests × 4 dictionaries makes 384
buffers of a few bytes each, which cost the worker ~2 ms per step as frames and ~0.4 ms
joined (benchmarks/README.md). No pickling: the decoder trusts nothing it has not checked
against the header.
A stream chunk carries raw residual stream rows (``m`` = hidden size) at hook point
``layer`` (``-1`` = embeddings) instead of features. A watch chunk is a feature chunk of
explicit ids that carries the values of a request's watched (``stop_when``) features,
kept apart from the features the request asked for.

The worker encodes (``sae_runtime/worker/feature_sender.py``), the API process decodes
(``sae_runtime/engine/feature_channel.py``); the sockets live there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureChunk:
    """Features of some tokens of one request, from one dictionary, computed in one step."""

    rid: str
    """The request's ``WorkerSpec.rid``."""
    dictionary: str
    """Client-facing id of the dictionary."""
    positions: np.ndarray
    """``[n]`` int32: token positions in the request (prompt tokens first, then generated)."""
    indices: np.ndarray | None
    """``[n, k]`` int32 feature ids (top-k requests), or ``None`` for explicit feature ids."""
    values: np.ndarray
    """``[n, k]`` float32 activations, sorted descending for top-k; ``[n, m]`` for explicit ids."""
    watch: bool = False
    """The values of the request's watched features (``WorkerSpec.watch``, explicit ids)."""


@dataclass
class StreamChunk:
    """Raw residual stream rows of some tokens of one request at one hook point, one step."""

    rid: str
    """The request's ``WorkerSpec.rid``."""
    layer: int
    """Hook point as a layer number (``-1`` = embeddings)."""
    positions: np.ndarray
    """``[n]`` int32 token positions in the request."""
    values: np.ndarray
    """``[n, d]`` float32: the stream at those positions."""


STREAM_KIND = "stream"
"""Header ``kind`` of a :class:`StreamChunk` (feature chunks have no ``kind``)."""

Chunk = FeatureChunk | StreamChunk


def encode_message(chunks: list[Chunk]) -> list[bytes]:
    """One step's chunks → the two ZeroMQ frames (header, body)."""
    header: list[dict] = []
    buffers: list[memoryview] = []
    for c in chunks:
        if isinstance(c, StreamChunk):
            header.append({"rid": c.rid, "kind": STREAM_KIND, "layer": int(c.layer),
                           "n": int(c.positions.shape[0]), "m": int(c.values.shape[1])})
            buffers.append(np.ascontiguousarray(c.positions, dtype=np.int32).data)
            buffers.append(np.ascontiguousarray(c.values, dtype=np.float32).data)
            continue
        entry = {"rid": c.rid, "dict": c.dictionary, "n": int(c.positions.shape[0]), "m": int(c.values.shape[1])}
        entry["has_idx"] = c.indices is not None
        if c.watch:
            entry["watch"] = True
        buffers.append(np.ascontiguousarray(c.positions, dtype=np.int32).data)
        if c.indices is not None:
            buffers.append(np.ascontiguousarray(c.indices, dtype=np.int32).data)
        buffers.append(np.ascontiguousarray(c.values, dtype=np.float32).data)
        header.append(entry)
    return [json.dumps(header).encode(), b"".join(buffers)]


class FeatureFrameError(ValueError):
    """A message on the side channel that does not have the expected shape."""


def _int(e: dict, key: str) -> int:
    v = e.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise FeatureFrameError(f"header field {key!r} must be a non-negative integer (got {v!r})")
    return v


class _Body:
    """Reads the body frame's arrays in order, each checked against what is left."""

    def __init__(self, frame: bytes | memoryview):
        self.buf = memoryview(frame).cast("B")
        self.offset = 0

    def take(self, count: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        end = self.offset + count * 4
        if end > self.buf.nbytes:
            raise FeatureFrameError(f"the body frame has {self.buf.nbytes} bytes; the header describes more "
                                    f"(at least {end})")
        out: np.ndarray = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        self.offset = end
        return out


def decode_message(frames: list[bytes]) -> list[Chunk]:
    """ZeroMQ frames → chunks; anything malformed raises :class:`FeatureFrameError` (never
    another exception type), so one bad message can be dropped without touching the rest."""
    if not frames:
        raise FeatureFrameError("empty message")
    if len(frames) != 2:
        raise FeatureFrameError(f"message has {len(frames)} frame(s); expected 2 (header, body)")
    try:
        header = json.loads(bytes(frames[0]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeatureFrameError(f"header is not JSON: {exc}") from None
    if not isinstance(header, list):
        raise FeatureFrameError("header must be a list of chunk entries")
    out: list[Chunk] = []
    body = _Body(frames[1])
    for e in header:
        if isinstance(e, dict) and "kind" in e:
            if e["kind"] != STREAM_KIND or not isinstance(e.get("rid"), str):
                raise FeatureFrameError(f"header entry of kind {e['kind']!r} must be kind 'stream' with a string 'rid'")
            layer = e.get("layer")
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < -1:
                raise FeatureFrameError(f"header field 'layer' must be an integer >= -1 (got {layer!r})")
            n, m = _int(e, "n"), _int(e, "m")
            positions = body.take(n, (n,), np.int32)
            values = body.take(n * m, (n, m), np.float32)
            out.append(StreamChunk(e["rid"], layer, positions, values))
            continue
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("rid"), str)
            or not isinstance(e.get("dict"), str)
            or not isinstance(e.get("has_idx"), bool)
        ):
            raise FeatureFrameError("header entry must have string 'rid' and 'dict' and boolean 'has_idx'")
        watch = e.get("watch", False)
        if not isinstance(watch, bool) or (watch and e["has_idx"]):
            raise FeatureFrameError("header field 'watch' must be a boolean, and a watch chunk has no indices")
        n, m = _int(e, "n"), _int(e, "m")
        positions = body.take(n, (n,), np.int32)
        indices = body.take(n * m, (n, m), np.int32) if e["has_idx"] else None
        values = body.take(n * m, (n, m), np.float32)
        out.append(FeatureChunk(e["rid"], e["dict"], positions, indices, values, watch))
    if body.offset != body.buf.nbytes:
        raise FeatureFrameError(f"the body frame has {body.buf.nbytes} bytes; the header describes {body.offset}")
    return out
