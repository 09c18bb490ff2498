"""Steering modes and strength units on the real engine: each edit's stream equals its formula.

Every case runs the prompt with one edit on the indexed test dictionary (layers.8, decoder
rows of different norms, a feature index: tests/steering_helpers.py) and reads back the
stream at layers.8 after the edit; the formula is computed in float64 from the unedited
stream of the same prompt (``SAEEngine.harvest_streams``) and the dictionary's weights. The
table these check is README.md's "Steering semantics".
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from sae_runtime.engine.spec import SAERequestSpec, SpecError, steering_applied
from tests.steering_helpers import INDEXED_LAYER, indexed_max_act, pick_stop, steered_stream

pytestmark = pytest.mark.slow

PROMPT = "The ocean liner sailed from Paris to the sea."


def _spec(edits: list[dict]) -> SAERequestSpec:
    return SAERequestSpec.model_validate({"steering": {"edits": edits}})


@pytest.fixture(scope="module")
def case(sae_engine):
    """Prompt ids, the unedited stream at layers.8, the indexed dictionary, and a feature that
    fires on most tokens (so clamp/scale/ablate/project_cap have something to act on)."""
    eng = sae_engine.engine
    ids = eng.encode_text(PROMPT)
    raw = sae_engine.run(eng.harvest_streams([ids], [INDEXED_LAYER]))[0][INDEXED_LAYER].double()
    did = sae_engine.ids["indexed"]
    d = eng.registry.get(did).dictionary
    acts = d.encode(raw.float()).double()
    feature = int((acts > 0).sum(0).argmax())
    assert int((acts[:, feature] > 0).sum()) >= len(ids) // 2
    return ids, raw, did, d, acts, feature


def _expected(raw: torch.Tensor, d, acts: torch.Tensor, f: int, mode: str, v: float) -> torch.Tensor:
    """README's table, row by row (v already in raw units, one per token or one for all)."""
    dv = d.W_dec[f].double()
    a = acts[:, f:f + 1]
    vv = torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1)
    c = (raw @ dv / (dv @ dv)).unsqueeze(1)  # the stream's coefficient along d_i
    coef = {
        "add": vv.expand_as(a),
        "clamp": vv - a,
        "scale": (vv - 1) * a,
        "ablate": -a,
        "project_cap": -torch.clamp(c - vv, min=0.0),
        "orthogonal": vv - c,
    }[mode]
    return raw + coef * dv


def _close_rows(out: torch.Tensor, expect: torch.Tensor, raw: torch.Tensor, rel: float = 1e-4) -> None:
    """Each row within ``rel`` of its own stream's norm (the first token's stream is ~100x the others')."""
    err = (out - expect).norm(dim=1)
    bound = rel * raw.norm(dim=1) + 1e-4
    assert bool((err <= bound).all()), f"rows off by {err.tolist()} (bounds {bound.tolist()})"


CASES = [  # mode, unit given, value
    ("add", "raw", 3.0),
    ("clamp", "raw", 2.0),
    ("scale", None, 0.25),
    ("ablate", None, None),
    ("project_cap", "raw", 0.5),
    ("orthogonal", "raw", -1.5),
    ("add", None, 2.0),  # the indexed dictionary's default unit: max
    ("clamp", "max", 1.5),
    ("add", "residual_norm", 0.3),
    ("orthogonal", "residual_norm", 0.1),
    ("project_cap", "residual_norm", 0.01),
]


@pytest.mark.parametrize("mode,unit,value", CASES, ids=[f"{m}-{u or 'default'}" for m, u, _ in CASES])
def test_mode_and_unit_match_formula(sae_engine, case, mode, unit, value):
    ids, raw, did, d, acts, f = case
    edit = {"dictionary": did, "feature": f, "mode": mode}
    if unit is not None:
        edit["unit"] = unit
    if value is not None:
        edit["value"] = value
    spec = _spec([edit])
    out = sae_engine.run(steered_stream(sae_engine.engine, ids, spec, INDEXED_LAYER)).double()

    applied = steering_applied(spec, sae_engine.engine.dictionary_info)
    assert applied is not None and len(applied.edits) == 1
    used = applied.edits[0].unit
    assert used == (unit or ("max" if mode in ("add", "clamp", "project_cap", "orthogonal") else "raw"))
    given = 0.0 if value is None else value
    if used == "max":
        v: object = given * indexed_max_act(f)
        assert applied.edits[0].raw_value == pytest.approx(v, rel=1e-6)
    elif used == "residual_norm":
        assert applied.edits[0].raw_value is None
        v = given * raw.norm(dim=1) / d.W_dec[f].double().norm()
    else:
        v = given
    expect = _expected(raw, d, acts, f, mode, v)  # type: ignore[arg-type]
    _close_rows(out, expect, raw)
    assert float((out - raw).norm(dim=1).max()) > 0.1, "the edit changed nothing"
    if used == "residual_norm" and mode == "add":
        # the added vector's norm is value·||x|| at every token
        torch.testing.assert_close((out - raw).norm(dim=1), given * raw.norm(dim=1), rtol=1e-3, atol=1e-3)


def test_project_cap_leaves_streams_below_the_cap(sae_engine, case):
    ids, raw, did, d, _acts, f = case
    dv = d.W_dec[f].double()
    c = raw @ dv / (dv @ dv)
    cap = float(c.median())  # about half the tokens are above it
    spec = _spec([{"dictionary": did, "feature": f, "mode": "project_cap", "value": cap, "unit": "raw"}])
    out = sae_engine.run(steered_stream(sae_engine.engine, ids, spec, INDEXED_LAYER)).double()
    below = c <= cap
    assert 0 < int(below.sum()) < len(ids)
    _close_rows(out[below], raw[below], raw[below], rel=1e-6)
    c_out = out @ dv / (dv @ dv)
    torch.testing.assert_close(c_out[~below], torch.full_like(c_out[~below], cap), rtol=0, atol=1e-3)


def test_new_modes_and_units_keep_a_plain_request_in_the_batch_unchanged(sae_engine, case):
    """Isolation: a plain request batched with a steered one gets its own stream."""
    ids, raw, did, _d, _acts, f = case
    eng = sae_engine.engine
    steered = _spec([
        {"dictionary": did, "feature": f, "mode": "orthogonal", "value": 0.2, "unit": "residual_norm"},
        {"dictionary": did, "feature": f + 1, "mode": "project_cap", "value": 0.0},
        {"dictionary": did, "feature": 3, "mode": "add", "value": 4.0},
        {"dictionary": did, "feature": 9, "mode": "add", "value": 1.0, "unit": "raw",
         "when": {"dictionary": did, "feature": f, "above": 0.0}},
    ])
    plain = SAERequestSpec()

    async def both():
        return await asyncio.gather(steered_stream(eng, ids, steered, INDEXED_LAYER),
                                    steered_stream(eng, ids, plain, INDEXED_LAYER))

    out_steered, out_plain = sae_engine.run(both())
    _close_rows(out_plain.double(), raw, raw, rel=1e-6)
    assert float((out_steered.double() - raw).norm(dim=1).min()) > 0.1


def test_max_unit_needs_an_index(sae_engine):
    did = sae_engine.ids["topk"]  # no feature index
    with pytest.raises(SpecError) as err:
        sae_engine.engine.validate(_spec([{"dictionary": did, "feature": 1, "value": 1.0, "unit": "max"}]))
    assert err.value.field == "steering.edits[0].unit"
    applied = steering_applied(_spec([{"dictionary": did, "feature": 1, "value": 1.0}]),
                               sae_engine.engine.dictionary_info)
    assert applied is not None and applied.edits[0].unit == "raw" and applied.edits[0].raw_value == 1.0


@pytest.mark.parametrize("where", ["same-hook-point", "earlier-hook-point"])
def test_conditional_edit_changes_only_tokens_where_its_condition_fired(sae_engine, case, where):
    ids, raw, did, _d, _acts, f = case
    eng = sae_engine.engine
    if where == "same-hook-point":
        cdid, cacts = did, _acts
    else:  # the topk dictionary at layers.6, before the edit's layers.8
        cdid = sae_engine.ids["topk"]
        raw6 = sae_engine.run(eng.harvest_streams([ids], [6]))[0][6]
        cacts = eng.registry.get(cdid).dictionary.encode(raw6).double()
    g = int((cacts > 0).sum(0).argmax())  # the condition's feature: fires on many tokens
    # The threshold sits in the widest gap between two tokens' values near the middle, never on
    # a token's value: the worker computes the activation in its own kernel, equal only to rounding.
    vals = cacts[:, g].sort().values
    lo, hi = len(vals) // 4, max(3 * len(vals) // 4, len(vals) // 4 + 1)
    j = lo + int((vals[lo + 1:hi + 1] - vals[lo:hi]).argmax())
    above = float((vals[j] + vals[j + 1]) / 2)
    fired = cacts[:, g] > above
    assert 0 < int(fired.sum()) < len(ids)
    spec = _spec([{"dictionary": did, "feature": f, "mode": "add", "value": 3.0, "unit": "raw",
                   "when": {"dictionary": cdid, "feature": g, "above": above}}])
    out = sae_engine.run(steered_stream(eng, ids, spec, INDEXED_LAYER)).double()
    dv = _d.W_dec[f].double()
    _close_rows(out[fired], raw[fired] + 3.0 * dv, raw[fired])
    _close_rows(out[~fired], raw[~fired], raw[~fired], rel=1e-6)


def test_condition_after_the_edit_is_refused(sae_engine):
    did, later = sae_engine.ids["indexed"], sae_engine.ids["jumprelu"]  # layers.8, layers.10
    with pytest.raises(SpecError) as err:
        sae_engine.engine.validate(_spec([{"dictionary": did, "feature": 1, "value": 1.0,
                                           "when": {"dictionary": later, "feature": 0, "above": 0.0}}]))
    assert err.value.field == "steering.edits[0].when" and "layers.10" in err.value.message


def _greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def test_stop_when_ends_at_the_first_token_where_the_feature_fires(sae_engine, case):
    """The same steered generation without ``stop_when`` gives every generated token's value
    of the dictionary's features; ``stop_when`` on one of them ends the generation with
    finish_reason "feature" right after the first token where it exceeds the threshold
    (that token included, with its features), and a plain request batched with it runs on."""
    ids, _raw, did, _d, _acts, f = case
    eng = sae_engine.engine
    edits = [{"dictionary": did, "feature": f, "mode": "add", "value": 2.0, "unit": "raw"}]
    every = {"dictionaries": [did], "feature_ids": list(range(256)), "scope": "generated"}
    base = sae_engine.run(eng.complete(ids, _greedy(14), SAERequestSpec.model_validate(
        {"features": every, "steering": {"edits": edits}})))
    assert len(base.token_ids) >= 8, base.text
    values = torch.tensor([t.features[0].values for t in base.features])  # all but the last token
    assert values.shape == (len(base.token_ids) - 1, 256)
    g, above, k = pick_stop(values, last=min(8, len(base.token_ids) - 3))

    spec = SAERequestSpec.model_validate({
        "features": {"dictionaries": [did], "feature_ids": [g], "scope": "generated"},
        "steering": {"edits": edits, "stop_when": [{"dictionary": did, "feature": g, "above": above}]}})

    async def streamed_and_plain():
        async def streamed():
            return [c async for c in eng.generate(ids, _greedy(14), spec)]

        return await asyncio.gather(streamed(), eng.complete(ids, _greedy(14)))

    plain_alone = sae_engine.run(eng.complete(ids, _greedy(14)))
    chunks, plain = sae_engine.run(streamed_and_plain())
    assert plain.token_ids == plain_alone.token_ids and plain.finish_reason == plain_alone.finish_reason
    assert chunks[-1].finished and chunks[-1].finish_reason == "feature"
    assert all(not c.finished for c in chunks[:-1])
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == base.token_ids[:k + 1]
    assert "".join(c.text for c in chunks) == eng.tokenizer.decode(tokens, skip_special_tokens=True)
    feats = [t for c in chunks for t in c.features]
    assert [t.position for t in feats] == list(range(len(ids), len(ids) + k + 1))  # the last token's too
    got = [t.features[0].values[0] for t in feats]
    assert got[k] > above and all(v <= above for v in got[:k])
    torch.testing.assert_close(torch.tensor(got), values[:k + 1, g], rtol=1e-4, atol=1e-4)
    assert chunks[-1].num_generated_tokens == k + 1
    assert eng.receiver.live_requests == 0

    whole = sae_engine.run(eng.complete(ids, _greedy(14), spec))  # not streamed: the same
    assert (whole.token_ids, whole.finish_reason) == (tokens, "feature")


def test_stop_when_needs_one_sequence_and_known_features(sae_engine):
    did = sae_engine.ids["indexed"]
    spec = SAERequestSpec.model_validate({"steering": {"stop_when": [{"dictionary": did, "feature": 1}]}})
    with pytest.raises(SpecError) as err:
        sae_engine.run(eng_complete(sae_engine, spec, n=2))
    assert err.value.field == "n"
    bad = SAERequestSpec.model_validate({"steering": {"stop_when": [{"dictionary": did, "feature": 1},
                                                                    {"dictionary": did, "feature": 9999}]}})
    with pytest.raises(SpecError) as err:
        sae_engine.engine.validate(bad)
    assert err.value.field == "steering.stop_when[1].feature" and err.value.not_found


async def eng_complete(sae_engine, spec, n: int):
    from vllm import SamplingParams

    eng = sae_engine.engine
    return await eng.complete(eng.encode_text(PROMPT), SamplingParams(max_tokens=2, n=n), spec)
