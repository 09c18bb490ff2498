"""Shared fixtures: one prepared model, and at most one vLLM engine per test session.

Starting vLLM costs tens of seconds on these CPUs, so every test that needs an engine
shares the session-scoped one below instead of starting its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep vLLM's CPU KV cache small (the default takes a share of all RAM) and quiet its logs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(scope="session")
def vllm_llm(default_model_dir):
    """A plain vLLM engine on the default model (float32, eager), shared by the session."""
    from vllm import LLM

    llm = LLM(
        model=str(default_model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()
