"""Torch implementations of the SAE kernels.

These are both the CPU runtime path and the oracle the Triton kernels are tested
against. They take already-validated plain tensors (validation lives in
``sae_runtime.kernels.__init__``) and do all arithmetic in float32.

Conventions shared with ``triton_kernels.py`` (keep the two in step):

* Activations are computed in float32 from ``pre.float() + b_enc.float()``.
  relu/topk: ``pre if pre > 0 else 0``; jumprelu: ``pre if pre > threshold else 0``.
* Top-k order: values descending, ties broken by the LOWER feature index. The
  definition is "the k largest int64 keys" with (value, index) packed into one key
  (:func:`pack_keys`, :func:`encode_topk_keys`), which is what the Triton kernel does;
  :func:`encode_topk` gets the same result faster from a float top-k plus tie repair.
  So both backends agree bit for bit, including which zero-valued features fill the
  slots of a row with fewer than k non-zero activations (the lowest-index ones).
  ``-0.0`` becomes ``+0.0``. NaN inputs: unspecified.
* Steering-edit modes: 0 NONE, 1 ADD, 2 CLAMP, 3 SCALE, 4 ABLATE, 5 PROJECT_CAP,
  6 ORTHOGONAL; other values are ignored like NONE (the public entry rejects them on CPU).
  CLAMP/SCALE/ABLATE read the feature's activation (the caller's ``edit_acts``, else
  computed from the edited features' encoder columns); PROJECT_CAP/ORTHOGONAL
  read the stream's coefficient along the decoder row, ``c = <x, d_i> / ||d_i||^2``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# activation codes (also used as tl.constexpr in the Triton kernels)
ACT_RELU = 0
ACT_JUMPRELU = 1
ACT_TOPK = 2

MODE_NONE, MODE_ADD, MODE_CLAMP, MODE_SCALE, MODE_ABLATE = 0, 1, 2, 3, 4
MODE_PROJECT_CAP, MODE_ORTHOGONAL = 5, 6
MODE_MAX = MODE_ORTHOGONAL

# rows are processed in chunks so that a [rows, d_sae] int64 key block stays ~32 MiB
_CHUNK_ELEMS = 1 << 22
_LOW_MASK = 0xFFFFFFFF
_IDX_BIAS = (1 << 31) - 1  # low word = _IDX_BIAS - index: lower index -> larger key


# ---------------------------------------------------------------------------
# encode epilogue: bias + activation + top-k
# ---------------------------------------------------------------------------


def _required(t: torch.Tensor | None, what: str) -> torch.Tensor:
    """``t``, which the caller's activation needs (the public functions check this first)."""
    if t is None:
        raise ValueError(f"{what} is required")
    return t


def activation_fp32(
    pre: torch.Tensor,
    act: int,
    b_enc: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense float32 activations of ``pre (+ b_enc)``; for ``topk`` only the ReLU part."""
    x = pre.float()
    if b_enc is not None:
        x = x + b_enc.float()
    if act == ACT_JUMPRELU:
        # (+ 0.0 turns a -0.0 that passes a negative threshold into +0.0, as the keys do)
        thr = _required(threshold, "threshold (activation jumprelu)")
        return torch.where(x > thr.float(), x, torch.zeros((), dtype=x.dtype, device=x.device)).add_(0.0)
    # where(x > 0, x, 0) bit for bit (NaN and -0.0 give +0.0), without a bool mask: on this
    # CPU the masked select over [32, 4608] took 0.6 ms, relu and two in-place passes 0.03 ms.
    return torch.relu(x).nan_to_num_(nan=0.0, posinf=float("inf")).add_(0.0)  # relu: a new tensor


def pack_keys(acts: torch.Tensor) -> torch.Tensor:
    """float32 [R, D] -> int64 [R, D] keys ordered like (value, -index).

    high word: the float's bits mapped to a signed int32 that orders like the float
    (negative floats have their low 31 bits flipped); -0.0 (-> -1) becomes +0.0 (-> 0).
    low word: ``2**31 - 1 - index`` (non-negative), so equal values order by lower index.
    """
    bits = acts.contiguous().view(torch.int32)
    hi = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    hi = torch.where(hi == -1, torch.zeros_like(hi), hi)
    low = _IDX_BIAS - torch.arange(acts.shape[-1], device=acts.device, dtype=torch.int64)
    return (hi.to(torch.int64) << 32) | low


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (indices int64, float32 values)."""
    idx = _IDX_BIAS - (keys & _LOW_MASK)
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return idx, bits.view(torch.float32)


def encode_topk_keys(
    pre: torch.Tensor,
    k: int,
    act: int,
    b_enc: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: top-k of the packed int64 keys (what the Triton kernel does).

    Simple but ~4x slower than a float top-k on CPU; :func:`encode_topk` is the fast
    equivalent used at run time (the tests check that they agree).
    """
    n, d = pre.shape
    indices = torch.empty(n, k, dtype=torch.int64, device=pre.device)
    values = torch.empty(n, k, dtype=pre.dtype, device=pre.device)
    rows = max(1, _CHUNK_ELEMS // max(d, 1))
    for r0 in range(0, n, rows):
        acts = activation_fp32(pre[r0 : r0 + rows], act, b_enc, threshold)
        top = pack_keys(acts).topk(k, dim=1, largest=True, sorted=True).values
        idx, val = unpack_keys(top)
        indices[r0 : r0 + rows] = idx
        values[r0 : r0 + rows] = val.to(pre.dtype)
    return indices, values


def _canonical_topk(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float top-k of ``acts`` [R, D] with the documented tie-break (lower index first).

    torch.topk gets the right *values* but breaks ties arbitrarily. Ties matter in two
    places: (1) inside the selection (fixed for every row by sorting the k picks by index,
    then stable-sorting by value), (2) at the boundary, when the k-th value also occurs
    outside the selection (typically a row with fewer than k non-zero activations, padded
    with zeros): for those rows only, the k-th-valued picks are replaced by the
    lowest-index elements of that value.
    """
    if k < acts.shape[1]:
        # one more than asked: the k-th value also occurs outside the selection iff the
        # (k+1)-th largest equals it (cheaper than comparing every element with it)
        vals, idx = acts.topk(k + 1, dim=1, largest=True, sorted=True)
        boundary = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
        vals, idx = vals[:, :k], idx[:, :k]
    else:
        vals, idx = acts.topk(k, dim=1, largest=True, sorted=True)
        boundary = vals.new_empty(0, dtype=torch.int64)
    kth = vals[:, -1:]
    n_sel = (vals == kth).sum(1)  # picks equal to the k-th value: the last n_sel slots
    if boundary.numel():
        eq = acts[boundary] == kth[boundary]
        want = n_sel[boundary]
        take = eq & (eq.cumsum(1) <= want.unsqueeze(1))  # lowest-index `want` per row
        r, c = take.nonzero(as_tuple=True)  # row-major: ascending column within a row
        start = torch.cumsum(want, 0) - want  # first hit of each row in (r, c)
        j = torch.arange(r.numel(), device=acts.device) - start[r]
        sub = idx[boundary]
        sub[r, k - want[r] + j] = c
        idx[boundary] = sub
    # canonical order: value descending, index ascending
    idx, perm = idx.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return idx.gather(1, perm), vals


def encode_topk(
    pre: torch.Tensor,
    k: int,
    act: int,
    b_enc: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k activations per row: (indices [N,k] int64, values [N,k] in pre.dtype).

    Same result as :func:`encode_topk_keys` (and the Triton kernel), bit for bit, for
    non-NaN inputs.
    """
    n, d = pre.shape
    indices = torch.empty(n, k, dtype=torch.int64, device=pre.device)
    values = torch.empty(n, k, dtype=pre.dtype, device=pre.device)
    rows = max(1, _CHUNK_ELEMS // max(d, 1))
    for r0 in range(0, n, rows):
        acts = activation_fp32(pre[r0 : r0 + rows], act, b_enc, threshold)
        idx, val = _canonical_topk(acts, k)
        indices[r0 : r0 + rows] = idx
        values[r0 : r0 + rows] = val.to(pre.dtype)
    return indices, values


def encode_pre(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    apply_b_dec_to_input: bool,
    matmul: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pre-activations without b_enc: ``(x - b_dec) @ W_enc`` in W_enc's dtype (cuBLAS/BLAS,
    or ``matmul``, which computes ``xin @ W_enc`` its own way: a prepacked copy of W_enc).

    x (small) is cast to the weights' dtype, never the weights to x's.
    """
    x = x.to(W_enc.dtype)
    xin = x - b_dec.to(x.dtype) if (apply_b_dec_to_input and b_dec is not None) else x
    return xin @ W_enc if matmul is None else matmul(xin)


# ---------------------------------------------------------------------------
# sparse decode
# ---------------------------------------------------------------------------


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] with float32 accumulation.

    Plain differentiable torch ops (autograd flows to ``values`` and ``W_dec``).
    Output dtype: ``promote_types(values.dtype, W_dec.dtype)``.
    """
    out_dtype = torch.promote_types(values.dtype, W_dec.dtype)
    n, k = indices.shape
    if values.dtype == torch.float32 and W_dec.dtype == torch.float32:
        # one fused gather-multiply-sum kernel, float32 throughout
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    # half precision: gather rows, upcast, batched dot; chunked to bound the [rows, k, d_in] copy
    d_in = W_dec.shape[1]
    rows = max(1, _CHUNK_ELEMS // max(k * d_in, 1))
    outs = []
    for r0 in range(0, n, rows):
        idx = indices[r0 : r0 + rows]
        w = W_dec[idx.reshape(-1)].reshape(idx.shape[0], k, d_in).float()
        outs.append(torch.bmm(values[r0 : r0 + rows].float().unsqueeze(1), w).squeeze(1))
    if not outs:
        return torch.zeros(0, d_in, dtype=out_dtype, device=W_dec.device)
    return torch.cat(outs).to(out_dtype)


# ---------------------------------------------------------------------------
# steering edit
# ---------------------------------------------------------------------------


def edit_coefficients(
    modes: torch.Tensor, vals: torch.Tensor, acts: torch.Tensor, proj: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-edit coefficient c such that the edit is ``x += c * d_i`` (float32).

    ``acts``: the edited feature's activation (CLAMP, SCALE, ABLATE); ``proj``: the stream's
    coefficient along the decoder row, ``<x, d_i> / ||d_i||^2`` (PROJECT_CAP, ORTHOGONAL).
    """
    zero = torch.zeros((), dtype=torch.float32, device=vals.device)
    c = torch.where(modes == MODE_ADD, vals, zero)
    c = torch.where(modes == MODE_CLAMP, vals - acts, c)
    c = torch.where(modes == MODE_SCALE, (vals - 1.0) * acts, c)
    c = torch.where(modes == MODE_ABLATE, -acts, c)
    if proj is not None:
        c = torch.where(modes == MODE_PROJECT_CAP, -torch.clamp(proj - vals, min=0.0), c)
        c = torch.where(modes == MODE_ORTHOGONAL, vals - proj, c)
    return c


def decoder_coefficients(xr: torch.Tensor, feats: torch.Tensor, need: torch.Tensor,
                         W_dec: torch.Tensor) -> torch.Tensor:
    """``<x[m], d_f> / ||d_f||^2`` for the (m, e) with ``need[m, e]`` (f = feats[m, e]); 0 elsewhere.

    A zero decoder row gives 0 (there is no direction to project on)."""
    out = torch.zeros(need.shape, dtype=torch.float32, device=xr.device)
    m_idx, e_idx = need.nonzero(as_tuple=True)
    if m_idx.numel() == 0:
        return out
    d = W_dec.index_select(0, feats[m_idx, e_idx]).float()  # [p, d_in]
    dots = (xr[m_idx] * d).sum(1)
    norm2 = (d * d).sum(1)
    out[m_idx, e_idx] = torch.where(norm2 > 0, dots / torch.where(norm2 > 0, norm2, 1.0), 0.0)
    return out


def _edited_feature_pre(
    xin: torch.Tensor, feats: torch.Tensor, need: torch.Tensor, W_enc: torch.Tensor
) -> torch.Tensor:
    """Dot products <xin[m], W_enc[:, feats[m, e]]> for the (m, e) with need[m, e]; 0 elsewhere."""
    m_idx, e_idx = need.nonzero(as_tuple=True)
    f = feats[m_idx, e_idx]
    dots = torch.zeros(need.shape, dtype=torch.float32, device=xin.device)
    uniq, inv = torch.unique(f, return_inverse=True)
    n_rows, n_pairs, n_uniq = xin.shape[0], f.numel(), uniq.numel()
    if n_rows * n_uniq <= 16 * n_pairs:
        # few distinct features: one small GEMM [M, d_in] @ [d_in, U], then pick each token's own
        p = xin @ W_enc.index_select(1, uniq).float()
        dots[m_idx, e_idx] = p[m_idx, inv]
    else:
        # many distinct features: per-pair dot products, chunked
        d_in = xin.shape[1]
        step = max(1, _CHUNK_ELEMS // max(d_in, 1))
        vals = []
        for p0 in range(0, n_pairs, step):
            w = W_enc.index_select(1, f[p0 : p0 + step]).float()  # [d_in, p]
            vals.append((xin[m_idx[p0 : p0 + step]] * w.t()).sum(1))
        dots[m_idx, e_idx] = torch.cat(vals)
    return dots


def steering_edit(
    x: torch.Tensor,
    token_slot: torch.Tensor,
    edit_features: torch.Tensor,
    edit_modes: torch.Tensor,
    edit_values: torch.Tensor,
    *,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    act: int,
    threshold: torch.Tensor | None = None,
    edit_acts: torch.Tensor | None = None,
    apply_b_dec_to_input: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    """See ``sae_runtime.kernels.steering_edit``. Rows without an active edit are not written."""
    out = x if inplace else x.clone()
    if x.shape[0] == 0 or edit_features.numel() == 0:
        return out
    rows = (token_slot >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    slots = token_slot[rows].long()
    modes = edit_modes[slots].long()
    active = (modes >= MODE_ADD) & (modes <= MODE_MAX)
    keep = active.any(1)
    rows, slots, modes, active = rows[keep], slots[keep], modes[keep], active[keep]
    if rows.numel() == 0:
        return out
    feats = torch.where(active, edit_features[slots].long(), torch.zeros((), dtype=torch.long, device=x.device))
    vals = edit_values[slots].float()
    need = active & (modes >= MODE_CLAMP) & (modes <= MODE_ABLATE)
    need_dec = active & (modes >= MODE_PROJECT_CAP)

    xr = x[rows].float()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    acts = torch.zeros(need.shape, dtype=torch.float32, device=x.device)
    if edit_acts is not None:
        # the caller's activations of each token's edited features: no encoder read
        acts = torch.where(need, edit_acts[rows].float(), zero)
    elif bool(need.any()):
        if act == ACT_TOPK:  # whether a feature is in the top-k depends on all d_sae of them
            raise ValueError("edit_acts [N, E] is required for clamp/scale/ablate edits (activation topk)")
        xin = xr - b_dec.float() if (apply_b_dec_to_input and b_dec is not None) else xr
        pre = _edited_feature_pre(xin, feats, need, W_enc)
        if b_enc is not None:
            pre = pre + b_enc.float()[feats]
        if act == ACT_JUMPRELU:
            thr = _required(threshold, "threshold (activation jumprelu)")
            acts = torch.where(pre > thr.float()[feats], pre, zero)
        else:
            acts = torch.where(pre > 0, pre, zero)
        acts = torch.where(need, acts, zero)
    proj = decoder_coefficients(xr, feats, need_dec, W_dec) if bool(need_dec.any()) else None
    coef = edit_coefficients(modes, vals, acts, proj)
    delta = sparse_decode(feats, coef, W_dec)  # float32 result (coef is float32)
    out[rows] = (xr + delta).to(x.dtype)
    return out
