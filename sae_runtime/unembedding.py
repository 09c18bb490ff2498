"""The model's unembedding, read from its checkpoint, for "which tokens does feature i push".

Used by the server's feature endpoint and by ``sae-index`` (promoted/suppressed tokens of
each feature). The model weights live in vLLM's worker process, out of reach; reading the two
tensors needed (``lm_head.weight`` — or the tied ``model.embed_tokens.weight`` — and the
final norm gain ``model.norm.weight``) from the safetensors files costs ~110 MB for the
default model and keeps both independent of the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

UNEMBED_NAMES = ("lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight")
NORM_NAMES = ("model.norm.weight", "norm.weight")


class Unembedding:
    """``W_U [vocab, d_model]`` and the final RMSNorm gain ``g [d_model]``."""

    def __init__(self, W_U: torch.Tensor, norm_gain: torch.Tensor | None):
        self.W_U = W_U.float()
        self.norm_gain = None if norm_gain is None else norm_gain.float()

    @classmethod
    def load(cls, model_dir: str | Path) -> Unembedding:
        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
        names = UNEMBED_NAMES[1:] if tied else UNEMBED_NAMES
        found: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in UNEMBED_NAMES + NORM_NAMES:
                        found[key] = f.get_tensor(key)
        W_U = next((found[n] for n in names if n in found), None)
        if W_U is None:
            raise KeyError(f"{model_dir}: none of {names} in the checkpoint")
        norm = next((found[n] for n in NORM_NAMES if n in found), None)
        return cls(W_U, norm)

    def logit_effect(self, direction: torch.Tensor) -> torch.Tensor:
        """Per-token logit change of adding ``direction`` before the final norm (to first order)."""
        d = direction.float()
        if self.norm_gain is not None:
            d = d * self.norm_gain
        return self.W_U @ d

    def top_tokens(self, direction: torch.Tensor, n: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """The ``n`` most promoted and ``n`` most suppressed token ids with their scores."""
        scores = self.logit_effect(direction)
        n = min(n, scores.numel())
        hi = torch.topk(scores, n)
        lo = torch.topk(-scores, n)
        promoted = [(int(i), float(v)) for v, i in zip(hi.values, hi.indices, strict=True)]
        suppressed = [(int(i), float(-v)) for v, i in zip(lo.values, lo.indices, strict=True)]
        return promoted, suppressed
