"""DictionaryRegistry: ids, model checks, lookup and description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_runtime.dictionary import DictionaryConfig, DictionaryFormatError, SparseDictionary
from sae_runtime.registry import (
    DictionaryRegistry,
    RegistryError,
    UnknownDictionaryError,
    same_model,
)

D_IN, D_SAE = 24, 96
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_KW = {"model_name": MODEL, "num_layers": 8, "hidden_size": D_IN}


def write_dict(directory: Path, arch: str = "topk", layer: int = 3, *, d_in: int = D_IN,
               model_name: str = MODEL, **metadata) -> Path:
    g = torch.Generator().manual_seed(layer)
    t = {"W_enc": torch.randn(d_in, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, d_in, generator=g),
         "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(d_in)}
    if arch == "jumprelu":
        t["threshold"] = torch.full((D_SAE,), 0.1)
    cfg = DictionaryConfig(architecture=arch, d_in=d_in, d_sae=D_SAE,
                           k=8 if arch == "topk" else None,
                           metadata={"model_name": model_name,
                                     "hook_name": f"blocks.{layer}.hook_resid_post", **metadata})
    return SparseDictionary(cfg, t).save(directory)


@pytest.fixture
def two_dirs(tmp_path):
    # listed out of layer order on purpose
    return [write_dict(tmp_path / "b", "jumprelu", layer=5), write_dict(tmp_path / "a", "topk", layer=3)]


def test_derived_ids_and_lookup(two_dirs):
    reg = DictionaryRegistry.load(two_dirs, **MODEL_KW)
    assert reg.ids() == ["layers.5/jumprelu-96", "layers.3/topk-96"]
    assert len(reg) == 2 and [e.id for e in reg] == reg.ids()
    entry = reg.get("layers.3/topk-96")
    assert (entry.hook_point, entry.layer, entry.architecture, entry.d_sae, entry.k) == (
        "layers.3", 3, "topk", D_SAE, 8)
    assert entry.path == two_dirs[1] and entry.dictionary.d_in == D_IN
    assert reg.get("layers.5/jumprelu-96").k is None
    assert reg.hook_points() == ["layers.3", "layers.5"]  # sorted by layer
    assert {hp: [e.id for e in es] for hp, es in reg.by_hook_point().items()} == {
        "layers.3": ["layers.3/topk-96"], "layers.5": ["layers.5/jumprelu-96"]}
    assert "layers.3/topk-96" in reg


def test_explicit_and_cfg_ids(tmp_path):
    dirs = [write_dict(tmp_path / "a", layer=1), write_dict(tmp_path / "b", layer=2, sae_id="res-2"),
            write_dict(tmp_path / "c", layer=3)]
    reg = DictionaryRegistry.load(dirs, ids=["mine", None, None], **MODEL_KW)
    assert reg.ids() == ["mine", "res-2", "layers.3/topk-96"]
    with pytest.raises(RegistryError, match="3 dictionary directories"):
        DictionaryRegistry.load(dirs, ids=["x"], **MODEL_KW)


def test_duplicate_ids_are_refused(tmp_path):
    dirs = [write_dict(tmp_path / "a", layer=3), write_dict(tmp_path / "b", layer=3)]
    with pytest.raises(RegistryError, match=r"'layers\.3/topk-96' is used twice"):
        DictionaryRegistry.load(dirs, **MODEL_KW)
    with pytest.raises(RegistryError, match="used twice"):
        DictionaryRegistry.load(dirs, ids=["same", "same"], **MODEL_KW)
    # explicit ids resolve the clash; no suffix is ever added silently
    assert DictionaryRegistry.load(dirs, ids=["x", "y"], **MODEL_KW).ids() == ["x", "y"]


def test_wrong_hidden_size(tmp_path):
    d = write_dict(tmp_path / "a", d_in=32)
    with pytest.raises(DictionaryFormatError, match="d_in=32 does not match the model's hidden size 24"):
        DictionaryRegistry.load([d], **MODEL_KW)


@pytest.mark.parametrize("name,ok", [
    (MODEL, True), ("SmolLM2-135M-Instruct", True), ("smollm2-135m-instruct", True),
    ("unknown", True), ("", True), ("gpt2", False), ("HuggingFaceTB/SmolLM2-360M-Instruct", False),
])
def test_model_name_check(tmp_path, name, ok):
    d = write_dict(tmp_path / "a", model_name=name)
    if ok:
        assert len(DictionaryRegistry.load([d], **MODEL_KW)) == 1
    else:
        with pytest.raises(RegistryError, match=f"trained on model '{name}'"):
            DictionaryRegistry.load([d], **MODEL_KW)


def test_same_model_last_path_component():
    assert same_model("/cache/models/SmolLM2-135M-Instruct/", MODEL)
    assert not same_model("other/SmolLM2", MODEL)


def test_layer_out_of_range(tmp_path):
    d = write_dict(tmp_path / "a", layer=8)
    with pytest.raises(RegistryError, match=r"layers\.8 does not exist: the model has 8 decoder layers"):
        DictionaryRegistry.load([d], **MODEL_KW)


def test_unknown_id_lists_known_ids(two_dirs):
    reg = DictionaryRegistry.load(two_dirs, **MODEL_KW)
    with pytest.raises(UnknownDictionaryError) as info:
        reg.get("layers.9/topk-96")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.startswith("unknown dictionary 'layers.9/topk-96'")
    assert "'layers.5/jumprelu-96'" in message and "'layers.3/topk-96'" in message


def test_describe_with_metrics(two_dirs):
    (two_dirs[1] / "metrics.json").write_text(json.dumps({"fvu": 0.12, "l0": 8.0}))
    (two_dirs[0] / "metrics.json").write_text("{broken")  # ignored, not fatal
    described = DictionaryRegistry.load(two_dirs, **MODEL_KW).describe()
    assert described[1] == {
        "id": "layers.3/topk-96", "model": MODEL, "hook_point": "layers.3", "layer": 3,
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 8,
        "path": str(two_dirs[1]), "metrics": {"fvu": 0.12, "l0": 8.0}}
    assert described[0]["metrics"] is None and described[0]["k"] is None
    json.dumps(described)  # plain data, ready for a response body


def test_sparsify_directory_in_registry(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "layers.4"
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": D_SAE, "d_in": D_IN}))
    save_file({"encoder.weight": torch.randn(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)},
              str(directory / "sae.safetensors"))
    reg = DictionaryRegistry.load([directory], **MODEL_KW)
    assert reg.ids() == ["layers.4/topk-96"] and reg.get("layers.4/topk-96").k == 4


SNAPSHOT = "/root/.cache/huggingface/hub/models--google--gemma-2-2b/snapshots/" + "0" * 40


@pytest.mark.parametrize("dictionary_model,served", [
    ("google/gemma-2-2b", SNAPSHOT),                       # cfg's hub id vs a cache snapshot
    ("gemma-2-2b", SNAPSHOT + "/"),                        # SAELens short name vs a snapshot
    ("google/gemma-2-2b", "/models/gemma-2-2b"),           # a directory named after the model
    ("gemma-2-2b", "google/gemma-2-2b"),
    ("gpt2-small", "gpt2"),                                # TransformerLens name vs hub name
    ("gpt2-small", "openai-community/gpt2"),
    ("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped"),
    ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
    ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
    ("qwen3-0.6b", "/hub/models--Qwen--Qwen3-0.6B/snapshots/abc"),
])
def test_same_model_names_snapshots_and_short_names(dictionary_model, served):
    assert same_model(dictionary_model, served)


@pytest.mark.parametrize("dictionary_model,served", [
    ("gemma-2-2b", "google/gemma-2-2b-it"),                # base vs instruct
    ("google/gemma-2-2b-it", SNAPSHOT),
    ("gemma-2-2b", "/hub/models--google--gemma-2-9b/snapshots/" + "0" * 40),
    ("gemma-2-2b", "/hub/models--google--gemma-2-9b/snapshots/gemma-2-2b"),  # repo decides
    ("gpt2-small", "gpt2-medium"),
    ("gpt2-small", "distilgpt2"),
    ("pythia-70m-deduped", "EleutherAI/pythia-70m"),
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"),
    ("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.1"),
])
def test_same_model_keeps_different_models_apart(dictionary_model, served):
    assert not same_model(dictionary_model, served)


def test_served_snapshot_path_decides_the_model(tmp_path):
    d = write_dict(tmp_path / "a", model_name="google/gemma-2-2b")
    kw = dict(MODEL_KW, model_name="0" * 40)  # a snapshot folder's name is only its commit
    assert len(DictionaryRegistry.load([d], model_path=SNAPSHOT, **kw)) == 1
    other = SNAPSHOT.replace("gemma-2-2b", "gemma-2-9b")
    with pytest.raises(RegistryError, match=r"trained on model 'google/gemma-2-2b'.*gemma-2-9b"):
        DictionaryRegistry.load([d], model_path=other, **kw)
