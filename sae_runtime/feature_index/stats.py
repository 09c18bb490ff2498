"""Per-feature statistics of a dictionary over a corpus, accumulated context batch by batch.

:class:`IndexStats` takes the top-k features of every token of whole contexts
(:class:`ContextFeatures`) and keeps, for every feature of the dictionary:

- the number of scored tokens (the caller's mask: position 0, special tokens and attention
  sinks excluded; ``sinks`` counts the sinks the caller took out),
  the tokens where the feature fired and its exact maximum;
- a fine histogram of its nonzero activations on a fixed log-spaced grid
  (:data:`FINE_BINS` bins over ``[10**FINE_LOG10_MIN, 10**FINE_LOG10_MAX)``, one bin is
  ×1.009 wide): the stored quantiles and the coarse histogram are read from it;
- co-occurrence counts (tokens where two features both fired), for Jaccard indices;
- its top-N contexts, exact: at most one per context (the context's peak), ordered by
  activation, ties by context id; each with a window of tokens around the peak and the
  feature's activation at each of them (0 at positions the mask excludes);
- a reservoir of random windows (the contexts with the smallest seeded hash of their id)
  with the set of features firing in each: the non-activating contexts of the label test.

Everything depends only on which contexts were seen, never on their order or batching, so
:meth:`IndexStats.merge` of statistics over disjoint sets of contexts equals the statistics
over their union, exactly (shards, interrupted runs, workers on other machines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FINE_BINS = 2048
FINE_LOG10_MIN = -3.0
FINE_LOG10_MAX = 5.0
"""The fine histogram's grid: activations below ``1e-3`` count in its first bin, above
``1e5`` in its last."""

PAIR_CHUNK = 8_000_000
"""Co-occurrence pairs counted per step (bounds the temporary memory: 8 bytes each)."""


@dataclass
class ContextFeatures:
    """One context as the engine saw it and its features."""

    ctx_id: int
    """Global id of the context in the corpus (decides ties and the random reservoir)."""
    token_ids: np.ndarray
    """int ``[T]``."""
    mask: np.ndarray
    """bool ``[T]``: positions the statistics count (not position 0, not special tokens)."""
    indices: np.ndarray
    """int ``[T, k]``: the top-k features of each position."""
    values: np.ndarray
    """float ``[T, k]``: their activations (0 = not firing)."""


def _mix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixing function (splitmix64's finalizer) on uint64."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def random_key(ctx_ids: np.ndarray, seed: int) -> np.ndarray:
    """Seeded pseudo-random int64 keys of context ids (the reservoir keeps the smallest)."""
    with np.errstate(over="ignore"):
        mixed = _mix64(np.asarray(ctx_ids, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    return (mixed >> np.uint64(1)).astype(np.int64)


def _lexorder(*keys: Tensor) -> Tensor:
    """Indices sorting by ``keys`` (the last is the primary key), stable."""
    order = torch.arange(keys[0].numel())
    for key in keys:
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def fine_bin(values: Tensor) -> Tensor:
    """The fine-histogram bin of each (positive) activation."""
    scaled = (torch.log10(values.double()) - FINE_LOG10_MIN) * (FINE_BINS / (FINE_LOG10_MAX - FINE_LOG10_MIN))
    return scaled.floor().clamp(0, FINE_BINS - 1).long()


def fine_edges() -> np.ndarray:
    """``[FINE_BINS + 1]`` edges of the fine histogram (bin ``b`` is ``[e[b], e[b+1])``)."""
    return 10.0 ** np.linspace(FINE_LOG10_MIN, FINE_LOG10_MAX, FINE_BINS + 1)


class IndexStats:
    """Streaming statistics of ``d_sae`` features (see the module's docstring)."""

    def __init__(self, d_sae: int, *, top_n: int = 16, window: int = 24, reservoir: int = 256, seed: int = 0,
                 cooccurrence: bool = True):
        if top_n < 1 or window < 1 or reservoir < 0:
            raise ValueError("top_n and window must be >= 1, reservoir >= 0")
        self.d, self.top_n, self.window, self.reservoir, self.seed = d_sae, top_n, window, reservoir, seed
        self.before = (window * 3) // 4  # tokens before the peak in its window (when the context has them)
        self.tokens = 0
        self.contexts = 0
        self.sinks = 0
        """Attention-sink tokens the caller took out of the masks (counted by it, kept here)."""
        d, n, w = d_sae, top_n, window
        self.n_fired = torch.zeros(d, dtype=torch.int64)
        self.max_act = torch.zeros(d, dtype=torch.float32)
        self.fine = torch.zeros(d, FINE_BINS, dtype=torch.int32)
        self.cooc = torch.zeros(d, d, dtype=torch.int32) if cooccurrence else None
        self.top_val = torch.full((d, n), -torch.inf, dtype=torch.float32)
        self.top_ctx = torch.full((d, n), -1, dtype=torch.int64)
        self.top_pos = torch.full((d, n), -1, dtype=torch.int32)
        self.top_start = torch.full((d, n), -1, dtype=torch.int32)
        self.top_tok = torch.full((d, n, w), -1, dtype=torch.int32)
        self.top_acts = torch.zeros(d, n, w, dtype=torch.float32)
        self.rnd_key = torch.full((reservoir,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        self.rnd_ctx = torch.full((reservoir,), -1, dtype=torch.int64)
        self.rnd_tok = torch.full((reservoir, w), -1, dtype=torch.int32)
        self.rnd_active = torch.zeros(reservoir, d, dtype=torch.bool)

    # -- accumulation ----------------------------------------------------------------------

    def _window_start(self, pos: Tensor, length: Tensor) -> Tensor:
        return torch.minimum((pos - self.before).clamp(min=0), (length - self.window).clamp(min=0))

    def update(self, contexts: Sequence[ContextFeatures]) -> None:
        """Add whole contexts (each context must be added once, in one call or another)."""
        if not contexts:
            return
        lengths = torch.tensor([len(c.token_ids) for c in contexts], dtype=torch.int64)
        offsets = torch.cumsum(lengths, 0) - lengths
        tokens = torch.from_numpy(np.concatenate([np.asarray(c.token_ids, np.int64) for c in contexts]))
        mask = torch.from_numpy(np.concatenate([np.asarray(c.mask, bool) for c in contexts]))
        idx = torch.from_numpy(np.concatenate([np.asarray(c.indices, np.int64) for c in contexts]))
        val = torch.from_numpy(np.concatenate([np.asarray(c.values, np.float32) for c in contexts]))
        ctx_ids = torch.tensor([c.ctx_id for c in contexts], dtype=torch.int64)
        local = torch.repeat_interleave(torch.arange(len(contexts)), lengths)
        pos = torch.arange(len(tokens)) - offsets[local]
        val = torch.where(mask[:, None], val, torch.zeros(()))
        firing = val > 0

        self.tokens += int(mask.sum())
        self.contexts += len(contexts)
        rows, slot = firing.nonzero(as_tuple=True)
        f, v = idx[rows, slot], val[rows, slot]
        self.n_fired += torch.bincount(f, minlength=self.d)
        self.max_act = torch.maximum(self.max_act, torch.zeros(self.d).scatter_reduce(0, f, v, "amax"))
        self.fine.view(-1).index_add_(0, f * FINE_BINS + fine_bin(v), torch.ones_like(f, dtype=torch.int32))
        if self.cooc is not None:
            self._count_pairs(idx, firing)
        self._update_top(f, v, rows, local, pos, ctx_ids, lengths, offsets, tokens, idx, val)
        if self.reservoir:
            self._update_reservoir(ctx_ids, lengths, offsets, tokens, mask, idx, firing)

    def _count_pairs(self, idx: Tensor, firing: Tensor) -> None:
        assert self.cooc is not None
        k = idx.shape[1]
        step = max(1, PAIR_CHUNK // (k * k))
        flat = self.cooc.view(-1)
        for s in range(0, idx.shape[0], step):
            i, m = idx[s:s + step], firing[s:s + step]
            pairs = (i[:, :, None] * self.d + i[:, None, :])[m[:, :, None] & m[:, None, :]]
            flat.index_add_(0, pairs, torch.ones_like(pairs, dtype=torch.int32))

    def _update_top(self, f: Tensor, v: Tensor, rows: Tensor, local: Tensor, pos: Tensor, ctx_ids: Tensor,
                    lengths: Tensor, offsets: Tensor, tokens: Tensor, idx: Tensor, val: Tensor) -> None:
        if f.numel() == 0:
            return
        c = local[rows]
        # One candidate per (feature, context): its peak (ties: the earliest position).
        key = f * len(lengths) + c
        order = _lexorder(pos[rows], -v, key)
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = key[order][1:] != key[order][:-1]
        keep = order[first]
        f, v, rows, c = f[keep], v[keep], rows[keep], c[keep]
        # Candidates that can enter: at least the feature's current N-th best.
        enter = v >= self.top_val[f, -1]
        f, v, rows, c = f[enter], v[enter], rows[enter], c[enter]
        if f.numel() == 0:
            return
        g = ctx_ids[c]
        order = _lexorder(g, -v, f)
        f, v, rows, c, g = f[order], v[order], rows[order], c[order], g[order]
        starts = torch.ones(len(f), dtype=torch.bool)
        starts[1:] = f[1:] != f[:-1]
        group_start = torch.cummax(torch.where(starts, torch.arange(len(f)), torch.zeros((), dtype=torch.long)), 0)
        rank = torch.arange(len(f)) - group_start.values
        keep = rank < self.top_n
        f, v, rows, c, g, rank = f[keep], v[keep], rows[keep], c[keep], g[keep], rank[keep]
        # Their windows.
        p = pos[rows]
        start = self._window_start(p, lengths[c])
        offs = torch.arange(self.window)
        wpos = start[:, None] + offs[None, :]
        inside = wpos < lengths[c][:, None]
        wrow = (offsets[c][:, None] + wpos).clamp(max=len(tokens) - 1)
        wtok = torch.where(inside, tokens[wrow], torch.full((), -1)).to(torch.int32)
        wact = torch.zeros(len(f), self.window)
        step = max(1, PAIR_CHUNK // (self.window * idx.shape[1]))
        for s in range(0, len(f), step):
            r = wrow[s:s + step]
            hit = idx[r] == f[s:s + step, None, None]  # [m, W, k]
            wact[s:s + step] = (val[r] * hit).sum(-1)
        wact = torch.where(inside, wact, torch.zeros(()))
        # Merge with the kept ones of the touched features.
        feats, slot = torch.unique(f, return_inverse=True)
        m, n = len(feats), self.top_n
        new_val = torch.full((m, n), -torch.inf)
        new_ctx = torch.full((m, n), -1, dtype=torch.int64)
        new_pos = torch.full((m, n), -1, dtype=torch.int32)
        new_start = torch.full((m, n), -1, dtype=torch.int32)
        new_tok = torch.full((m, n, self.window), -1, dtype=torch.int32)
        new_acts = torch.zeros(m, n, self.window)
        new_val[slot, rank], new_ctx[slot, rank] = v, g
        new_pos[slot, rank], new_start[slot, rank] = p.to(torch.int32), start.to(torch.int32)
        new_tok[slot, rank], new_acts[slot, rank] = wtok, wact
        self._merge_top(feats, new_val, new_ctx, new_pos, new_start, new_tok, new_acts)

    def _merge_top(self, feats: Tensor, val: Tensor, ctx: Tensor, pos: Tensor, start: Tensor, tok: Tensor,
                   acts: Tensor) -> None:
        """Keep the best ``top_n`` of the kept and the given examples of features ``feats``."""
        all_val = torch.cat([self.top_val[feats], val], 1)
        all_ctx = torch.cat([self.top_ctx[feats], ctx], 1)
        empty = all_ctx < 0
        # Order: activation descending, then context id ascending; empty slots last.
        ctx_key = torch.where(empty, torch.iinfo(torch.int64).max, all_ctx)
        o = torch.sort(ctx_key, dim=1, stable=True).indices
        o = o.gather(1, torch.sort(-all_val.gather(1, o), dim=1, stable=True).indices)[:, :self.top_n]
        self.top_val[feats] = all_val.gather(1, o)
        self.top_ctx[feats] = all_ctx.gather(1, o)
        self.top_pos[feats] = torch.cat([self.top_pos[feats], pos], 1).gather(1, o)
        self.top_start[feats] = torch.cat([self.top_start[feats], start], 1).gather(1, o)
        ow = o[:, :, None].expand(-1, -1, self.window)
        self.top_tok[feats] = torch.cat([self.top_tok[feats], tok], 1).gather(1, ow)
        self.top_acts[feats] = torch.cat([self.top_acts[feats], acts], 1).gather(1, ow)

    def _update_reservoir(self, ctx_ids: Tensor, lengths: Tensor, offsets: Tensor, tokens: Tensor, mask: Tensor,
                          idx: Tensor, firing: Tensor) -> None:
        keys = torch.from_numpy(random_key(ctx_ids.numpy(), self.seed))
        worst = self.rnd_key.max()
        for i in torch.nonzero(keys < worst).flatten().tolist():
            start, stop = self.reservoir_span(int(keys[i]), int(lengths[i]))
            rows = torch.arange(int(offsets[i]) + start, int(offsets[i]) + stop)
            active = torch.zeros(self.d, dtype=torch.bool)
            active[idx[rows][firing[rows]]] = True
            tok = torch.full((self.window,), -1, dtype=torch.int32)
            tok[:stop - start] = tokens[rows].to(torch.int32)
            self._merge_reservoir(keys[i:i + 1], ctx_ids[i:i + 1], tok[None], active[None])

    def reservoir_span(self, key: int, length: int) -> tuple[int, int]:
        """``[start, stop)`` of the random window of a context of ``length`` tokens whose
        reservoir key is ``key`` (:func:`random_key`)."""
        center = 1 + key % max(length - 1, 1)
        start = int(self._window_start(torch.tensor(center), torch.tensor(length)))
        return start, min(start + self.window, length)

    def _merge_reservoir(self, key: Tensor, ctx: Tensor, tok: Tensor, active: Tensor) -> None:
        all_key = torch.cat([self.rnd_key, key])
        o = torch.sort(all_key, stable=True).indices[:self.reservoir]
        self.rnd_key = all_key[o]
        self.rnd_ctx = torch.cat([self.rnd_ctx, ctx])[o]
        self.rnd_tok = torch.cat([self.rnd_tok, tok])[o]
        self.rnd_active = torch.cat([self.rnd_active, active])[o]

    # -- merging and saving ----------------------------------------------------------------

    def _settings(self) -> tuple[Any, ...]:
        return (self.d, self.top_n, self.window, self.reservoir, self.seed, self.cooc is not None)

    def merge(self, other: IndexStats) -> None:
        """Add statistics over a disjoint set of contexts (exact)."""
        if other._settings() != self._settings():
            raise ValueError(f"cannot merge statistics of other settings: {other._settings()} vs {self._settings()}")
        self.tokens += other.tokens
        self.contexts += other.contexts
        self.sinks += other.sinks
        self.n_fired += other.n_fired
        self.max_act = torch.maximum(self.max_act, other.max_act)
        self.fine += other.fine
        if self.cooc is not None and other.cooc is not None:
            self.cooc += other.cooc
        feats = torch.arange(self.d)
        self._merge_top(feats, other.top_val, other.top_ctx, other.top_pos, other.top_start, other.top_tok,
                        other.top_acts)
        if self.reservoir:
            self._merge_reservoir(other.rnd_key, other.rnd_ctx, other.rnd_tok, other.rnd_active)

    _TENSORS = ("n_fired", "max_act", "fine", "cooc", "top_val", "top_ctx", "top_pos", "top_start", "top_tok",
                "top_acts", "rnd_key", "rnd_ctx", "rnd_tok", "rnd_active")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"settings": self._settings(), "tokens": self.tokens, "contexts": self.contexts,
                                 "sinks": self.sinks}
        for name in self._TENSORS:
            tensor = getattr(self, name)
            if name == "fine":  # mostly empty: kept sparse
                tensor = tensor.to_sparse()
            state[name] = tensor
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> IndexStats:
        d, top_n, window, reservoir, seed, cooc = state["settings"]
        out = cls(d, top_n=top_n, window=window, reservoir=reservoir, seed=seed, cooccurrence=cooc)
        out.tokens, out.contexts, out.sinks = state["tokens"], state["contexts"], state["sinks"]
        for name in cls._TENSORS:
            tensor = state[name]
            setattr(out, name, tensor.to_dense() if name == "fine" else tensor)
        return out

    def save(self, path: str | Path) -> None:
        """Write atomically (a file next to ``path``, then renamed)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> IndexStats:
        return cls.from_state_dict(torch.load(path, weights_only=True))

    # -- results ---------------------------------------------------------------------------

    def density(self) -> np.ndarray:
        return (self.n_fired.double() / max(self.tokens, 1)).numpy()

    def quantiles(self, levels: Sequence[float]) -> np.ndarray:
        """``[d, len(levels)]`` quantiles of each feature's nonzero activations (0 when it never
        fired), read from the fine histogram: the inverted-CDF quantile, interpolated
        log-linearly inside its bin (within one bin, ×1.009, of the exact value), capped at
        the exact maximum."""
        counts = self.fine.double().numpy()
        cum = np.cumsum(counts, 1)
        total = cum[:, -1:]
        edges = np.log10(fine_edges())
        out = np.zeros((self.d, len(levels)))
        for j, q in enumerate(levels):
            target = np.maximum(np.ceil(q * total), 1)  # rank (1-based) of the quantile
            b = np.minimum((cum < target).sum(1), FINE_BINS - 1)
            below = np.where(b > 0, np.take_along_axis(cum, np.maximum(b - 1, 0)[:, None], 1)[:, 0], 0)
            inbin = np.maximum(counts[np.arange(self.d), b], 1)
            frac = (target[:, 0] - below - 0.5) / inbin
            out[:, j] = 10.0 ** (edges[b] + np.clip(frac, 0, 1) * (edges[b + 1] - edges[b]))
        out = np.minimum(out, self.max_act.double().numpy()[:, None])
        out[total[:, 0] == 0] = 0.0
        return out.astype(np.float32)

    def coarse_hist(self, bins: int) -> np.ndarray:
        """``[d, bins]`` counts over ``(0, max_act]`` in equal bins, from the fine histogram:
        each fine bin's count goes to the coarse bin holding its log-centre (a count can land
        one coarse bin off when its fine bin straddles a coarse boundary)."""
        edges = fine_edges()
        centre = np.sqrt(edges[:-1] * edges[1:])
        mx = self.max_act.double().numpy()
        out = np.zeros((self.d, bins), np.int64)
        counts = self.fine.numpy()
        f, b = np.nonzero(counts)
        if len(f):
            cb = np.ceil(np.minimum(centre[b] / mx[f], 1.0) * bins).astype(np.int64) - 1
            np.add.at(out, (f, np.clip(cb, 0, bins - 1)), counts[f, b])
        return out.astype(np.int32)

    def cooccurring(self, top: int) -> list[list[tuple[int, float]]]:
        """Per feature, the ``top`` features with the largest Jaccard index of firing sets
        (tokens where both fired / tokens where either fired), larger than 0, best first."""
        if self.cooc is None:
            return [[] for _ in range(self.d)]
        n = self.n_fired.double()
        out: list[list[tuple[int, float]]] = []
        for s in range(0, self.d, 1024):
            both = self.cooc[s:s + 1024].double()
            jac = both / (n[s:s + 1024, None] + n[None, :] - both).clamp(min=1)
            rows = torch.arange(len(jac))
            jac[rows, rows + s] = 0
            vals, ids = torch.topk(jac, min(top, self.d), dim=1)
            for vr, ir in zip(vals.tolist(), ids.tolist(), strict=True):
                out.append([(i, v) for v, i in zip(vr, ir, strict=True) if v > 0])
        return out

    def examples(self, feature: int) -> list[dict[str, Any]]:
        """The kept top contexts of ``feature``, strongest first: ``activation``, ``ctx``
        (context id), ``position`` (of the peak in the context), ``peak`` (its offset in the
        window), ``token_ids`` and ``acts`` (the window, trimmed at the context's end)."""
        out = []
        for r in range(self.top_n):
            ctx = int(self.top_ctx[feature, r])
            if ctx < 0:
                break
            tok = self.top_tok[feature, r]
            n = int((tok >= 0).sum())
            pos, start = int(self.top_pos[feature, r]), int(self.top_start[feature, r])
            out.append({"activation": float(self.top_val[feature, r]), "ctx": ctx, "position": pos,
                        "peak": pos - start, "token_ids": tok[:n].tolist(),
                        "acts": self.top_acts[feature, r, :n].tolist()})
        return out

    def random_windows(self) -> list[tuple[list[int], Tensor]]:
        """The reservoir's windows (token ids) and the features firing in each (bool ``[d]``)."""
        out = []
        for r in range(self.reservoir):
            if int(self.rnd_ctx[r]) < 0:
                break
            tok = self.rnd_tok[r]
            out.append((tok[tok >= 0].tolist(), self.rnd_active[r]))
        return out
