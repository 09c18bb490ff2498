"""The engine↔worker contract (sae_runtime.protocol): the worker spec and install
configuration round-trip through their plain encodings, malformed data is refused naming
the field, and the engine's encoding of a real request is what the worker decodes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from sae_runtime.engine.spec import DictionaryInfo, SAERequestSpec, to_worker_spec
from sae_runtime.protocol import (
    DictionaryToLoad,
    EditSpec,
    FeatureChunk,
    FeatureFrameError,
    FeatureSpec,
    InstallConfig,
    StreamChunk,
    VectorSpec,
    WorkerSpec,
    WorkerSpecError,
    decode_message,
    encode_message,
)
from sae_runtime.worker.step_plan import build_step_plan, parse_request

FULL = WorkerSpec(
    rid="r1",
    features=FeatureSpec(dicts=["d0"], top_k=4, feature_ids=[1, 7], scope="prompt"),
    edits=[EditSpec(dictionary="d0", feature=3, mode="clamp", value=2.5, scope="all")],
    vectors=[VectorSpec(layer=-1, vector=[0.5, -1.0], scale=2.0, scope="generated")],
)


def test_encoding_is_the_documented_plain_dict():
    enc = FULL.encode()
    assert json.loads(json.dumps(enc)) == enc  # plain data only
    assert enc == {
        "rid": "r1",
        "features": {"dicts": ["d0"], "top_k": 4, "feature_ids": [1, 7], "scope": "prompt"},
        "edits": [{"dict": "d0", "feature": 3, "mode": "clamp", "value": 2.5, "scope": "all"}],
        "vectors": [{"layer": -1, "vector": [0.5, -1.0], "scale": 2.0, "scope": "generated"}],
    }
    assert WorkerSpec(rid="r2").encode() == {"rid": "r2"}
    assert WorkerSpec(rid="r3", streams=[-1, 4]).encode() == {"rid": "r3", "streams": [-1, 4]}


@pytest.mark.parametrize("spec", [FULL, WorkerSpec(rid="x"), WorkerSpec(rid="z", streams=[-1, 0, 12]),
                                  WorkerSpec(rid="y", features=FeatureSpec(["a", "b"], None, [0], "all"))])
def test_round_trip(spec):
    assert WorkerSpec.decode(spec.encode()) == spec
    # vLLM carries extra_args through msgspec: lists may arrive as lists of the same values
    assert WorkerSpec.decode(json.loads(json.dumps(spec.encode()))) == spec


def _with(path: list, value):
    enc = json.loads(json.dumps(FULL.encode()))
    target = enc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return enc


@pytest.mark.parametrize("data, field", [
    ("not a dict", "sae: expected a dict"),
    (_with(["rid"], KeyError), "sae.rid: missing"),
    (_with(["rid"], 3), "sae.rid"),
    (_with(["features", "scope"], "everything"), "sae.features.scope"),
    (_with(["features", "top_k"], 0), "sae.features.top_k"),
    (_with(["features", "dicts"], "d0"), "sae.features.dicts"),
    (_with(["edits", 0, "mode"], "multiply"), "sae.edits[0].mode"),
    (_with(["edits", 0, "feature"], -1), "sae.edits[0].feature"),
    (_with(["edits", 0, "value"], "big"), "sae.edits[0].value"),
    (_with(["vectors", 0, "vector", 1], "x"), "sae.vectors[0].vector[1]"),
    (_with(["vectors", 0, "layer"], -2), "sae.vectors[0].layer"),
    (_with(["vectors", 0, "layer"], True), "sae.vectors[0].layer"),
    (_with(["streams"], 3), "sae.streams: expected a list"),
    (_with(["streams"], [2, "layers.3"]), "sae.streams[1]: expected an integer"),
    (_with(["streams"], [-2]), "sae.streams[0]: must be >= -1"),
    (_with(["streams"], [1.5]), "sae.streams[0]"),
    (_with(["streams"], [4, 4]), "sae.streams: hook points repeat"),
])
def test_malformed_spec_names_the_field(data, field):
    with pytest.raises(WorkerSpecError) as info:
        WorkerSpec.decode(data)
    assert field in str(info.value)


def test_install_config_round_trip_and_errors():
    cfg = InstallConfig(dictionaries=[DictionaryToLoad("d0", "/x/d0")], feature_address="ipc:///tmp/s", dtype=None)
    enc = cfg.encode()
    assert enc == {"dictionaries": [{"id": "d0", "path": "/x/d0"}], "feature_address": "ipc:///tmp/s", "dtype": None}
    assert InstallConfig.decode(enc) == cfg
    with pytest.raises(WorkerSpecError, match=r"install\.dictionaries\[0\]\.path"):
        InstallConfig.decode({"dictionaries": [{"id": "d0"}]})
    with pytest.raises(WorkerSpecError, match=r"install\.dictionaries: missing"):
        InstallConfig.decode({})


def test_engine_encoding_is_what_the_worker_reads():
    """The request path end to end minus vLLM: API-process spec -> encoded -> worker state."""
    dicts = {"d0": DictionaryInfo(id="d0", hook_point="layers.1", d_sae=16, k=None, decoder_norm_max=1.0)}
    spec = SAERequestSpec.model_validate({
        "features": {"dictionaries": ["d0"], "top_k": 3, "scope": "generated"},
        "steering": {"edits": [{"dictionary": "d0", "feature": 2, "mode": "ablate", "scope": "prompt"}],
                     "vectors": [{"hook_point": "layers.0", "vector": [1.0, 2.0], "scale": 0.5}]},
    })
    encoded = to_worker_spec(spec, "rid-9", dicts).encode()
    state = parse_request(WorkerSpec.decode(encoded), prompt_len=4, hidden_size=2)
    assert state.rid == "rid-9" and state.feature_dicts == ["d0"] and state.top_k == 3
    assert state.feature_scope == "generated" and state.feature_ids is None
    assert set(state.edits["d0"]) == {"prompt"}
    assert state.edits["d0"]["prompt"].features.tolist() == [2]
    assert state.vectors[0]["prompt"].tolist() == [0.5, 1.0] == state.vectors[0]["generated"].tolist()


def test_feature_frames_round_trip_and_refuse_garbage():
    chunks = [FeatureChunk("r", "d0", np.array([3, 4], np.int32), np.array([[1, 2], [3, 4]], np.int32),
                           np.array([[0.5, 0.25], [1.0, 0.0]], np.float32)),
              FeatureChunk("s", "d1", np.array([0], np.int32), None, np.array([[7.0]], np.float32))]
    out = decode_message([bytes(f) for f in encode_message(chunks)])
    assert [(c.rid, c.dictionary, c.indices is None) for c in out] == [("r", "d0", False), ("s", "d1", True)]
    assert out[0].values.tolist() == [[0.5, 0.25], [1.0, 0.0]] and out[1].values.tolist() == [[7.0]]
    frames = [bytes(f) for f in encode_message(chunks)]
    with pytest.raises(FeatureFrameError, match="frame"):
        decode_message(frames[:-1])


def test_stream_chunks_round_trip_beside_feature_chunks_and_refuse_garbage():
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    chunks = [StreamChunk("r", -1, np.array([0, 1], np.int32), rows),
              FeatureChunk("r", "d0", np.array([1], np.int32), None, np.array([[7.0]], np.float32)),
              StreamChunk("s", 5, np.array([2], np.int32), rows[:1] + 10)]
    out = decode_message([bytes(f) for f in encode_message(chunks)])
    assert [type(c).__name__ for c in out] == ["StreamChunk", "FeatureChunk", "StreamChunk"]
    assert isinstance(out[0], StreamChunk) and isinstance(out[2], StreamChunk)
    assert (out[0].rid, out[0].layer, out[0].positions.tolist()) == ("r", -1, [0, 1])
    assert out[0].values.tolist() == rows.tolist() and out[2].values.tolist() == [[10.0, 11.0, 12.0]]
    frames = [bytes(f) for f in encode_message(chunks)]
    header = json.loads(frames[0])
    for key, value, problem in (("kind", "rows", "kind 'stream'"), ("layer", -2, "'layer'"),
                                ("layer", "0", "'layer'"), ("m", 4, "frame")):
        bad = [dict(e) for e in header]
        bad[0][key] = value
        with pytest.raises(FeatureFrameError, match=problem):
            decode_message([json.dumps(bad).encode(), *frames[1:]])


def test_stream_requests_plan_every_prompt_row_at_each_hook_point_without_a_dictionary():
    """Hook points with no dictionary (here -1 and 3) get the rows; generated tokens do not."""
    state = parse_request(WorkerSpec(rid="h", streams=[-1, 3]), prompt_len=4, hidden_size=2, num_layers=5)
    plan = build_step_plan([(state, 10, np.array([2, 3, 4], np.int64))], {}, torch.device("cpu"))
    assert plan is not None and set(plan.layers) == {-1, 3}
    for L in (-1, 3):
        (job,) = plan.layers[L].streams
        assert job.rid == "h" and job.rows.tolist() == [10, 11] and job.positions.tolist() == [2, 3]
        assert not plan.layers[L].extract and not plan.layers[L].edits
    # a decode step of the same request (only generated tokens) needs no hook
    assert build_step_plan([(state, 0, np.array([4], np.int64))], {}, torch.device("cpu")) is None
    with pytest.raises(ValueError, match=r"sae.streams: hook points \[5\] beyond the model's 5 layers"):
        parse_request(WorkerSpec(rid="h", streams=[5]), prompt_len=4, hidden_size=2, num_layers=5)


@pytest.mark.parametrize("hook_points, field, problem", [
    ("layers.3", "hook_points", "non-empty list"),
    ([], "hook_points", "non-empty list"),
    (["layers.3", "attn.2"], "hook_points[1]", "unsupported hook point"),
    ([30], "hook_points[0]", "not a hook point of this model"),
    (["layers.30"], "hook_points[0]", "layers.0 .. layers.29"),
    ([-2], "hook_points[0]", "not a hook point"),
    ([True], "hook_points[0]", "hook point name or layer number"),
])
def test_engine_refuses_bad_harvest_hook_points_naming_them(hook_points, field, problem):
    from types import SimpleNamespace

    from sae_runtime.engine.engine import SAEEngine
    from sae_runtime.engine.spec import ModelShape, SpecError

    engine: Any = SimpleNamespace(shape=ModelShape(num_layers=30, hidden_size=576), last_layer=None)
    assert SAEEngine.stream_layers(engine, ["embeddings", 12, "blocks.3.hook_resid_pre", "layers.12"]) == [-1, 2, 12]
    with pytest.raises(SpecError) as info:
        SAEEngine.stream_layers(engine, hook_points)
    assert info.value.field == field and problem in str(info.value)


def test_worker_copies_stream_rows_after_edits_for_both_layer_shapes():
    """The worker's stream copy at a hook point: ``hidden + residual`` (or the stream itself)
    at the planned rows, one chunk per request, and the hidden states left untouched."""
    from sae_runtime.worker.runtime import SAEWorkerRuntime
    from sae_runtime.worker.step_plan import LayerPlan, StreamJob

    rt: Any = object.__new__(SAEWorkerRuntime)  # only the step's state, no vLLM runner
    rt._chunks, rt.dictionaries = [], {}
    hidden, residual = torch.randn(6, 4), torch.randn(6, 4)
    jobs = [StreamJob("a", torch.tensor([0, 1, 2]), np.array([0, 1, 2], np.int32)),
            StreamJob("b", torch.tensor([4]), np.array([7], np.int32))]
    assert rt._apply_layer(3, LayerPlan(streams=jobs), hidden, residual) is None
    assert rt._apply_layer(-1, LayerPlan(streams=jobs[1:]), hidden, None) is None
    a, b, b_emb = rt._chunks
    assert (a.rid, a.layer, a.positions.tolist()) == ("a", 3, [0, 1, 2])
    assert np.array_equal(a.values, (hidden + residual)[:3].numpy())
    assert (b.rid, b.layer, b.positions.tolist()) == ("b", 3, [7])
    assert np.array_equal(b.values, (hidden + residual)[4:5].numpy())
    assert (b_emb.layer, b_emb.values.tolist()) == (-1, hidden[4:5].tolist())


def test_units_and_conditions_travel_and_are_planned_per_step():
    """``unit``/``when`` round-trip; two requests' conditions get distinct step ids, planned
    at the condition dictionary's layer on all of the request's rows."""
    from sae_runtime.protocol.worker_spec import ConditionSpec

    cond = ConditionSpec(dictionary="early", feature=2, above=0.5)
    e1 = EditSpec(dictionary="late", feature=3, mode="orthogonal", value=0.1, scope="all", unit="residual_norm",
                  when=cond)
    e2 = EditSpec(dictionary="late", feature=4, mode="project_cap", value=1.0, scope="all")
    spec = WorkerSpec(rid="c", edits=[e1, e2])
    assert WorkerSpec.decode(json.loads(json.dumps(spec.encode()))) == spec
    with pytest.raises(WorkerSpecError, match=r"sae.edits\[0\].unit"):
        WorkerSpec.decode({"rid": "x", "edits": [{**e1.encode(), "unit": "max"}]})
    with pytest.raises(WorkerSpecError, match=r"sae.edits\[0\].when.above"):
        WorkerSpec.decode({"rid": "x", "edits": [{**e1.encode(), "when": {"dict": "a", "feature": 1}}]})
    a = parse_request(spec, prompt_len=3, hidden_size=2)
    b = parse_request(WorkerSpec(rid="d", edits=[e1]), prompt_len=3, hidden_size=2)
    plan = build_step_plan([(a, 0, np.array([0, 1, 2])), (b, 3, np.array([0, 1]))], {"early": 1, "late": 2},
                           torch.device("cpu"))
    assert plan is not None
    group = plan.layers[1].conditions["early"]  # both requests' conditions, one group
    assert group.cids == [0, 1] and group.rows.tolist() == [0, 1, 2, 3, 4] and group.features.tolist() == [2]
    assert group.condition.tolist() == [0, 0, 0, 1, 1] and group.step_row.tolist() == [0, 1, 2, 3, 4]
    assert group.at_row.tolist() == [0, 1, 2, 3, 4] and group.at_feature.tolist() == [0] * 5
    assert group.above.tolist() == [0.5] * 5
    batch = plan.layers[2].edits["late"]
    assert batch.cond is not None and batch.per_norm is not None
    assert batch.cond.tolist() == [[0, -1], [1, -1]] and batch.per_norm.tolist() == [[True, False], [True, False]]
    assert not batch.needs_activation  # orthogonal / project_cap read the decoder row only


def test_stop_when_becomes_watched_features_sent_back_for_generated_tokens_only():
    """``stop_when`` → one watch entry per dictionary (each feature once); the watch
    round-trips; the plan extracts those features on generated rows only, as watch chunks,
    which travel apart from asked features and land in the request's watch table."""
    from sae_runtime.engine.feature_channel import RequestFeatures
    from sae_runtime.protocol import WatchSpec

    info = {n: DictionaryInfo(id=n, hook_point=h, d_sae=16, k=None) for n, h in (("a", "layers.1"), ("b", "layers.2"))}
    spec = SAERequestSpec.model_validate({"steering": {"stop_when": [
        {"dictionary": "b", "feature": 3, "above": 0.5}, {"dictionary": "a", "feature": 7},
        {"dictionary": "b", "feature": 3, "above": 2.0}, {"dictionary": "b", "feature": 1}]}})
    ws = to_worker_spec(spec, "w", info)
    assert ws.watch == [WatchSpec("b", [3, 1]), WatchSpec("a", [7])]
    assert WorkerSpec.decode(json.loads(json.dumps(ws.encode()))) == ws
    with pytest.raises(WorkerSpecError, match=r"sae.watch\[0\].features"):
        WorkerSpec.decode({"rid": "x", "watch": [{"dict": "b", "features": [3, 3]}]})
    state = parse_request(ws, prompt_len=3, hidden_size=2)
    plan = build_step_plan([(state, 5, np.array([1, 2, 3, 4]))], {"a": 1, "b": 2}, torch.device("cpu"))
    assert plan is not None
    (job,) = plan.layers[2].extract["b"]
    assert job.watch and job.top_k is None and job.rows.tolist() == [7, 8] and job.positions.tolist() == [3, 4]
    assert job.feature_ids is not None and job.feature_ids.tolist() == [3, 1]
    chunks = [FeatureChunk("w", "b", np.array([3], np.int32), None, np.array([[0.75, 0.0]], np.float32), watch=True),
              FeatureChunk("w", "b", np.array([3], np.int32), None, np.array([[5.0]], np.float32))]
    out = decode_message([bytes(f) for f in encode_message(chunks)])
    assert [c.watch for c in out] == [True, False]
    header = json.loads(bytes(encode_message(chunks)[0]))
    header[0]["has_idx"] = True
    with pytest.raises(FeatureFrameError, match="watch"):
        decode_message([json.dumps(header).encode(), *[bytes(f) for f in encode_message(chunks)[1:]]])
    req = RequestFeatures(dictionaries=["b"], kinds=("ids",), watches=("b", "a"), watch_from=3)
    req.add(out[0])
    req.add(out[1])
    assert not req.watched(range(2, 4))  # "a" has not arrived
    assert req.watched(range(0, 3))  # prompt positions are never watched
    assert req.covers(range(3, 4))
    popped = req.pop("ids", "b", 3)
    assert popped is not None and popped[1].tolist() == [5.0]
    assert req.pop_watch("b", 3).tolist() == [0.75, 0.0]

