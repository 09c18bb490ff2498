"""An :class:`~sae_runtime.engine.engine.SAEEngine` driven from synchronous code.

The engine is asyncio-based. Synchronous callers (sae-index's build, sae-train's vLLM
harvest, the benchmarks) run it on its own event loop in a daemon thread and hand it
coroutines from their own thread::

    runner = EngineThread(name="sae-index-engine")
    engine = runner.start(EngineConfig(...), timeout=1800)
    try:
        out = runner.run(engine.harvest_features(...), timeout=600)
    finally:
        runner.close()

A caller that already has a running engine on a loop of its own (a server, a test
fixture) wraps it with ``EngineThread(engine, loop)``: ``start`` then returns that engine,
and ``close`` leaves both running, as their owner shuts them down.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sae_runtime.engine.engine import EngineConfig, SAEEngine

T = TypeVar("T")

SHUTDOWN_TIMEOUT_S = 120.0
"""``close``: the engine's shutdown must finish within this."""
JOIN_TIMEOUT_S = 10.0
"""``close``: the loop's thread must end within this once the loop is stopped."""
SETTLE_S = 0.2
"""``close``: after shutdown, the loop runs this long so the engine's cancelled output
handler finishes on it before the loop stops."""


class EngineThread:
    """An :class:`SAEEngine` on its own asyncio loop in a daemon thread (or a given engine
    on the loop it runs on), for synchronous code.

    ``start(config, timeout)`` starts the loop's thread (named ``name``) and the engine on
    it, and returns the engine; if the engine fails to start (or does not within
    ``timeout``) the loop is stopped again before the error propagates, so ``close`` after
    a failed start has nothing to do. ``submit(coro)`` schedules a coroutine on the loop
    and returns its :class:`concurrent.futures.Future` (callers pipeline work with it);
    ``run(coro, timeout)`` waits for its result. ``close()`` shuts the engine down on its
    loop, lets the loop run briefly for the handlers shutdown cancels, then stops the loop,
    joins the thread and closes the loop; it does nothing for a handed-in engine, before
    ``start`` or twice. After ``close`` a new ``start`` starts a fresh engine.
    """

    def __init__(
        self,
        engine: SAEEngine | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        name: str = "sae-engine",
    ):
        if (engine is None) != (loop is None):
            raise ValueError("pass both engine and the event loop it runs on, or neither")
        self.engine: SAEEngine | None = engine
        self.loop = loop
        self.owned = engine is None  # started (and so shut down) here
        self.name = name
        self._thread: threading.Thread | None = None

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the engine's loop; its future."""
        if self.loop is None:
            coro.close()
            raise RuntimeError("the engine is not running (start it first)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the engine's loop and return its result (``TimeoutError`` after
        ``timeout`` seconds; ``None``: no limit)."""
        return self.submit(coro).result(timeout)

    def start(self, config: EngineConfig, timeout: float) -> SAEEngine:
        """The engine: the handed-in or already started one, else one started from ``config``
        within ``timeout`` seconds on a new loop in a new daemon thread."""
        if self.engine is not None:
            return self.engine
        from sae_runtime.engine.engine import SAEEngine

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        thread.start()
        self.loop, self._thread = loop, thread
        try:
            engine = self.run(SAEEngine.start(config), timeout)
        except BaseException:
            self._stop_loop()
            raise
        self.engine = engine
        return engine

    def _stop_loop(self) -> None:
        if self.owned and self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(JOIN_TIMEOUT_S)
            self.loop.close()
            self.loop, self._thread = None, None

    def close(self) -> None:
        """Shut an engine started here down and stop its loop (see the class)."""
        if not self.owned or self.engine is None:
            return
        engine, self.engine = self.engine, None

        async def shutdown() -> None:
            engine.shutdown()
            await asyncio.sleep(SETTLE_S)  # let the cancelled output handler finish on this loop

        try:
            self.run(shutdown(), SHUTDOWN_TIMEOUT_S)
        finally:
            self._stop_loop()

    def __enter__(self) -> EngineThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
