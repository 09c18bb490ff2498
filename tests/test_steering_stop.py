"""stop_when in the engine without vLLM: which generated position fires first, and how the
chunk holding later tokens is cut (the end-to-end behaviour is in
tests/test_steering_engine.py and tests/test_steering_server.py)."""

from __future__ import annotations

import numpy as np

from sae_runtime.protocol import FeatureChunk


def test_the_engine_cuts_a_chunk_after_the_token_a_stop_feature_fired_on():
    """The engine's stop_when bookkeeping without vLLM: the first firing generated position
    (values of several watched dictionaries, each condition its own column and threshold),
    and a chunk cut after it (tokens, logprobs, text of the kept tokens only, finish_reason)."""
    from types import SimpleNamespace

    from sae_runtime.engine.engine import SAEEngine
    from sae_runtime.engine.feature_channel import RequestFeatures
    from sae_runtime.engine.outputs import GenerationChunk

    req = RequestFeatures(dictionaries=[], kinds=(), watches=("a", "b"), watch_from=10)
    for pos, a, b in ((10, [0.0, 5.0], [0.1]), (11, [0.2, 0.0], [0.9]), (12, [3.0, 0.0], [0.0])):
        req.add(FeatureChunk("r", "a", np.array([pos], np.int32), None, np.array([a], np.float32), watch=True))
        req.add(FeatureChunk("r", "b", np.array([pos], np.int32), None, np.array([b], np.float32), watch=True))
    stops = [("a", 0, 1.0), ("b", 0, 0.5)]  # a's first column above 1, or b's above 0.5
    assert SAEEngine._first_firing(req, range(10, 13), stops) == 11
    assert req.watch_rows == {"a": {}, "b": {}}  # checked values are dropped

    eng = SAEEngine.__new__(SAEEngine)
    eng.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(f"<{i}>" for i in ids))
    generated = [7, 8, 9, 4, 5]  # 3 handed out before, this chunk brought 4 and 5
    chunk = GenerationChunk(request_id="r", token_ids=[4, 5], text="<4><5>", logprobs=[{4: -0.1}, {5: -0.2}],
                            num_generated_tokens=5)
    eng._cut(chunk, generated, before=3, keep=4, params=SimpleNamespace())
    assert (chunk.token_ids, chunk.text, chunk.logprobs) == ([4], "<4>", [{4: -0.1}])
    assert (chunk.finished, chunk.finish_reason, chunk.num_generated_tokens) == (True, "feature", 4)
    chunk = GenerationChunk(request_id="r", token_ids=[4], text="<4>", num_generated_tokens=4)
    eng._cut(chunk, generated[:4], before=3, keep=3, params=SimpleNamespace())  # fired on a token already sent
    assert (chunk.token_ids, chunk.text, chunk.finish_reason, chunk.num_generated_tokens) == ([], "", "feature", 3)
