"""Fast checks of the wire contract (``sae_wire``): stubs current, the one converter in both
directions, the client importable without torch; and the server's configuration.

No server is started here; these run in ``make test-fast``. The same request through the
real gRPC server is in tests/test_server_grpc.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from sae_wire import convert as conv
from sae_wire import sae_serve_pb2 as pb
from sae_wire.models import (
    DictionaryFeatures,
    DictionaryInfoOut,
    ExtractRequest,
    ExtractResponse,
    FeatureInfoOut,
    GenerateChunkOut,
    GenerateRequest,
    TokenFeaturesOut,
)
from server.errors import ApiError, translate

REPO = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_generated_from_the_current_proto():
    from sae_wire.generate import HERE, generate

    for name, text in generate().items():
        assert (HERE / name).read_text() == text, f"{name} is stale: run python -m sae_wire.generate"


def test_generator_check_mode_reports_current_stubs():
    out = subprocess.run([sys.executable, "-m", "sae_wire.generate", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _server_reads(msg):
    """What the server makes of a client's message: serialised, parsed, converted, validated."""
    parsed = type(msg).FromString(msg.SerializeToString())
    if isinstance(parsed, pb.ExtractFeaturesRequest):
        return conv.extract_request_from_pb(parsed)
    return conv.generate_request_from_pb(parsed)


def test_generate_request_converts_into_the_engine_spec_models():
    from clients.grpc_client import generate_request

    msg = generate_request(
        None, [{"role": "user", "content": "hi"}], {"max_tokens": 5, "temperature": 0, "seed": 3},
        {"dictionaries": ["d"], "top_k": 4, "scope": "generated"},
        {"edits": [{"dictionary": "d", "feature": 7, "mode": "ablate"},
                   {"dictionary": "d", "feature": 2, "mode": "clamp", "value": 0.0, "scope": "prompt"}],
         "vectors": [{"hook_point": "layers.3", "vector": [0.5, -1.0], "scale": 2.0}]})
    req = _server_reads(msg)
    assert req.messages[0].content == "hi" and req.text is None
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.seed) == (5, 0.0, 3)
    assert (req.features.dictionaries, req.features.top_k, req.features.scope) == (["d"], 4, "generated")
    e0, e1 = req.steering.edits
    assert (e0.mode, e0.value, e1.mode, e1.value, e1.scope) == ("ablate", 0.0, "clamp", 0.0, "prompt")
    assert req.steering.vectors[0].vector == [0.5, -1.0] and req.steering.vectors[0].scale == 2.0


@pytest.mark.parametrize("features", [
    {"dictionaries": ["d"], "top_k": 3, "feature_ids": [5, 1, 9]},  # both: both must arrive
    {"dictionaries": ["d", "e"], "feature_ids": [0], "scope": "prompt"},
    {"dictionaries": ["d"], "top_k": 2, "scope": "generated"},
    {"dictionaries": ["d"]},  # neither: the default top_k
])
def test_requests_round_trip_through_the_wire_unchanged(features):
    """Client model -> message -> server model is the identity, for both RPCs: a field one
    direction writes and the other does not read (top_k beside feature_ids) fails here."""
    from clients.grpc_client import extract_request, generate_request

    extract = ExtractRequest.model_validate({"text": "x", "features": features})
    assert _server_reads(extract_request(features, "x", None)) == extract
    generate = GenerateRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "features": features,
            "sampling": {
                "max_tokens": 3,
                "temperature": 0.5,
                "top_p": 0.75,  # float32-exact
                "stop": ["."],
                "seed": 1,
            },
        }
    )
    assert _server_reads(conv.generate_request_pb(generate)) == generate
    assert (
        _server_reads(generate_request(None, [{"role": "user", "content": "x"}], generate.sampling, features, None))
        == generate
    )


def test_top_k_and_feature_ids_together_both_travel():
    msg = conv.feature_request_pb({"dictionaries": ["d"], "top_k": 3, "feature_ids": [5, 1]})
    assert msg.HasField("top_k") and msg.top_k == 3 and list(msg.feature_ids) == [5, 1]


def _tokens(features: list[DictionaryFeatures]) -> list[TokenFeaturesOut]:
    return [
        TokenFeaturesOut(position=0, token_id=11, token="Hi", is_prompt=True, features=features),
        TokenFeaturesOut(position=1, token_id=12, token=" there", is_prompt=False, features=features),
    ]


@pytest.mark.parametrize(
    "dictionary_features",
    [
        # top_k and feature_ids: the top-k in indices/values, the asked ids' values in feature_values
        DictionaryFeatures(dictionary="d", indices=[4, 2], values=[3.0, 1.5], feature_values=[0.0, 1.5, 0.25]),
        DictionaryFeatures(dictionary="d", indices=[4, 2], values=[3.0, 1.5]),  # top_k only
        DictionaryFeatures(dictionary="d", values=[0.0, 0.5]),  # feature_ids only
    ],
)
def test_responses_round_trip_through_the_wire_unchanged(dictionary_features):
    """Server model -> message -> client model is the identity (float32-exact values)."""
    resp = ExtractResponse(model="m", tokens=_tokens([dictionary_features]))
    wire = pb.ExtractFeaturesResponse.FromString(conv.extract_response_pb(resp).SerializeToString())
    assert conv.extract_response_from_pb(wire) == resp
    chunk = GenerateChunkOut(
        token_ids=[12],
        text=" there",
        features=_tokens([dictionary_features]),
        finished=True,
        finish_reason="length",
        usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    )
    wire = pb.GenerateResponse.FromString(conv.generate_chunk_pb(chunk).SerializeToString())
    assert conv.generate_chunk_from_pb(wire) == chunk


def test_dictionary_and_feature_info_round_trip():
    d = DictionaryInfoOut(
        id="d", model="m", hook_point="layers.6", architecture="topk", d_in=8, d_sae=32, k=4, metrics={"fvu": 0.25}
    )
    assert conv.dictionary_from_pb(conv.dictionary_pb(d)) == d
    bare = DictionaryInfoOut(id="d", model="m", hook_point="layers.6", architecture="relu", d_in=8, d_sae=32)
    assert conv.dictionary_from_pb(conv.dictionary_pb(bare)) == bare
    f = FeatureInfoOut(
        dictionary="d",
        feature=3,
        hook_point="layers.6",
        decoder_norm=1.0,
        top_promoted=[{"token_id": 1, "token": "a", "score": 0.5}],
        top_suppressed=[{"token_id": 2, "token": "b", "score": -0.5}],
        density=0.125,
    )
    assert conv.feature_info_from_pb(conv.feature_info_pb(f)) == f


def test_dictionary_summary_round_trips_with_and_without_its_optional_parts():
    from sae_wire.models import DictionarySummary

    full = DictionarySummary(
        id="d", model="m", hook_point="layers.6", architecture="topk", d_in=8, d_sae=32, k=4, has_index=True,
        fvu=0.125, l0=4.0, dead_frac=0.0, ce_loss_recovered=0.9, eval_tokens=100, index_tokens=50, never_fired=3,
        density_log10_edges=[-2.0, -1.75, -1.5], density_counts=[20, 9],
        training_log=[{"step": 10, "tokens": 1280, "loss": 0.5, "fvu": 0.5, "l0": 4.0, "dead": 0.25}])
    assert conv.dictionary_summary_from_pb(conv.dictionary_summary_pb(full)) == full
    bare = DictionarySummary(id="d", model="m", hook_point="layers.6", architecture="relu", d_in=8, d_sae=32,
                             has_index=False)
    back = conv.dictionary_summary_from_pb(conv.dictionary_summary_pb(bare))
    assert back == bare and back.fvu is None and back.k is None


def test_unset_optionals_take_the_shared_defaults():
    req = conv.generate_request_from_pb(pb.GenerateRequest(text="x", features=pb.FeatureRequest(dictionaries=["d"])))
    assert req.features.top_k == 8 and req.features.scope == "all"  # FeatureRequest's defaults
    assert req.steering is None and req.sampling.max_tokens is None


@pytest.mark.parametrize(
    "msg,field",
    [
        (pb.GenerateRequest(), "input"),
        (
            pb.GenerateRequest(text="x", steering=pb.Steering(edits=[pb.SteeringEdit(dictionary="d", feature=1)])),
            "steering.edits.0",
        ),  # add needs a value
        (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(temperature=9)), "sampling.temperature"),
        (pb.ExtractFeaturesRequest(text="x"), "features"),
        (pb.GenerateRequest(text="x", features=pb.FeatureRequest(dictionaries=["d"], scope=7)), "features.scope"),
    ],
)
def test_invalid_messages_name_the_field_and_map_to_invalid_argument(msg, field):
    read = conv.extract_request_from_pb if isinstance(msg, pb.ExtractFeaturesRequest) else conv.generate_request_from_pb
    with pytest.raises((conv.WireError, ValidationError)) as err:
        read(msg)
    api = translate(err.value)
    assert isinstance(api, ApiError), f"{type(err.value).__name__} is not mapped to an ApiError"
    assert api.field == field and api.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


# Importing these must not import any of BLOCKED: the client installs without torch/vLLM
# (`pip install sae-serve`, the base install) and the wire package depends on nothing of the server.
CLIENT_MODULES = (
    "sae_wire",
    "sae_wire.models",
    "sae_wire.convert",
    "sae_wire.sae_serve_pb2",
    "sae_wire.sae_serve_pb2_grpc",
    "clients",
    "clients.grpc_client",
    "clients.cli",
)
BLOCKED = ("torch", "vllm", "server", "sae_runtime", "ray", "transformers", "triton")
GUARD = """
import importlib, sys
BLOCKED = {blocked!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {{name!r}} (a client must not need it)")
        return None

sys.meta_path.insert(0, Refuse())
for name in {modules!r}:
    importlib.import_module(name)
"""


def _guarded_import(modules: tuple[str, ...], then: str = "", path: str = str(REPO)) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter in which importing any of BLOCKED raises."""
    script = GUARD.format(blocked=BLOCKED, modules=modules) + textwrap.dedent(then)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
    )


def test_client_and_wire_import_without_torch_vllm_or_the_server():
    out = _guarded_import(
        CLIENT_MODULES,
        """
        from clients.cli import build_parser
        from clients.grpc_client import extract_request
        msg = extract_request({"dictionaries": ["d"], "top_k": 2, "feature_ids": [3]}, "hi", None)
        assert msg.features.top_k == 2 and list(msg.features.feature_ids) == [3], msg
        build_parser().parse_args(["extract", "x", "-d", "d"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
    """,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_import_guard_catches_a_client_that_imports_the_server(tmp_path):
    """The guard above can fail: a module that imports ``server`` is refused."""
    (tmp_path / "leaky_client.py").write_text("import server.models\n")
    out = _guarded_import(("leaky_client",), path=f"{tmp_path}:{REPO}")
    assert out.returncode != 0 and "blocked import of 'server" in out.stderr, out.stderr


def test_pyproject_ships_the_wire_package_and_a_client_only_base_install():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "sae_wire*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    project = pyproject["project"]
    base = " ".join(project["dependencies"])
    for package in ("grpcio", "protobuf", "pydantic", "httpx"):
        assert package in base, f"the base (client) install lacks {package}"
    # torch comes in through accelerate/transformers; none of the server's stack is in the base.
    for heavy in ("torch", "vllm", "ray", "transformers", "accelerate", "fastapi"):
        assert heavy not in base, f"the base (client) install pulls {heavy}"
    assert any(d.startswith("ray[serve]") for d in project["optional-dependencies"]["server"])


def test_spec_errors_map_to_http_and_grpc_codes():
    from sae_runtime.engine.spec import SpecError

    nf = ApiError.from_spec_error(SpecError("steering.edits[0].dictionary", "unknown", not_found=True))
    bad = ApiError.from_spec_error(SpecError("features.top_k", "too big"))
    assert (nf.http_status, nf.grpc_code) == (404, grpc.StatusCode.NOT_FOUND)
    assert (bad.http_status, bad.grpc_code) == (400, grpc.StatusCode.INVALID_ARGUMENT)


def test_sae_client_edit_syntax():
    from clients.cli import parse_edit

    assert parse_edit("layers.6/topk-512:12:add:4.5") == {
        "dictionary": "layers.6/topk-512",
        "feature": 12,
        "mode": "add",
        "value": 4.5,
    }
    assert parse_edit("d:3:ablate") == {"dictionary": "d", "feature": 3, "mode": "ablate"}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_edit("d:x:add:1")


def test_cli_flags_override_yaml(tmp_path):
    from server.cli import build_parser, config_from_args

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("http_port: 9000\nreplicas: 2\nengine:\n  max_model_len: 1024\n  kv_cache_gib: 2\n")
    cfg = config_from_args(
        build_parser().parse_args(["--config", str(cfg_file), "--http-port", "9100", "--kv-cache-gib", "1.5"])
    )
    assert (cfg.http_port, cfg.replicas, cfg.grpc_port, cfg.host) == (9100, 2, 50051, "127.0.0.1")
    assert (cfg.engine.max_model_len, cfg.engine.kv_cache_gib, cfg.engine.dtype) == (1024, 1.5, "float32")
    bad = tmp_path / "bad.yaml"
    bad.write_text("http_prot: 1\n")
    with pytest.raises(ValueError, match="http_prot"):
        config_from_args(build_parser().parse_args(["--config", str(bad)]))


def test_feature_index_messages_round_trip():
    from sae_wire.models import (
        FeatureIndexCard,
        FeatureSearchResponse,
        SearchByExampleRequest,
        SearchByExampleResponse,
    )

    feats = {"dictionaries": ["d"], "top_k": 3, "feature_ids": [1], "normalize": "max", "labels": True,
             "exclude_dense_above": 0.25}
    req = _server_reads(conv.extract_request_pb({"text": "x", "features": feats}))
    assert req.features.model_dump() == {**feats, "scope": "all"}
    plain = _server_reads(conv.extract_request_pb({"text": "x", "features": {"dictionaries": ["d"]}}))
    assert (plain.features.normalize, plain.features.labels, plain.features.exclude_dense_above) == ("none", False,
                                                                                                    None)
    labelled = DictionaryFeatures(dictionary="d", indices=[4, 2], values=[1.0, 0.5], feature_values=[0.25],
                                  labels=["four", "two"], feature_labels=["one"])
    assert conv.dictionary_features_from_pb(conv.dictionary_features_pb(labelled)) == labelled
    card = FeatureIndexCard(
        label="sea", label_source="tokens", label_score=0.75, max_activation=2.5, density=0.125, n_fired=3,
        quantile_levels=[0.5], quantiles=[1.5], histogram=[1, 2], histogram_max=2.5,
        top_tokens=[{"token_id": 5, "token": " sea", "count": 2.0}],
        cooccurring=[{"feature": 7, "jaccard": 0.5, "label": "waves"}],
        examples=[{"activation": 2.5, "tokens": ["a", " sea"], "token_ids": [1, 5], "activations": [0.0, 2.5],
                   "peak": 1, "doc": "doc-1", "position": 4}])
    info = FeatureInfoOut(dictionary="d", feature=1, hook_point="layers.6", decoder_norm=1.0, top_promoted=[],
                          top_suppressed=[], density=0.125, has_index=True, index=card)
    assert conv.feature_info_from_pb(conv.feature_info_pb(info)) == info
    bare = info.model_copy(update={"has_index": False, "index": None})
    assert conv.feature_info_from_pb(conv.feature_info_pb(bare)) == bare
    found = FeatureSearchResponse(dictionary="d", query="sea",
                                  results=[{"feature": 1, "label": "sea", "density": 0.125, "max_activation": 2.5}])
    assert conv.search_features_response_from_pb(conv.search_features_response_pb(found)) == found
    ask = SearchByExampleRequest(dictionary="d", texts=["a"], contrast_texts=["b"], limit=5, exclude_dense_above=0.5)
    assert conv.search_by_example_request_from_pb(conv.search_by_example_request_pb(ask)) == ask
    ranked = SearchByExampleResponse(dictionary="d", results=[
        {"feature": 1, "score": 0.5, "label": "sea", "max_activation": 2.5, "density": 0.125}])
    assert conv.search_by_example_response_from_pb(conv.search_by_example_response_pb(ranked)) == ranked
