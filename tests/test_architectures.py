"""Every decoder family the server hooks: features, steering and isolation on real vLLM.

One tiny random checkpoint per family (tests/tiny_models.py), served by the real engine
with two dictionaries: one at ``blocks.0.hook_resid_pre`` (the embeddings as layer 0
reads them: hook point -1) and one at ``blocks.1.hook_resid_post`` (``layers.1``), plus
identity probes at both that read vLLM's stream itself. References come from transformers'
``output_hidden_states`` on the same checkpoint (``hidden_states[0]`` and
``hidden_states[2]``).

Modes: every family runs in vLLM's compiled mode, which is where the SAE step must
survive Dynamo's trace and vLLM's graph splitting; here with the ``eager`` compile backend
(the same trace and split, no Inductor code generation: Inductor adds minutes per start
and does not touch the op, which stays opaque). Pure eager mode, where the layers run as
Python, is the same op code called directly; it runs for one family per way a layer hands
on the stream: the stream from a vLLM-native layer (GPT-2) and from a Transformers-backend
layer (GPT-NeoX); the (hidden, residual) pair runs eager with the default model (Llama) in
tests/test_engine.py, and in full Inductor there too. Each engine start costs ~40-60 s on
2 cores (two process spawns importing torch and vLLM), hence no more.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_runtime.dictionary import SparseDictionary
from sae_runtime.engine.spec import SAERequestSpec
from tests.dictionary_factory import make_dictionary
from tests.feature_reference import STREAM_RTOL, assert_topk_extraction_matches, make_stream_probe, stream_from_probe
from tests.tiny_models import FAMILIES, HIDDEN, make_tiny_model

pytestmark = pytest.mark.slow

# Pair-returning layers run eager in tests/test_engine.py (Llama). SAE_SERVE_TEST_ALL_MODES=1
# runs every family in both modes (about 6 minutes more on 2 cores).
EAGER_FAMILIES = FAMILIES if os.environ.get("SAE_SERVE_TEST_ALL_MODES") == "1" else ("gpt2", "gpt_neox")
PARAMS = [(f, "compiled") for f in FAMILIES] + [(f, "eager") for f in EAGER_FAMILIES]
PROMPT = "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in"
HOOKS = {"pre": ("blocks.0.hook_resid_pre", 0), "post": ("blocks.1.hook_resid_post", 2)}  # name, hidden_states index


@dataclass
class Served:
    family: str
    mode: str
    engine: Any
    loop: asyncio.AbstractEventLoop
    model_dir: Path
    dirs: dict[str, Path]  # role -> dictionary directory
    ids: dict[str, str]  # role -> served id

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{f}-{m}" for f, m in PARAMS])
def served(request, tmp_path_factory, default_model_dir) -> Served:
    from sae_runtime.engine.engine import EngineConfig, SAEEngine

    family, mode = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = make_tiny_model(family, root / family, default_model_dir)
    dirs = {
        "pre": make_dictionary(root / "pre", layer=0, d_sae=256, architecture="topk", k=8, d_in=HIDDEN, seed=3,
                               model_name=family, hook_point=HOOKS["pre"][0]),
        "post": make_dictionary(root / "post", layer=1, d_sae=256, architecture="topk", k=8, d_in=HIDDEN, seed=4,
                                model_name=family, hook_point=HOOKS["post"][0]),
        "probe_pre": make_stream_probe(root / "probe_pre", hook_point=HOOKS["pre"][0], d_in=HIDDEN, model_name=family),
        "probe_post": make_stream_probe(root / "probe_post", hook_point=HOOKS["post"][0], d_in=HIDDEN,
                                        model_name=family),
    }
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    roles = list(dirs)
    config = EngineConfig(model=str(model_dir), dictionaries=[str(dirs[r]) for r in roles],
                          enforce_eager=mode == "eager", compile_backend="eager",
                          max_model_len=512, max_num_seqs=8)
    engine = asyncio.run_coroutine_threadsafe(SAEEngine.start(config), loop).result(600)
    yield Served(family, mode, engine, loop, model_dir, dirs, dict(zip(roles, engine.registry.ids(), strict=True)))

    async def close():
        engine.shutdown()
        await asyncio.sleep(0.2)

    asyncio.run_coroutine_threadsafe(close(), loop).result(120)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=1)


def _changed(steered, plain) -> bool:
    """The steered generation differs: other tokens, or the same first token with another
    probability (a tiny random model can be so peaked that no edit moves its argmax)."""
    if steered.token_ids != plain.token_ids:
        return True
    t = plain.token_ids[0]
    return abs(steered.logprobs[0][t] - plain.logprobs[0][t]) > 1e-3


def _reference_streams(model_dir: Path, ids: list[int]) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0].float() for h in out.hidden_states)


def test_engine_mode_and_hooked_layers(served):
    cfg = served.engine.llm.vllm_config
    assert cfg.model_config.enforce_eager is (served.mode == "eager")
    assert served.engine.registry.get(served.ids["pre"]).hook_point == "embeddings"
    assert served.engine.registry.get(served.ids["post"]).hook_point == "layers.1"


def test_features_and_stream_equal_transformers(served):
    eng = served.engine
    ids = eng.encode_text(PROMPT)
    hidden = _reference_streams(served.model_dir, ids)
    probes = SAERequestSpec.model_validate({"features": {
        "dictionaries": [served.ids["probe_pre"], served.ids["probe_post"]], "feature_ids": list(range(2 * HIDDEN))}})
    feats = served.run(eng.extract(ids, probes.features))
    for j, role in enumerate(("pre", "post")):
        ref = hidden[HOOKS[role][1]]
        got = stream_from_probe(torch.tensor([f.features[j].values for f in feats]))
        rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max() < STREAM_RTOL, (role, rel.max().item())

    s = SAERequestSpec.model_validate({"features": {"dictionaries": [served.ids["pre"], served.ids["post"]],
                                                    "top_k": 6}})
    feats = served.run(eng.extract(ids, s.features))
    assert [f.token_id for f in feats] == ids
    checked = 0
    for j, role in enumerate(("pre", "post")):
        d = SparseDictionary.load(served.dirs[role])
        checked += assert_topk_extraction_matches([f.features[j].values for f in feats],
                                                  [f.features[j].indices for f in feats], d, hidden[HOOKS[role][1]])
    assert checked > 2 * len(ids)


def _steer(served, role: str, feature: int, value: float) -> SAERequestSpec:
    return SAERequestSpec.model_validate({"steering": {"edits": [
        {"dictionary": served.ids[role], "feature": feature, "mode": "add", "value": value}]}})


def test_steering_changes_what_the_next_layer_reads(served):
    """An edit at the embeddings shows in the stream after layer 1 (the next layers read
    it) and in the text; an edit after layer 1 changes the text."""
    eng = served.engine
    ids = eng.encode_text(PROMPT)
    probe = {"dictionaries": [served.ids["probe_post"]], "feature_ids": list(range(2 * HIDDEN)), "scope": "prompt"}
    plain = served.run(eng.complete(ids, _greedy(8), SAERequestSpec.model_validate({"features": probe})))
    pre_edit = _steer(served, "pre", 5, 40.0).model_dump(exclude_none=True)
    steered_pre = served.run(eng.complete(ids, _greedy(8), SAERequestSpec.model_validate({**pre_edit,
                                                                                          "features": probe})))
    x_plain = stream_from_probe(torch.tensor([f.features[0].values for f in plain.features]))
    x_steer = stream_from_probe(torch.tensor([f.features[0].values for f in steered_pre.features]))
    assert ((x_steer - x_plain).norm(dim=-1) > 1.0).all()
    assert _changed(steered_pre, plain)
    steered_post = served.run(eng.complete(ids, _greedy(8), _steer(served, "post", 7, 40.0)))
    assert _changed(steered_post, plain)


def test_mixed_batch_is_isolated(served):
    eng = served.engine
    prompts = [eng.encode_text(f"Story {i}: once upon a time, in a town called") for i in range(4)]
    specs = [None, _steer(served, "pre", 3, 40.0), None, _steer(served, "post", 9, -40.0)]

    async def batch(with_specs: bool):
        return await asyncio.gather(*[eng.complete(p, _greedy(8), s if with_specs else None)
                                      for p, s in zip(prompts, specs, strict=True)])

    plain = served.run(batch(False))
    mixed = served.run(batch(True))
    for k, s in enumerate(specs):
        if s is None:
            assert mixed[k].token_ids == plain[k].token_ids, k
        else:
            alone = served.run(eng.complete(prompts[k], _greedy(8), s))
            assert mixed[k].token_ids == alone.token_ids, k
            assert _changed(mixed[k], plain[k]), k
