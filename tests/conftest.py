"""Shared fixtures: one prepared model, and one SAE engine (real vLLM) per test session.

Starting vLLM costs tens of seconds on these CPUs, so every test that needs an engine
shares the session-scoped one below. The engine is asyncio-based; it lives on its own
event loop in a background thread and tests submit coroutines to it with ``harness.run``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# The session server's fixtures (sae_server, live_server, ...), shared by every module.
pytest_plugins = ("tests.server_fixtures",)

# Keep vLLM's CPU KV cache small (the default takes a share of all RAM) and its logs short.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DICTIONARY = REPO / "sae_runtime" / "data" / "default_dictionary"
PROBE_LAYERS = (6, 10, 12)  # the layers of the engine's test dictionaries


def pytest_collection_modifyitems(config, items):
    # The shutdown test stops the session server: whatever file names sort after it, it runs last.
    last = [item for item in items if item.nodeid.startswith("tests/test_server_shutdown.py")]
    if last:
        items[:] = [item for item in items if item not in last] + last
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from sae_runtime.default_model import prepare_default_model

    return prepare_default_model(progress=False)


@dataclass
class EngineHarness:
    runner: Any  # the EngineThread the engine runs on
    dictionaries: dict[str, Path]  # role -> directory ("topk", "jumprelu", "trained", "depth.L" if present)
    ids: dict[str, str]  # role -> served dictionary id
    mode: str  # "eager" or "compiled"

    @property
    def engine(self) -> Any:
        return self.runner.engine

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.runner.loop

    def run(self, coro: Coroutine, timeout: float = 600) -> Any:
        return self.runner.run(coro, timeout)


@pytest.fixture(scope="session")
def engine_dictionaries(tmp_path_factory) -> dict[str, Path]:
    from sae_runtime.default_model import MODEL_NAME
    from tests.dictionary_factory import make_dictionary
    from tests.feature_reference import make_stream_probe

    root = tmp_path_factory.mktemp("dictionaries")
    dicts = {
        "topk": make_dictionary(root / "topk6", layer=6, d_sae=512, architecture="topk", k=16, seed=1),
        "jumprelu": make_dictionary(root / "jr10", layer=10, d_sae=256, architecture="jumprelu", seed=2),
    }
    # A dictionary with a feature index (steering units "max", concepts): tests/steering_helpers.py.
    from tests.steering_helpers import make_indexed_dictionary

    dicts["indexed"] = make_indexed_dictionary(root / "indexed8")
    if (DEFAULT_DICTIONARY / "cfg.json").is_file():
        dicts["trained"] = DEFAULT_DICTIONARY
    # The dictionaries at other depths (sae-serve --depth-dictionaries), as "depth.<layer>".
    from server.config import depth_dictionary_dirs

    for folder in depth_dictionary_dirs():
        dicts[f"depth.{folder.name.rsplit('.', 1)[-1]}"] = folder
    # Probes that read vLLM's residual stream at every hooked layer (see feature_reference).
    for layer in PROBE_LAYERS:
        dicts[f"probe{layer}"] = make_stream_probe(root / f"probe{layer}", hook_point=f"layers.{layer}",
                                                   d_in=576, model_name=MODEL_NAME)
    return dicts


@pytest.fixture(scope="session", params=["eager", "compiled"])
def sae_engine(request, default_model_dir, engine_dictionaries) -> EngineHarness:
    """The session's engine: default model, float32, with the test dictionaries.

    Parametrized over vLLM's eager and compiled modes: every test that uses it runs in
    both, and pytest keeps one engine alive at a time (session-scoped parameters are
    grouped, the eager engine is shut down before the compiled one starts).
    """
    from sae_runtime.engine.background import EngineThread
    from sae_runtime.engine.engine import EngineConfig

    roles = list(engine_dictionaries)
    config = EngineConfig(
        dictionaries=[str(engine_dictionaries[r]) for r in roles],
        max_model_len=1024,
        max_num_seqs=16,
        enforce_eager=request.param == "eager",
        limits={"max_feature_ids": 2 * 576},  # a stream probe's features, all at once
    )
    runner = EngineThread(name="engine-loop")
    engine = runner.start(config, timeout=900)
    try:
        ids = dict(zip(roles, engine.registry.ids(), strict=True))
        yield EngineHarness(runner, engine_dictionaries, ids, request.param)
    finally:
        runner.close()
