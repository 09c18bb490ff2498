"""The worker end of the feature side channel: a ZeroMQ PUSH socket to the API process.

The API end and the reasons for a side channel are in ``sae_runtime/engine/feature_channel.py``;
the frame format both ends share is :mod:`sae_runtime.protocol.feature_frames`.
"""

from __future__ import annotations

import logging

import zmq

from sae_runtime.protocol.feature_frames import Chunk, encode_message

logger = logging.getLogger("sae_runtime.feature_channel")

# Bounds of the sending end, in messages (one message = one engine step's features).
SEND_HWM = 1000  # queued in the worker
SEND_TIMEOUT_MS = 1000  # a full queue blocks the worker this long, then the message is dropped


class FeatureSender:
    """Worker end: PUSH socket connected to the API process's receiver.

    Bounded: at most :data:`SEND_HWM` messages wait here (plus ``RECEIVE_HWM`` in the
    receiver). A full queue blocks the worker for up to :data:`SEND_TIMEOUT_MS`
    (back-pressure while the API process catches up); past that the message is dropped and
    counted (``dropped_messages``), so a stalled receiver can slow the engine but never
    stop it. The requests whose features were dropped then end with a 503 (feature wait
    timed out) instead of waiting forever.
    """

    def __init__(self, address: str):
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)
        self.sent_messages = 0
        self.dropped_messages = 0

    def send(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        try:
            self._sock.send_multipart(encode_message(chunks), copy=False)  # two frames (header, body)
            self.sent_messages += 1
        except zmq.Again:
            self.dropped_messages += 1
            if self.dropped_messages == 1 or self.dropped_messages % 100 == 0:
                logger.warning("feature side channel full for %d ms: dropped a message of %d chunk(s) "
                               "(%d dropped so far)", SEND_TIMEOUT_MS, len(chunks), self.dropped_messages)

    def close(self) -> None:
        self._sock.close(linger=0)
