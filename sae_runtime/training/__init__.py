"""Training of sparse dictionaries for sae-serve (command ``sae-train``).

Modules, one job each: ``data`` (documents, held-out split, contexts, default corpus),
``activations`` (harvesting at hook points through ``sae_runtime.hf_streams``, any
decoder-only transformers model; disk cache, shuffled batches), ``trainers``
(TopK/BatchTopK/JumpReLU/standard losses), ``evaluate`` (held-out metrics), ``checkpoint``
(resume), ``config`` (options), ``train`` (the run), ``cli`` (``sae-train``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["TrainConfig", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: ``config`` needs pydantic, while ``trainers`` needs torch alone (the GPU check,
    # benchmarks/gpu_check.py, times the trainers on machines that have nothing else).
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(*args, **kwargs):
    """See :func:`sae_runtime.training.train.run` (imported lazily: it pulls in transformers)."""
    from .train import run as _run

    return _run(*args, **kwargs)
