"""The SAE runtime inside the vLLM worker process: the step at each hook point, per-step plans.

Installed once per worker by :class:`sae_runtime.worker.extension.SAEWorkerExtension`.
Everything it reads of vLLM's model runner goes through :mod:`sae_runtime.vllm_surface`.
It wraps the model runner's ``execute_model`` (to know where a step starts and ends and
to free finished requests) and becomes the implementation of the custom ops of
``residual_op`` that ``decoder_layers.py`` put at every hook point, in eager and compiled
mode alike. In a step where no request has a spec, the step returns at its first line and
the layer's output passes through unchanged.

At hook point ``L`` the layer has returned either ``(hidden_states, residual)``, whose sum
is the residual stream ``x`` README.md calls ``layers.L``, or ``x`` itself. Steering
adds its ``delta`` to ``hidden_states`` (or to ``x``) of the edited rows only, so layer
``L+1`` sees ``x + delta``, and every other row stays bit-identical. Features are extracted from
the stream after this step's edits, i.e. from what layer ``L+1`` actually reads; so are
the raw stream rows a request asks for (``WorkerSpec.streams``: harvesting for training),
which need no dictionary at their hook point and are sent as stream chunks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from sae_runtime import kernels, vllm_surface
from sae_runtime.dictionary import SparseDictionary
from sae_runtime.protocol import SPEC_KEY, Chunk, FeatureChunk, StreamChunk, WorkerSpec
from sae_runtime.worker import residual_op
from sae_runtime.worker.decoder_layers import LAYER_ATTR, hooked_layers
from sae_runtime.worker.feature_sender import FeatureSender
from sae_runtime.worker.step_plan import (
    ConditionGroup,
    EditBatch,
    ExtractJob,
    PlanCache,
    RequestState,
    StepPlan,
    StreamJob,
    parse_request,
)


class SAEWorkerRuntime:
    def __init__(self, runner: Any, dictionaries: dict[str, SparseDictionary], sender: FeatureSender | None):
        vllm_surface.check_model_runner(runner)
        self.runner = runner
        self.dictionaries = dictionaries
        self.dict_layers = {name: d.layer for name, d in dictionaries.items()}
        # ``xin @ W_enc`` of each dictionary for extraction: vLLM's prepacked CPU matmul where
        # there is one (about twice torch's speed at decode batch sizes; costs a packed copy
        # of W_enc), else None (torch). Gated dictionaries encode through their own module.
        # The edits, conditions and named features that read a top-k feature's activation
        # (a full encode) encode through it too (SparseDictionary.encode / feature_activations).
        self.encoders = {name: self._counted(vllm_surface.cpu_packed_matmul(d.W_enc)) if d.activation != "gated"
                         else None for name, d in dictionaries.items()}
        self.packed_encodes = 0  # calls of those matmuls (worker stats)
        self.sender = sender
        model = vllm_surface.runner_model(runner)
        self.layers = hooked_layers(model)
        self.hidden_size = vllm_surface.runner_hidden_size(runner)
        self.device = next(model.parameters()).device
        # None: a request without a spec (remembered so that each is looked at once)
        self.requests: dict[str, RequestState | None] = {}
        self.steps = 0
        self._plan: StepPlan | None = None
        self._plans = PlanCache()  # the last step's plan, reused while the batch layout holds
        self._fired: dict[int, torch.Tensor] = {}  # this step's evaluated conditions: id -> [tokens] bool
        self._chunks: list[Chunk] = []
        self._restore_execute: Callable[[], None] | None = None
        self._restore_sample: Callable[[], None] | None = None
        self.seeded_draws_held_back = 0

    def _counted(self, matmul: Callable[[torch.Tensor], torch.Tensor] | None
                 ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``matmul`` counting its calls in ``packed_encodes`` (None stays None)."""
        if matmul is None:
            return None

        def counted(x: torch.Tensor) -> torch.Tensor:
            self.packed_encodes += 1
            return matmul(x)

        return counted

    # -- installation -------------------------------------------------------------------

    def install(self) -> None:
        missing = [L for L, layer in enumerate(self.layers) if getattr(layer, LAYER_ATTR, None) != L]
        if missing:
            raise RuntimeError(f"the SAE step is not in decoder layers {missing[:5]}...")
        residual_op.set_step_function(self._step)
        self._restore_execute = vllm_surface.wrap_execute_model(self.runner, self._execute_model)
        if vllm_surface.runner_device_type(self.runner) == "cpu":
            # A seeded request whose prefill is split across steps would otherwise kill the
            # engine core on CPU (see vllm_surface.seeded_draws_held_back); CUDA is left as is.
            self._restore_sample = vllm_surface.wrap_sample_tokens(self.runner, self._sample_tokens)

    def uninstall(self) -> None:
        residual_op.set_step_function(None)
        if self._restore_execute is not None:
            self._restore_execute()
            self._restore_execute = None
        if self._restore_sample is not None:
            self._restore_sample()
            self._restore_sample = None

    def stats(self) -> dict[str, Any]:
        return {
            "tracked_requests": len(self.requests),
            "requests_with_spec": sum(1 for s in self.requests.values() if s is not None),
            "steps": self.steps,
            "plans_built": self._plans.builds,
            "plans_reused": self._plans.reuses,
            "dictionaries": sorted(self.dictionaries),
            # dictionaries whose extraction encodes through a prepacked matmul (cpu_packed_matmul)
            "packed_encoders": sorted(name for name, m in self.encoders.items() if m is not None),
            "packed_encodes": self.packed_encodes,
            # the CPU thread binding this worker started with (None: vLLM's default, 'auto')
            "cpu_threads_bind": os.environ.get(vllm_surface.CPU_BIND_ENV),
            # decoder layers the model runs (fewer than the model has with stop_after_layer)
            "layers": len(self.layers),
            # feature messages dropped because the side channel stayed full (see FeatureSender)
            "feature_messages_dropped": getattr(self.sender, "dropped_messages", 0),
            # seeded rows of a split prefill whose discarded sample left their generator untouched
            "seeded_draws_held_back": self.seeded_draws_held_back,
        }

    # -- per step -----------------------------------------------------------------------

    def _execute_model(self, orig_execute: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        finished = vllm_surface.finished_request_ids(scheduler_output)
        if finished:
            self._plans.clear()  # an ended request's id must not match a cached layout
        for req_id in finished:
            self.requests.pop(req_id, None)
        self.steps += 1
        # The runner lays the batch out inside execute_model, so the plan is resolved at
        # the first hook of the step, when input_batch / query_start_loc / positions hold
        # this step's layout.
        self._plan = _LAZY if vllm_surface.step_has_tokens(scheduler_output) else None
        try:
            return orig_execute(scheduler_output, *args, **kwargs)
        finally:
            self._plan = None
            self._fired = {}
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                if self.sender is not None:
                    self.sender.send(chunks)

    def _sample_tokens(self, orig_sample: Any, *args: Any, **kwargs: Any) -> Any:
        with vllm_surface.seeded_draws_held_back(self.runner) as held:
            self.seeded_draws_held_back += held
            return orig_sample(*args, **kwargs)

    def _state_of(self, req_id: str) -> RequestState | None:
        """The parsed spec of a request (``None`` if it has none), parsed on first sight."""
        try:
            return self.requests[req_id]
        except KeyError:
            pass
        state = None
        found = vllm_surface.request_extra_arg(self.runner, req_id, SPEC_KEY)
        if found is not None:
            encoded, num_prompt_tokens = found
            state = parse_request(WorkerSpec.decode(encoded), num_prompt_tokens, self.hidden_size,
                                  len(self.layers))
        # Requests without a spec are remembered too, so each is looked at once.
        self.requests[req_id] = state
        return state

    def _resolve_plan(self) -> StepPlan | None:
        """The step plan for the runner's prepared batch (first hook of a step): the last
        step's when the batch's layout is the same, else a new one."""
        req_ids, qsl = vllm_surface.batch_layout(self.runner)
        num_reqs = len(req_ids)
        items = []
        positions = None
        for i, req_id in enumerate(req_ids):
            state = self._state_of(req_id)
            if state is None:
                continue
            start, end = int(qsl[i]), int(qsl[i + 1])
            if end > start:
                if positions is None:
                    total = int(qsl[num_reqs])
                    positions = vllm_surface.batch_positions(self.runner, total)
                items.append((state, start, positions[start:end]))
        if not items:
            return None
        return self._plans.get(items, self.dict_layers, self.device)

    # -- hooks --------------------------------------------------------------------------

    def _step(self, L: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """The ops' implementation at hook point ``L``: new hidden states (the new stream
        when ``residual`` is None), or None if untouched."""
        plan = self._plan
        if plan is None:
            return None
        if plan is _LAZY:
            plan = self._plan = self._resolve_plan()
            if plan is None:
                return None
        lp = plan.layers.get(L)
        if lp is None:
            return None
        return self._apply_layer(L, lp, hidden, residual)

    def _apply_layer(self, L: int, lp: Any, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        new_hidden = hidden
        if lp.conditions:  # before any edit at this hook point
            self._evaluate_conditions(lp.conditions, hidden, residual)
        if lp.edits or lp.vectors is not None:
            new_hidden = hidden.clone()
            for name, batch in lp.edits.items():
                x = _stream_rows(hidden, residual, batch.rows)
                delta = self._edit_delta(self.dictionaries[name], x, batch, self.encoders[name])
                new_hidden.index_add_(0, batch.rows, delta.to(hidden.dtype))
            if lp.vectors is not None:
                new_hidden.index_add_(0, lp.vectors.rows, lp.vectors.vectors.to(hidden.dtype))
        for name, jobs in lp.extract.items():
            self._extract(self.dictionaries[name], name, new_hidden, residual, jobs)
        if lp.streams:
            self._copy_streams(L, lp.streams, new_hidden, residual)
        return None if new_hidden is hidden else new_hidden

    def _evaluate_conditions(self, groups: dict[str, ConditionGroup], hidden: torch.Tensor,
                             residual: torch.Tensor | None) -> None:
        """Where each condition fires (``self._fired[cid]``, over the step's rows): per
        dictionary one activation pass over the rows its conditions cover (the plan's
        :class:`ConditionGroup`). A top-k feature's activation needs the full encode, through
        extraction's matmul, in row chunks that bound the dense ``[rows, d_sae]`` activations
        as :func:`_edit_feature_acts` does."""
        for name, g in groups.items():
            d = self.dictionaries[name]
            x = _stream_rows(hidden, residual, g.rows).to(d.dtype)
            step = max(1, _EDIT_ENCODE_CHUNK_ELEMS // d.d_sae if d.activation == "topk" else x.shape[0])
            acts = torch.cat([d.feature_activations(x[r0:r0 + step], g.features, self.encoders[name]).float()
                              for r0 in range(0, x.shape[0], step)])  # [rows, features]
            fired = torch.zeros(len(g.cids), hidden.shape[0], dtype=torch.bool, device=hidden.device)
            fired[g.condition, g.step_row] = acts[g.at_row, g.at_feature] > g.above
            for i, cid in enumerate(g.cids):
                self._fired[cid] = fired[i]

    def _copy_streams(self, L: int, jobs: list[StreamJob], hidden: torch.Tensor,
                      residual: torch.Tensor | None) -> None:
        """Raw stream rows of every job at hook point ``L``: one gather and one copy to the
        host for the whole step, split per request (views of one array)."""
        rows = jobs[0].rows if len(jobs) == 1 else torch.cat([j.rows for j in jobs])
        x = _stream_rows(hidden, residual, rows).float().cpu().numpy()
        off = 0
        for j in jobs:
            n = j.rows.numel()
            self._chunks.append(StreamChunk(j.rid, L, j.positions, x[off:off + n]))
            off += n

    def _edit_delta(self, d: SparseDictionary, x: torch.Tensor, batch: EditBatch,
                    matmul: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``edited − x`` for the edit batch rows (each edit computed from the original x);
        ``matmul``: the dictionary's packed encoder matmul, as in extraction (None: torch's)."""
        xd = x.to(d.dtype)
        if batch.per_norm is not None or batch.cond is not None:
            batch = _per_token_values(d, x, batch, self._fired)
        if d.activation == "gated":
            return _gated_edit_delta(d, xd, batch).float()
        # A top-k feature's activation depends on the whole encode: computed once here and
        # handed to the kernel, which then reads no encoder weights.
        edit_acts = None
        if d.activation == "topk" and batch.needs_activation:
            edit_acts = _edit_feature_acts(d, xd, batch, matmul)
        edited = kernels.steering_edit(
            xd,
            batch.token_slot,
            batch.features,
            batch.modes,
            batch.values,
            W_enc=d.W_enc,
            b_enc=d.b_enc,
            W_dec=d.W_dec,
            b_dec=d.b_dec,
            activation=d.activation,
            threshold=getattr(d, "threshold", None) if d.activation == "jumprelu" else None,
            edit_acts=edit_acts,
            apply_b_dec_to_input=d.cfg.apply_b_dec_to_input,
        )
        return edited.float() - xd.float()

    def _extract(self, d: SparseDictionary, name: str, hidden: torch.Tensor, residual: torch.Tensor | None,
                 jobs: list[ExtractJob]) -> None:
        # The stream at the hook point, gathered once for every job's rows (a request may
        # ask for both top-k and named features of the same rows).
        sizes = [j.rows.numel() for j in jobs]
        rows = torch.cat([j.rows for j in jobs])
        x_all = _stream_rows(hidden, residual, rows).to(d.dtype)
        x_of = list(torch.split(x_all, sizes))
        topk = [(i, j.top_k) for i, j in enumerate(jobs) if j.top_k is not None]
        if topk:
            x = x_all if len(topk) == len(jobs) else torch.cat([x_of[i] for i, _ in topk])
            k = max(job_k for _, job_k in topk)
            if d.k is not None and d.activation == "topk":
                k = min(k, d.k)
            k = min(k, d.d_sae)
            if d.activation == "gated":
                vals, idx = torch.topk(d.encode(x), k, dim=-1)
            else:
                idx, vals = kernels.encode_features(
                    x, d.W_enc, d.b_enc, d.b_dec, k,
                    activation=d.activation,
                    threshold=getattr(d, "threshold", None) if d.activation == "jumprelu" else None,
                    apply_b_dec_to_input=d.cfg.apply_b_dec_to_input,
                    matmul=self.encoders[name],
                )
            idx_np = idx.to(torch.int32).cpu().numpy()
            vals_np = vals.float().cpu().numpy()
            off = 0
            for i, job_k in topk:
                j, n = jobs[i], sizes[i]
                kj = min(job_k, k)
                chunk = FeatureChunk(j.rid, name, j.positions, idx_np[off : off + n, :kj], vals_np[off : off + n, :kj])
                self._chunks.append(chunk)
                off += n
        for j, x in zip(jobs, x_of, strict=True):
            if j.feature_ids is not None:
                named = d.feature_activations(x, j.feature_ids, self.encoders[name]).float().cpu().numpy()
                self._chunks.append(FeatureChunk(j.rid, name, j.positions, None, named, watch=j.watch))


def _stream_rows(hidden: torch.Tensor, residual: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The residual stream at ``rows``: ``hidden + residual``, or ``hidden`` itself when the
    layer hands the stream on whole (``residual`` None)."""
    return hidden[rows] if residual is None else hidden[rows] + residual[rows]


def _per_token_values(d: SparseDictionary, x: torch.Tensor, batch: EditBatch,
                      fired: dict[int, torch.Tensor]) -> EditBatch:
    """The batch with one slot per row: its residual_norm values turned into raw ones for that
    row's token, ``v · ||x|| / ||d_i||`` (so the edit's ``v_eff · d_i`` has norm ``v · ||x||``;
    a zero decoder row gives 0), and its conditional edits switched off (mode NONE) on the rows
    where their condition did not fire."""
    slot = batch.token_slot.long()
    feats, modes, vals = batch.features[slot], batch.modes[slot], batch.values[slot].float()
    if batch.per_norm is not None:
        per_norm = batch.per_norm[slot]
        x_norm = x.float().norm(dim=1, keepdim=True)  # [n, 1]
        d_norm = d.W_dec.float().index_select(0, feats.reshape(-1)).norm(dim=1).reshape(feats.shape)
        factor = torch.where(d_norm > 0, x_norm / torch.where(d_norm > 0, d_norm, 1.0), 0.0)
        vals = torch.where(per_norm, vals * factor, vals)
    if batch.cond is not None:
        cond = batch.cond[slot]  # [n, E]
        ids = sorted(fired)
        table = torch.stack([fired[i][batch.rows] for i in ids], 1) if ids else None  # [n, C]
        on = torch.ones_like(cond, dtype=torch.bool)
        if table is not None:
            col = torch.searchsorted(torch.tensor(ids, device=cond.device), cond.clamp(min=0))
            on = table.gather(1, col.clamp(max=len(ids) - 1))
        # a condition never evaluated (cannot happen: its hook point is not after the edit's) counts as not fired
        known = torch.isin(cond, torch.tensor(ids, dtype=cond.dtype, device=cond.device))
        modes = torch.where((cond >= 0) & ~(on & known), torch.zeros_like(modes), modes)
    rows = torch.arange(slot.numel(), dtype=batch.token_slot.dtype, device=slot.device)
    return EditBatch(rows=batch.rows, token_slot=rows, features=feats, modes=modes, values=vals,
                     needs_activation=batch.needs_activation)


# rows per encode chunk in _edit_feature_acts: bounds the dense [rows, d_sae] activations
_EDIT_ENCODE_CHUNK_ELEMS = 1 << 25


def _edit_feature_acts(d: SparseDictionary, xd: torch.Tensor, batch: EditBatch,
                       matmul: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``[n, E]`` float32: the activation of each row's edited features, ``d.encode`` of the row
    gathered at them (the edits whose activation only a full encode gives: top-k, gated).

    One encode per row chunk, and the activation is read from it: for top-k a feature is
    active iff its value in that encode is >= the token's k-th largest value there (the
    dictionary's own rule), so the k-th feature is always in. (Recomputing an edited
    feature's pre-activation apart and comparing it with the encode's k-th value would mix
    two GEMMs whose rounding differs: the k-th feature itself could miss its own top-k.)
    ``matmul`` is the encoder matmul extraction uses (the worker's packed one), so an edit
    reads pre-activations from the same GEMM as the features a request reports (equal for
    an equal stream)."""
    feats = batch.features[batch.token_slot.long().clamp(min=0)]  # [n, E]
    n = xd.shape[0]
    rows = max(1, _EDIT_ENCODE_CHUNK_ELEMS // d.d_sae)
    if rows >= n:
        return d.encode(xd, matmul).gather(1, feats).float()
    return torch.cat(
        [d.encode(xd[r0 : r0 + rows], matmul).gather(1, feats[r0 : r0 + rows]).float() for r0 in range(0, n, rows)]
    )


def _gated_edit_delta(d: SparseDictionary, x: torch.Tensor, batch: EditBatch) -> torch.Tensor:
    """Torch path for gated dictionaries (the steering kernel covers relu/jumprelu/topk)."""
    feats = batch.features[batch.token_slot.long()]  # [n, E]
    modes = batch.modes[batch.token_slot.long()]
    vals = batch.values[batch.token_slot.long()]
    acts = _edit_feature_acts(d, x, batch)
    coef = torch.zeros_like(vals)
    coef = torch.where(modes == kernels.EditMode.ADD, vals, coef)
    coef = torch.where(modes == kernels.EditMode.CLAMP, vals - acts, coef)
    coef = torch.where(modes == kernels.EditMode.SCALE, (vals - 1) * acts, coef)
    coef = torch.where(modes == kernels.EditMode.ABLATE, -acts, coef)
    dec = d.W_dec.float()[feats]  # [n, E, d_in]
    norm2 = (dec * dec).sum(-1)
    proj = torch.where(norm2 > 0, torch.einsum("nd,ned->ne", x.float(), dec) / torch.where(norm2 > 0, norm2, 1.0), 0.0)
    coef = torch.where(modes == kernels.EditMode.PROJECT_CAP, -torch.clamp(proj - vals, min=0.0), coef)
    coef = torch.where(modes == kernels.EditMode.ORTHOGONAL, vals - proj, coef)
    return torch.einsum("ne,ned->nd", coef, dec)


class _Lazy:
    """Marker: this step has specs, the plan is resolved at the first hook."""


_LAZY: Any = _Lazy()
