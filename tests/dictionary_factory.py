"""Small dictionaries in the served format, for engine tests that need one fast.

Decoder rows are random unit directions and the encoder is their transpose, so feature
``i`` reads and writes the same direction: an ablation then drives the feature's own
activation to ``act(b_enc_i)`` exactly, which tests can predict. The trained default
dictionary (``sae_runtime/data/default_dictionary``) is used where it exists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_runtime.default_model import MODEL_NAME
from sae_runtime.dictionary import DictionaryConfig, SparseDictionary


def make_dictionary(path: Path, *, layer: int, d_sae: int, architecture: str, k: int | None = None,
                    threshold: float = 0.5, d_in: int = 576, seed: int = 0,
                    model_name: str = MODEL_NAME, hook_point: str | None = None) -> Path:
    """Write a dictionary at ``hook_point`` (default ``layers.{layer}``) for ``model_name``."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    cfg = DictionaryConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        k=k,
        apply_b_dec_to_input=True,
        normalize_activations="none",
        metadata={"model_name": model_name, "hook_name": hook_point or f"layers.{layer}"},
    )
    tensors = {
        "W_enc": W_dec.T.contiguous(),
        "W_dec": W_dec,
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    if architecture == "jumprelu":
        tensors["threshold"] = torch.full((d_sae,), threshold)
    SparseDictionary(cfg, tensors).save(path)
    return path
