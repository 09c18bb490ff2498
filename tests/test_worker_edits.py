"""The worker's steering edits on dictionaries whose activation needs the full encode (top-k,
gated): the activation an edit reads is the dictionary's own encode of the token, so the
token's k-th feature is always in its top k (no second GEMM to round it out). No engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_runtime import kernels
from sae_runtime.dictionary import DictionaryConfig, SparseDictionary
from sae_runtime.worker import runtime
from sae_runtime.worker.runtime import SAEWorkerRuntime
from sae_runtime.worker.step_plan import EditBatch

D_IN, D_SAE, K, N = 64, 512, 16, 96
ABLATE, CLAMP = int(kernels.EditMode.ABLATE), int(kernels.EditMode.CLAMP)


def _dictionary(arch: str) -> SparseDictionary:
    # bfloat16: the encode rounds each pre-activation to 8 bits, so neighbouring values in
    # a token's ranking often tie or sit within an ulp of each other at the k-th place.
    g = torch.Generator().manual_seed(0)
    t = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
        "b_dec": torch.randn(D_IN, generator=g) * 0.1,
    }
    if arch == "gated":
        t |= {
            "b_gate": torch.randn(D_SAE, generator=g) * 0.3,
            "r_mag": torch.randn(D_SAE, generator=g) * 0.2,
            "b_mag": torch.randn(D_SAE, generator=g) * 0.3,
        }
    else:
        t["b_enc"] = torch.randn(D_SAE, generator=g) * 0.1
    cfg = DictionaryConfig(
        architecture=arch,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K if arch == "topk" else None,
        dtype="bfloat16",
        metadata={"hook_name": "layers.0"},
    )
    return SparseDictionary(cfg, t, dtype=torch.bfloat16)


def _edit_delta(
    d: SparseDictionary, x: torch.Tensor, feats: torch.Tensor, modes: torch.Tensor, values: torch.Tensor,
    matmul: Any = None,
) -> torch.Tensor:
    """The worker's delta for one slot per row (row n edits ``feats[n]``)."""
    rt: Any = object.__new__(SAEWorkerRuntime)  # only the step's state, no vLLM runner
    rt._fired = {}
    n = x.shape[0]
    batch = EditBatch(
        rows=torch.arange(n),
        token_slot=torch.arange(n, dtype=torch.int32),
        features=feats,
        modes=modes.to(torch.int32),
        values=values.float(),
        needs_activation=True,
    )
    return rt._edit_delta(d, x, batch, matmul)


@pytest.mark.parametrize("chunk", [None, 7 * D_SAE])  # one encode / row chunks of 7 tokens
@pytest.mark.parametrize("arch", ["topk", "gated"])
@torch.inference_mode()  # as in the engine
def test_edit_reads_the_activation_of_the_dictionarys_own_encode(arch, chunk, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    if chunk is not None:
        monkeypatch.setattr(runtime, "_EDIT_ENCODE_CHUNK_ELEMS", chunk)
    d = _dictionary(arch)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1))
    xd = x.to(d.dtype)
    acts = d.encode(xd)  # [N, D_SAE] bfloat16, the dictionary's reference
    # features by their value: top-k by pre-activation (past the k-th, the encode is 0)
    order = (d.encode_pre(xd) if arch == "topk" else acts).float().topk(K + 8, dim=1).indices
    # per row: ablate its K-th feature (the one at the edge of its top k), and clamp to 1 a
    # feature just past it (top-k: outside, activation 0; gated: active)
    feats = torch.stack([order[:, K - 1], order[:, K + 4]], 1)
    modes = torch.tensor([ABLATE, CLAMP]).expand(N, 2)
    values = torch.tensor([0.0, 1.0]).expand(N, 2)
    a = acts.gather(1, feats).float()
    assert (a[:, 0] > 0).all()
    if arch == "topk":
        assert (a[:, 1] == 0).all() and (d.encode_pre(xd).gather(1, feats[:, 1:]) > 0).all()
    delta = _edit_delta(d, x, feats, modes, values)
    coef = torch.stack([-a[:, 0], 1.0 - a[:, 1]], 1)  # ablate: -a; clamp to 1: 1 - a
    W = d.W_dec.float()
    expect = torch.einsum("ne,ned->nd", coef, W[feats])
    if arch == "topk":  # the kernel writes x's dtype back: the delta is what survives that
        expect = (xd.float() + expect).to(d.dtype).float() - xd.float()
    torch.testing.assert_close(delta, expect, rtol=1e-5, atol=1e-6)
    # every row's K-th feature was ablated: removing -a d alone leaves the clamp's share
    assert (delta.norm(dim=1) > 0).all()
    alone = _edit_delta(d, x, feats[:, :1], modes[:, :1], values[:, :1])
    assert (alone.norm(dim=1) > 0.5 * a[:, 0] * W[feats[:, 0]].norm(dim=1)).all()


def _counted_packed_matmul(d: SparseDictionary) -> tuple[Any, list[int]]:
    """The worker's packed encoder matmul for ``d`` (skips the test where there is none) and
    the row counts of its calls."""
    from sae_runtime import vllm_surface

    packed = vllm_surface.cpu_packed_matmul(d.W_enc)
    if packed is None:
        pytest.skip("no prepacked CPU matmul on this machine")
    calls: list[int] = []

    def matmul(xin: torch.Tensor) -> torch.Tensor:
        calls.append(xin.shape[0])
        return packed(xin)

    return matmul, calls


@torch.inference_mode()
def test_topk_edit_reads_the_encode_of_the_packed_matmul_extraction_uses(monkeypatch):
    """On CPU the worker extracts through vLLM's prepacked encoder matmul; an edit that reads
    a top-k feature's activation encodes through the same matmul, so it sees the activations
    the request's features report (no second GEMM rounding them apart)."""
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    d = _dictionary("topk")
    matmul, calls = _counted_packed_matmul(d)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(2))
    xd = x.to(d.dtype)
    acts = d.encode(xd, matmul)  # what the packed extraction reports as active
    calls.clear()
    order = acts.float().topk(K, dim=1).indices
    feats = order[:, K - 1 :]  # each row's K-th feature: ablate it
    modes = torch.full((N, 1), ABLATE)
    values = torch.zeros(N, 1)
    delta = _edit_delta(d, x, feats, modes, values, matmul)
    assert sum(calls) == N  # the edit's encode went through the packed matmul
    a = acts.gather(1, feats).float()
    assert (a[:, 0] > 0).all()
    expect = torch.einsum("ne,ned->nd", -a, d.W_dec.float()[feats])
    expect = (xd.float() + expect).to(d.dtype).float() - xd.float()
    torch.testing.assert_close(delta, expect, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_topk_condition_reads_the_encode_of_the_packed_matmul():
    """A condition (`when`) on a top-k feature is evaluated from the full encode through the
    packed matmul extraction uses: it fires exactly where that encode's activation is above
    the threshold, and the matmul is called (torch's is not used)."""
    from sae_runtime.worker.step_plan import ConditionGroup, ConditionJob, LayerPlan

    d = _dictionary("topk")
    matmul, calls = _counted_packed_matmul(d)
    rt: Any = object.__new__(SAEWorkerRuntime)
    rt.dictionaries, rt.encoders, rt._fired = {"d": d}, {"d": matmul}, {}
    hidden = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    rows = torch.arange(0, N, 2)
    acts = d.encode(hidden[rows].to(d.dtype), matmul)
    feature = int(acts.float().gt(0).sum(0).argmax())  # active on many rows, not all
    above = float(acts[:, feature].float().median())
    calls.clear()
    job = ConditionJob(cid=0, dictionary="d", feature=feature, above=above, rows=rows)
    plan = LayerPlan(conditions={"d": ConditionGroup.of([job], torch.device("cpu"))})
    assert rt._apply_layer(0, plan, hidden, None) is None  # no edit: the stream is untouched
    assert calls == [rows.numel()]
    expect = torch.zeros(N, dtype=torch.bool)
    expect[rows] = acts[:, feature].float() > above
    assert torch.equal(rt._fired[0], expect) and 0 < int(expect.sum()) < rows.numel()


@pytest.mark.parametrize("chunk_rows", [None, 10])
@torch.inference_mode()
def test_conditions_on_one_dictionary_share_one_encode(monkeypatch, chunk_rows):
    """Several requests' conditions on one top-k dictionary at a hook point (two of them on
    the same request's rows) are evaluated from one encode of the rows they cover, each row
    once (in row chunks where the dense activations would be large), and each condition
    fires exactly where that encode's activation of its feature is above its threshold."""
    from sae_runtime.worker import runtime
    from sae_runtime.worker.step_plan import ConditionGroup, ConditionJob, LayerPlan

    if chunk_rows is not None:
        monkeypatch.setattr(runtime, "_EDIT_ENCODE_CHUNK_ELEMS", chunk_rows * D_SAE)
    d = _dictionary("topk")
    matmul, calls = _counted_packed_matmul(d)
    rt: Any = object.__new__(SAEWorkerRuntime)
    rt.dictionaries, rt.encoders, rt._fired = {"d": d}, {"d": matmul}, {}
    hidden = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(5))
    a_rows, b_rows, c_rows = torch.arange(0, 32), torch.arange(40, 72), torch.arange(80, 96)
    covered = torch.cat([a_rows, b_rows, c_rows])  # sorted, as the worker reads them
    step = chunk_rows or len(covered)
    acts = torch.cat([d.encode(hidden[covered[r0:r0 + step]].to(d.dtype), matmul).float()
                      for r0 in range(0, len(covered), step)])
    busy = acts.gt(0).sum(0).argsort(descending=True)
    f1, f2, f3 = (int(busy[i]) for i in range(3))  # features active on many rows
    jobs = [(0, f1, a_rows), (1, f2, a_rows), (2, f1, b_rows), (3, f3, c_rows)]
    thresholds = {}
    for cid, f, rows in jobs:
        sel = acts[torch.searchsorted(covered, rows), f]
        thresholds[cid] = float(sel.median())
    calls.clear()
    group = ConditionGroup.of([ConditionJob(cid=cid, dictionary="d", feature=f, above=thresholds[cid], rows=rows)
                               for cid, f, rows in jobs], torch.device("cpu"))
    assert group.rows.tolist() == covered.tolist() and group.features.tolist() == sorted({f1, f2, f3})
    plan = LayerPlan(conditions={"d": group})
    assert rt._apply_layer(0, plan, hidden, None) is None
    assert sum(calls) == len(covered) and len(calls) == -(-len(covered) // step)
    any_fired = 0
    for cid, f, rows in jobs:
        expect = torch.zeros(N, dtype=torch.bool)
        expect[rows] = acts[torch.searchsorted(covered, rows), f] > thresholds[cid]
        assert torch.equal(rt._fired[cid], expect), cid
        any_fired += int(expect.sum())
    assert 0 < any_fired < 2 * len(a_rows) + len(b_rows) + len(c_rows)
