"""A request with a ``seed`` whose prompt is prefilled over two engine steps (chunked prefill).

vLLM samples a token for such a prompt at the end of its first step, discards it, and used to
rewind the request's generator with ``set_offset``, which a CPU generator refuses: the engine
core died and every request in flight with it. The worker now keeps that generator out of the
discarded draw (``vllm_surface.seeded_draws_held_back``). On the session engine (its step
budget is a few thousand tokens, a prompt at most ``max_model_len`` = 1024), a crowd of long
prompts sent together fills the budget, so one of them is split; the worker counts the seeded
rows it held back (``seeded_draws_held_back`` in its stats), so the tests know a split happened.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

PROMPT_LEN = 1000
CROWD = 4  # long unseeded prompts sent with the seeded one: more than a step's token budget


def _prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(200, 20000, (PROMPT_LEN,), generator=g).tolist()


def _params(seed: int | None, max_tokens: int = 8):
    from vllm import SamplingParams

    # No prefix cache reads: a repeated prompt is prefilled (and split) again.
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, skip_reading_prefix_cache=True)


def _held_back(sae_engine) -> int:
    stats = sae_engine.run(sae_engine.engine.worker_stats())
    return sum(s.get("seeded_draws_held_back", 0) for s in stats)


def test_a_seeded_split_prefill_leaves_the_engine_alive(sae_engine):
    eng = sae_engine.engine
    # Every request of the crowd seeded: whichever is split, it is a seeded one.
    prompts = [_prompt(100 + i) for i in range(CROWD + 1)]

    async def run_all():
        return await asyncio.gather(*(eng.complete(p, _params(7 + i)) for i, p in enumerate(prompts)))

    before = _held_back(sae_engine)
    outs = sae_engine.run(run_all())
    assert [len(o.token_ids) for o in outs] == [8] * len(prompts)
    assert _held_back(sae_engine) > before, "no prompt was split: the test did not exercise the fix"
    # The engine still serves.
    again = sae_engine.run(eng.complete(_prompt(1), _params(3, max_tokens=2)))
    assert len(again.token_ids) == 2


def test_a_seeded_request_gives_the_same_tokens_split_or_not(sae_engine):
    """Every request of a crowd is seeded, so whichever the scheduler splits (that depends on
    how the requests reach it, which differs from machine to machine), each must give the
    tokens it gives alone, unsplit."""
    eng = sae_engine.engine
    prompts = [_prompt(42 + i) for i in range(CROWD + 1)]
    seeds = [1234 + i for i in range(len(prompts))]
    alone = []
    for p, seed in zip(prompts, seeds, strict=True):
        before = _held_back(sae_engine)
        alone.append(list(sae_engine.run(eng.complete(p, _params(seed))).token_ids))
        assert _held_back(sae_engine) == before, "a prompt alone was split"
    assert all(len(a) == 8 for a in alone)

    async def run_all():
        return await asyncio.gather(*(eng.complete(p, _params(s)) for p, s in zip(prompts, seeds, strict=True)))

    for _ in range(3):
        before = _held_back(sae_engine)
        crowd = [list(o.token_ids) for o in sae_engine.run(run_all())]
        if _held_back(sae_engine) > before:
            break
    else:
        pytest.fail("no prompt of the crowd was split: the test did not exercise the fix")
    assert crowd == alone
    # A different seed gives other tokens (the seed is honoured at all).
    other = list(sae_engine.run(eng.complete(prompts[0], _params(4321))).token_ids)
    assert other != alone[0]
