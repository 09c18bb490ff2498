"""The engine↔worker contract (sae_runtime.protocol): the worker spec and install
configuration round-trip through their plain encodings, malformed data is refused naming
the field, and the engine's encoding of a real request is what the worker decodes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_runtime.engine.spec import DictionaryInfo, SAERequestSpec, to_worker_spec
from sae_runtime.protocol import (
    DictionaryToLoad,
    EditSpec,
    FeatureChunk,
    FeatureFrameError,
    FeatureSpec,
    InstallConfig,
    VectorSpec,
    WorkerSpec,
    WorkerSpecError,
    decode_message,
    encode_message,
)
from sae_runtime.worker.step_plan import parse_request

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


@pytest.mark.parametrize("spec", [FULL, WorkerSpec(rid="x"),
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
