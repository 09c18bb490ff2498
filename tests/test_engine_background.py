"""EngineThread (sae_runtime/engine/background.py): the loop's thread, start, run, close and
the failure paths, with SAEEngine.start replaced by a stand-in (no vLLM; the real engine
runs through it in tests/test_feature_index_build.py and tests/test_engine.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from sae_runtime.engine import engine as engine_module
from sae_runtime.engine.background import EngineThread
from sae_runtime.engine.engine import EngineConfig


class FakeEngine:
    """Records where shutdown ran, and whether the loop still ran the handlers it cancelled."""

    def __init__(self) -> None:
        self.shutdown_thread: str | None = None
        self.handler_finished = False

    def shutdown(self) -> None:
        self.shutdown_thread = threading.current_thread().name
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, setattr, self, "handler_finished", True)  # a handler winding down


@pytest.fixture
def fake_start(monkeypatch):
    started: list[tuple[EngineConfig, str]] = []
    failure: list[BaseException] = []

    async def start(cls, config=None):
        started.append((config, threading.current_thread().name))
        if failure:
            raise failure[0]
        return FakeEngine()

    monkeypatch.setattr(engine_module.SAEEngine, "start", classmethod(start))
    return started, failure


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_start_run_close(fake_start):
    started, _ = fake_start
    runner = EngineThread(name="bg-test-engine")
    config = EngineConfig(max_model_len=64)
    engine: Any = runner.start(config, timeout=10)
    assert isinstance(engine, FakeEngine)
    assert started == [(config, "bg-test-engine")]  # started on the loop's thread
    assert runner.start(config, timeout=10) is engine and len(started) == 1  # started once
    thread = _threads("bg-test-engine")
    assert len(thread) == 1 and thread[0].daemon

    async def where() -> str:
        return threading.current_thread().name

    assert runner.run(where(), timeout=10) == "bg-test-engine"
    assert runner.submit(where()).result(10) == "bg-test-engine"
    loop = runner.loop
    assert loop is not None

    runner.close()
    assert engine.shutdown_thread == "bg-test-engine"  # shut down on its own loop
    assert engine.handler_finished  # the loop ran on after shutdown before it stopped
    assert not thread[0].is_alive() and loop.is_closed()
    assert runner.engine is None and runner.loop is None
    runner.close()  # twice: nothing to do
    with pytest.raises(RuntimeError, match="not running"):
        runner.run(where(), timeout=1)

    again = runner.start(config, timeout=10)  # after close: a fresh engine
    assert again is not engine and len(started) == 2
    runner.close()
    assert not _threads("bg-test-engine")


def test_failed_start_stops_the_loop(fake_start):
    started, failure = fake_start
    failure.append(OSError("no such model"))
    runner = EngineThread(name="bg-test-failing")
    with pytest.raises(OSError, match="no such model"):
        runner.start(EngineConfig(), timeout=10)
    assert len(started) == 1
    assert not _threads("bg-test-failing") and runner.loop is None and runner.engine is None
    runner.close()  # after a failed start: nothing to do, no error


def test_start_timeout_stops_the_loop(monkeypatch):
    async def slow(cls, config=None):
        time.sleep(0.5)  # holds the loop past the timeout
        return FakeEngine()

    monkeypatch.setattr(engine_module.SAEEngine, "start", classmethod(slow))
    runner = EngineThread(name="bg-test-slow")
    with pytest.raises(TimeoutError):
        runner.start(EngineConfig(), timeout=0.2)
    assert not _threads("bg-test-slow") and runner.loop is None and runner.engine is None


def test_handed_in_engine_is_left_running(fake_start):
    started, _ = fake_start
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bg-test-owner", daemon=True)
    thread.start()
    try:
        engine = FakeEngine()
        runner = EngineThread(engine, loop)  # type: ignore[arg-type]
        assert runner.start(EngineConfig(), timeout=10) is engine and not started

        async def where() -> str:
            return threading.current_thread().name

        assert runner.run(where(), timeout=10) == "bg-test-owner"
        runner.close()
        assert engine.shutdown_thread is None and thread.is_alive() and not loop.is_closed()
        assert runner.run(where(), timeout=10) == "bg-test-owner"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_engine_and_loop_go_together():
    with pytest.raises(ValueError, match="both"):
        EngineThread(engine=FakeEngine())  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="both"):
            EngineThread(loop=loop)
    finally:
        loop.close()
