"""Fast checks of the wire format: stubs current, gRPC <-> pydantic conversion, configuration.

No server is started here; these run in ``make test-fast``.
"""

from __future__ import annotations

import argparse

import grpc
import pytest

from clients.proto import sae_serve_pb2 as pb
from server import grpc_convert as conv
from server.errors import ApiError


def test_committed_stubs_are_generated_from_the_current_proto():
    from clients.proto.generate import HERE, generate

    for name, text in generate().items():
        assert (HERE / name).read_text() == text, f"{name} is stale: run python -m clients.proto.generate"


def test_generate_request_converts_into_the_engine_spec_models():
    from clients.grpc_client import generate_request

    msg = generate_request(
        None, [{"role": "user", "content": "hi"}], {"max_tokens": 5, "temperature": 0, "seed": 3},
        {"dictionaries": ["d"], "top_k": 4, "scope": "generated"},
        {"edits": [{"dictionary": "d", "feature": 7, "mode": "ablate"},
                   {"dictionary": "d", "feature": 2, "mode": "clamp", "value": 0.0, "scope": "prompt"}],
         "vectors": [{"hook_point": "layers.3", "vector": [0.5, -1.0], "scale": 2.0}]})
    req = conv.generate_request(pb.GenerateRequest.FromString(msg.SerializeToString()))
    assert req.messages[0].content == "hi" and req.text is None
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.seed) == (5, 0.0, 3)
    assert (req.features.dictionaries, req.features.top_k, req.features.scope) == (["d"], 4, "generated")
    e0, e1 = req.steering.edits
    assert (e0.mode, e0.value, e1.mode, e1.value, e1.scope) == ("ablate", 0.0, "clamp", 0.0, "prompt")
    assert req.steering.vectors[0].vector == [0.5, -1.0] and req.steering.vectors[0].scale == 2.0


def test_unset_optionals_take_the_shared_defaults():
    req = conv.generate_request(pb.GenerateRequest(text="x", features=pb.FeatureRequest(dictionaries=["d"])))
    assert req.features.top_k == 8 and req.features.scope == "all"  # FeatureRequest's defaults
    assert req.steering is None and req.sampling.max_tokens is None


@pytest.mark.parametrize("msg,field", [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(text="x", steering=pb.Steering(edits=[pb.SteeringEdit(dictionary="d", feature=1)])),
     "steering.edits.0"),  # add needs a value
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(temperature=9)), "sampling.temperature"),
    (pb.ExtractFeaturesRequest(text="x"), "features"),
])
def test_invalid_messages_name_the_field_and_map_to_invalid_argument(msg, field):
    with pytest.raises(ApiError) as err:
        (conv.extract_request if isinstance(msg, pb.ExtractFeaturesRequest) else conv.generate_request)(msg)
    assert err.value.field == field and err.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


def test_spec_errors_map_to_http_and_grpc_codes():
    from sae_runtime.engine.spec import SpecError

    nf = ApiError.from_spec_error(SpecError("steering.edits[0].dictionary", "unknown", not_found=True))
    bad = ApiError.from_spec_error(SpecError("features.top_k", "too big"))
    assert (nf.http_status, nf.grpc_code) == (404, grpc.StatusCode.NOT_FOUND)
    assert (bad.http_status, bad.grpc_code) == (400, grpc.StatusCode.INVALID_ARGUMENT)


def test_sae_client_edit_syntax():
    from clients.cli import parse_edit

    assert parse_edit("layers.6/topk-512:12:add:4.5") == {
        "dictionary": "layers.6/topk-512", "feature": 12, "mode": "add", "value": 4.5}
    assert parse_edit("d:3:ablate") == {"dictionary": "d", "feature": 3, "mode": "ablate"}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_edit("d:x:add:1")


def test_cli_flags_override_yaml(tmp_path):
    from server.cli import build_parser, config_from_args

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("http_port: 9000\nreplicas: 2\nengine:\n  max_model_len: 1024\n  kv_cache_gib: 2\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(cfg_file), "--http-port", "9100",
                                                      "--kv-cache-gib", "1.5"]))
    assert (cfg.http_port, cfg.replicas, cfg.grpc_port, cfg.host) == (9100, 2, 50051, "127.0.0.1")
    assert (cfg.engine.max_model_len, cfg.engine.kv_cache_gib, cfg.engine.dtype) == (1024, 1.5, "float32")
    bad = tmp_path / "bad.yaml"
    bad.write_text("http_prot: 1\n")
    with pytest.raises(ValueError, match="http_prot"):
        config_from_args(build_parser().parse_args(["--config", str(bad)]))
