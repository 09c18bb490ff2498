"""Helpers of the steering tests: a test dictionary with a feature index, and a run that
returns the residual stream a request's steering produced.

The indexed dictionary has decoder rows of different norms (so formulas with ``||d_i||``
are checked for real) and a feature index written with the index's own writer: every
feature's max activation is ``1 + feature / 100`` and a few features carry labels that the
concept tests search for.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_runtime.default_model import MODEL_NAME
from sae_runtime.dictionary import DictionaryConfig, SparseDictionary
from sae_runtime.feature_index import INDEX_FILE
from sae_runtime.feature_index.schema import HIST_BINS, QUANTILE_LEVELS
from sae_runtime.feature_index.store import FeatureRecord, IndexWriter

INDEXED_LAYER = 8
INDEXED_D_SAE = 256
LABELS = {5: "the ocean and waves", 17: "ocean liners", 40: "French cities", 41: "Paris landmarks"}


def indexed_max_act(feature: int) -> float:
    return 1.0 + feature / 100


def make_indexed_dictionary(path: Path, *, layer: int = INDEXED_LAYER, d_sae: int = INDEXED_D_SAE,
                            d_in: int = 576, seed: int = 5) -> Path:
    """A ReLU dictionary at ``layers.{layer}`` with decoder norms in [0.5, 2] and a feature index."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec *= 0.5 + 1.5 * torch.rand(d_sae, 1, generator=g)
    cfg = DictionaryConfig(architecture="standard", d_in=d_in, d_sae=d_sae, dtype="float32",
                           apply_b_dec_to_input=True, normalize_activations="none",
                           metadata={"model_name": MODEL_NAME, "hook_name": f"layers.{layer}"})
    tensors = {"W_enc": (W_dec / W_dec.norm(dim=1, keepdim=True)).T.contiguous(), "W_dec": W_dec,
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}
    SparseDictionary(cfg, tensors).save(path)
    records = [FeatureRecord(feature=f, max_act=indexed_max_act(f), n_fired=10, density=0.1,
                             quantiles=[0.0] * len(QUANTILE_LEVELS), hist=[0] * HIST_BINS,
                             label=LABELS.get(f, ""))
               for f in range(d_sae)]
    with IndexWriter(path / INDEX_FILE, {"d_sae": d_sae, "dictionary_id": path.name}) as w:
        w.add_features(records)
    return path


async def steered_stream(engine: Any, ids: list[int], spec: Any, layer: int) -> torch.Tensor:
    """The residual stream at ``layer`` of every prompt token after ``spec``'s steering (the
    rows the worker copies out are those after the layer's edits)."""
    from vllm import SamplingParams

    from sae_runtime import vllm_surface
    from sae_runtime.engine.spec import to_worker_spec
    from sae_runtime.protocol import SPEC_KEY

    engine.validate(spec)
    rid = uuid.uuid4().hex
    ws = dataclasses.replace(to_worker_spec(spec, rid, engine.dictionary_info), streams=[layer])
    params = SamplingParams(max_tokens=1, temperature=0.0)
    vllm_surface.stream_deltas(params)
    params.skip_reading_prefix_cache = True
    params.extra_args = {SPEC_KEY: ws.encode()}
    rows = engine.receiver.register(rid, [], kinds=(), streams=(layer,))
    try:
        prompt = vllm_surface.token_prompt(list(ids), cache_salt="steer-test-" + rid)
        async for _ in engine.llm.generate(prompt, params, rid):
            pass
        await engine._wait_for(rows, range(len(ids)))
        return torch.from_numpy(np.array(rows.stream(layer, range(len(ids)))))
    finally:
        engine.receiver.unregister(rid)


def pick_stop(values: torch.Tensor, last: int) -> tuple[int, float, int]:
    """A ``stop_when`` that first fires on generated token ``k`` (1 <= k <= last) of a run
    whose generated tokens have feature ``values`` ``[tokens, features]``: the feature and
    token with the widest gap between its value there and its largest value before; the
    threshold halfway across. Returns (feature, above, k)."""
    best: tuple[float, int, float, int] | None = None
    for k in range(1, min(last, values.shape[0] - 1) + 1):
        before = values[:k].max(0).values
        gap = values[k] - before
        f = int(gap.argmax())
        if best is None or float(gap[f]) > best[0]:
            best = (float(gap[f]), f, float(before[f]) + float(gap[f]) / 2, k)
    assert best is not None and best[0] > 1e-2, f"no feature first fires after token 0 (widest gap {best})"
    return best[1], best[2], best[3]
