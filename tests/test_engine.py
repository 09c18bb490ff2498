"""The engine: real vLLM (CPU, float32, eager) with SAE hooks; extraction and steering.

All tests share the session engine (see conftest). References are computed with
transformers on the same checkpoint, stopping at the hook point.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from pydantic import ValidationError

from sae_runtime import vllm_surface
from sae_runtime.dictionary import SparseDictionary
from sae_runtime.engine.spec import SAERequestSpec, SpecError
from tests.conftest import PROBE_LAYERS
from tests.feature_reference import (
    STREAM_RTOL,
    assert_close_where_decided,
    assert_topk_extraction_matches,
    decided,
    stream_from_probe,
)

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in"

# vLLM's CPU kernels (fused RMSNorm, its attention) and transformers' eager ones sum in
# different orders; in float32 the residual streams then differ by ~1e-6 relative, which
# moves activations by a few 1e-4 absolute: ATOL/RTOL leave margin and still catch any real
# mismatch (a wrong token, layer or position moves values by O(1)). Where a TopK or
# JumpReLU decision sits within that rounding, see tests/feature_reference.py.


def greedy(max_tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def spec(**kw) -> SAERequestSpec:
    return SAERequestSpec.model_validate(kw)


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def hf_stream(hf_model, ids: list[int], layer: int) -> torch.Tensor:
    """Residual stream after decoder layer ``layer`` for every token (the hook point)."""
    captured = {}

    def grab(module, args, output):
        captured["x"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = hf_model.model.layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            hf_model(torch.tensor([ids]))
    finally:
        handle.remove()
    return captured["x"][0].float()


def test_extraction_matches_transformers_reference(sae_engine, hf_model):
    eng = sae_engine.engine
    ids = eng.encode_text(PROMPT)
    roles = ["topk", "jumprelu"]
    s = spec(features={"dictionaries": [sae_engine.ids[r] for r in roles], "top_k": 8, "scope": "all"})
    (before,) = sae_engine.run(eng.worker_stats())
    out = sae_engine.run(eng.complete(ids, greedy(6), s))
    # Every prompt token and every generated token the model read (all but the last).
    assert [f.position for f in out.features] == list(range(len(ids) + len(out.token_ids) - 1))
    full = ids + out.token_ids[:-1]
    assert [f.token_id for f in out.features] == full

    checked = 0
    for j, role in enumerate(roles):
        d = SparseDictionary.load(sae_engine.dictionaries[role])
        assert all(tok.features[j].dictionary == sae_engine.ids[role] for tok in out.features)
        checked += assert_topk_extraction_matches(
            [tok.features[j].values for tok in out.features], [tok.features[j].indices for tok in out.features],
            d, hf_stream(hf_model, full, d.layer))
    assert checked > 50  # the comparison saw real, non-zero activations
    # ...encoded through vLLM's prepacked CPU matmul (vllm_surface.cpu_packed_matmul), not torch's:
    # both dictionaries at each of the request's steps (a prefill and 5 decode steps at least)
    (stats,) = sae_engine.run(eng.worker_stats())
    assert {sae_engine.ids[r] for r in roles} <= set(stats["packed_encoders"])
    assert stats["packed_encodes"] - before["packed_encodes"] >= 2 * len(out.token_ids)


def _engine_stream(sae_engine, ids: list[int], layer: int) -> torch.Tensor:
    """vLLM's residual stream at ``layers.{layer}`` for ``ids``, read through a probe."""
    s = spec(features={"dictionaries": [sae_engine.ids[f"probe{layer}"]], "feature_ids": list(range(2 * 576))})
    feats = sae_engine.run(sae_engine.engine.extract(ids, s.features))
    return stream_from_probe(torch.tensor([f.features[0].values for f in feats]))


def _stream_error(sae_engine, hf_model, ids: list[int], layer: int) -> torch.Tensor:
    """``||x_vllm - x_transformers||`` per token at ``layers.{layer}``."""
    return (_engine_stream(sae_engine, ids, layer) - hf_stream(hf_model, ids, layer)).norm(dim=-1)


def test_vllm_stream_matches_transformers(sae_engine, hf_model):
    """The bound every numeric comparison relies on (tests/feature_reference.py): vLLM's
    residual stream, read through identity probes, is transformers' to STREAM_RTOL."""
    eng = sae_engine.engine
    ids = eng.encode_text(PROMPT)
    for layer in PROBE_LAYERS:
        got = _engine_stream(sae_engine, ids, layer)
        ref = hf_stream(hf_model, ids, layer)
        rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
        print(f"layers.{layer}: max ||x_vllm - x_hf|| / ||x_hf|| = {rel.max().item():.2e}")
        assert rel.max() < STREAM_RTOL, (layer, rel.max().item())
        # ...and the probe is not vacuous: the stream is the right layer's, not a neighbour's.
        other = hf_stream(hf_model, ids, layer - 1)
        assert ((got - other).norm(dim=-1) / other.norm(dim=-1))[1:].min() > 100 * STREAM_RTOL


def test_extraction_of_given_feature_ids_and_prompt_scope(sae_engine, hf_model):
    eng = sae_engine.engine
    ids = eng.encode_text(PROMPT)
    fids = [0, 5, 17, 300, 511]
    s = spec(features={"dictionaries": [sae_engine.ids["topk"]], "feature_ids": fids})
    feats = sae_engine.run(eng.extract(ids, s.features))
    assert [f.position for f in feats] == list(range(len(ids)))
    d = SparseDictionary.load(sae_engine.dictionaries["topk"])
    x = hf_stream(hf_model, ids, d.layer)
    ref_full, ok = d.encode(x), decided(d, x)
    got = torch.tensor([f.features[0].values for f in feats])
    assert feats[0].features[0].indices is None
    assert_close_where_decided(got, ref_full[:, fids], ok[:, fids])

    # Both at once: the top-k in indices/values, the asked ids in feature_values.
    both = spec(features={"dictionaries": [sae_engine.ids["topk"]], "feature_ids": fids, "top_k": 3})
    feats2 = sae_engine.run(eng.extract(ids, both.features))
    assert [f.features[0].feature_values for f in feats2] == [f.features[0].values for f in feats]
    assert all(len(f.features[0].indices) == len(f.features[0].values) == 3 for f in feats2)
    assert_topk_extraction_matches([f.features[0].values for f in feats2], [f.features[0].indices for f in feats2],
                                   d, x)


def test_prompt_features_complete_even_when_prefix_is_cached(sae_engine):
    eng = sae_engine.engine
    ids = eng.encode_text(PROMPT * 12)  # several full KV blocks
    s = spec(features={"dictionaries": [sae_engine.ids["topk"]], "top_k": 4, "scope": "prompt"})
    sae_engine.run(eng.complete(ids, greedy(2)))  # warm the prefix cache...
    assert sae_engine.run(eng.complete(ids, greedy(2))).num_cached_tokens > 0  # ...it is warm
    feats = sae_engine.run(eng.extract(ids, s.features))
    assert [f.position for f in feats] == list(range(len(ids)))


def test_prefix_cache_is_shared_only_under_identical_steering(sae_engine):
    eng = sae_engine.engine
    did = sae_engine.ids["topk"]
    # Long enough to fill several KV blocks (vLLM's CPU block size is 128 tokens).
    ids = eng.encode_text("A long shared preamble about the cache. " * 40)

    def steer(value):
        return spec(steering={"edits": [{"dictionary": did, "feature": 4, "mode": "add", "value": value}]})

    def cached(s):
        return sae_engine.run(eng.complete(ids, greedy(2), s)).num_cached_tokens

    cached(None)
    assert cached(None) > 0  # plain requests share their prefix
    assert cached(steer(10.0)) == 0  # steered: never reuses unsteered blocks
    assert cached(steer(10.0)) > 0  # the same steering shares its own blocks
    assert cached(steer(11.0)) == 0  # other steering does not


def _steered_edits():
    return [
        None,
        {"edits": [{"dictionary": "topk", "feature": 3, "mode": "add", "value": 30.0}]},
        None,
        {"edits": [{"dictionary": "jumprelu", "feature": 7, "mode": "clamp", "value": 25.0, "scope": "generated"}]},
        None,
        {"edits": [{"dictionary": "topk", "feature": 11, "mode": "scale", "value": 4.0},
                   {"dictionary": "topk", "feature": 40, "mode": "add", "value": -20.0, "scope": "prompt"}]},
        {"edits": [{"dictionary": "jumprelu", "feature": 1, "mode": "add", "value": 20.0}],
         "vectors": [{"hook_point": "layers.3", "vector": [0.5] * 576, "scale": 1.0}]},
        None,
    ]


def test_isolation_in_one_batch(sae_engine):
    """Unsteered requests are untouched by their steered neighbours; steered ones are the
    same as when run alone."""
    eng = sae_engine.engine
    prompts = [f"Story {i}: once upon a time, in a town called" for i in range(8)]
    ids = [eng.encode_text(p) for p in prompts]
    steering = _steered_edits()
    specs = []
    for s in steering:
        if s is None:
            specs.append(None)
            continue
        for e in s.get("edits", []):
            e["dictionary"] = sae_engine.ids[e["dictionary"]]
        specs.append(spec(steering=s))

    async def batch(with_specs):
        return await asyncio.gather(*[
            eng.complete(i, greedy(16), sp if with_specs else None) for i, sp in zip(ids, specs, strict=True)
        ])

    plain = sae_engine.run(batch(False))
    mixed = sae_engine.run(batch(True))
    alone = {k: sae_engine.run(eng.complete(ids[k], greedy(16), specs[k])) for k in range(8) if specs[k]}
    for k in range(8):
        if specs[k] is None:
            assert mixed[k].token_ids == plain[k].token_ids, k
        else:
            assert mixed[k].token_ids == alone[k].token_ids, k
    # The steering did something (else the test above proves nothing).
    assert sum(mixed[k].token_ids != plain[k].token_ids for k in alone) >= 3


def test_stream_interval_streams_the_same_tokens_and_features_in_larger_chunks(sae_engine):
    """``EngineConfig.stream_interval`` N: the first token comes at once, then N tokens per
    chunk (vLLM's stream_interval on the request); the tokens, the text and every token's
    features are those of the per-token stream."""
    eng = sae_engine.engine
    ids = eng.encode_text(PROMPT)
    sp = spec(features={"dictionaries": [sae_engine.ids["topk"]], "top_k": 4, "scope": "generated"})

    async def chunks():
        return [c async for c in eng.generate(ids, greedy(10), sp)]

    per_token = sae_engine.run(chunks())
    config = eng.config
    eng.config = config.model_copy(update={"stream_interval": 4})
    try:
        grouped = sae_engine.run(chunks())
    finally:
        eng.config = config
    assert [len(c.token_ids) for c in per_token] == [1] * 10
    assert [len(c.token_ids) for c in grouped] == [1, 4, 4, 1]
    assert [t for c in grouped for t in c.token_ids] == [t for c in per_token for t in c.token_ids]
    assert "".join(c.text for c in grouped) == "".join(c.text for c in per_token)
    a = [f for c in per_token for f in c.features]
    b = [f for c in grouped for f in c.features]
    assert [f.position for f in b] == [f.position for f in a] == list(range(len(ids), len(ids) + 9))
    # the same step batches (one request): the same top-k, values to rounding
    for x, y in zip(a, b, strict=True):
        assert x.features[0].indices == y.features[0].indices, x.position
        assert x.features[0].values == pytest.approx(y.features[0].values, rel=1e-5, abs=1e-6)
    assert sum(len(c.features) > 1 for c in grouped) == 2  # features came with the chunks of 4


def _promoted_tokens(hf_model, direction: torch.Tensor, n: int) -> list[int]:
    g = hf_model.model.norm.weight.detach()
    logits = hf_model.lm_head.weight.detach() @ (direction * g)
    return torch.topk(logits, n).indices.tolist()


def test_clamp_raises_promoted_tokens_and_ablate_zeroes_feature(sae_engine, hf_model):
    eng = sae_engine.engine
    role = "trained" if "trained" in sae_engine.ids else "topk"
    did = sae_engine.ids[role]
    d = SparseDictionary.load(sae_engine.dictionaries[role])
    ids = eng.encode_chat([{"role": "user", "content": "Tell me about the weather today."}])

    # Clamp: the tokens feature i's decoder direction promotes gain probability.
    feature = 5
    promoted = _promoted_tokens(hf_model, d.W_dec[feature].float(), 10)
    params = greedy(1, logprob_token_ids=promoted)
    clamp = spec(steering={"edits": [{"dictionary": did, "feature": feature, "mode": "clamp", "value": 200.0}]})
    base = sae_engine.run(eng.complete(ids, params))
    steered = sae_engine.run(eng.complete(ids, params, clamp))
    p_base = sum(torch.tensor(base.logprobs[0][t]).exp() for t in promoted)
    p_steer = sum(torch.tensor(steered.logprobs[0][t]).exp() for t in promoted)
    assert p_steer > 10 * p_base, (p_base, p_steer)

    # Ablate: the feature's activation in the stream the next layer reads goes to what the
    # README's steering formula predicts from the unsteered stream.
    read = {"dictionaries": [did], "top_k": 8, "scope": "prompt"}
    before = sae_engine.run(eng.extract(ids, SAERequestSpec.model_validate({"features": read}).features))
    totals: dict[int, float] = {}
    for t in before[1:]:  # position 0 (the attention sink) has outsized activations
        for i, v in zip(t.features[0].indices, t.features[0].values, strict=True):
            totals[i] = totals.get(i, 0.0) + v
    target = max(totals, key=totals.get)  # the prompt's strongest feature
    x = hf_stream(hf_model, ids, d.layer)
    a = d.feature_activations(x, [target])[:, 0]
    assert a.max() > 0
    ablate = spec(steering={"edits": [{"dictionary": did, "feature": target, "mode": "ablate"}]},
                  features={"dictionaries": [did], "feature_ids": [target], "scope": "prompt"})
    after = sae_engine.run(eng.complete(ids, greedy(1), ablate))
    got = torch.tensor([t.features[0].values[0] for t in after.features])
    ablated = x - a[:, None] * d.W_dec[target].float()
    expected = d.feature_activations(ablated, [target])[:, 0]
    # Where a decision is certain, the engine's ablated activation is the reference's.
    # The stream difference is measured at this hook point (probe), per token. The engine
    # ablates its own a(x), which differs from the reference's by at most ||w_t|| ||Δx||
    # where a(x)'s own decision is certain, so the ablated streams differ by at most
    # (1 + ||w_t|| ||d_t||) ||Δx||.
    dx = _stream_error(sae_engine, hf_model, ids, d.layer)
    widen = 1 + float(d.W_enc[:, target].float().norm() * d.W_dec[target].float().norm())
    ok = decided(d, x, stream_error=dx)[:, target] & decided(d, ablated, widen, stream_error=dx)[:, target]
    assert_close_where_decided(got, expected, ok, atol=5e-3, rtol=1e-3)
    assert got.abs().max() < a.max()


def test_raw_vector_equals_add_edit(sae_engine):
    eng = sae_engine.engine
    did = sae_engine.ids["topk"]
    d = SparseDictionary.load(sae_engine.dictionaries["topk"])
    ids = eng.encode_text("My favourite colour is")
    v, i = 120.0, 9
    by_edit = spec(steering={"edits": [{"dictionary": did, "feature": i, "mode": "add", "value": v}]})
    by_vector = spec(steering={"vectors": [{"hook_point": "layers.6", "vector": (v * d.W_dec[i]).tolist()}]})
    a = sae_engine.run(eng.complete(ids, greedy(12, logprobs=1), by_edit))
    b = sae_engine.run(eng.complete(ids, greedy(12, logprobs=1), by_vector))
    plain = sae_engine.run(eng.complete(ids, greedy(12)))
    assert a.token_ids == b.token_ids
    assert a.token_ids != plain.token_ids
    for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids, strict=True):
        assert abs(la[t] - lb[t]) < 1e-3


def test_abort_frees_worker_state(sae_engine):
    eng = sae_engine.engine
    ids = eng.encode_text("Count from one to one hundred: one, two,")
    s = spec(features={"dictionaries": [sae_engine.ids["topk"]], "top_k": 4},
             steering={"edits": [{"dictionary": sae_engine.ids["topk"], "feature": 2, "mode": "add", "value": 5.0}]})

    async def start_then_abort():
        gen = eng.generate(ids, greedy(300), s)
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        during = await eng.worker_stats()
        live_during = eng.receiver.live_requests
        await gen.aclose()
        for _ in range(100):
            stats = await eng.worker_stats()
            if stats[0]["tracked_requests"] == 0:
                break
            await asyncio.sleep(0.1)
        return during, live_during, stats

    during, live_during, after = sae_engine.run(start_then_abort())
    assert during[0]["requests_with_spec"] == 1 and live_during == 1
    assert after[0]["tracked_requests"] == 0
    assert eng.receiver.live_requests == 0


@pytest.mark.parametrize(
    "body, field, not_found",
    [
        ({"features": {"dictionaries": ["nope"]}}, "features.dictionaries[0]", True),
        (
            {"steering": {"edits": [{"dictionary": "nope", "feature": 1, "value": 1.0}]}},
            "steering.edits[0].dictionary",
            True,
        ),
        (
            {"steering": {"edits": [{"dictionary": "@topk", "feature": 512, "value": 1.0}]}},
            "steering.edits[0].feature",
            True,
        ),
        ({"features": {"dictionaries": ["@topk"], "feature_ids": [9999]}}, "features.feature_ids[0]", False),
        (
            {"steering": {"vectors": [{"hook_point": "layers.3", "vector": [1.0] * 10}]}},
            "steering.vectors[0].vector",
            False,
        ),
        (
            {"steering": {"vectors": [{"hook_point": "layers.30", "vector": [1.0] * 576}]}},
            "steering.vectors[0].hook_point",
            True,
        ),
        (
            {"steering": {"vectors": [{"hook_point": "attn.3", "vector": [1.0] * 576}]}},
            "steering.vectors[0].hook_point",
            False,
        ),
    ],
)
def test_invalid_specs_are_refused_before_the_engine(sae_engine, body, field, not_found):
    eng = sae_engine.engine
    import json

    raw = json.loads(json.dumps(body).replace("@topk", sae_engine.ids["topk"]))
    steps_before = sae_engine.run(eng.worker_stats())[0]["steps"]

    async def attempt():
        async for _ in eng.generate(eng.encode_text("hi"), greedy(2), spec(**raw)):
            pass

    with pytest.raises(SpecError) as info:
        sae_engine.run(attempt())
    assert info.value.field == field and info.value.not_found is not_found
    assert sae_engine.run(eng.worker_stats())[0]["steps"] == steps_before


@pytest.mark.parametrize(
    "body",
    [
        {"steering": {"edits": [{"dictionary": "d", "feature": 1, "mode": "clamp", "value": float("nan")}]}},
        {"steering": {"edits": [{"dictionary": "d", "feature": 1, "mode": "add", "value": 1.0, "scope": "middle"}]}},
        {"steering": {"edits": [{"dictionary": "d", "feature": -1, "value": 1.0}]}},
        {"steering": {"edits": [{"dictionary": "d", "feature": 1, "mode": "boost", "value": 1.0}]}},
        {"steering": {"edits": [{"dictionary": "d", "feature": 1, "mode": "add"}]}},
        {"steering": {"vectors": [{"hook_point": "layers.1", "vector": [1.0, float("inf")]}]}},
        {"features": {"dictionaries": ["d"], "top_k": 0}},
        {"features": {"dictionaries": ["d"], "scope": "everything"}},
        {"features": {"dictionaries": ["d"]}, "unknown_field": 1},
    ],
)
def test_malformed_specs_fail_validation(body):
    with pytest.raises(ValidationError):
        SAERequestSpec.model_validate(body)


def test_top_k_beyond_a_dictionary_width_is_refused():
    from sae_runtime.engine.spec import DictionaryInfo, ModelShape, SpecError, SpecLimits, validate_spec

    served = {
        "wide": DictionaryInfo("wide", "layers.3", 512, None),
        "narrow": DictionaryInfo("narrow", "layers.3", 64, 8),
    }
    shape, limits = ModelShape(num_layers=30, hidden_size=576), SpecLimits(max_top_k=256)
    validate_spec(
        SAERequestSpec.model_validate({"features": {"dictionaries": ["wide", "narrow"], "top_k": 64}}),
        served,
        shape,
        limits,
    )
    with pytest.raises(SpecError) as info:
        validate_spec(
            SAERequestSpec.model_validate({"features": {"dictionaries": ["wide", "narrow"], "top_k": 65}}),
            served,
            shape,
            limits,
        )
    assert info.value.field == "features.top_k" and "d_sae=64" in str(info.value) and "'narrow'" in str(info.value)


def test_engine_mode_is_the_one_asked_for(sae_engine):
    """The parametrization really gives an eager and a compiled engine."""
    cfg = sae_engine.engine.llm.vllm_config
    assert cfg.model_config.enforce_eager is (sae_engine.mode == "eager")
    if sae_engine.mode == "compiled":
        assert cfg.compilation_config.mode != 0  # CompilationMode.NONE


@pytest.mark.parametrize("role", ["trained", "depth.4", "depth.24"])
def test_training_harvest_reads_what_the_engine_reads(sae_engine, default_model_dir, role):
    """sae-train's activations at a hook point are the ones the served hook sees: the
    served dictionary's features of harvested activations match the engine's (the default
    dictionary and the dictionaries at other depths)."""
    if role not in sae_engine.ids:
        pytest.skip(f"no {role} dictionary in this checkout")
    from sae_runtime.training.activations import ModelActivations

    eng = sae_engine.engine
    d = SparseDictionary.load(sae_engine.dictionaries[role])
    ids = eng.encode_text(PROMPT)
    source = ModelActivations(default_model_dir)
    ids_t = torch.tensor(ids)
    harvested = source.harvest([ids_t], [d.layer])[d.layer]
    trained_on = source.training_mask(ids_t[None], torch.tensor([len(ids)]))[0]
    s = spec(features={"dictionaries": [sae_engine.ids[role]], "top_k": 8})
    feats = [f for f in sae_engine.run(eng.extract(ids, s.features)) if trained_on[f.position]]
    assert len(feats) == harvested.shape[0] > 5
    assert_topk_extraction_matches(
        [f.features[0].values for f in feats], [f.features[0].indices for f in feats], d, harvested.float()
    )


# --------------------------------------------------------------------------- harvesting

HARVEST_POINTS = ["embeddings", "layers.3", "layers.6", 29]
"""Hook points of the harvest tests: layers.3 and embeddings have no dictionary in the
session engine, layers.6 has one, 29 (a layer number) is the last layer."""


def test_harvested_streams_match_transformers(sae_engine, hf_model):
    """SAEEngine.harvest_streams returns, per prompt and hook point, the raw stream of every
    token (position 0 included, cached prefixes recomputed), transformers' to STREAM_RTOL."""
    from sae_runtime import hf_streams

    eng = sae_engine.engine
    first = eng.encode_text(PROMPT)
    prompts = [first, eng.encode_text("Paris is the capital of France, and Rome of Italy."), first]
    sae_engine.run(eng.complete(first, greedy(1)))  # its prefix is now in vLLM's cache
    got = sae_engine.run(eng.harvest_streams(prompts, HARVEST_POINTS))
    layers = [-1, 3, 6, 29]
    assert len(got) == len(prompts)
    for ids, streams in zip(prompts, got, strict=True):
        assert sorted(streams) == layers
        ref = hf_streams.residual_streams(hf_model, torch.tensor([ids]), layers, stop_early=False)
        for L in layers:
            x, r = streams[L], ref[L][0]
            assert x.shape == (len(ids), eng.shape.hidden_size) and x.dtype == torch.float32, (L, x.shape)
            rel = (x - r).norm(dim=-1) / r.norm(dim=-1)
            assert rel.max() < STREAM_RTOL, (L, rel.max().item())
        # not vacuous: each hook point's rows are its own, not a neighbour's
        for L, other in ((3, 6), (6, 29), (-1, 3)):
            o = ref[other][0]
            assert ((streams[L] - o).norm(dim=-1) / o.norm(dim=-1)).min() > 100 * STREAM_RTOL, (L, other)
    # bad input is refused before anything reaches vLLM, naming it
    with pytest.raises(SpecError, match=r"token_id_lists\[1\]: is empty"):
        sae_engine.run(eng.harvest_streams([first, []], ["layers.3"]))
    with pytest.raises(SpecError, match=r"hook_points\[1\]: 'layers.30' is not a hook point"):
        sae_engine.run(eng.harvest_streams([first], ["layers.3", "layers.30"]))


def test_sae_train_harvests_through_the_engine(sae_engine, default_model_dir, tmp_path):
    """sae-train's vLLM harvest keeps the transformers harvest's rows (position 0 and special
    tokens out, same order), writes the same activation cache, and a short run trains."""
    if sae_engine.mode != "eager":
        pytest.skip("one engine mode is enough for a training run; the streams are checked in both")
    from sae_runtime.training.activations import ActivationCache, ModelActivations
    from sae_runtime.training.config import TrainConfig
    from sae_runtime.training.engine_harvest import EngineActivations
    from sae_runtime.training.train import run

    eng = sae_engine.engine
    harvester = EngineActivations(default_model_dir, engine=eng, loop=sae_engine.loop)
    source = ModelActivations(default_model_dir)
    contexts = [torch.tensor(eng.encode_text(t)) for t in (PROMPT, "One two three four five six seven.")]
    a, b = harvester.harvest(contexts, [-1, 1]), source.harvest(contexts, [-1, 1])
    for L in (-1, 1):
        assert a[L].shape == b[L].shape == (sum(len(c) - 1 for c in contexts), 576)
        assert ((a[L] - b[L]).norm(dim=-1) / b[L].norm(dim=-1)).max() < STREAM_RTOL

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + PROMPT * 4)
    threads = torch.get_num_threads()

    def cfg(**kw) -> TrainConfig:
        return TrainConfig(hook_point="layers.1", data=[str(corpus)], ctx_len=64, eval_fraction=0.2,
                           max_tokens=600, d_sae=64, k=8, batch_size=128, steps=4, warmup_steps=1,
                           eval_tokens=96, progress=False, threads=1, **kw)

    try:
        assert cfg().harvest == "vllm"
        m = run(cfg(cache_dir=str(tmp_path / "c_vllm")), tmp_path / "out", command="test", source=source,
                harvester=harvester)
        run(cfg(cache_dir=str(tmp_path / "c_tf"), harvest="transformers"), tmp_path / "out_tf", command="test",
            source=source)
    finally:
        torch.set_num_threads(threads)
    assert m["eval"]["fvu"] < 1.5 and m["config"]["harvest"] == "vllm"
    SparseDictionary.load(tmp_path / "out", expected_d_in=576, expected_hook_point="layers.1")
    # one fingerprint whatever the source, and the same float16 rows in it
    (dv,), (dt,) = list((tmp_path / "c_vllm").iterdir()), list((tmp_path / "c_tf").iterdir())
    assert dv.name == dt.name
    xv, xt = ActivationCache(dv).open(1).float(), ActivationCache(dt).open(1).float()
    assert xv.shape == xt.shape and xv.shape[0] > 128
    torch.testing.assert_close(xv, xt, atol=2e-3, rtol=2e-3)  # float16 rounding of ~1e-6 differences


def test_harvest_engine_stops_after_the_deepest_hook_point(default_model_dir, hf_model):
    """sae-train's own harvest engine runs the model only through the deepest layer asked for
    (``HarvestEngineConfig.stop_after_layer``): its worker keeps 2 of 30 decoder layers for a
    harvest at embeddings and layers.1, the streams there are still transformers' (all 30
    layers run there), and a deeper hook point is refused by name."""
    from sae_runtime import hf_streams
    from sae_runtime.training.engine_harvest import EngineActivations

    harvester = EngineActivations(default_model_dir, max_model_len=256)
    try:
        ids = harvester.tokenizer(PROMPT)["input_ids"]
        (got,) = harvester.residuals([torch.tensor(ids)], [-1, 1])
        eng = harvester._runner.engine
        assert eng.last_layer == 1
        (stats,) = harvester._runner.run(eng.worker_stats(), 60)
        assert stats["layers"] == 2  # 28 layers dropped: the harvest computed 2 of 30
        # a harvest engine binds its worker to every CPU (unless the environment sets it)
        bind = os.environ.get(vllm_surface.CPU_BIND_ENV, "all")
        assert stats["cpu_threads_bind"] == (vllm_surface.all_cpus_binding() if bind == "all" else bind)
        ref = hf_streams.residual_streams(hf_model, torch.tensor([ids]), [-1, 1], stop_early=False)
        for L in (-1, 1):
            rel = (got[L] - ref[L][0]).norm(dim=-1) / ref[L][0].norm(dim=-1)
            assert got[L].shape == (len(ids), 576) and rel.max() < STREAM_RTOL, (L, rel.max().item())
        with pytest.raises(SpecError, match=r"hook_points\[0\]: 'layers.2' is not a hook point .*stops after "
                                            r"layers.1"):
            harvester._runner.run(eng.harvest_streams([ids], ["layers.2"]), 60)
        from vllm import SamplingParams

        from sae_runtime.engine.engine import EngineError

        with pytest.raises(EngineError, match=r"stops after layers.1 .*meaningless"):  # no text from half a model
            harvester._runner.run(eng.complete(ids, SamplingParams(max_tokens=4)), 60)
        (one,) = harvester._runner.run(eng.harvest_streams([ids[:5]], ["embeddings"]), 60)  # still serving
        assert one[-1].shape == (5, 576)
    finally:
        harvester.close()


def test_harvest_engine_layer_bound_is_checked():
    """``stop_after_layer`` outside the model, before a dictionary's layer, or 'dictionaries'
    without one is refused before vLLM starts; a serving config never stops early."""
    from types import SimpleNamespace

    from sae_runtime.engine.engine import EngineConfig, HarvestEngineConfig, last_layer

    registry = [SimpleNamespace(id="a", layer=6), SimpleNamespace(id="b", layer=12)]
    assert last_layer(EngineConfig(), registry, 30) is None
    assert last_layer(HarvestEngineConfig(), registry, 30) is None
    assert last_layer(HarvestEngineConfig(stop_after_layer="dictionaries"), registry, 30) == 12
    assert last_layer(HarvestEngineConfig(stop_after_layer=12), registry, 30) == 12
    assert last_layer(HarvestEngineConfig(stop_after_layer=29), [], 30) == 29
    with pytest.raises(ValueError, match=r"stop_after_layer 11 drops the layers of dictionaries \['b'\]"):
        last_layer(HarvestEngineConfig(stop_after_layer=11), registry, 30)
    with pytest.raises(ValueError, match=r"stop_after_layer 30: the model has layers.0 .. layers.29"):
        last_layer(HarvestEngineConfig(stop_after_layer=30), [], 30)
    with pytest.raises(ValueError, match="serves no dictionary"):
        last_layer(HarvestEngineConfig(stop_after_layer="dictionaries"), [], 30)
    with pytest.raises(ValidationError):
        HarvestEngineConfig(stop_after_layer="deepest")
    assert "stop_after_layer" not in EngineConfig.model_fields  # not a sae-serve flag
    # sae-index's own engine stops after its dictionary's layer and binds every CPU
    from sae_runtime.feature_index.build import engine_config
    from sae_runtime.feature_index.config import IndexConfig

    index_engine = engine_config(IndexConfig())
    assert (index_engine.stop_after_layer, index_engine.cpu_threads_bind) == ("dictionaries", "all")
