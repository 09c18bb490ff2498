"""Residual-stream activations of the served model, harvested for training.

Hook point ``layers.L`` is the stream after decoder layer ``L`` and ``embeddings`` (index
-1) the stream entering layer 0, on any decoder-only transformers model: finding the
decoder layers and reading the stream at a hook point is ``sae_runtime.hf_streams``' job
(forward hooks on the layers' outputs, a pre-hook on layer 0's input; the same numbers as
``output_hidden_states[L + 1]``, except that after the last layer it is the raw layer
output, before the final norm). The forward pass stops right after the deepest requested
hook point, so harvesting layer 12 of 30 costs 13/30 of a forward pass.

Which tokens train the dictionary: every real token except position 0 of a context and
special tokens. Position 0 is the attention sink: its residual norm is tens of times the
others' (see ``tests/test_training.py``), and letting it in would spend the dictionary's
capacity and the loss on one outlier direction. The server still computes features there
(the dictionary is defined for every input), they are simply not what it was trained for.

Two harvest sources give the same rows (to float32 rounding, ~1e-6 relative): the vLLM
engine (``engine_harvest.EngineActivations``, the default: prefill-only requests whose raw
stream rows come back over the engine's side channel) and transformers
(:class:`ModelActivations`, the reference, also the model evaluation runs on).

Two ways to feed the trainer, both deterministic given the seed, so a resumed run sees the
same batches as an uninterrupted one:

* ``ActivationCache``: harvest once to float16 files on disk (resumable), then draw
  shuffled batches from them by a per-epoch permutation (random access in a memmap);
* ``StreamingBatches``: harvest on the fly into a shuffling buffer (no disk); resuming
  fast-forwards by harvesting again, which costs time, not correctness.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import hf_streams
from ..hook_points import hook_point_name, parse_hook_point, validate_hook_point

CACHE_VERSION = 1


class HarvestSource:
    """What every harvest source shares: the tokenizer, the model's shape and which tokens
    train the dictionary. Subclasses set the attributes below and implement ``harvest``:
    :class:`ModelActivations` (transformers, the reference) and
    :class:`sae_runtime.training.engine_harvest.EngineActivations` (the vLLM engine, the
    default)."""

    model_path: str
    tokenizer: Any
    num_layers: int
    d_model: int
    special_ids: Tensor
    pad_id: int

    def _token_rules(self) -> None:
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

    def layer_of(self, hook_point: str) -> int:
        return parse_hook_point(validate_hook_point(hook_point, self.num_layers))

    def pad(self, contexts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Right-pad contexts into ``input_ids [B, T]``; returns it and ``lengths [B]``."""
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        ids = torch.full((len(contexts), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, :len(c)] = c
        return ids, lengths

    def training_mask(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, T]`` bool: real tokens that train the dictionary (not pos 0, padding, specials)."""
        pos = torch.arange(input_ids.shape[1])
        mask = (pos[None, :] < lengths[:, None]) & (pos[None, :] > 0)
        return mask & ~torch.isin(input_ids, self.special_ids)

    def harvest(self, contexts: Sequence[Tensor], layers: Sequence[int]) -> dict[int, Tensor]:
        """Training-token activations ``[n, d]`` per layer for a batch of contexts (CPU,
        float32): the rows of ``training_mask``, context by context, in position order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds beyond its tokenizer (an engine); idempotent."""


class ModelActivations(HarvestSource):
    """A decoder-only causal LM (transformers) that returns residual streams at hook points.

    Any architecture whose decoder layers ``hf_streams`` finds (every family in
    ``tests/tiny_models.py``); hook point indices are ``-1`` (``embeddings``) to
    ``num_layers - 1``. The reference harvest, and the model evaluation runs on.
    """

    def __init__(self, model_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        # transformers decorates PreTrainedModel.to with functools.wraps, which typeshed's
        # _Wrapped types as an unbound function (it expects the model as argument 1).
        self.model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        self.layers_path, self.layers = hf_streams.find_decoder_layers(self.model)
        self.num_layers = len(self.layers)
        self.d_model = hf_streams.hidden_size(self.model)
        self._token_rules()

    @torch.no_grad()
    def residuals(self, input_ids: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """Residual stream at each of hook points ``layers`` for ``input_ids [B, T]`` (float32, [B, T, d]).

        The forward pass stops after the deepest requested hook point.
        """
        return hf_streams.residual_streams(self.model, input_ids, layers, stop_early=True)

    def harvest(self, contexts: Sequence[Tensor], layers: Sequence[int]) -> dict[int, Tensor]:
        """Training-token activations ``[n, d]`` per layer for a batch of contexts (CPU)."""
        ids, lengths = self.pad(contexts)
        mask = self.training_mask(ids, lengths)
        res = self.residuals(ids, layers)
        return {L: res[L][mask.to(res[L].device)].cpu() for L in layers}


def batched(contexts: Sequence[Tensor], tokens_per_batch: int) -> Iterator[tuple[int, list[Tensor]]]:
    """Consecutive groups of contexts of about ``tokens_per_batch`` tokens: (start index, group)."""
    group: list[Tensor] = []
    start, size = 0, 0
    for i, c in enumerate(contexts):
        if group and size + len(c) > tokens_per_batch:
            yield start, group
            start, group, size = i, [], 0
        group.append(c)
        size += len(c)
    if group:
        yield start, group


# --------------------------------------------------------------------------- disk cache


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def cache_fingerprint(**parts: Any) -> str:
    """Short hash of everything that decides the cached activations."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ActivationCache:
    """Activations of one or more hook points in float16 files, harvested resumably.

    Layout: ``meta.json`` (what was harvested and how), ``layers.L.f16`` or ``embeddings.f16`` (raw
    ``[capacity, d]`` float16 memmaps) and ``progress.json`` (contexts and tokens done,
    written after the data it describes, so a killed harvest resumes where it stopped).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.root / "meta.json").read_text())

    @property
    def progress(self) -> dict[str, Any]:
        p = self.root / "progress.json"
        return json.loads(p.read_text()) if p.is_file() else {"contexts": 0, "tokens": 0, "complete": False}

    def complete(self, fingerprint: str) -> bool:
        return ((self.root / "meta.json").is_file() and self.meta.get("fingerprint") == fingerprint
                and bool(self.progress.get("complete")))

    def _file(self, layer: int) -> Path:
        return self.root / f"{hook_point_name(layer)}.f16"

    def harvest(self, source: HarvestSource, contexts: Sequence[Tensor], layers: Sequence[int],
                *, fingerprint: str, tokens_per_batch: int = 4096, progress: bool = True) -> None:
        """Harvest ``contexts`` (in order) into the cache, continuing a partial harvest."""
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        layers = sorted(set(layers))
        capacity = sum(len(c) for c in contexts)  # upper bound on training tokens
        meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "layers": layers,
                "d": source.d_model, "dtype": "float16", "capacity": capacity,
                "contexts": len(contexts), "model_path": source.model_path}
        if not (self.root / "meta.json").is_file() or self.meta.get("fingerprint") != fingerprint:
            for f in self.root.glob("*.f16"):
                f.unlink()
            (self.root / "progress.json").unlink(missing_ok=True)
            _write_json(self.root / "meta.json", meta)
        state = self.progress
        if state.get("complete"):
            return
        maps = {L: np.memmap(self._file(L), dtype=np.float16, shape=(capacity, source.d_model),
                             mode="r+" if self._file(L).exists() else "w+") for L in layers}
        done_ctx, done_tok = int(state["contexts"]), int(state["tokens"])
        bar = tqdm(total=len(contexts), initial=done_ctx, desc="harvest", unit="ctx",
                   disable=not progress, dynamic_ncols=True)
        for _start, group in batched(contexts[done_ctx:], tokens_per_batch):
            acts = source.harvest(group, layers)
            n = next(iter(acts.values())).shape[0]
            for L, a in acts.items():
                if a.abs().max() > 60000:
                    raise OverflowError(f"{hook_point_name(L)}: activations exceed float16's range")
                maps[L][done_tok:done_tok + n] = a.numpy().astype(np.float16)
                maps[L].flush()
            done_ctx += len(group)
            done_tok += n
            _write_json(self.root / "progress.json", {"contexts": done_ctx, "tokens": done_tok,
                                                     "complete": False})
            bar.update(len(group))
            bar.set_postfix(tokens=done_tok)
        bar.close()
        _write_json(self.root / "progress.json", {"contexts": done_ctx, "tokens": done_tok,
                                                 "complete": True})

    def tokens(self) -> int:
        return int(self.progress["tokens"])

    def open(self, layer: int) -> Tensor:
        """The harvested activations of one layer, ``[tokens, d]`` float16 (memory-mapped)."""
        meta = self.meta
        arr = np.memmap(self._file(layer), dtype=np.float16, mode="c",
                        shape=(meta["capacity"], meta["d"]))[: self.tokens()]
        return torch.from_numpy(np.asarray(arr))


SINK_NORM_FACTOR = 10.0
"""A row whose stream norm exceeds this multiple of the median norm of the rows harvested with
it is an attention sink beyond position 0 (on the default model at layer 12: ~1 token in 4,000
of general text, at norm ~25,000 against a median of ~140, often at position 1 of a context that
starts mid-document). Such rows are left out of training and evaluation like position 0 itself:
one of them outweighs a whole batch in a squared error, and in FVU's variance."""


def sink_rows(x: Tensor, factor: float = SINK_NORM_FACTOR) -> Tensor:
    """``[N]`` bool: the rows of ``x [N, d]`` whose norm exceeds ``factor`` × the median row norm."""
    return sink_norms(x.float().norm(dim=-1), factor)


def sink_norms(norms: Tensor, factor: float = SINK_NORM_FACTOR) -> Tensor:
    """:func:`sink_rows` of rows given by their norms ``[N]`` (what sae-index gets from the engine)."""
    if norms.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=norms.device)
    return norms > factor * norms.median()


def kept_rows(table: Tensor, chunk: int = 65536, factor: float = SINK_NORM_FACTOR) -> Tensor:
    """Indices of the rows of an activation table that are not sinks (:func:`sink_rows`, the
    median taken per chunk of ``chunk`` rows, in harvest order)."""
    keep = [torch.arange(i, min(i + chunk, table.shape[0]))[~sink_rows(table[i:i + chunk], factor)]
            for i in range(0, table.shape[0], chunk)]
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)


class RowTables:
    """Several activation tables ``[n_i, d]`` read as one ``[sum n_i, d]``, rows numbered table
    after table (one per source drawn on its own budget; nothing is copied)."""

    def __init__(self, tables: Sequence[Tensor]):
        if not tables:
            raise ValueError("no activation tables")
        self.tables = list(tables)
        sizes = torch.tensor([t.shape[0] for t in self.tables], dtype=torch.long)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self.shape = (int(self.starts[-1]), int(self.tables[0].shape[1]))

    def __getitem__(self, idx: Tensor) -> Tensor:
        """The rows ``idx`` (a sorted 1-D index tensor), in that order."""
        cuts = torch.searchsorted(idx, self.starts).tolist()
        parts = [t[idx[cuts[i]:cuts[i + 1]] - self.starts[i]] for i, t in enumerate(self.tables)
                 if cuts[i + 1] > cuts[i]]
        return torch.cat(parts) if parts else self.tables[0][:0]


class ShuffledBatches:
    """Batches of rows of an activation table, reshuffled each epoch, addressable by step.

    Batch ``s`` is a pure function of (seed, s): resuming at step ``s`` needs no replay.
    The last partial batch of an epoch is dropped.
    """

    def __init__(self, table: Tensor | RowTables, batch_size: int, seed: int, rows: Tensor | None = None):
        self.rows = rows  # the table rows to draw from (all if None)
        n = table.shape[0] if rows is None else rows.numel()
        if n < batch_size:
            raise ValueError(f"only {n} activations for a batch of {batch_size}")
        self.table, self.batch_size, self.seed, self.n = table, batch_size, seed, n
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm: Tensor | None = None

    def __call__(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self._perm
        if epoch != self._epoch or perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=gen)
            if self.rows is not None:
                perm = self.rows[perm]
            self._perm, self._epoch = perm, epoch
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size].sort().values
        return self.table[idx].float()


class StreamingBatches:
    """Harvest on the fly into a shuffling buffer; no disk. Deterministic given the seed.

    The buffer collects ``buffer_tokens`` activations, shuffles them and hands out whole
    batches; leftovers stay for the next fill. Contexts cycle (epochs) when exhausted.
    ``skip(n)`` replays the first ``n`` batches without returning them (for resume).
    """

    def __init__(self, source: HarvestSource, contexts: Sequence[Tensor], layer: int,
                 batch_size: int, seed: int, buffer_tokens: int = 65536,
                 tokens_per_batch: int = 4096):
        self.source, self.contexts, self.layer = source, list(contexts), layer
        self.batch_size, self.seed, self.buffer_tokens = batch_size, seed, buffer_tokens
        self.tokens_per_batch = tokens_per_batch
        self._gen = torch.Generator().manual_seed(seed)
        self._iter = self._stream()

    def _contexts_forever(self) -> Iterator[list[Tensor]]:
        while True:
            for _, group in batched(self.contexts, self.tokens_per_batch):
                yield group

    def _stream(self) -> Iterator[Tensor]:
        pending = torch.empty(0, self.source.d_model)
        groups = self._contexts_forever()
        while True:
            parts = [pending]
            size = pending.shape[0]
            while size < self.buffer_tokens:
                a = self.source.harvest(next(groups), [self.layer])[self.layer]
                a = a[~sink_rows(a)]
                parts.append(a)
                size += a.shape[0]
            buf = torch.cat(parts)
            buf = buf[torch.randperm(buf.shape[0], generator=self._gen)]
            n_batches = buf.shape[0] // self.batch_size
            for b in range(n_batches):
                yield buf[b * self.batch_size:(b + 1) * self.batch_size]
            pending = buf[n_batches * self.batch_size:]

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self._iter)

    def __call__(self, step: int) -> Tensor:  # steps must be consecutive
        return next(self._iter)
