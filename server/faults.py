"""Fault injection for chaos tests: kill a replica's feature side-channel receiver on request.

Off unless ``SAE_SERVE_FAULT_INJECTION=1`` is in ``sae-serve``'s environment when it starts
(it is passed on to the replicas with their Ray ``runtime_env``, so it also holds on other
nodes). Only then does a replica's HTTP app have ``POST /debug/faults/feature-channel``;
like every route but plain ``/health`` it needs an API key when keys are set.

Why a route and not something done to the process from outside: the receiver is an asyncio
task in the replica's event loop reading a ZeroMQ PULL socket. No operating-system handle
stops just that: unlinking the IPC socket file leaves the established connection working,
the ZeroMQ I/O thread cannot be stopped without killing the whole replica (that case is
covered by killing the replica actor), and closing a descriptor in another process needs a
debugger. So the fault is injected inside the replica, the way the two real failures look:

- ``task``: the receiving task stops, as an unexpected exception or cancellation in it would
  end it. The supervisor restarts it in place; queued messages are kept.
- ``socket``: the receiver's ZeroMQ socket is closed under it, as a failed socket or context
  would leave it. Every restart fails at once, the receiver gives up and reports itself
  unhealthy, and Ray Serve's health check replaces the replica.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from server.errors import ApiError, ErrorKind

logger = logging.getLogger("sae_serve.faults")

FAULT_INJECTION_ENV = "SAE_SERVE_FAULT_INJECTION"
FEATURE_CHANNEL_ROUTE = "/debug/faults/feature-channel"


def enabled() -> bool:
    """Whether this process was started with fault injection on."""
    return os.environ.get(FAULT_INJECTION_ENV, "") == "1"


class FeatureChannelFault(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kill: Literal["task", "socket"]


def kill_feature_receiver(receiver: Any, kill: str) -> dict[str, Any]:
    """Inject ``kill`` into ``receiver`` (a running ``FeatureReceiver``); return its stats
    from just before. Reaches into the receiver's private task and socket on purpose: a
    fault comes from outside the code that would otherwise guard against it."""
    task = receiver._task
    if not receiver.healthy or task is None or task.done() or receiver._sock.closed:
        raise ApiError(ErrorKind.UNAVAILABLE, "the feature side channel's receiver is not running "
                       f"(failure: {receiver.failure or 'none'}); nothing to kill")
    before = receiver.stats()
    if kill == "task":
        task.cancel()
    else:
        receiver._sock.close(linger=0)
    logger.warning("fault injection: killed the feature side channel's receiver (%s)", kill)
    return before
