"""The feature index's statistics (sae_runtime/feature_index/stats.py) against a brute-force
computation on synthetic activations, and the exactness of merging partial results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_runtime.feature_index.stats import ContextFeatures, IndexStats, random_key

D, K, TOP_N, WINDOW = 40, 5, 4, 6
SPECIAL = 7  # token id treated as special (masked out)


def synthetic(n_ctx: int = 60, seed: int = 0) -> list[ContextFeatures]:
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_ctx):
        t = int(rng.integers(3, 30))
        tokens = rng.integers(0, 50, t)
        mask = np.arange(t) > 0
        mask &= tokens != SPECIAL
        idx = np.stack([rng.permutation(D)[:K] for _ in range(t)])
        # A few features fire often and strongly, the rest rarely; ~30% of slots are 0.
        val = rng.exponential(1.0, (t, K)) * (1 + (idx < 5) * 3)
        val = np.round(val, 2)  # ties occur
        val[rng.random((t, K)) < 0.3] = 0.0
        out.append(ContextFeatures(ctx_id=c, token_ids=tokens, mask=mask, indices=idx,
                                   values=val.astype(np.float32)))
    return out


def dense(c: ContextFeatures) -> np.ndarray:
    a = np.zeros((len(c.token_ids), D), np.float32)
    for p in range(len(c.token_ids)):
        if c.mask[p]:
            a[p, c.indices[p]] = c.values[p]
    return a


def brute_force(contexts: list[ContextFeatures]) -> dict:
    acts = [dense(c) for c in contexts]
    tokens = sum(int(c.mask.sum()) for c in contexts)
    allv = np.concatenate(acts)
    fired = allv > 0
    peaks = {f: [] for f in range(D)}
    for c, a in zip(contexts, acts, strict=True):
        for f in range(D):
            if (a[:, f] > 0).any():
                p = int(np.argmax(a[:, f]))  # first maximum
                peaks[f].append((-float(a[p, f]), c.ctx_id, p))
    top = {f: sorted(peaks[f])[:TOP_N] for f in range(D)}
    return {"tokens": tokens, "n_fired": fired.sum(0), "max": allv.max(0), "values": allv,
            "cooc": fired.T.astype(np.int64) @ fired.astype(np.int64), "top": top, "acts": acts}


def run(contexts, batches: int = 1, **kw) -> IndexStats:
    s = IndexStats(D, top_n=TOP_N, window=WINDOW, reservoir=8, seed=3, **kw)
    for part in np.array_split(np.arange(len(contexts)), batches):
        s.update([contexts[i] for i in part])
    return s


def test_counts_max_density_and_cooccurrence_match_brute_force():
    ctxs = synthetic()
    s, ref = run(ctxs, batches=5), brute_force(ctxs)
    assert s.tokens == ref["tokens"]
    assert s.n_fired.tolist() == ref["n_fired"].tolist()
    np.testing.assert_array_equal(s.max_act.numpy(), ref["max"])
    np.testing.assert_allclose(s.density(), ref["n_fired"] / ref["tokens"])
    assert s.cooc is not None
    np.testing.assert_array_equal(s.cooc.numpy(), ref["cooc"])
    co = s.cooccurring(3)
    for f in (0, 1, 17):
        n = ref["n_fired"]
        jac = ref["cooc"][f] / np.maximum(n[f] + n - ref["cooc"][f], 1)
        jac[f] = 0
        best = sorted(range(D), key=lambda g: -jac[g])[:3]
        assert [g for g, _ in co[f]] == [g for g in best if jac[g] > 0]
        assert [j for _, j in co[f]] == pytest.approx([jac[g] for g in best if jac[g] > 0])


def test_top_examples_are_exact_one_per_context_with_windows():
    ctxs = synthetic()
    s, ref = run(ctxs, batches=7), brute_force(ctxs)
    for f in range(D):
        got = s.examples(f)
        want = ref["top"][f]
        assert [(e["ctx"], e["position"]) for e in got] == [(c, p) for _, c, p in want]
        assert [e["activation"] for e in got] == pytest.approx([-v for v, _, _ in want])
        for e in got:
            c = ctxs[e["ctx"]]
            start = e["position"] - e["peak"]
            assert e["token_ids"] == c.token_ids[start:start + WINDOW].tolist()
            np.testing.assert_allclose(e["acts"], ref["acts"][e["ctx"]][start:start + WINDOW, f])
            assert e["acts"][e["peak"]] == pytest.approx(e["activation"])
            assert len(e["token_ids"]) == min(WINDOW, len(c.token_ids))


def test_quantiles_and_histogram_from_the_fine_histogram():
    ctxs = synthetic(120)
    s, ref = run(ctxs, batches=3), brute_force(ctxs)
    levels = (0.5, 0.9, 0.99)
    q = s.quantiles(levels)
    hist = s.coarse_hist(8)
    for f in range(D):
        v = ref["values"][:, f]
        v = v[v > 0]
        if len(v) == 0:
            assert (q[f] == 0).all() and hist[f].sum() == 0
            continue
        exact = np.quantile(v, levels, method="inverted_cdf")
        np.testing.assert_allclose(q[f], exact, rtol=0.02, atol=2e-3)
        assert hist[f].sum() == len(v)
        exact_hist = np.histogram(v, bins=8, range=(0, v.max()))[0]
        assert np.abs(np.cumsum(hist[f]) - np.cumsum(exact_hist)).max() <= max(2, 0.05 * len(v))


def test_merge_of_shards_equals_one_pass_and_survives_saving(tmp_path):
    ctxs = synthetic(80, seed=5)
    whole = run(ctxs)
    order = np.random.default_rng(1).permutation(len(ctxs))
    shards = [run([ctxs[i] for i in part], batches=2) for part in np.array_split(order, 3)]
    shards[1].save(tmp_path / "s1.pt")
    shards[1] = IndexStats.load(tmp_path / "s1.pt")
    merged = shards[2]
    merged.merge(shards[0])
    merged.merge(shards[1])
    a, b = whole.state_dict(), merged.state_dict()
    assert a["tokens"] == b["tokens"] and a["contexts"] == b["contexts"] == len(ctxs)
    for name in IndexStats._TENSORS:
        x, y = a[name], b[name]
        if name == "fine":
            x, y = x.to_dense(), y.to_dense()
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="other settings"):
        merged.merge(IndexStats(D + 1, top_n=TOP_N, window=WINDOW, reservoir=8, seed=3))


def test_reservoir_keeps_the_contexts_of_smallest_key_with_their_firing_features():
    ctxs = synthetic(50)
    s = run(ctxs, batches=4)
    keys = random_key(np.arange(50), 3)
    assert s.rnd_ctx.tolist() == np.argsort(keys, kind="stable")[:8].tolist()
    for (tokens, active), c in zip(s.random_windows(), s.rnd_ctx.tolist(), strict=True):
        ctx = ctxs[c]
        text = ctx.token_ids.tolist()
        start = next(i for i in range(len(text)) if text[i:i + len(tokens)] == tokens)
        a = dense(ctx)[start:start + len(tokens)]
        assert active.tolist() == (a > 0).any(0).tolist()


def test_exclude_sinks_takes_the_norm_outliers_of_the_scored_tokens_out_of_the_masks(tmp_path):
    """sae-index's attention-sink rule (``build.exclude_sinks``, sae-train's ``sink_norms``):
    a scored token over 10x the median norm of all the scored tokens handed in is taken out
    of its context's mask; unscored positions (position 0, whatever its norm) neither count
    in the median nor change; the count goes into the statistics and survives merging and
    saving."""
    from sae_runtime.feature_index.build import exclude_sinks

    ctxs = synthetic(6, seed=2)
    rng = np.random.default_rng(0)
    norms = [rng.uniform(100, 150, len(c.token_ids)).astype(np.float32) for c in ctxs]
    for n in norms:
        n[0] = 20_000.0  # position 0: not scored, not a sink here
    scored_pos = [int(np.flatnonzero(c.mask)[0]) for c in ctxs[:2]]
    norms[0][scored_pos[0]] = 25_000.0
    norms[1][scored_pos[1]] = 1_600.0  # over 10x any median of the others (<= 150)
    before = [c.mask.copy() for c in ctxs]
    assert exclude_sinks(ctxs, norms) == 2
    for i, (c, m) in enumerate(zip(ctxs, before, strict=True)):
        want = m.copy()
        if i < 2:
            want[scored_pos[i]] = False
        assert c.mask.tolist() == want.tolist()
    s = run(ctxs)
    s.sinks += 2
    assert s.tokens == sum(int(m.sum()) for m in before) - 2
    assert brute_force(ctxs)["max"].max() == pytest.approx(float(s.max_act.max()))
    s.save(tmp_path / "s.pt")
    other = run(synthetic(3, seed=9))
    other.sinks = 1
    loaded = IndexStats.load(tmp_path / "s.pt")
    loaded.merge(other)
    assert loaded.sinks == 3
    # Nothing is a sink when no norm stands out; an empty batch has none.
    assert exclude_sinks(synthetic(3, seed=4), [np.full(len(c.token_ids), 120.0, np.float32)
                                                for c in synthetic(3, seed=4)]) == 0
    assert exclude_sinks([], []) == 0
