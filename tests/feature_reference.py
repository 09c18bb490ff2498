"""Comparing the engine's features with a transformers reference, robustly.

The engine's residual stream comes from vLLM's CPU kernels, the reference's from
transformers; both are correct and differ by float32 rounding (different summation
orders), ~1e-6 of the stream's norm. Continuous quantities then agree to a tolerance. A
discrete decision does not: whether a feature is in a TopK dictionary's top k, or above a
JumpReLU threshold, flips when its pre-activation sits within that rounding of the
boundary, and then one side reports ~the boundary value and the other 0. That is a
property of one machine's rounding, not of the code.

So every comparison here:

1. bounds the pre-activation error from a bound on the stream error: for feature ``j``,
   ``|Δpre_j| <= ||W_enc[:, j]|| * ||Δx||`` (Cauchy-Schwarz), with ``||Δx|| <=
   STREAM_RTOL * ||x||``. ``tests/test_engine.py::test_vllm_stream_matches_transformers``
   measures ``||Δx|| / ||x||`` through the engine itself and asserts it is below
   STREAM_RTOL, so the bound used everywhere is a checked one;
2. compares exactly (to ATOL/RTOL) every feature whose decision margin exceeds that bound
   (its side of the boundary is certain on any machine);
3. asserts separately that the features it could not decide are few.

A broken extraction or edit moves values by O(1) on many tokens and fails (2); a
rounding flip moves one value on one token and is excused by (1) and counted by (3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_runtime.dictionary import DictionaryConfig, SparseDictionary

# Continuous values (dot products with unit-norm directions over streams of norm up to
# ~100) move by a few 1e-4 between the two forward passes.
ATOL, RTOL = 2e-3, 1e-3
STREAM_RTOL = 1e-4
"""Bound on ``||x_vllm - x_transformers|| / ||x_transformers||`` per token (measured ~1e-6)."""
MAX_UNDECIDED = 0.05
"""At most this fraction of the compared (token, feature) pairs may sit within rounding of
a decision boundary; a few percent would already mean the margins are not rounding."""


def preact_error_bound(d: SparseDictionary, x: torch.Tensor, factor: float = 1.0,
                       stream_error: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token bound ``[tokens]`` on how far a pre-activation can move between the two
    forward passes: ``||W_enc[:, j]|| * ||Δx||`` with ``||Δx||`` the measured
    ``stream_error`` ``[tokens]`` when the test has it (read through a probe), else the
    checked bound ``STREAM_RTOL * ||x||``. ``factor`` widens it for streams derived from
    ``x`` (e.g. ablated)."""
    w = d.W_enc.float().norm(dim=0).max()
    dx = STREAM_RTOL * x.float().norm(dim=-1) if stream_error is None else stream_error.float()
    return factor * dx * w + 1e-6


def decision_margin(d: SparseDictionary, x: torch.Tensor) -> torch.Tensor:
    """``[tokens, d_sae]``: how far each feature's pre-activation is from the value where
    whether it fires would flip, ``inf`` where a flip cannot change the value by more
    than rounding (ReLU: continuous at 0)."""
    x = x.float()
    inf = torch.full((), float("inf"))
    if d.activation == "topk":
        acts = d.encode_pre(x).float().relu()
        k = d.k
        top = acts.topk(min(k + 1, acts.shape[-1]), dim=-1).values
        kth = top[:, k - 1: k]
        next_ = top[:, k: k + 1] if top.shape[-1] > k else torch.zeros_like(kth)
        # In the top k, a feature leaves when it drops below the (k+1)-th; outside, it
        # enters when it rises above the k-th.
        other = torch.where(acts >= kth, next_, kth)
        margin = (acts - other).abs()
        # A flip at a boundary near 0 changes the value by ~0: no discontinuity there.
        return torch.where(other > 0, margin, inf)
    if d.activation == "jumprelu":
        pre = d.encode_pre(x).float()
        thr = d.threshold.float()
        margin = (pre - thr).abs()
        return torch.where(thr > 0, margin, inf).expand_as(pre)
    if d.activation == "gated":
        return d.encode_pre(x).float().abs()
    return torch.full((x.shape[0], d.d_sae), float("inf"))


def decided(d: SparseDictionary, x: torch.Tensor, factor: float = 1.0,
            stream_error: torch.Tensor | None = None) -> torch.Tensor:
    """``[tokens, d_sae]`` bool: features whose firing decision is certain given the stream
    error (see :func:`preact_error_bound`), with a factor 2 of safety."""
    return decision_margin(d, x) > 2 * preact_error_bound(d, x, factor, stream_error)[:, None]


def assert_close_where_decided(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor,
                               atol: float = ATOL, rtol: float = RTOL) -> int:
    """Compare ``got`` and ``expected`` where ``mask``; assert the rest are few. Returns the
    number of entries compared."""
    assert got.shape == expected.shape == mask.shape, (got.shape, expected.shape, mask.shape)
    undecided = int((~mask).sum())
    assert undecided <= max(1, MAX_UNDECIDED * mask.numel()), (
        f"{undecided} of {mask.numel()} values sit within rounding of a decision boundary")
    torch.testing.assert_close(got[mask], expected[mask], atol=atol, rtol=rtol)
    return int(mask.sum())


def assert_topk_extraction_matches(values: list[list[float]], indices: list[list[int]],
                                   d: SparseDictionary, x: torch.Tensor) -> int:
    """Engine's top-k extraction (``values``/``indices`` per token, rows aligned with ``x``)
    against the reference encode of ``x``: the values at the engine's indices, and the
    sorted top values. Returns how many non-zero values were checked."""
    ref = d.encode(x.float())
    ok = decided(d, x)
    got_v = torch.tensor(values, dtype=torch.float32)
    got_i = torch.tensor(indices, dtype=torch.long)
    rows = torch.arange(len(values))[:, None].expand_as(got_i)
    # Values at the engine's indices.
    assert_close_where_decided(got_v, ref[rows, got_i], ok[rows, got_i])
    # ...and they are the strongest ones: the reference's top values agree, on the tokens
    # where no undecided feature could enter or leave the reference's top list.
    ref_top = torch.sort(ref, dim=-1, descending=True).values[:, : got_v.shape[1]]
    floor = ref_top[:, -1:]
    undecided_in_range = (~ok & (ref >= floor - 1e-3)).any(dim=-1)
    token_ok = (~undecided_in_range)[:, None].expand_as(got_v)
    assert_close_where_decided(torch.sort(got_v, dim=-1, descending=True).values, ref_top, token_ok)
    return int((got_v > 0).sum())


# --------------------------------------------------------------------------- stream probe


def make_stream_probe(path: Path, *, hook_point: str, d_in: int, model_name: str) -> Path:
    """A dictionary whose features read the stream itself: ``W_enc = [I, -I]``, ReLU, so
    features ``j`` and ``d_in + j`` are ``relu(x_j)`` and ``relu(-x_j)``. Extracting all of
    them from the engine gives the residual stream vLLM computed at the hook point."""
    eye = torch.eye(d_in)
    cfg = DictionaryConfig(
        architecture="standard", d_in=d_in, d_sae=2 * d_in, dtype="float32",
        apply_b_dec_to_input=False, normalize_activations="none",
        metadata={"model_name": model_name, "hook_name": hook_point},
    )
    tensors = {"W_enc": torch.cat([eye, -eye], dim=1), "W_dec": torch.cat([eye, -eye], dim=0),
               "b_enc": torch.zeros(2 * d_in), "b_dec": torch.zeros(d_in)}
    SparseDictionary(cfg, tensors).save(path)
    return path


def stream_from_probe(values: torch.Tensor) -> torch.Tensor:
    """The stream ``[tokens, d_in]`` from a probe's feature values ``[tokens, 2 d_in]``."""
    d_in = values.shape[-1] // 2
    return values[:, :d_in] - values[:, d_in:]
