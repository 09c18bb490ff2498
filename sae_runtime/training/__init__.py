"""Training of sparse dictionaries for sae-serve (command ``sae-train``).

Modules, one job each: ``data`` (documents, held-out split, contexts, default corpus),
``activations`` (harvesting at hook points through ``sae_runtime.hf_streams``, any
decoder-only transformers model; disk cache, shuffled batches), ``trainers``
(TopK/BatchTopK/JumpReLU/standard losses), ``evaluate`` (held-out metrics), ``checkpoint``
(resume), ``config`` (options), ``train`` (the run), ``cli`` (``sae-train``).
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "run"]


def run(*args, **kwargs):
    """See :func:`sae_runtime.training.train.run` (imported lazily: it pulls in transformers)."""
    from .train import run as _run

    return _run(*args, **kwargs)
