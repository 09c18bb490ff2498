"""Serving models other than the default one: start-up checks and models without a chat template.

1. ``sae-serve`` checks the model and every dictionary before Ray starts: a dictionary
   trained on another model, one hooked beyond the model's layers, one whose ``d_in`` is
   not the model's hidden size, and a model that is not on this machine each end the real
   command within seconds, with ``sae-serve: error: REASON`` as the last line of stderr,
   exit status 2, and no Ray started (Ray's temp directory is pointed at an empty folder
   that must stay empty).
2. A model without a chat template (GPT-2 and Pythia checkpoints have none): chat
   completions and chat prompts are refused with 400 / INVALID_ARGUMENT naming the
   problem before the engine sees them; completions and extraction keep working. Checked
   in-process against the real HTTP app and gRPC methods with an engine-free stand-in
   (fast), and end to end on a live server (slow) that serves a tiny GPT-2 checkpoint by
   its hub id ``tiny-org/tiny-gpt2`` from a local Hugging Face cache.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

from tests.dictionary_factory import make_dictionary
from tests.server_fixtures import DICTIONARY_ID, SAE_SERVE, start_server
from tests.tiny_models import HIDDEN, NUM_LAYERS, make_tiny_model

HUB_ID = "tiny-org/tiny-gpt2"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_gpt2(default_model_dir, tmp_path_factory) -> Path:
    """A tiny GPT-2 checkpoint (3 layers, hidden 128, no chat template) in a folder named tiny-gpt2."""
    return make_tiny_model("gpt2", tmp_path_factory.mktemp("models") / "tiny-gpt2", default_model_dir)


@pytest.fixture(scope="module")
def hub_cache(tiny_gpt2, tmp_path_factory) -> Path:
    """A local Hugging Face hub cache holding the tiny checkpoint as ``tiny-org/tiny-gpt2``
    (the layout ``huggingface-cli download`` leaves: refs/main and a snapshot of links)."""
    hub = tmp_path_factory.mktemp("hub")
    repo = hub / "models--tiny-org--tiny-gpt2"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in tiny_gpt2.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return hub


def tiny_dictionary(path: Path, **kw) -> Path:
    args = dict(layer=1, d_sae=64, architecture="topk", k=4, d_in=HIDDEN, seed=0, model_name="tiny-gpt2")
    return make_dictionary(path, **{**args, **kw})


# -- 1. start-up checks, through the real command ---------------------------------------------


def run_sae_serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, float, Path]:
    """Run ``sae-serve ARGS`` to its end; Ray's temp dir is an empty folder it must not touch."""
    ray_tmp = tmp / "ray-tmp"
    ray_tmp.mkdir(exist_ok=True)
    full_env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1",
                    PYTHONUNBUFFERED="1", **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.run([str(SAE_SERVE), "--no-default-dictionary", "--eager", *args], cwd=tmp, env=full_env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, ray_tmp


def assert_refused_before_ray(result: tuple[int, str, str, float, Path], *needles: str) -> str:
    rc, out, err, _elapsed, ray_tmp = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"no stderr (rc {rc}); stdout:\n{out}"
    last = lines[-1]
    assert rc == 2, (rc, err[-3000:])
    assert last.startswith("sae-serve: error: "), err[-3000:]
    for needle in needles:
        assert needle in last, (needle, last)
    assert "Traceback" not in err, err[-3000:]
    # Nothing of Ray: no banner, no session directory under RAY_TMPDIR, no "starting" line.
    assert "Started a local Ray instance" not in out + err and "sae-serve: starting" not in err, err[-3000:]
    assert not any(ray_tmp.iterdir()), sorted(p.name for p in ray_tmp.iterdir())
    return last


def test_dictionary_of_another_model_is_refused_at_start(tiny_gpt2, tmp_path):
    d = tiny_dictionary(tmp_path / "pythia-dict", model_name="EleutherAI/pythia-70m")
    last = assert_refused_before_ray(run_sae_serve(tmp_path, "--model", str(tiny_gpt2), "--dictionary", str(d)),
                                     "pythia-70m", "tiny-gpt2", str(d))
    assert "trained on model" in last


def test_hook_point_beyond_the_models_layers_is_refused_at_start(tiny_gpt2, tmp_path):
    d = tiny_dictionary(tmp_path / "deep-dict", layer=7)
    assert_refused_before_ray(run_sae_serve(tmp_path, "--model", str(tiny_gpt2), "--dictionary", str(d)),
                              "layers.7", f"{NUM_LAYERS} decoder layers")


def test_dictionary_of_another_width_is_refused_at_start(tiny_gpt2, tmp_path):
    d = tiny_dictionary(tmp_path / "wide-dict", d_in=576)
    last = assert_refused_before_ray(run_sae_serve(tmp_path, "--model", str(tiny_gpt2), "--dictionary", str(d)),
                                     "576", str(HIDDEN))
    assert "d_in" in last


def test_missing_model_directory_is_refused_at_start(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_refused_before_ray(run_sae_serve(tmp_path, "--model", str(missing)), str(missing), "does not exist")


def test_hub_id_not_in_the_local_cache_is_refused_at_start(tmp_path):
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    assert_refused_before_ray(run_sae_serve(tmp_path, "--model", "nobody/no-such-model",
                                            env={"HF_HUB_CACHE": str(empty)}),
                              "'nobody/no-such-model'", "Hugging Face cache")


def test_hub_id_from_the_local_cache_is_checked_under_its_hub_name(hub_cache, tmp_path):
    # The served model's name is the hub id, and a dictionary is checked against that.
    d = tiny_dictionary(tmp_path / "other-dict", model_name="gpt2-xl")
    assert_refused_before_ray(run_sae_serve(tmp_path, "--model", HUB_ID, "--dictionary", str(d),
                                            env={"HF_HUB_CACHE": str(hub_cache)}),
                              "'gpt2-xl'", f"'{HUB_ID}'")


def test_startup_check_in_process(tiny_gpt2, hub_cache, tmp_path, monkeypatch):
    """The same check as a function: what it returns for a good configuration."""
    from server.config import ServeConfig
    from server.launcher import StartupError, check_model_and_dictionaries

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    d = tiny_dictionary(tmp_path / "ok-dict", model_name=HUB_ID)
    info = check_model_and_dictionaries(ServeConfig(engine={"model": HUB_ID, "dictionaries": [str(d)]}))
    assert (info.name, info.architecture, info.num_layers, info.hidden_size, info.has_chat_template) == (
        HUB_ID, "GPT2LMHeadModel", NUM_LAYERS, HIDDEN, False)
    with pytest.raises(StartupError) as err:  # two ids for one dictionary
        check_model_and_dictionaries(ServeConfig(engine={"model": str(tiny_gpt2), "dictionaries": [str(d)],
                                                         "dictionary_ids": ["a", "b"]}))
    assert err.value.exit_code == 2 and "2 ids for 1 dictionary" in str(err.value)
    # Joining a cluster: a model that is only on the other nodes is left to the replicas.
    assert check_model_and_dictionaries(ServeConfig(engine={"model": str(tmp_path / "elsewhere")},
                                                    ray_address="10.0.0.1:6379")) is None


# -- 2a. no chat template: the real HTTP app and gRPC methods, engine-free ----------------------


class _Registry:
    def ids(self) -> list[str]:
        return []

    def describe(self) -> list[dict]:
        return []


class _Engine(SimpleNamespace):
    """What the service reads of an engine, for a model without a chat template."""

    def encode_text(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def encode_chat(self, messages):  # must never be reached
        raise AssertionError("encode_chat called for a model without a chat template")


class _Context:
    """The part of Ray's gRPC context the methods use."""

    def __init__(self):
        self._code = self._details = None

    def invocation_metadata(self):
        return []

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details


def _fake_service():
    from server.metrics import ServiceMetrics
    from server.service import SAEService

    engine = _Engine(model_name="tiny-gpt2", has_chat_template=False, registry=_Registry(),
                     config=SimpleNamespace(max_model_len=64), llm=SimpleNamespace(errored=False))
    return SAEService(engine, ServiceMetrics("test"))  # type: ignore[arg-type]


def test_chat_is_refused_before_the_engine_without_a_chat_template():
    from fastapi.testclient import TestClient

    from server.http_api import build_http_app

    with TestClient(build_http_app(_fake_service(), 100_000)) as http:
        (card,) = http.get("/v1/models").json()["data"]
        assert card["id"] == "tiny-gpt2" and card["supports_chat"] is False and card["max_model_len"] == 64
        for body in ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                     {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}):
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "messages" and err["type"] == "invalid_request_error", err
            assert "'tiny-gpt2' has no chat template" in err["message"] and "/v1/completions" in err["message"]
        r = http.post("/v1/features/extract", json={"messages": [{"role": "user", "content": "Hi"}],
                                                    "features": {"dictionaries": ["d"]}})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"], r.text


def test_grpc_chat_is_refused_without_a_chat_template():
    from sae_wire import sae_serve_pb2 as pb
    from server.grpc_service import GrpcRequestError, SAEGrpcMethods

    m = SAEGrpcMethods()
    m.service = _fake_service()
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi")])

    async def call(name, req, streaming):
        ctx = _Context()
        with pytest.raises(GrpcRequestError):
            if streaming:
                async for _ in getattr(m, name)(req, ctx):
                    pass
            else:
                await getattr(m, name)(req, ctx)
        return ctx

    for name, req, streaming in [("Generate", pb.GenerateRequest(chat=chat), True),
                                 ("ExtractFeatures", pb.ExtractFeaturesRequest(
                                     chat=chat, features=pb.FeatureRequest(dictionaries=["d"])), False)]:
        ctx = asyncio.run(call(name, req, streaming))
        assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, ctx.code(), ctx.details())
        assert "messages" in ctx.details() and "no chat template" in ctx.details(), ctx.details()
    assert m.service.open_streams == 0


# -- 2b. no chat template: a live server on the tiny GPT-2, by hub id --------------------------


@pytest.fixture(scope="module")
def gpt2_server(hub_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2_server")
    d = tiny_dictionary(tmp / "tiny-gpt2-topk", model_name=HUB_ID)
    server = start_server(tmp, d, ("--model", HUB_ID, "--eager"),
                          {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    yield server
    _rc, left = server.stop()
    assert not left, f"processes left after SIGTERM: {left}"


@pytest.fixture(scope="module")
def gpt2_http(gpt2_server):
    with httpx.Client(base_url=gpt2_server.base_url, timeout=300) as c:
        yield c


CHAT = [{"role": "user", "content": "Hello there"}]
FEAT = {"dictionaries": [DICTIONARY_ID], "top_k": 2}


@pytest.mark.slow
def test_live_models_names_the_hub_id_and_no_chat(gpt2_http):
    (card,) = gpt2_http.get("/v1/models").json()["data"]
    assert card["id"] == HUB_ID and card["supports_chat"] is False, card
    (d,) = gpt2_http.get("/v1/dictionaries").json()["data"]
    assert (d["id"], d["model"], d["hook_point"], d["d_in"]) == (DICTIONARY_ID, HUB_ID, "layers.1", HIDDEN)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_live_chat_completions_refused(gpt2_http, stream):
    r = gpt2_http.post("/v1/chat/completions", json={"model": HUB_ID, "messages": CHAT, "max_tokens": 2,
                                                     "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["code"] == 400, err
    assert f"model '{HUB_ID}' has no chat template" in err["message"] and "/v1/completions" in err["message"], err
    assert gpt2_http.get("/health").json()["status"] == "ok"


@pytest.mark.slow
def test_live_completions_and_extraction_work(gpt2_http):
    r = gpt2_http.post("/v1/completions", json={"model": HUB_ID, "prompt": "Hello world, this is",
                                                "max_tokens": 4, "temperature": 0, "features": FEAT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == HUB_ID
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and body["usage"]["completion_tokens"] >= 1, body
    assert choice["text"] or choice["finish_reason"] == "stop", body
    assert choice["features"] and all(len(t["features"][0]["indices"]) == 2 for t in choice["features"])

    r = gpt2_http.post("/v1/features/extract", json={"text": "Hello world", "features": FEAT})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert len(tokens) >= 2 and all(t["features"][0]["dictionary"] == DICTIONARY_ID for t in tokens)
    assert all(len(t["features"][0]["indices"]) == 2 for t in tokens)

    r = gpt2_http.post("/v1/features/extract", json={"messages": CHAT, "features": FEAT})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_live_grpc_chat_refused_and_text_generates(gpt2_server):
    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(gpt2_server.grpc_target) as channel:
        stub = pb_grpc.SAEServiceStub(channel)
        chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi")])
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(chat=chat), timeout=120))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "no chat template" in err.value.details() and "messages" in err.value.details()
        chunks = list(stub.Generate(pb.GenerateRequest(text="Hello world", sampling=pb.SamplingOptions(
            max_tokens=3, temperature=0.0)), timeout=300))
        assert chunks[-1].finished and chunks[-1].usage.completion_tokens >= 1
