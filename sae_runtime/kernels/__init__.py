"""SAE kernels: encode epilogue (activation + top-k), sparse decode, steering edit.

Public functions here validate their inputs (cheap shape/dtype/device checks; value
ranges only for CPU tensors, where checking costs no device sync) and dispatch:

* ``SAE_KERNELS_BACKEND=torch``  -> torch implementations (``reference.py``) everywhere;
* ``SAE_KERNELS_BACKEND=triton`` -> Triton kernels (``triton_kernels.py``) also for CPU
  tensors, which needs Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is
  first imported) -- this is how the tests run the Triton kernels without a GPU;
* unset / ``auto`` -> Triton for CUDA tensors (torch if Triton cannot be imported), torch
  otherwise.

The variable is read at every call. ``triton_kernels`` is imported only when needed.

Numerics: everything accumulates in float32. Top-k values come sorted descending with
ties broken by the lower feature index, identically in both backends (see
``reference.pack_keys``).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Collection, Sequence
from types import ModuleType

import torch

from . import reference

__all__ = [
    "ACTIVATIONS",
    "EditMode",
    "backend_for",
    "edit_mode_from_name",
    "encode_features",
    "encode_topk",
    "sparse_decode",
    "steering_edit",
]

ACTIVATIONS = {
    "relu": reference.ACT_RELU,
    "standard": reference.ACT_RELU,
    "jumprelu": reference.ACT_JUMPRELU,
    "topk": reference.ACT_TOPK,
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


class EditMode(enum.IntEnum):
    """Steering edit modes (the values stored in ``edit_modes``)."""

    NONE = 0
    ADD = 1
    CLAMP = 2
    SCALE = 3
    ABLATE = 4
    PROJECT_CAP = 5
    ORTHOGONAL = 6


def edit_mode_from_name(name: str) -> EditMode:
    """"add" | "clamp" | "scale" | "ablate" | "project_cap" | "orthogonal" (case-insensitive) -> EditMode."""
    try:
        mode = EditMode[str(name).strip().upper()]
    except KeyError:
        mode = None
    if mode is None or mode == EditMode.NONE:
        raise ValueError(f"unknown steering edit mode {name!r}; expected one of add, clamp, scale, ablate, "
                         "project_cap, orthogonal")
    return mode


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------

_triton_mod: ModuleType | None = None
_triton_import_error: Exception | None = None


def _load_triton() -> ModuleType | None:
    global _triton_mod, _triton_import_error
    if _triton_mod is None and _triton_import_error is None:
        try:
            from . import triton_kernels

            _triton_mod = triton_kernels
        except Exception as e:  # pragma: no cover - depends on the installation
            _triton_import_error = e
    return _triton_mod


def backend_for(device: torch.device) -> str:
    """The backend ("torch" or "triton") a call with tensors on ``device`` will use now."""
    choice = os.environ.get("SAE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"SAE_KERNELS_BACKEND must be auto, torch or triton, not {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if device.type != "cuda":
            return "torch"
        return "triton" if _load_triton() is not None else "torch"
    # forced triton
    mod = _load_triton()
    if mod is None:
        raise RuntimeError(f"SAE_KERNELS_BACKEND=triton but triton cannot be imported: {_triton_import_error!r}")
    if device.type != "cuda" and not mod.interpreter_ready():
        raise RuntimeError(
            "SAE_KERNELS_BACKEND=triton on CPU tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported in this process"
        )
    return "triton"


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _act_code(activation: str) -> int:
    try:
        return ACTIVATIONS[str(activation).lower()]
    except KeyError:
        raise ValueError(f"activation must be one of relu, jumprelu, topk; got {activation!r}") from None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: Collection[torch.dtype] | None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None:
        _check(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:
        _check(t.device == device, f"{name} is on {t.device}, expected {device}")
    if shape is not None:
        for i, s in enumerate(shape):
            if s is not None:
                _check(t.shape[i] == s, f"{name} has shape {tuple(t.shape)}, expected dim {i} == {s}")


def _check_k(k: int, d_sae: int) -> None:
    _check(isinstance(k, int) and not isinstance(k, bool), f"k must be an int, got {type(k).__name__}")
    _check(1 <= k <= d_sae, f"k must be in [1, d_sae={d_sae}], got {k}")


def _check_threshold(act: int, threshold: torch.Tensor | None, d_sae: int,
                     device: torch.device) -> torch.Tensor | None:
    if act == reference.ACT_JUMPRELU:
        if threshold is None:
            raise ValueError("activation 'jumprelu' needs threshold [d_sae]")
        _check_tensor("threshold", threshold, 1, _FLOAT_DTYPES, device, (d_sae,))
        return threshold.contiguous()
    return None


# ---------------------------------------------------------------------------
# 1. encode
# ---------------------------------------------------------------------------


def encode_topk(
    pre: torch.Tensor,
    k: int,
    *,
    activation: str,
    b_enc: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode epilogue: ``act(pre + b_enc)`` then the k largest activations per row.

    pre: [N, d_sae] pre-activations (without b_enc when b_enc is given).
    activation: "relu" (alias "standard"), "jumprelu" (needs ``threshold [d_sae]``:
    ``pre if pre > threshold else 0``) or "topk" (ReLU then top-k: asking for the
    dictionary's k, or fewer, gives its activations; more would be wrong and is not
    detectable here).
    Returns ``(indices [N, k] int64, values [N, k] pre.dtype)``: values sorted descending,
    ties broken by the lower feature index; a row with fewer than k non-zero activations
    is padded with value 0 at the lowest-index inactive features (valid indices).
    """
    act = _act_code(activation)
    _check_tensor("pre", pre, 2, _FLOAT_DTYPES)
    _n, d_sae = pre.shape
    _check_k(k, d_sae)
    if b_enc is not None:
        _check_tensor("b_enc", b_enc, 1, _FLOAT_DTYPES, pre.device, (d_sae,))
        b_enc = b_enc.contiguous()
    threshold = _check_threshold(act, threshold, d_sae, pre.device)
    if backend_for(pre.device) == "triton":
        from . import triton_kernels  # imported by backend_for already

        return triton_kernels.encode_topk(pre, k, act, b_enc, threshold)
    return reference.encode_topk(pre, k, act, b_enc, threshold)


# rows per encode chunk: bounds the [rows, d_sae] pre-activation block to ~2**25 elements
_ENCODE_CHUNK_ELEMS = 1 << 25


def encode_features(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    b_dec: torch.Tensor | None,
    k: int,
    *,
    activation: str,
    threshold: torch.Tensor | None = None,
    apply_b_dec_to_input: bool = True,
    matmul: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k feature activations of ``x [N, d_in]``: ``act((x - b_dec) @ W_enc + b_enc)``.

    The matmul runs in torch (cuBLAS / CPU BLAS) in x's dtype, row-chunked so the
    [rows, d_sae] pre-activation block stays bounded; the bias/activation/top-k epilogue
    is :func:`encode_topk`. (A fused Triton matmul+epilogue is not provided: nothing
    showed it beating cuBLAS + the epilogue kernel.) x is cast to W_enc's dtype (never the
    weights to x's), so values come back in W_enc's dtype. For "topk" dictionaries k must
    be at most the dictionary's own k. ``matmul``, if given, computes ``xin @ W_enc`` for the
    centred rows ``xin [rows, d_in]`` (W_enc's dtype) instead of torch: the worker passes a
    prepacked CPU matmul (``vllm_surface.cpu_packed_matmul``); results then differ from
    torch's by rounding only.
    """
    _check_tensor("x", x, 2, _FLOAT_DTYPES)
    _check(matmul is None or callable(matmul), f"matmul must be callable or None, got {type(matmul).__name__}")
    n, d_in = x.shape
    _check_tensor("W_enc", W_enc, 2, _FLOAT_DTYPES, x.device, (d_in, None))
    d_sae = W_enc.shape[1]
    if b_dec is not None:
        _check_tensor("b_dec", b_dec, 1, _FLOAT_DTYPES, x.device, (d_in,))
    _check_k(k, d_sae)
    _act_code(activation)
    if n == 0:
        return (
            torch.empty(0, k, dtype=torch.int64, device=x.device),
            torch.empty(0, k, dtype=W_enc.dtype, device=x.device),
        )
    rows = max(1, _ENCODE_CHUNK_ELEMS // d_sae)
    if rows >= n:
        pre = reference.encode_pre(x, W_enc, b_dec, apply_b_dec_to_input, matmul)
        return encode_topk(pre, k, activation=activation, b_enc=b_enc, threshold=threshold)
    outs = [
        encode_topk(
            reference.encode_pre(x[r0 : r0 + rows], W_enc, b_dec, apply_b_dec_to_input, matmul),
            k,
            activation=activation,
            b_enc=b_enc,
            threshold=threshold,
        )
        for r0 in range(0, n, rows)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# ---------------------------------------------------------------------------
# 2. sparse decode
# ---------------------------------------------------------------------------


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``out[n] = sum_j values[n, j] * W_dec[indices[n, j]]`` -> [N, d_in] (no b_dec).

    float32 accumulation; output dtype ``promote_types(values.dtype, W_dec.dtype)``.
    Differentiable w.r.t. ``values`` and ``W_dec`` on both backends (Triton: forward and
    backward kernels in a ``torch.autograd.Function``). Indices must be < d_sae.
    """
    _check_tensor("indices", indices, 2, _INDEX_DTYPES)
    _check_tensor("W_dec", W_dec, 2, _FLOAT_DTYPES, indices.device)
    _check_tensor("values", values, 2, _FLOAT_DTYPES, indices.device, tuple(indices.shape))
    if indices.device.type == "cpu" and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        _check(lo >= 0 and hi < W_dec.shape[0], f"indices must be in [0, {W_dec.shape[0]}), got [{lo}, {hi}]")
    if backend_for(indices.device) == "triton":
        from . import triton_kernels  # imported by backend_for already

        return triton_kernels.sparse_decode(indices, values, W_dec)
    return reference.sparse_decode(indices, values, W_dec)


# ---------------------------------------------------------------------------
# 3. steering edit
# ---------------------------------------------------------------------------


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
    activation: str,
    threshold: torch.Tensor | None = None,
    edit_acts: torch.Tensor | None = None,
    apply_b_dec_to_input: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    """Apply per-token steering edits to the residual stream ``x [N, d_in]``.

    Token n uses edit slot ``token_slot[n]`` (-1: no edits; the row comes out bitwise
    unchanged, also when its slot holds only NONE padding). A slot holds E edits
    ``(edit_features[s, e], edit_modes[s, e], edit_values[s, e])``; with ``d_i = W_dec[i]``
    and ``a_i`` the activation of feature i of the ORIGINAL x:
    ADD ``x += v d_i``; CLAMP ``x += (v - a_i) d_i``; SCALE ``x += (v - 1) a_i d_i``;
    ABLATE ``x -= a_i d_i``; with ``c_i = <x, d_i> / ||d_i||^2`` (the stream's coefficient along
    ``d_i``, read from W_dec): PROJECT_CAP ``x -= max(c_i - v, 0) d_i`` (caps the projection on
    ``d_i / ||d_i||`` at ``v ||d_i||``); ORTHOGONAL ``x += (v - c_i) d_i`` (removes the
    component along ``d_i``, adds ``v d_i``). All edits of a slot add up (a repeated feature contributes
    each time). ``a_i`` is ``edit_acts[n, e]`` when the caller gives ``edit_acts [N, E]``
    (the activation of token n's edited feature ``edit_features[token_slot[n], e]``, read
    only where the mode is CLAMP/SCALE/ABLATE; W_enc, b_enc and threshold are then not
    read). Without it the activation is computed here from the edited features' W_enc
    columns only: relu ``relu(pre_i)``; jumprelu ``pre_i if pre_i > threshold_i``. A topk
    dictionary's activation depends on all d_sae pre-activations, so its CLAMP/SCALE/ABLATE
    edits need ``edit_acts``, read from one full encode of x (the worker gathers
    ``SparseDictionary.encode(x)`` at the edited features): whether a feature is in the
    top k is then decided within that one encode, where the k-th feature's own value is the
    k-th value (a pre-activation recomputed apart, with other rounding, could fall an ulp
    short of it). Accumulates in float32, writes x's dtype.
    Returns the edited tensor: ``x`` itself when ``inplace`` else a new tensor.
    """
    act = _act_code(activation)
    _check_tensor("x", x, 2, _FLOAT_DTYPES)
    dev = x.device
    n, d_in = x.shape
    _check_tensor("token_slot", token_slot, 1, _INDEX_DTYPES, dev, (n,))
    _check_tensor("edit_features", edit_features, 2, (torch.int64, torch.int32), dev)
    S, E = edit_features.shape
    _check_tensor("edit_modes", edit_modes, 2, (torch.int8, torch.uint8, torch.int32, torch.int64), dev, (S, E))
    _check_tensor("edit_values", edit_values, 2, _FLOAT_DTYPES, dev, (S, E))
    _check_tensor("W_enc", W_enc, 2, _FLOAT_DTYPES, dev, (d_in, None))
    d_sae = W_enc.shape[1]
    _check_tensor("W_dec", W_dec, 2, _FLOAT_DTYPES, dev, (d_sae, d_in))
    if b_enc is not None:
        _check_tensor("b_enc", b_enc, 1, _FLOAT_DTYPES, dev, (d_sae,))
        b_enc = b_enc.contiguous()
    if b_dec is not None:
        _check_tensor("b_dec", b_dec, 1, _FLOAT_DTYPES, dev, (d_in,))
        b_dec = b_dec.contiguous()
    threshold = _check_threshold(act, threshold, d_sae, dev)
    if edit_acts is not None:
        _check_tensor("edit_acts", edit_acts, 2, _FLOAT_DTYPES, dev, (n, E))
        edit_acts = edit_acts.contiguous()
    elif act == reference.ACT_TOPK:
        # (on CUDA this check syncs: a topk dictionary with only ADD/PROJECT_CAP/ORTHOGONAL edits)
        need = (edit_modes >= EditMode.CLAMP) & (edit_modes <= EditMode.ABLATE)
        _check(not bool(need.any()), "activation 'topk' needs edit_acts [N, E] for clamp/scale/ablate edits")
    if dev.type == "cpu" and S * E > 0:
        m = edit_modes.long()
        _check(bool(((m >= 0) & (m <= 6)).all()),
               "edit_modes must be in 0..6 (NONE, ADD, CLAMP, SCALE, ABLATE, PROJECT_CAP, ORTHOGONAL)")
        f = edit_features[m != EditMode.NONE]
        if f.numel():
            _check(int(f.min()) >= 0 and int(f.max()) < d_sae, f"edit_features must be in [0, {d_sae})")
    if dev.type == "cpu" and n:
        _check(int(token_slot.min()) >= -1 and int(token_slot.max()) < S, f"token_slot must be in [-1, {S})")
    impl = reference.steering_edit
    if backend_for(dev) == "triton":
        from . import triton_kernels  # imported by backend_for already

        impl = triton_kernels.steering_edit
    return impl(
        x,
        token_slot,
        edit_features,
        edit_modes,
        edit_values,
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        act=act,
        threshold=threshold,
        edit_acts=edit_acts,
        apply_b_dec_to_input=apply_b_dec_to_input,
        inplace=inplace,
    )
