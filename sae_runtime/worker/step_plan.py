"""Per-step plan: which rows of the flattened token batch belong to which request, and what
each hook point must do to them.

vLLM flattens every scheduled token of every running request into one batch per step
(prefill chunks and decode tokens mixed). The model runner has already laid the step out
when the first hook runs (read through ``sae_runtime.vllm_surface.batch_layout`` and
``batch_positions``): the request of each row, the row boundaries in the token batch, each
token's position in its request. From those and each request's parsed spec this module builds
everything the hooks need as ready tensors, so the hooks themselves only index and call kernels.

The plan depends on the batch's requests, their rows and which of those rows are prompt
tokens, not on the positions themselves (they only label the rows sent back). In decoding
that layout stays the same step after step, so :class:`PlanCache` keeps the last plan and
reuses it while the layout does not change, refreshing only the positions it reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from sae_runtime.kernels import edit_mode_from_name
from sae_runtime.protocol.worker_spec import ConditionSpec, EditSpec, WorkerSpec


@dataclass
class ScopedEdits:
    """The edits of one request on one dictionary for one kind of token."""

    features: torch.Tensor  # [E] int64
    modes: torch.Tensor  # [E] int32
    values: torch.Tensor  # [E] float32
    per_norm: torch.Tensor  # [E] bool: value in residual_norm units (times ||x|| / ||d_i|| per token)
    cond: torch.Tensor  # [E] int64: index in RequestState.conditions of the edit's ``when``, -1 none


@dataclass
class RequestState:
    """A request's spec, parsed once when the worker first sees it, freed when it ends."""

    rid: str
    prompt_len: int
    # dictionary id -> {"prompt": ScopedEdits, "generated": ScopedEdits} (either may be absent)
    edits: dict[str, dict[str, ScopedEdits]]
    # layer -> {"prompt": [d_in] vector, "generated": [d_in] vector}
    vectors: dict[int, dict[str, torch.Tensor]]
    feature_dicts: list[str]
    top_k: int | None
    feature_ids: torch.Tensor | None
    feature_scope: str | None
    streams: list[int] = field(default_factory=list)
    """Hook points whose raw stream rows of the prompt tokens are sent back."""
    conditions: list[ConditionSpec] = field(default_factory=list)
    """The distinct ``when`` conditions of the request's edits."""
    watch: dict[str, torch.Tensor] = field(default_factory=dict)
    """dictionary id -> [m] int64 feature ids whose values on generated tokens are sent back
    (``stop_when``)."""


def _in_scope(scope: str, kind: str) -> bool:
    return scope == "all" or scope == kind


def parse_request(spec: WorkerSpec, prompt_len: int, hidden_size: int,
                  num_layers: int | None = None) -> RequestState:
    """Turn a request's :class:`~sae_runtime.protocol.WorkerSpec` into tensors."""
    if num_layers is not None:
        bad = [L for L in spec.streams if L >= num_layers]
        if bad:
            raise ValueError(f"sae.streams: hook points {bad} beyond the model's {num_layers} layers")
    edits: dict[str, dict[str, ScopedEdits]] = {}
    conditions: list[ConditionSpec] = []
    for e in spec.edits:
        if e.when is not None and e.when not in conditions:
            conditions.append(e.when)
    by_dict: dict[str, list[EditSpec]] = {}
    for e in spec.edits:
        by_dict.setdefault(e.dictionary, []).append(e)
    for name, items in by_dict.items():
        scoped = {}
        for kind in ("prompt", "generated"):
            sel = [e for e in items if _in_scope(e.scope, kind)]
            if sel:
                scoped[kind] = ScopedEdits(
                    features=torch.tensor([e.feature for e in sel], dtype=torch.int64),
                    modes=torch.tensor([int(edit_mode_from_name(e.mode)) for e in sel], dtype=torch.int32),
                    values=torch.tensor([e.value for e in sel], dtype=torch.float32),
                    per_norm=torch.tensor([e.unit == "residual_norm" for e in sel], dtype=torch.bool),
                    cond=torch.tensor([-1 if e.when is None else conditions.index(e.when) for e in sel],
                                      dtype=torch.int64),
                )
        if scoped:
            edits[name] = scoped

    vectors: dict[int, dict[str, torch.Tensor]] = {}
    for v in spec.vectors:
        vec = torch.tensor(v.vector, dtype=torch.float32) * float(v.scale)
        if vec.shape != (hidden_size,):
            raise ValueError(f"steering vector of size {vec.shape[0]}, expected {hidden_size}")
        per_layer = vectors.setdefault(int(v.layer), {})
        for kind in ("prompt", "generated"):
            if _in_scope(v.scope, kind):
                per_layer[kind] = per_layer[kind] + vec if kind in per_layer else vec

    feats = spec.features
    return RequestState(
        rid=spec.rid,
        prompt_len=prompt_len,
        edits=edits,
        vectors=vectors,
        feature_dicts=list(feats.dicts) if feats else [],
        top_k=feats.top_k if feats else None,
        feature_ids=torch.tensor(feats.feature_ids, dtype=torch.int64) if feats and feats.feature_ids else None,
        feature_scope=feats.scope if feats else None,
        streams=list(spec.streams),
        conditions=conditions,
        watch={w.dictionary: torch.tensor(w.features, dtype=torch.int64) for w in spec.watch},
    )


@dataclass
class EditBatch:
    """All edits on one dictionary in this step, in the steering kernel's layout."""

    rows: torch.Tensor  # [n] int64 rows of the token batch that have edits
    token_slot: torch.Tensor  # [n] int32 slot of each such row
    features: torch.Tensor  # [S, E] int64
    modes: torch.Tensor  # [S, E] int32 (0 pads)
    values: torch.Tensor  # [S, E] float32
    needs_activation: bool  # any CLAMP, SCALE or ABLATE edit (they read the feature's activation)
    per_norm: torch.Tensor | None = None  # [S, E] bool, None when no edit is in residual_norm units
    cond: torch.Tensor | None = None  # [S, E] int64 step condition id of each edit (-1 none); None: no conditions


@dataclass
class VectorBatch:
    rows: torch.Tensor  # [n] int64
    vectors: torch.Tensor  # [n, d_in] float32, the summed vector of each row


@dataclass
class ExtractJob:
    rid: str
    rows: torch.Tensor  # [n] int64
    positions: np.ndarray  # [n] int32
    top_k: int | None
    feature_ids: torch.Tensor | None
    watch: bool = False  # the request's watched features (feature_ids), sent as watch chunks


@dataclass
class StreamJob:
    """Raw stream rows of one request to copy out at one hook point."""

    rid: str
    rows: torch.Tensor  # [n] int64
    positions: np.ndarray  # [n] int32


@dataclass
class ConditionJob:
    """One request's condition on its rows, as planned (a :class:`ConditionGroup` evaluates it
    with the others on its dictionary at its hook point, before the edits there)."""

    cid: int  # the step's condition id (EditBatch.cond)
    dictionary: str
    feature: int
    above: float
    rows: torch.Tensor  # [n] int64 step rows (CPU)


@dataclass
class ConditionGroup:
    """Every condition on one dictionary at its hook point, evaluated together from one
    activation pass over the rows they cover (each row once: a decode batch whose requests
    each carry a ``when`` on one top-k dictionary costs one encode, not one per request).
    Built once per batch layout, with the plan; an *entry* is one (condition, row) pair."""

    cids: list[int]  # the step's condition ids, in entry order
    rows: torch.Tensor  # [U] int64: the step rows the conditions cover, sorted, each once
    features: torch.Tensor  # [F] int64: the distinct features the conditions read
    at_row: torch.Tensor  # [M] int64: each entry's index in ``rows``
    at_feature: torch.Tensor  # [M] int64: each entry's index in ``features``
    condition: torch.Tensor  # [M] int64: each entry's index in ``cids``
    step_row: torch.Tensor  # [M] int64: each entry's step row
    above: torch.Tensor  # [M] float32: each entry's threshold

    @classmethod
    def of(cls, jobs: list[ConditionJob], device: torch.device) -> ConditionGroup:
        """The group of ``jobs`` (one dictionary's, rows on the CPU)."""
        feats = sorted({j.feature for j in jobs})
        step_row = torch.cat([j.rows for j in jobs])
        rows, at_row = torch.unique(step_row, return_inverse=True)

        def per_entry(value: Callable[[int, ConditionJob], float | int], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat([torch.full(j.rows.shape, value(i, j), dtype=dtype) for i, j in enumerate(jobs)])

        return cls(
            cids=[j.cid for j in jobs],
            rows=rows.to(device),
            features=torch.tensor(feats, dtype=torch.int64, device=device),
            at_row=at_row.to(device),
            at_feature=per_entry(lambda _, j: feats.index(j.feature), torch.int64).to(device),
            condition=per_entry(lambda i, _: i, torch.int64).to(device),
            step_row=step_row.to(device),
            above=per_entry(lambda _, j: j.above, torch.float32).to(device),
        )


@dataclass
class LayerPlan:
    conditions: dict[str, ConditionGroup] = field(default_factory=dict)  # dictionary -> its conditions here
    edits: dict[str, EditBatch] = field(default_factory=dict)
    vectors: VectorBatch | None = None
    extract: dict[str, list[ExtractJob]] = field(default_factory=dict)
    streams: list[StreamJob] = field(default_factory=list)


@dataclass
class StepPlan:
    layers: dict[int, LayerPlan]
    positioned: list[tuple[ExtractJob | StreamJob, int, np.ndarray]] = field(default_factory=list)
    """Every job that reports positions, with the index of its request in the step's items
    and the indices of its rows among that request's rows: a reused plan takes this step's
    positions from there (:meth:`refresh_positions`)."""

    def refresh_positions(self, rows_of_requests: list[tuple[RequestState, int, np.ndarray]]) -> None:
        for job, item, local in self.positioned:
            job.positions = rows_of_requests[item][2][local].astype(np.int32)


RowLayout = tuple[tuple[str, int, int, "bool | bytes"], ...]
"""What a step's plan is built from besides the specs: for each request with a spec, its id,
first row, number of rows and which of them are prompt tokens."""


def row_layout(rows_of_requests: list[tuple[RequestState, int, np.ndarray]]) -> RowLayout:
    """The key of :class:`PlanCache`: ``(rid, start, n, prompt rows)`` for each request,
    the prompt rows as one bool for a single row (a decode step), else the mask's bytes."""
    key = []
    for state, start, positions in rows_of_requests:
        n = positions.shape[0]
        prompt: bool | bytes = (bool(positions[0] < state.prompt_len) if n == 1
                                else (positions < state.prompt_len).tobytes())
        key.append((state.rid, start, n, prompt))
    return tuple(key)


class PlanCache:
    """The last step's plan, reused while the batch's layout (:func:`row_layout`) stays the same.

    A request's spec never changes while it runs, so the layout and the request ids fix the
    plan; :meth:`clear` must be called when a request ends (its id could come back with
    another spec)."""

    def __init__(self) -> None:
        self._key: RowLayout | None = None
        self._plan: StepPlan | None = None
        self.builds = 0
        self.reuses = 0

    def clear(self) -> None:
        self._key, self._plan = None, None

    def get(self, rows_of_requests: list[tuple[RequestState, int, np.ndarray]], dict_layers: dict[str, int],
            device: torch.device) -> StepPlan | None:
        key = row_layout(rows_of_requests)
        if key == self._key:
            self.reuses += 1
            if self._plan is not None:
                self._plan.refresh_positions(rows_of_requests)
            return self._plan
        self.builds += 1
        self._plan = build_step_plan(rows_of_requests, dict_layers, device)
        self._key = key
        return self._plan


def _pack_slots(slots: list[ScopedEdits], cond_maps: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(s.features.numel() for s in slots)
    feats = torch.zeros(len(slots), width, dtype=torch.int64)
    modes = torch.zeros(len(slots), width, dtype=torch.int32)
    vals = torch.zeros(len(slots), width, dtype=torch.float32)
    per_norm = torch.zeros(len(slots), width, dtype=torch.bool)
    cond = torch.full((len(slots), width), -1, dtype=torch.int64)
    for i, (s, cmap) in enumerate(zip(slots, cond_maps, strict=True)):
        n = s.features.numel()
        feats[i, :n], modes[i, :n], vals[i, :n], per_norm[i, :n] = s.features, s.modes, s.values, s.per_norm
        if cmap.numel():
            cond[i, :n] = torch.where(s.cond >= 0, cmap[s.cond.clamp(min=0)], -1)
    return feats, modes, vals, per_norm, cond


def build_step_plan(
    rows_of_requests: list[tuple[RequestState, int, np.ndarray]],
    dict_layers: dict[str, int],
    device: torch.device,
) -> StepPlan | None:
    """Build the plan for one step.

    ``rows_of_requests``: for each request with a spec in this step, its state, the first
    row of its tokens in the flattened batch and the positions of those tokens.
    ``dict_layers``: dictionary id → layer of its hook point.
    Returns ``None`` when nothing in this step needs a hook.
    """
    layers: dict[int, LayerPlan] = {}

    def layer(L: int) -> LayerPlan:
        return layers.setdefault(L, LayerPlan())

    # dictionary -> ([row index tensors], [slot per row tensors], [slots], [step condition ids of each slot's request])
    edit_acc: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[ScopedEdits], list[torch.Tensor]]] = {}
    n_conditions = 0
    cond_acc: dict[tuple[int, str], list[ConditionJob]] = {}  # (layer, dictionary) -> its conditions
    vec_acc: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    positioned: list[tuple[ExtractJob | StreamJob, int, np.ndarray]] = []

    for item, (state, start, positions) in enumerate(rows_of_requests):
        n = positions.shape[0]
        rows = torch.arange(start, start + n, dtype=torch.int64)
        is_prompt = torch.from_numpy(positions < state.prompt_len)
        kinds = {"prompt": is_prompt, "generated": ~is_prompt}

        # The request's conditions get step-wide ids and are evaluated on all its rows.
        cmap = torch.arange(n_conditions, n_conditions + len(state.conditions), dtype=torch.int64)
        for c, cid in zip(state.conditions, cmap.tolist(), strict=True):
            cond_acc.setdefault((dict_layers[c.dictionary], c.dictionary), []).append(
                ConditionJob(cid, c.dictionary, c.feature, c.above, rows))
        n_conditions += len(state.conditions)

        for name, scoped in state.edits.items():
            rows_l, slot_l, slots, cmaps = edit_acc.setdefault(name, ([], [], [], []))
            for kind, edits in scoped.items():
                mask = kinds[kind]
                if bool(mask.any()):
                    rows_l.append(rows[mask])
                    slot_l.append(torch.full((int(mask.sum()),), len(slots), dtype=torch.int32))
                    slots.append(edits)
                    cmaps.append(cmap)

        for L, scoped_vecs in state.vectors.items():
            rows_l, vecs_l = vec_acc.setdefault(L, ([], []))
            for kind, vec in scoped_vecs.items():
                mask = kinds[kind]
                cnt = int(mask.sum())
                if cnt:
                    rows_l.append(rows[mask])
                    vecs_l.append(vec.expand(cnt, -1))

        if state.feature_dicts:
            scope = state.feature_scope
            if scope is None:  # parse_request sets a scope whenever it sets feature_dicts
                raise RuntimeError(f"request {state.rid}: features asked without a scope")
            mask = torch.ones(n, dtype=torch.bool) if scope == "all" else kinds[scope]
            if bool(mask.any()):
                sel_rows = rows[mask]
                local = np.flatnonzero(mask.numpy())
                sel_pos = positions[local]
                for name in state.feature_dicts:
                    job = ExtractJob(state.rid, sel_rows.to(device), sel_pos.astype(np.int32), state.top_k,
                                     None if state.feature_ids is None else state.feature_ids.to(device))
                    layer(dict_layers[name]).extract.setdefault(name, []).append(job)
                    positioned.append((job, item, local))

        if state.watch:
            # Generated tokens only (stop_when fires on a generated token), after the edits.
            is_gen = positions >= state.prompt_len
            if is_gen.any():
                sel_rows = rows[torch.from_numpy(is_gen)].to(device)
                local = np.flatnonzero(is_gen)
                sel_pos = positions[local].astype(np.int32)
                for name, ids in state.watch.items():
                    job = ExtractJob(state.rid, sel_rows, sel_pos, None, ids.to(device), watch=True)
                    layer(dict_layers[name]).extract.setdefault(name, []).append(job)
                    positioned.append((job, item, local))

        if state.streams:
            # Prompt tokens only (a harvest is a prefill); each is copied where it is computed.
            is_prompt_np = positions < state.prompt_len
            if is_prompt_np.any():
                sel_rows = rows[torch.from_numpy(is_prompt_np)].to(device)
                local = np.flatnonzero(is_prompt_np)
                sel_pos = positions[local].astype(np.int32)
                for L in state.streams:
                    stream_job = StreamJob(state.rid, sel_rows, sel_pos)
                    layer(L).streams.append(stream_job)
                    positioned.append((stream_job, item, local))

    for (L, name), jobs in cond_acc.items():
        layer(L).conditions[name] = ConditionGroup.of(jobs, device)
    for name, (rows_l, slot_l, slots, cmaps) in edit_acc.items():
        if not rows_l:
            continue
        feats, modes, vals, per_norm, cond = _pack_slots(slots, cmaps)
        layer(dict_layers[name]).edits[name] = EditBatch(
            rows=torch.cat(rows_l).to(device),
            token_slot=torch.cat(slot_l).to(device),
            features=feats.to(device),
            modes=modes.to(device),
            values=vals.to(device),
            needs_activation=bool(((modes >= 2) & (modes <= 4)).any()),
            per_norm=per_norm.to(device) if bool(per_norm.any()) else None,
            cond=cond.to(device) if bool((cond >= 0).any()) else None,
        )
    for L, (rows_l, vecs_l) in vec_acc.items():
        if rows_l:
            layer(L).vectors = VectorBatch(rows=torch.cat(rows_l).to(device), vectors=torch.cat(vecs_l).to(device))

    return StepPlan(layers, positioned) if layers else None
