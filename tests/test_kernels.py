"""Kernel tests: torch reference vs dense formulas, Triton kernels vs the torch reference.

How the Triton kernels run without a GPU: Triton decides between compiled JIT and its CPU
interpreter when a kernel (or triton.language itself) is *defined*, so TRITON_INTERPRET=1
must be set before `triton` is first imported. Other tests in the same pytest process may
import vllm/triton first, and setting the variable here would leak into them. So:

* if this process already runs Triton in interpreter mode (TRITON_INTERPRET=1 was set
  before triton was imported), the `test_triton_*` tests run in-process;
* on a CUDA machine they run in-process on the GPU (compiled);
* otherwise they are skipped here and `test_triton_interpreter_subprocess` runs them all
  in ONE child `python -m pytest` with TRITON_INTERPRET=1 and SAE_KERNELS_BACKEND=triton.

Interpreter limits: bf16 `tl.dot`/atomics misbehave there, so interpreted tests use
float32/float16; the `gpu`-marked tests compare compiled kernels incl. bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_runtime import kernels as K
from sae_runtime.kernels import reference as R

HAS_CUDA = torch.cuda.is_available()
IN_CHILD = os.environ.get("SAE_KERNELS_TEST_CHILD") == "1"
REPO = Path(__file__).resolve().parents[1]


def _triton_mode() -> str | None:
    try:
        from sae_runtime.kernels import triton_kernels as T
    except Exception:
        return None
    if T.interpreter_ready():
        return "interpreter"
    return "cuda" if HAS_CUDA else "subprocess"


TRITON_MODE = _triton_mode()


@pytest.fixture
def tdev(monkeypatch):
    """Device for Triton-vs-oracle tests (forces the Triton backend)."""
    if TRITON_MODE is None:
        pytest.skip("triton not importable")
    if TRITON_MODE == "subprocess":
        pytest.skip("run under the Triton interpreter by test_triton_interpreter_subprocess")
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "triton")
    return torch.device("cuda" if TRITON_MODE == "cuda" else "cpu")


@pytest.mark.skipif(IN_CHILD or TRITON_MODE != "subprocess", reason="Triton tests run in-process here")
def test_triton_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", SAE_KERNELS_BACKEND="triton", SAE_KERNELS_TEST_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "triton and not subprocess"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    summary = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, tail


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _dict(d_in, d_sae, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    b_enc = torch.randn(d_sae, generator=g) * 0.1
    b_dec = torch.randn(d_in, generator=g) * 0.1
    thr = torch.rand(d_sae, generator=g) * 0.5
    return [t.to(device=device, dtype=dtype) for t in (W_enc, b_enc, W_dec, b_dec, thr)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _dense_acts(pre64, act, thr=None, k=None):
    """Dense activations in float64 (topk keeps the k largest after ReLU)."""
    if act == "jumprelu":
        return torch.where(pre64 > thr.double(), pre64, 0.0)
    a = pre64.clamp_min(0)
    if act == "topk":
        top = a.topk(k, dim=1)
        a = torch.zeros_like(a).scatter_(1, top.indices, top.values)
    return a


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# API basics
# ---------------------------------------------------------------------------


def test_edit_modes():
    assert [int(K.EditMode[m]) for m in ("NONE", "ADD", "CLAMP", "SCALE", "ABLATE")] == [0, 1, 2, 3, 4]
    assert K.edit_mode_from_name("add") is K.EditMode.ADD
    assert K.edit_mode_from_name("Clamp") is K.EditMode.CLAMP
    assert K.edit_mode_from_name("scale") == 3 and K.edit_mode_from_name("ablate") == 4
    for bad in ("none", "boost", ""):
        with pytest.raises(ValueError):
            K.edit_mode_from_name(bad)


def test_backend_env_read_at_call_time(monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    assert K.backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError):
        K.encode_topk(torch.randn(2, 8), 2, activation="relu")
    monkeypatch.delenv("SAE_KERNELS_BACKEND")
    assert K.backend_for(torch.device("cpu")) == "torch"


def test_validation_errors(monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    W_enc, b_enc, W_dec, b_dec, _thr = _dict(8, 16)
    pre = torch.randn(3, 16)
    with pytest.raises(ValueError, match="activation"):
        K.encode_topk(pre, 2, activation="gelu")
    with pytest.raises(ValueError, match="k must"):
        K.encode_topk(pre, 17, activation="relu")
    with pytest.raises(ValueError, match="threshold"):
        K.encode_topk(pre, 2, activation="jumprelu")
    with pytest.raises(ValueError, match="b_enc"):
        K.encode_topk(pre, 2, activation="relu", b_enc=torch.zeros(15))
    with pytest.raises(ValueError, match="pre"):
        K.encode_topk(torch.zeros(3, 16, dtype=torch.int32), 2, activation="relu")
    with pytest.raises(ValueError, match="values"):
        K.sparse_decode(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), W_dec)
    with pytest.raises(ValueError, match="indices must be in"):
        K.sparse_decode(torch.full((2, 3), 16), torch.zeros(2, 3), W_dec)
    x = torch.randn(4, 8)
    kw = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    slots = torch.tensor([0, -1, 0, 0])
    feats = torch.tensor([[1, 2]])
    modes = torch.tensor([[2, 1]], dtype=torch.int8)
    vals = torch.tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match="edit_acts"):
        K.steering_edit(x, slots, feats, modes, vals, activation="topk", **kw)
    with pytest.raises(ValueError, match="edit_acts"):
        K.steering_edit(x, slots, feats, modes, vals, activation="topk", edit_acts=torch.zeros(4, 1), **kw)
    with pytest.raises(ValueError, match="edit_acts"):
        K.steering_edit(x, slots, feats, modes, vals, activation="relu", edit_acts=torch.zeros(3, 2), **kw)
    with pytest.raises(ValueError, match="edit_modes must be"):
        K.steering_edit(x, slots, feats, torch.tensor([[7, 1]], dtype=torch.int8), vals, activation="relu", **kw)
    with pytest.raises(ValueError, match="edit_features"):
        K.steering_edit(x, slots, torch.tensor([[16, 1]]), modes, vals, activation="relu", **kw)
    with pytest.raises(ValueError, match="token_slot"):
        K.steering_edit(x, torch.tensor([0, 1, 0, 0]), feats, modes, vals, activation="relu", **kw)
    with pytest.raises(ValueError, match="edit_values"):
        K.steering_edit(x, slots, feats, modes, vals[:, :1], activation="relu", **kw)
    with pytest.raises(ValueError, match="W_dec"):
        K.steering_edit(x, slots, feats, modes, vals, activation="relu", **{**kw, "W_dec": W_dec.t()})
    # topk with only ADD edits needs no edit_acts
    K.steering_edit(x, slots, feats, torch.tensor([[1, 1]], dtype=torch.int8), vals, activation="topk", **kw)


# ---------------------------------------------------------------------------
# torch reference vs dense formulas
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_reference_encode_vs_dense(act, apply_b_dec, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    d_in, d_sae, k = 50, 300, 24
    W_enc, b_enc, _W_dec, b_dec, thr = _dict(d_in, d_sae)
    x = torch.randn(9, d_in)
    pre64 = ((x - b_dec) if apply_b_dec else x).double() @ W_enc.double() + b_enc.double()
    # dense oracle from the same float32 pre-activations (a float64 one could flip a
    # jumprelu feature sitting within rounding of its threshold); pre itself vs float64:
    pre32 = ((x - b_dec) if apply_b_dec else x) @ W_enc + b_enc
    torch.testing.assert_close(pre32.double(), pre64, rtol=1e-5, atol=1e-5)
    dense = _dense_acts(pre32.double(), act, thr, k)
    idx, val = K.encode_features(x, W_enc, b_enc, b_dec, k, activation=act, threshold=thr,
                                 apply_b_dec_to_input=apply_b_dec)  # fmt: skip
    assert idx.shape == (9, k) and idx.dtype == torch.int64 and val.dtype == torch.float32
    assert (val[:, :-1] >= val[:, 1:]).all()
    torch.testing.assert_close(val.double(), dense.topk(k, dim=1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val.double(), dense.gather(1, idx), rtol=1e-5, atol=1e-5)
    # row-chunked encode gives the same
    monkeypatch.setattr(K, "_ENCODE_CHUNK_ELEMS", 2 * d_sae)
    idx2, val2 = K.encode_features(x, W_enc, b_enc, b_dec, k, activation=act, threshold=thr,
                                   apply_b_dec_to_input=apply_b_dec)  # fmt: skip
    # (BLAS may round differently for a smaller row count, so values only close)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(val, val2, rtol=1e-5, atol=1e-6)


def test_reference_topk_ties_and_padding():
    pre = torch.tensor(
        [
            [0.0, 2.0, 1.0, 2.0, -1.0, 1.0, 2.0, -0.0],  # ties at 2.0 and 1.0
            [-1.0, -2.0, 0.5, -0.0, -3.0, 0.0, -1.0, 0.0],  # one positive: padded with zeros
        ]
    )
    idx, val = R.encode_topk(pre, 5, R.ACT_RELU)
    assert idx.tolist() == [[1, 3, 6, 2, 5], [2, 0, 1, 3, 4]]
    assert val.tolist() == [[2.0, 2.0, 2.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0, 0.0]]
    assert _bits(val[1, 1:]).eq(0).all()  # +0.0, never -0.0
    # key packing round-trips arbitrary floats
    a = torch.tensor([[3.5, -2.25, 0.0, 1e-40, -1e-40, float("inf"), -float("inf"), 7.0]])
    i, v = R.unpack_keys(R.pack_keys(a))
    assert i.tolist() == [list(range(8))] and torch.equal(v, a)
    order = R.pack_keys(a).argsort(descending=True)[0].tolist()
    assert order == [5, 7, 0, 3, 2, 4, 1, 6]


@pytest.mark.parametrize("act", ["relu", "jumprelu"])
def test_reference_fast_topk_equals_key_definition(act):
    d = 300
    g = torch.Generator().manual_seed(3)
    thr = torch.rand(d, generator=g) - 0.2  # some negative thresholds: negative activations
    b = torch.randn(d, generator=g).round() * 0.5
    rows = [
        torch.randn(8, d, generator=g),
        torch.randn(8, d, generator=g).round(),  # many exact ties
        -torch.rand(8, d, generator=g),  # nothing positive: all padding
        torch.randn(8, d, generator=g).clamp_max(0).round(),  # ties at 0 and below
    ]
    pre = torch.cat(rows)
    pre[5, :] = 0.5
    for k in (1, 3, 24, 96, 300):
        for bias in (None, b):
            a = R.encode_topk(pre, k, K.ACTIVATIONS[act], bias, thr)
            e = R.encode_topk_keys(pre, k, K.ACTIVATIONS[act], bias, thr)
            assert torch.equal(a[0], e[0]) and torch.equal(_bits(a[1]), _bits(e[1])), (k, bias is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_sparse_decode_vs_dense(dtype):
    d_sae, d_in, n, k = 300, 50, 6, 17
    _, _, W_dec, _, _ = _dict(d_in, d_sae, dtype)
    idx = torch.randint(0, d_sae, (n, k))
    val = torch.randn(n, k).to(dtype)
    val[0, 3:] = 0
    dense = torch.zeros(n, d_sae, dtype=torch.float64).index_put_(
        (torch.arange(n).repeat_interleave(k), idx.reshape(-1)), val.double().reshape(-1), accumulate=True
    )
    out = R.sparse_decode(idx, val, W_dec)
    assert out.dtype == dtype and out.shape == (n, d_in)
    torch.testing.assert_close(out.double(), dense @ W_dec.double(), **_tol(dtype))
    # autograd vs the dense formula (float32)
    if dtype == torch.float32:
        v1 = val.clone().requires_grad_()
        w1 = W_dec.clone().requires_grad_()
        g = torch.randn(n, d_in)
        (R.sparse_decode(idx, v1, w1) * g).sum().backward()
        torch.testing.assert_close(v1.grad, (g @ W_dec.t()).gather(1, idx), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w1.grad, dense.float().t() @ g, rtol=1e-4, atol=1e-5)


def _dense_steer(x, slots, feats, modes, vals, W_enc, b_enc, W_dec, b_dec, act, thr, k, apply_b_dec=True):
    """Full encode (float64), then the design-notes table token by token."""
    xd = x.double()
    pre = ((xd - b_dec.double()) if apply_b_dec else xd) @ W_enc.double() + b_enc.double()
    a = _dense_acts(pre, act, thr, k)
    out = xd.clone()
    for n in range(x.shape[0]):
        s = int(slots[n])
        if s < 0:
            continue
        for e in range(feats.shape[1]):
            m, f, v = int(modes[s, e]), int(feats[s, e]), float(vals[s, e])
            d = W_dec[f].double()
            if m == 1:
                out[n] += v * d
            elif m == 2:
                out[n] += (v - a[n, f]) * d
            elif m == 3:
                out[n] += (v - 1) * a[n, f] * d
            elif m == 4:
                out[n] -= a[n, f] * d
            elif m in (5, 6):  # project_cap / orthogonal: c = <x, d> / |d|^2 of the original x
                c = float(xd[n] @ d) / float(d @ d)
                out[n] += (-max(c - v, 0.0) if m == 5 else v - c) * d
    return out, pre


def _slot_acts(acts, slots, feats):
    """``edit_acts [N, E]``: token n's activation of each feature of its slot (0 without one)."""
    feats_n = feats.to(acts.device)[slots.clamp(min=0).to(acts.device)]
    return torch.where((slots >= 0).to(acts.device)[:, None], acts.gather(1, feats_n), 0.0).float()


def _edits(d_sae, S=3, E=4, seed=1, modes=None):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randint(0, d_sae, (S, E), generator=g)
    feats[0, 1] = feats[0, 0]  # repeated feature id in one slot
    if modes is None:
        modes = torch.randint(1, 7, (S, E), generator=g)
        modes[1, -1] = 0  # padding
    else:
        modes = torch.full((S, E), modes)
    vals = torch.randn(S, E, generator=g) * 2
    return feats, modes.to(torch.int8), vals.float()


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_reference_steering_vs_dense(act, apply_b_dec, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    d_in, d_sae, k = 50, 300, 16
    W_enc, b_enc, W_dec, b_dec, thr = _dict(d_in, d_sae)
    x = torch.randn(8, d_in)
    slots = torch.tensor([0, 1, -1, 2, 0, -1, 1, 2])
    feats, modes, vals = _edits(d_sae)
    # make sure some edited features are active for most tokens
    feats[:, 2] = (x.double() @ W_enc.double()).argmax(1)[:3]
    expect, pre = _dense_steer(x, slots, feats, modes, vals, W_enc, b_enc, W_dec, b_dec, act, thr, k, apply_b_dec)
    # topk: the caller's activations from the full encode (the others compute their own)
    acts = _slot_acts(_dense_acts(pre, act, thr, k), slots, feats) if act == "topk" else None
    out = K.steering_edit(x, slots, feats, modes, vals, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                          activation=act, threshold=thr, edit_acts=acts, apply_b_dec_to_input=apply_b_dec)  # fmt: skip
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)
    assert torch.equal(_bits(out[slots < 0]), _bits(x[slots < 0]))
    assert not torch.equal(out[slots >= 0], x[slots >= 0])


def _steer_with_acts(x, slots, feats, modes, vals, W_dec, edit_acts):
    """The design-notes table in float64 with ``a_i`` = ``edit_acts[n, e]``."""
    xd = x.double().cpu()
    out = xd.clone()
    W = W_dec.double().cpu()
    for n in range(x.shape[0]):
        s = int(slots[n])
        if s < 0:
            continue
        for e in range(feats.shape[1]):
            m, f, v, a = int(modes[s, e]), int(feats[s, e]), float(vals[s, e]), float(edit_acts[n, e])
            d = W[f]
            c = float(xd[n] @ d) / float(d @ d)
            out[n] += {0: 0.0, 1: v, 2: v - a, 3: (v - 1) * a, 4: -a, 5: -max(c - v, 0.0), 6: v - c}[m] * d
    return out


def _nan_encoder(W_enc, b_enc, thr):
    """Encoder tensors full of NaN: an edit that reads any of them comes out NaN."""
    return dict(
        W_enc=torch.full_like(W_enc, float("nan")),
        b_enc=torch.full_like(b_enc, float("nan")),
        threshold=torch.full_like(thr, float("nan")),
    )


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
def test_reference_steering_uses_given_edit_acts(act, monkeypatch):
    # edit_acts replace the activation (whatever the activation function) and the encoder is
    # not read: token n's edit e gets edit_acts[n, e], also where two tokens share a slot.
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    d_in, d_sae = 50, 300
    W_enc, b_enc, W_dec, b_dec, thr = _dict(d_in, d_sae)
    x = torch.randn(8, d_in)
    slots = torch.tensor([0, 1, -1, 2, 0, -1, 1, 2])
    feats, modes, vals = _edits(d_sae)
    edit_acts = torch.rand(8, feats.shape[1]) * 3 + 0.5  # distinct per token and edit
    expect = _steer_with_acts(x, slots, feats, modes, vals, W_dec, edit_acts)
    out = K.steering_edit(x, slots, feats, modes, vals, W_dec=W_dec, b_dec=b_dec, activation=act,
                          edit_acts=edit_acts, **_nan_encoder(W_enc, b_enc, thr))  # fmt: skip
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)
    assert torch.equal(_bits(out[slots < 0]), _bits(x[slots < 0]))
    # the tokens sharing slot 0 got different edits: their own activations
    d0 = (out - x)[[0, 4]]
    assert not torch.allclose(d0[0], d0[1])


def test_reference_steering_many_distinct_features(monkeypatch):
    # exercises the per-pair (non-GEMM) dot-product path of the reference
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    d_in, d_sae = 50, 300
    W_enc, b_enc, W_dec, b_dec, thr = _dict(d_in, d_sae)
    x = torch.randn(40, d_in)
    S, E = 40, 8
    feats = torch.randint(0, d_sae, (S, E))
    modes = torch.randint(2, 5, (S, E)).to(torch.int8)
    vals = torch.randn(S, E)
    slots = torch.arange(40)
    expect, _ = _dense_steer(x, slots, feats, modes, vals, W_enc, b_enc, W_dec, b_dec, "relu", thr, None)
    out = K.steering_edit(x, slots, feats, modes, vals, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                          activation="relu")  # fmt: skip
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Triton vs torch reference (interpreter on CPU, compiled on CUDA)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,d_sae,k,act,dtype,block",
    [
        (4, 300, 1, "relu", torch.float32, None),
        (3, 300, 96, "jumprelu", torch.float16, None),
        (3, 50, 7, "topk", torch.float32, None),
        (3, 300, 8, "relu", torch.float16, 64),  # 3 rounds of candidate merging
        (2, 2500, 96, "jumprelu", torch.float32, None),  # 2 blocks of 2048 -> merge
        (0, 300, 5, "relu", torch.float32, None),
    ],
)
def test_triton_encode_topk(tdev, n, d_sae, k, act, dtype, block):
    from sae_runtime.kernels import triton_kernels as T

    g = torch.Generator().manual_seed(n + d_sae + k)
    pre = torch.randn(n, d_sae, generator=g).to(dtype)
    if n:
        pre[0, ::3] = 0.25  # ties
        pre[-1] = -pre[-1].abs()  # no positive activation at all: all-zero padding
        pre[-1, 5] = 1.0
    b_enc = (torch.randn(d_sae, generator=g) * 0.05).to(dtype)
    thr = (torch.rand(d_sae, generator=g) * 0.3 - 0.1).to(dtype)  # some negative: negative acts
    pre, b_enc, thr = pre.to(tdev), b_enc.to(tdev), thr.to(tdev)
    i_ref, v_ref = R.encode_topk(pre, k, K.ACTIVATIONS[act], b_enc, thr if act == "jumprelu" else None)
    if block is None:
        i_tri, v_tri = K.encode_topk(pre, k, activation=act, b_enc=b_enc, threshold=thr)
    else:
        a = K.ACTIVATIONS[act]
        i_tri, v_tri = T.encode_topk(pre, k, a, b_enc, thr if act == "jumprelu" else None, block=block)
    assert i_tri.shape == (n, k) and v_tri.dtype == dtype
    assert torch.equal(i_tri, i_ref) and torch.equal(_bits(v_tri), _bits(v_ref))


def test_triton_encode_topk_bitonic_path(tdev):
    # the compiled default (tl.topk); slow in the interpreter, so tiny
    from sae_runtime.kernels import triton_kernels as T

    pre = torch.randn(2, 40).to(tdev)
    pre[0, :10] = 0.5
    for k in (1, 6):
        i_ref, v_ref = R.encode_topk(pre, k, R.ACT_RELU)
        i_tri, v_tri = T.encode_topk(pre, k, R.ACT_RELU, bitonic=True, block=16)
        assert torch.equal(i_tri, i_ref) and torch.equal(v_tri, v_ref)


def test_triton_encode_features(tdev):
    W_enc, b_enc, _W_dec, b_dec, thr = _dict(50, 300, device=tdev)
    x = torch.randn(3, 50, device=tdev)
    i_tri, v_tri = K.encode_features(x, W_enc, b_enc, b_dec, 8, activation="jumprelu", threshold=thr)
    pre = R.encode_pre(x, W_enc, b_dec, True)
    i_ref, v_ref = R.encode_topk(pre, 8, R.ACT_JUMPRELU, b_enc, thr)
    assert torch.equal(i_tri, i_ref) and torch.equal(v_tri, v_ref)


@pytest.mark.parametrize(
    "n,d_in,k,dtype",
    [(5, 50, 1, torch.float32), (3, 576, 96, torch.float16), (4, 50, 13, torch.float16), (0, 50, 4, torch.float32)],
)
def test_triton_sparse_decode_forward(tdev, n, d_in, k, dtype):
    d_sae = 300
    _, _, W_dec, _, _ = _dict(d_in, d_sae, dtype, tdev)
    idx = torch.randint(0, d_sae, (n, k), device=tdev)
    val = torch.randn(n, k, device=tdev).to(dtype)
    if n:
        val[0, k // 2 :] = 0
        idx[-1, 0] = idx[-1, -1]  # repeated index in a row
    out = K.sparse_decode(idx, val, W_dec)
    ref = R.sparse_decode(idx, val, W_dec)
    assert out.shape == (n, d_in) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("n,d_in,k,dtype", [(4, 50, 96, torch.float32), (3, 576, 5, torch.float32),
                                            (3, 50, 9, torch.float16)])  # fmt: skip
def test_triton_sparse_decode_backward(tdev, n, d_in, k, dtype):
    d_sae = 300
    _, _, W_dec, _, _ = _dict(d_in, d_sae, dtype, tdev)
    idx = torch.randint(0, 40, (n, k), device=tdev)  # few distinct features: long runs in grad_W
    idx[:, 0] = 299
    val = torch.randn(n, k, device=tdev).to(dtype)
    val[0, -1] = 0
    g = torch.randn(n, d_in, device=tdev).to(dtype)
    grads = []
    for fn in (K.sparse_decode, R.sparse_decode):
        v = val.clone().requires_grad_()
        w = W_dec.clone().requires_grad_()
        out = fn(idx, v, w)
        out.backward(g)
        grads.append((out.detach(), v.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **_tol(dtype))
    # only values / only W_dec requiring grad
    v = val.clone().requires_grad_()
    K.sparse_decode(idx, v, W_dec).backward(g)
    torch.testing.assert_close(v.grad, grads[1][1], **_tol(dtype))


def _steer_case(tdev, d_in, dtype, act, modes=None, S=3, E=4, n=9, seed=0):
    W_enc, b_enc, W_dec, b_dec, thr = _dict(d_in, 300, dtype, tdev, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n, d_in, generator=g).to(dtype).to(tdev)
    x[:, 0] = -0.0
    slots = torch.tensor([0, 1, -1, 2, 0, -1, 1, 2, 0][:n], device=tdev)
    feats, m, vals = _edits(300, S, E, seed=seed + 1, modes=modes)
    feats[:, 2] = (x.float() @ W_enc.float()).argmax(1)[:S].cpu()  # edited features that fire
    feats, m, vals = feats.to(tdev), m.to(tdev), vals.to(tdev)
    pre = (x.double() - b_dec.double()) @ W_enc.double() + b_enc.double()
    acts = _slot_acts(_dense_acts(pre, act, thr, 16), slots, feats) if act == "topk" else None
    kw = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=thr, edit_acts=acts)
    return x, slots, feats, m, vals, kw


@pytest.mark.parametrize(
    "d_in,dtype,act,modes",
    [
        (50, torch.float32, "relu", None),
        (576, torch.float16, "jumprelu", None),
        (50, torch.float32, "topk", None),
        (50, torch.float32, "relu", 1),
        (50, torch.float16, "relu", 2),
        (50, torch.float32, "jumprelu", 3),
        (576, torch.float32, "topk", 4),
        (50, torch.float32, "relu", 5),
        (576, torch.float16, "jumprelu", 6),
    ],
)
def test_triton_steering_edit(tdev, d_in, dtype, act, modes):
    x, slots, feats, m, vals, kw = _steer_case(tdev, d_in, dtype, act, modes)
    x0 = x.clone()
    ref = R.steering_edit(x, slots, feats, m, vals, act=K.ACTIVATIONS[act], **kw)
    out = K.steering_edit(x, slots, feats, m, vals, activation=act, **kw)
    assert out is not x and torch.equal(_bits(x), _bits(x0))
    torch.testing.assert_close(out, ref, **_tol(dtype))
    assert torch.equal(_bits(out[slots < 0]), _bits(x0[slots < 0]))
    # in place: same tensor comes back, same numbers
    slots32 = slots.to(torch.int32)
    out2 = K.steering_edit(x, slots32, feats, m.to(torch.int32), vals, activation=act, inplace=True, **kw)
    assert out2 is x
    torch.testing.assert_close(x, ref, **_tol(dtype))
    assert torch.equal(_bits(x[slots < 0]), _bits(x0[slots < 0]))


@pytest.mark.parametrize(
    "act,dtype,d_in", [("topk", torch.float32, 50), ("relu", torch.float16, 576), ("jumprelu", torch.float32, 576)]
)
def test_triton_steering_edit_acts(tdev, act, dtype, d_in):
    # the kernel reads edit_acts[n, e] (no encoder read: the encoder tensors are NaN)
    x, slots, feats, m, vals, kw = _steer_case(tdev, d_in, dtype, act)
    edit_acts = (torch.rand(x.shape[0], feats.shape[1]) * 3 + 0.5).to(tdev)
    kw = {**kw, **_nan_encoder(kw["W_enc"], kw["b_enc"], kw["threshold"]), "edit_acts": edit_acts}
    ref = R.steering_edit(x, slots, feats, m, vals, act=K.ACTIVATIONS[act], **kw)
    out = K.steering_edit(x, slots, feats, m, vals, activation=act, **kw)
    expect = _steer_with_acts(x, slots.cpu(), feats.cpu(), m.cpu(), vals.cpu(), kw["W_dec"], edit_acts.cpu())
    torch.testing.assert_close(out, ref, **_tol(dtype))
    torch.testing.assert_close(out.double().cpu(), expect.to(dtype).double(), **_tol(dtype))
    assert torch.equal(_bits(out[slots < 0]), _bits(x[slots < 0]))


def test_triton_steering_identity_and_empty(tdev):
    x, slots, feats, m, vals, kw = _steer_case(tdev, 50, torch.float32, "relu")
    x0 = x.clone()
    # all slots empty / all padding: bitwise identity, also in place
    none = torch.zeros_like(m)
    for inplace in (False, True):
        out = K.steering_edit(x, slots, feats, none, vals, activation="relu", inplace=inplace, **kw)
        assert torch.equal(_bits(out), _bits(x0)) and ((out is x) == inplace)
        out = K.steering_edit(x, torch.full_like(slots, -1), feats, m, vals, activation="relu",
                              inplace=inplace, **kw)  # fmt: skip
        assert torch.equal(_bits(out), _bits(x0))
    # N = 0 tokens, S = 0 slots
    e = x[:0]
    assert K.steering_edit(e, slots[:0], feats, m, vals, activation="relu", **{**kw, "edit_acts": None}).shape == (
        0, 50)  # fmt: skip
    out = K.steering_edit(x, torch.full_like(slots, -1), feats[:0], m[:0], vals[:0], activation="relu", **kw)
    assert torch.equal(_bits(out), _bits(x0))


def test_triton_steering_noncontiguous_and_transposed_wenc(tdev):
    x, slots, feats, m, vals, kw = _steer_case(tdev, 50, torch.float32, "relu")
    big = torch.randn(x.shape[0], 80, device=tdev)
    big[:, :50] = x
    xv = big[:, :50]  # row stride 80
    w_t = kw["W_enc"].t().contiguous().t()  # [d_in, d_sae] view of a [d_sae, d_in] store
    ref = R.steering_edit(x, slots, feats, m, vals, act=R.ACT_RELU, **{**kw, "W_enc": w_t})
    out = K.steering_edit(xv, slots, feats, m, vals, activation="relu", inplace=True, **{**kw, "W_enc": w_t})
    assert out is xv
    torch.testing.assert_close(big[:, :50], ref)


# ---------------------------------------------------------------------------
# compiled Triton on a GPU (bf16 included)
# ---------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_sae,k", [(4608, 32), (16384, 128), (65536, 256), (301, 96)])
def test_gpu_encode_topk(monkeypatch, dtype, d_sae, k):
    monkeypatch.delenv("SAE_KERNELS_BACKEND", raising=False)
    pre = torch.randn(257, d_sae, device="cuda").to(dtype)
    pre[0, ::5] = 0.5
    b = (torch.randn(d_sae, device="cuda") * 0.1).to(dtype)
    thr = torch.rand(d_sae, device="cuda").to(dtype)
    for act, t in (("relu", None), ("jumprelu", thr)):
        i_ref, v_ref = R.encode_topk(pre, k, K.ACTIVATIONS[act], b, t)
        i_tri, v_tri = K.encode_topk(pre, k, activation=act, b_enc=b, threshold=t)
        assert torch.equal(i_tri, i_ref) and torch.equal(v_tri, v_ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_in,k", [(576, 32), (2048, 128), (50, 1)])
def test_gpu_sparse_decode(monkeypatch, dtype, d_in, k):
    monkeypatch.delenv("SAE_KERNELS_BACKEND", raising=False)
    d_sae, n = 16384, 300
    W = (torch.randn(d_sae, d_in, device="cuda") / d_in**0.5).to(dtype)
    idx = torch.randint(0, d_sae, (n, k), device="cuda")
    idx[:, 0] = 7  # a popular feature
    val = torch.randn(n, k, device="cuda").to(dtype)
    g = torch.randn(n, d_in, device="cuda").to(dtype)
    res = []
    # oracle in float32 (torch's own half-precision index backward accumulates in half)
    for fn, cast in ((K.sparse_decode, dtype), (R.sparse_decode, torch.float32)):
        v, w = val.to(cast).requires_grad_(), W.to(cast).requires_grad_()
        out = fn(idx, v, w)
        out.backward(g.to(cast))
        res.append((out.detach(), v.grad, w.grad))
    for a, b in zip(*res, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
def test_gpu_steering_edit(monkeypatch, dtype, act):
    monkeypatch.delenv("SAE_KERNELS_BACKEND", raising=False)
    for d_in in (576, 2048):
        x, slots, feats, m, vals, kw = _steer_case(torch.device("cuda"), d_in, dtype, act, S=3, E=8, n=9)
        x0 = x.clone()
        ref = R.steering_edit(x, slots, feats, m, vals, act=K.ACTIVATIONS[act], **kw)
        out = K.steering_edit(x, slots, feats, m, vals, activation=act, **kw)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(_bits(out[slots < 0]), _bits(x0[slots < 0]))
        assert K.steering_edit(x, slots, feats, m, vals, activation=act, inplace=True, **kw) is x


def test_relu_activation_is_the_masked_definition_bit_for_bit():
    """The fast ReLU of the CPU epilogue equals ``where(x > 0, x, 0)`` bit for bit: NaN,
    -0.0, negatives and -inf give +0.0, +inf and subnormals stay; ``pre`` is not modified."""
    from sae_runtime.kernels import reference

    edge = torch.tensor([float("nan"), -0.0, 0.0, -1.0, 2.0, float("inf"), float("-inf"), 1e-45, -1e-45])
    pre = torch.cat([edge, torch.randn(4608 - edge.numel(), generator=torch.Generator().manual_seed(0))])[None]
    kept = pre.clone()
    for b_enc in (None, torch.randn(4608, generator=torch.Generator().manual_seed(1))):
        x = pre if b_enc is None else pre + b_enc
        want = torch.where(x > 0, x, torch.zeros(()))
        got = reference.activation_fp32(pre, reference.ACT_RELU, b_enc)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(pre.view(torch.int32), kept.view(torch.int32))
