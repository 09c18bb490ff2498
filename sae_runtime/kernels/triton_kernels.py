"""Triton implementations of the SAE kernels (+ autograd wiring).

Imported lazily by ``sae_runtime.kernels`` only when the Triton backend is chosen, so
that a CPU-only process never pays for (or depends on) Triton.

Each kernel sits next to its host-side launcher; the torch oracle for each one is the
function of the same name in ``reference.py``. Every kernel accumulates in float32 and
loads/stores the caller's dtypes (fp32 / fp16 / bf16; the interpreter cannot do bf16
atomics, see the tests).

Interpreter: ``@triton.jit`` decides between the compiled JIT and the Triton CPU
interpreter when a kernel is *defined*, and Triton's own library functions (``tl.sum``,
``tl.topk`` ...) are defined when ``triton`` is first imported. So CPU tensors only work
if ``TRITON_INTERPRET=1`` was set before ``triton`` was imported;
:func:`interpreter_ready` tells whether that is the case.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT64_MIN = tl.constexpr(-(2**63))
_IDX_BIAS = tl.constexpr(2**31 - 1)


def interpreter_ready() -> bool:
    """True when both our kernels and triton.language were created by the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_topk_stage_kernel, InterpretedFunction) and isinstance(tl.topk, InterpretedFunction)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


# ===========================================================================
# 1. encode epilogue: bias + activation + top-k
# ===========================================================================
#
# How the top-k works (d_sae up to 65536+, k up to 256+):
#   * every activation is packed into one int64 key: high word = the fp32 bits mapped
#     to an order-preserving int32, low word = 2**31-1-index. Keys are unique, their
#     order is (value desc, index asc), so top-k over keys gives exactly the documented
#     tie-break and one comparison network sorts value and index together.
#   * round 1: grid (rows, ceil(d_sae / BLOCK)). Each program loads BLOCK pre-activations,
#     adds b_enc, applies the activation, packs keys and keeps its K_PAD = next_pow2(k)
#     largest with ``tl.topk`` (Triton's bitonic top-k: sorts runs of K_PAD, then repeatedly
#     takes the elementwise max of run pairs and re-merges, ~BLOCK*log2(K_PAD)^2/2 compares)
#     and writes them to a candidate buffer.
#   * rounds 2..: the same kernel over the candidate buffer (keys in, keys out), each round
#     shrinking the row by BLOCK / K_PAD, until one block holds the whole row; that last
#     program decodes the k best keys into (index, value). For d_sae=65536, k=128:
#     65536 -> 32 x 128 = 4096 -> one block: two launches.
#   The pre-activation matrix is read once; activations are never materialised.
#   (Under the interpreter the per-block selection is max-extraction instead, see kernel.)


@triton.jit
def _topk_stage_kernel(
    src_ptr,
    bias_ptr,
    thr_ptr,
    cand_ptr,
    out_idx_ptr,
    out_val_ptr,
    n_cols,
    src_stride,
    cand_stride,
    k,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
    BITONIC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < n_cols
    if FIRST:
        x = tl.load(src_ptr + row * src_stride + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if ACT == 1:  # jumprelu
            thr = tl.load(thr_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            a = tl.where(x > thr, x, 0.0)
        else:  # relu / topk (the top-k is the selection below)
            a = tl.where(x > 0.0, x, 0.0)
        bits = a.to(tl.int32, bitcast=True)
        hi = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        hi = tl.where(hi == -1, 0, hi)  # -0.0 -> +0.0
        key = (hi.to(tl.int64) << 32) | (_IDX_BIAS - cols.to(tl.int64))
    else:
        key = tl.load(src_ptr + row * src_stride + cols, mask=cmask, other=_INT64_MIN)
    key = tl.where(cmask, key, _INT64_MIN)
    offs = tl.arange(0, K_PAD)
    if BITONIC:
        top = tl.topk(key, K_PAD)  # [K_PAD], descending
    else:
        # K_PAD rounds of "take the max key, knock it out" (keys are unique). Used under
        # the interpreter, where tl.topk's xor-reductions run element by element in Python.
        top = tl.full([K_PAD], _INT64_MIN, tl.int64)
        for i in range(K_PAD):
            m = tl.max(key, axis=0)
            top = tl.where(offs == i, m, top)
            key = tl.where(key == m, _INT64_MIN, key)
    if LAST:
        hi_w = top >> 32
        low = top - (hi_w << 32)
        idx = _IDX_BIAS - low
        h32 = hi_w.to(tl.int32)
        val = (h32 ^ ((h32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        omask = offs < k
        tl.store(out_idx_ptr + row * k + offs, idx, mask=omask)
        tl.store(out_val_ptr + row * k + offs, val.to(out_val_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(cand_ptr + row * cand_stride + blk * K_PAD + offs, top)


def encode_topk(
    pre: torch.Tensor,
    k: int,
    act: int,
    b_enc: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    block: int | None = None,
    bitonic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``reference.encode_topk`` (same results bit for bit).

    ``block`` caps the per-program block (testing the multi-round merge at small sizes);
    ``bitonic`` picks tl.topk (default when compiled) over max-extraction (default under
    the interpreter, where tl.topk is very slow).
    """
    if pre.stride(-1) != 1:
        pre = pre.contiguous()
    n, d = pre.shape
    indices = torch.empty(n, k, dtype=torch.int64, device=pre.device)
    values = torch.empty(n, k, dtype=pre.dtype, device=pre.device)
    if n == 0 or k == 0:
        return indices, values
    k_pad = _next_pow2(k)
    if bitonic is None:
        bitonic = not interpreter_ready()
    block_max = block or max(2048, 4 * k_pad)
    b_arg = b_enc if b_enc is not None else pre
    t_arg = threshold if threshold is not None else pre
    src, src_stride, n_cols, first = pre, pre.stride(0), d, True
    while True:
        blk = max(k_pad, min(block_max, _next_pow2(n_cols)))
        nblocks = triton.cdiv(n_cols, blk)
        last = nblocks == 1
        cand = indices if last else torch.empty(n, nblocks * k_pad, dtype=torch.int64, device=pre.device)
        _topk_stage_kernel[(n, nblocks)](
            src, b_arg, t_arg, cand, indices, values,
            n_cols, src_stride, cand.stride(0), k,
            ACT=act, HAS_BIAS=b_enc is not None, FIRST=first, LAST=last,
            BLOCK=blk, K_PAD=k_pad, BITONIC=bool(bitonic), num_warps=8 if blk >= 2048 else 4,
        )  # fmt: skip
        if last:
            return indices, values
        src, src_stride, n_cols, first = cand, cand.stride(0), nblocks * k_pad, False


# ===========================================================================
# 2. sparse decode: out[n] = sum_j values[n, j] * W_dec[indices[n, j]]   (+ backward)
# ===========================================================================


@triton.jit
def _sparse_decode_fwd_kernel(
    idx_ptr,
    val_ptr,
    w_ptr,
    out_ptr,
    k,
    d_in,
    stride_idx,
    stride_val,
    stride_w,
    stride_out,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid (N, ceil(d_in / BLOCK_D)); gathers BLOCK_K decoder rows per step
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d_in
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, k, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        jmask = j < k
        idx = tl.load(idx_ptr + row * stride_idx + j, mask=jmask, other=0).to(tl.int64)
        v = tl.load(val_ptr + row * stride_val + j, mask=jmask, other=0.0).to(tl.float32)
        live = jmask & (v != 0.0)  # zero slots (padding) cost no memory traffic
        w = tl.load(
            w_ptr + idx[:, None] * stride_w + cols[None, :], mask=live[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * v[:, None], axis=0)
    tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _sparse_decode_grad_values_kernel(
    idx_ptr,
    g_ptr,
    w_ptr,
    gv_ptr,
    k,
    d_in,
    stride_idx,
    stride_g,
    stride_w,
    stride_gv,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grad_values[n, j] = <grad_out[n], W_dec[idx[n, j]]>; grid (N, ceil(k / BLOCK_K))
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = j < k
    idx = tl.load(idx_ptr + row * stride_idx + j, mask=jmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d_in
        g = tl.load(g_ptr + row * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_w + cols[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(gv_ptr + row * stride_gv + j, acc.to(gv_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def _sparse_decode_grad_w_kernel(
    feat_ptr,
    row_ptr,
    val_ptr,
    g_ptr,
    gw_ptr,
    P,
    d_in,
    stride_g,
    stride_gw,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grad_W_dec[f] += values[n, j] * grad_out[n] over the (n, j) with idx[n, j] == f.
    # The P = N*k pairs come sorted by feature; each program walks BLOCK_P consecutive
    # pairs, sums runs of equal features in registers and flushes a run with one fp32
    # atomic_add when the feature changes (one atomic per run, not per pair).
    start = tl.program_id(0).to(tl.int64) * BLOCK_P
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d_in
    cur = tl.load(feat_ptr + start)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, BLOCK_P):
        p = start + i
        valid = p < P
        f = tl.load(feat_ptr + p, mask=valid, other=0)
        f = tl.where(valid, f, cur)
        r = tl.load(row_ptr + p, mask=valid, other=0)
        v = tl.load(val_ptr + p, mask=valid, other=0.0).to(tl.float32)
        # (flush as a [BLOCK_D] tensor: the interpreter mis-types scalar & tensor masks)
        flush = (cols.to(tl.int64) * 0 + f) != cur
        tl.atomic_add(gw_ptr + cur * stride_gw + cols, acc, mask=cmask & flush)
        acc = tl.where(flush, 0.0, acc)
        cur = f
        live = (tl.zeros([BLOCK_D], dtype=tl.float32) + v) != 0.0  # v == 0 also when not valid
        g = tl.load(g_ptr + r * stride_g + cols, mask=cmask & live, other=0.0).to(tl.float32)
        acc += v * g
    tl.atomic_add(gw_ptr + cur * stride_gw + cols, acc, mask=cmask)


def _decode_blocks(d_in: int) -> int:
    return min(256, _next_pow2(d_in))


def sparse_decode_forward(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    n, k = indices.shape
    d_in = W_dec.shape[1]
    out = torch.empty(n, d_in, dtype=torch.promote_types(values.dtype, W_dec.dtype), device=W_dec.device)
    if n == 0:
        return out
    if k == 0:
        return out.zero_()
    indices, values, W_dec = indices.contiguous(), values.contiguous(), W_dec.contiguous()
    block_d = _decode_blocks(d_in)
    _sparse_decode_fwd_kernel[(n, triton.cdiv(d_in, block_d))](
        indices, values, W_dec, out, k, d_in,
        indices.stride(0), values.stride(0), W_dec.stride(0), out.stride(0),
        BLOCK_K=min(32, _next_pow2(k)), BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


def sparse_decode_grad_values(indices: torch.Tensor, grad_out: torch.Tensor, W_dec: torch.Tensor,
                              values_dtype: torch.dtype) -> torch.Tensor:
    n, k = indices.shape
    d_in = W_dec.shape[1]
    gv = torch.empty(n, k, dtype=values_dtype, device=W_dec.device)
    if n == 0 or k == 0:
        return gv
    block_k = min(32, _next_pow2(k))
    block_d = _decode_blocks(d_in)
    _sparse_decode_grad_values_kernel[(n, triton.cdiv(k, block_k))](
        indices, grad_out, W_dec, gv, k, d_in,
        indices.stride(0), grad_out.stride(0), W_dec.stride(0), gv.stride(0),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return gv


def sparse_decode_grad_w(indices: torch.Tensor, values: torch.Tensor, grad_out: torch.Tensor,
                         W_dec_shape: torch.Size, W_dec_dtype: torch.dtype) -> torch.Tensor:
    d_sae, d_in = W_dec_shape
    gw = torch.zeros(d_sae, d_in, dtype=torch.float32, device=grad_out.device)
    n, k = indices.shape
    P = n * k
    if P == 0:
        return gw.to(W_dec_dtype)
    feats, order = indices.reshape(-1).to(torch.int64).sort(stable=True)
    rows = torch.div(order, k, rounding_mode="floor")
    vals = values.reshape(-1)[order].contiguous()
    block_p = 64
    block_d = _decode_blocks(d_in)
    _sparse_decode_grad_w_kernel[(triton.cdiv(P, block_p), triton.cdiv(d_in, block_d))](
        feats, rows, vals, grad_out, gw, P, d_in, grad_out.stride(0), gw.stride(0),
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return gw if W_dec_dtype == torch.float32 else gw.to(W_dec_dtype)


class SparseDecode(torch.autograd.Function):
    """out = sparse_decode(indices, values, W_dec); backward to values and W_dec."""

    @staticmethod
    def forward(ctx, indices, values, W_dec):
        out = sparse_decode_forward(indices, values, W_dec)
        ctx.save_for_backward(indices, values, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, values, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        indices = indices.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_values = sparse_decode_grad_values(indices, grad_out, W_dec.contiguous(), values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = sparse_decode_grad_w(indices, values.contiguous(), grad_out, W_dec.shape, W_dec.dtype)
        return None, grad_values, grad_w


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    return SparseDecode.apply(indices, values, W_dec)


# ===========================================================================
# 3. steering edit (in place on one row per program)
# ===========================================================================


@triton.jit
def _steering_edit_kernel(
    x_ptr,
    slot_ptr,
    feat_ptr,
    mode_ptr,
    val_ptr,
    eacts_ptr,
    wenc_ptr,
    benc_ptr,
    thr_ptr,
    wdec_ptr,
    bdec_ptr,
    D,
    E,
    stride_x,
    stride_ea,
    stride_we_d,
    stride_we_f,
    stride_wd,
    ACT: tl.constexpr,
    HAS_EACTS: tl.constexpr,
    HAS_BENC: tl.constexpr,
    SUB_BDEC: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program per token; tokens with slot -1 (or only NONE edits) are never written
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    if slot >= 0:
        e = tl.arange(0, E_PAD)
        emask = e < E
        modes = tl.load(mode_ptr + slot * E + e, mask=emask, other=0).to(tl.int32)
        active = (modes >= 1) & (modes <= 6)
        need = active & (modes >= 2) & (modes <= 4)  # CLAMP/SCALE/ABLATE read the activation
        need_dec = active & (modes >= 5)  # PROJECT_CAP/ORTHOGONAL read <x, d_i> / |d_i|^2
        feats = tl.load(feat_ptr + slot * E + e, mask=active, other=0).to(tl.int64)
        vals = tl.load(val_ptr + slot * E + e, mask=active, other=0.0).to(tl.float32)
        acts = tl.zeros([E_PAD], dtype=tl.float32)
        if HAS_EACTS:
            # the caller's activations of this token's edited features: no W_enc read
            acts = tl.load(eacts_ptr + row * stride_ea + e, mask=need, other=0.0).to(tl.float32)
        elif tl.max(need.to(tl.int32), axis=0) > 0:
            # phase 1: pre_i = <x - b_dec, W_enc[:, i]> + b_enc[i] for the edited features only
            dots = tl.zeros([E_PAD], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                xc = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
                if SUB_BDEC:
                    xc -= tl.load(bdec_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(
                    wenc_ptr + cols[None, :] * stride_we_d + feats[:, None] * stride_we_f,
                    mask=need[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                dots += tl.sum(w * xc[None, :], axis=1)
            pre = dots
            if HAS_BENC:
                pre += tl.load(benc_ptr + feats, mask=need, other=0.0).to(tl.float32)
            if ACT == 1:  # jumprelu
                thr = tl.load(thr_ptr + feats, mask=need, other=0.0).to(tl.float32)
                a = tl.where(pre > thr, pre, 0.0)
            else:  # relu (a topk dictionary's clamp/scale/ablate edits come with edit_acts)
                a = tl.where(pre > 0.0, pre, 0.0)
            acts = tl.where(need, a, 0.0)
        proj = tl.zeros([E_PAD], dtype=tl.float32)
        if tl.max(need_dec.to(tl.int32), axis=0) > 0:
            # phase 1b: the stream's coefficient along each edited decoder row
            xd = tl.zeros([E_PAD], dtype=tl.float32)
            dn = tl.zeros([E_PAD], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                xc = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(
                    wdec_ptr + feats[:, None] * stride_wd + cols[None, :],
                    mask=need_dec[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                xd += tl.sum(w * xc[None, :], axis=1)
                dn += tl.sum(w * w, axis=1)
            proj = tl.where(need_dec & (dn > 0.0), xd / tl.where(dn > 0.0, dn, 1.0), 0.0)
        coef = tl.where(modes == 1, vals, 0.0)
        coef = tl.where(modes == 2, vals - acts, coef)
        coef = tl.where(modes == 3, (vals - 1.0) * acts, coef)
        coef = tl.where(modes == 4, -acts, coef)
        coef = tl.where(modes == 5, -tl.maximum(proj - vals, 0.0), coef)
        coef = tl.where(modes == 6, vals - proj, coef)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            # phase 2: x += sum_e coef_e * W_dec[feat_e]  (fp32, written back in x's dtype)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                xptrs = x_ptr + row * stride_x + cols
                xc = tl.load(xptrs, mask=cmask, other=0.0)
                w = tl.load(
                    wdec_ptr + feats[:, None] * stride_wd + cols[None, :],
                    mask=active[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                delta = tl.sum(w * coef[:, None], axis=0)
                tl.store(xptrs, (xc.to(tl.float32) + delta).to(xc.dtype), mask=cmask)


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
    """Triton twin of ``reference.steering_edit``."""
    n, d = x.shape
    S, E = edit_features.shape
    if inplace and x.stride(-1) == 1:
        out = x
    else:
        out = x.clone(memory_format=torch.contiguous_format)
    if n > 0 and S > 0 and E > 0:
        W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
        dummy = out
        eacts = edit_acts.contiguous() if edit_acts is not None else dummy
        _steering_edit_kernel[(n,)](
            out, token_slot.contiguous(), edit_features.contiguous(), edit_modes.contiguous(),
            edit_values.contiguous(), eacts,
            W_enc, b_enc if b_enc is not None else dummy, threshold if threshold is not None else dummy,
            W_dec, b_dec if b_dec is not None else dummy,
            d, E, out.stride(0), eacts.stride(0), W_enc.stride(0), W_enc.stride(1), W_dec.stride(0),
            ACT=act, HAS_EACTS=edit_acts is not None, HAS_BENC=b_enc is not None,
            SUB_BDEC=bool(apply_b_dec_to_input and b_dec is not None),
            E_PAD=max(2, _next_pow2(E)), BLOCK_D=min(512, _next_pow2(d)), num_warps=4,
        )  # fmt: skip
    if inplace and out is not x:
        x.copy_(out)
        return x
    return out
