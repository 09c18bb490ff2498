"""The worker reuses a step's plan while the batch's layout holds (no vLLM engine).

A plan is fixed by the requests of the batch, their rows and which rows are prompt tokens;
the positions only label the rows sent back. So consecutive decode steps of the same batch
reuse one plan (with this step's positions), and any change of layout builds a new one that
equals a plan built from scratch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sae_runtime.protocol import EditSpec, FeatureSpec, WorkerSpec
from sae_runtime.worker.step_plan import PlanCache, StepPlan, build_step_plan, parse_request

CPU = torch.device("cpu")
LAYERS = {"d": 1, "e": 2}


def _state(rid: str, prompt_len: int = 3, **spec):
    return parse_request(WorkerSpec(rid=rid, **spec), prompt_len=prompt_len, hidden_size=2, num_layers=4)


def _plain(value):
    """A plan (or any part of it) as nested Python values, tensors and arrays as lists."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return (str(value.dtype), value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "positioned"}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(plan: StepPlan | None, items) -> bool:
    return _plain(plan) == _plain(build_step_plan(items, LAYERS, CPU))


def test_unchanged_batch_reuses_the_plan_with_this_steps_positions_and_a_changed_one_rebuilds():
    feats = FeatureSpec(dicts=["d"], top_k=4, feature_ids=None, scope="all")
    edit = EditSpec(dictionary="e", feature=3, mode="clamp", value=2.0, scope="generated")
    a = _state("a", features=feats, streams=[0])
    b = _state("b", edits=[edit], features=FeatureSpec(dicts=["e"], top_k=None, feature_ids=[1, 5], scope="generated"))
    c = _state("c", features=feats)
    cache = PlanCache()

    def step(items):
        return cache.get(items, LAYERS, CPU)

    # prefill of a (3 prompt rows) and b (prompt rows 0-2)
    items = [(a, 0, np.array([0, 1, 2])), (b, 3, np.array([0, 1, 2]))]
    first = step(items)
    assert first is not None and _same(first, items) and cache.builds == 1
    # first decode step: every row is generated now -> new layout, new plan
    items = [(a, 0, np.array([3])), (b, 1, np.array([3]))]
    decode = step(items)
    assert decode is not first and _same(decode, items) and cache.builds == 2
    # next decode steps: same requests, same rows, still generated -> the same plan object,
    # whose reported positions are this step's, equal to a plan built from scratch
    for pos in (4, 5, 6):
        items = [(a, 0, np.array([pos])), (b, 1, np.array([pos]))]
        again = step(items)
        assert again is decode and _same(again, items)
        assert [j.positions.tolist() for j in again.layers[1].extract["d"]] == [[pos]]
        assert [j.positions.tolist() for j in again.layers[2].extract["e"]] == [[pos]]
    assert (cache.builds, cache.reuses) == (2, 3)

    # each kind of change builds a new plan equal to one from scratch
    changes = [
        [(a, 0, np.array([7])), (b, 1, np.array([7])), (c, 2, np.array([0, 1]))],  # a request joins (prefill)
        [(a, 0, np.array([8])), (b, 1, np.array([8])), (c, 2, np.array([2, 3]))],  # its rows: prompt + generated
        [(b, 0, np.array([9])), (a, 1, np.array([9])), (c, 2, np.array([4]))],  # the batch reordered
        [(a, 0, np.array([10])), (c, 1, np.array([5]))],  # a request left
    ]
    for items in changes:
        before = cache.builds
        plan = step(items)
        assert cache.builds == before + 1 and _same(plan, items)
        assert step(items) is plan  # and the same layout once more reuses it

    # a batch where nothing needs a hook caches "no plan" too
    d = _state("d", features=FeatureSpec(dicts=["d"], top_k=2, feature_ids=None, scope="prompt"))
    assert step([(d, 0, np.array([3]))]) is None and step([(d, 0, np.array([4]))]) is None
    assert cache.reuses == len(changes) + 3 + 1

    # an ended request clears the cache: the same ids and rows with new specs are planned anew
    items = [(a, 0, np.array([11])), (c, 1, np.array([6]))]
    kept = step(items)
    cache.clear()
    a2 = _state("a", edits=[edit])
    items = [(a2, 0, np.array([11])), (c, 1, np.array([6]))]
    fresh = step(items)
    assert fresh is not kept and _same(fresh, items) and "e" in fresh.layers[2].edits
