"""Evaluation of a dictionary on held-out text, with the numbers ``metrics.json`` holds.

Everything is computed from the dictionary as it is served (``SparseDictionary``, loaded
from the written directory), never from the trainer's internal state, so the metrics
describe exactly what a client gets.

Per held-out context the model runs three times, identical up to the hook point (which
is computed once; the spliced runs re-run only the layers after it, then the model's own
final norm, head and logit soft-capping):

* clean: capture ``x`` at the hook point; feed ``x`` through the dictionary for the
  reconstruction statistics;
* spliced: ``x`` replaced by the reconstruction ``x_hat``;
* zero-ablated: ``x`` replaced by zeros.

Capturing and splicing go through ``sae_runtime.hf_streams``, so this works on every
decoder-only transformers model it finds the layers of; at ``embeddings`` (index -1) the
input of layer 0 is replaced.

Only the *evaluated* positions are replaced and scored: real tokens other than position
0 and special tokens, i.e. the positions the dictionary was trained for (position 0 is
the attention sink, whose norm is ~100x the others', and any other token whose norm
exceeds ``activations.SINK_NORM_FACTOR`` times the median of its batch: a sink beyond
position 0, about one token in 4,000 of general text on the default model). Next-token losses are taken at the
evaluated positions that have a next token. Then

* ``fvu`` = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean over all evaluated tokens;
* ``l0`` = mean number of non-zero activations per token;
* ``dead_frac``: latents that fired on none of the evaluated tokens (window stated as
  ``eval_tokens``); ``dense_frac``: latents firing on more than ``dense_threshold`` of them;
* ``ce_loss_recovered`` = (CE_zero - CE_sae) / (CE_zero - CE_clean), 1 = as good as the
  clean model, 0 = no better than deleting the residual stream;
* ``kl_div`` = mean KL(clean || spliced) of the next-token distributions, in nats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import hf_streams
from ..dictionary import SparseDictionary
from .activations import ModelActivations, batched, sink_rows


@dataclass
class RunningStats:
    """Accumulators for reconstruction metrics over any number of batches (float64)."""

    d_in: int
    d_sae: int
    tokens: int = 0
    sum_x: Tensor = field(init=False)
    sum_sq: float = 0.0
    err_sq: float = 0.0
    l0_sum: float = 0.0
    fire_counts: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fire_counts = torch.zeros(self.d_sae, dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        x64 = x.double()
        self.tokens += x.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_sq += float(x64.pow(2).sum())
        self.err_sq += float((x64 - x_hat.double()).pow(2).sum())
        fired = acts != 0
        self.l0_sum += float(fired.sum())
        self.fire_counts += fired.sum(0).cpu()

    def result(self, dense_threshold: float = 0.1) -> dict[str, float]:
        n = max(self.tokens, 1)
        centered = self.sum_sq - float(self.sum_x.pow(2).sum()) / n  # sum ||x - mean||^2
        freq = self.fire_counts.double() / n
        return {
            "fvu": self.err_sq / max(centered, 1e-30),
            "mse_per_token": self.err_sq / n,
            "l0": self.l0_sum / n,
            "dead_frac": float((self.fire_counts == 0).double().mean()),
            "dead_count": int((self.fire_counts == 0).sum()),
            "dense_frac": float((freq > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold,
            "eval_tokens": self.tokens,
        }

    def log10_density(self) -> Tensor:
        """Per-latent log10 firing frequency (SAELens' ``sparsity.safetensors``)."""
        return (self.fire_counts.double() / max(self.tokens, 1) + 1e-10).log10().float()


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean); NaN when ablating costs nothing."""
    denom = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denom if abs(denom) > 1e-12 else float("nan")


class _CleanPass:
    """One clean forward pass that also records the stream ``x`` at hook point ``layer``.

    ``logits_with(h)`` then gives the logits with that stream replaced by ``h``; the layers
    up to the hook point are not run again (``hf_streams.forward_with_stream``), since
    the part before the hook point is the same for all three runs.
    """

    def __init__(self, source: ModelActivations, ids: Tensor, layer: int):
        self.source, self.layer = source, layer
        self.ids = ids.to(source.device)
        with hf_streams.capturing_streams(source.model, [layer]) as captured:
            self.logits = source.model(input_ids=self.ids, use_cache=False).logits.float()
        self.x: Tensor = captured[layer]

    def logits_with(self, h: Tensor) -> Tensor:
        """Logits when the stream at the hook point is ``h`` instead of ``x``."""
        out = hf_streams.forward_with_stream(self.source.model, self.ids, self.layer, h)
        return out.logits.float()


def _without_sinks(mask: Tensor, stream: Tensor) -> Tensor:
    """``mask`` with the attention sinks among its tokens (:func:`sink_rows`) switched off:
    they are neither scored nor replaced by their reconstruction, like position 0."""
    sinks = sink_rows(stream[mask])
    if not bool(sinks.any()):
        return mask
    mask = mask.clone()
    where = mask.nonzero()[sinks]
    mask[where[:, 0], where[:, 1]] = False
    return mask


@torch.no_grad()
def evaluate(dictionary: SparseDictionary, source: ModelActivations,
             contexts: Sequence[Tensor], *, layer: int, tokens_per_batch: int = 2048,
             dense_threshold: float = 0.1, lm_metrics: bool = True,
             progress: Callable[[int], None] | None = None) -> tuple[dict[str, float], RunningStats]:
    """Reconstruction and (optionally) language-model metrics of ``dictionary`` on ``contexts``."""
    stats = RunningStats(dictionary.d_in, dictionary.d_sae)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_sum, n_pred = 0.0, 0
    for _, group in batched(contexts, tokens_per_batch):
        ids, lengths = source.pad(group)
        mask = source.training_mask(ids, lengths).to(source.device)
        if not lm_metrics:
            stream = source.residuals(ids, [layer])[layer]
            mask = _without_sinks(mask, stream)
            x = stream[mask]
            out = dictionary(x)
            stats.update(x, out.reconstruction, out.feature_acts)
            if progress:
                progress(int(mask.sum()))
            continue
        clean = _CleanPass(source, ids, layer)
        clean_logits = clean.logits
        mask = _without_sinks(mask, clean.x)
        x = clean.x[mask].float()
        out = dictionary(x)
        stats.update(x, out.reconstruction, out.feature_acts)

        def spliced(values: Tensor, clean: _CleanPass = clean, mask: Tensor = mask) -> Tensor:
            h = clean.x.clone()
            h[mask] = values.to(h.dtype)
            return clean.logits_with(h)

        sae_logits = spliced(out.reconstruction)
        zero_logits = spliced(torch.zeros_like(x))
        # predictions at evaluated positions that have a next real token
        pred = mask.clone()
        pred[:, -1] = False
        pos = torch.arange(ids.shape[1], device=mask.device)
        pred &= (pos[None, :] + 1) < lengths.to(mask.device)[:, None]
        targets = ids.to(mask.device)[:, 1:][pred[:, :-1]]
        logp = {}
        for name, logits in (("clean", clean_logits), ("sae", sae_logits), ("zero", zero_logits)):
            lp = F.log_softmax(logits[pred], dim=-1)
            logp[name] = lp
            ce[name] += float(F.nll_loss(lp, targets, reduction="sum"))
        kl_sum += float((logp["clean"].exp() * (logp["clean"] - logp["sae"])).sum())
        n_pred += int(targets.numel())
        if progress:
            progress(int(mask.sum()))
    metrics = stats.result(dense_threshold)
    if lm_metrics and n_pred:
        for name in ce:
            ce[name] /= n_pred
        metrics.update({
            "ce_loss_clean": ce["clean"], "ce_loss_with_sae": ce["sae"],
            "ce_loss_zero_ablated": ce["zero"],
            "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
            "kl_div": kl_sum / n_pred, "lm_eval_predictions": n_pred,
        })
    return metrics, stats
