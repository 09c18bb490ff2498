"""What the server reads from a checkpoint before any engine starts (sae_runtime/model_info.py)."""

from __future__ import annotations

import pytest

from sae_runtime.model_info import ModelNotFoundError, read_model_info, resolve_model_path, served_name
from tests.tiny_models import HIDDEN, NUM_LAYERS, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("model_info")
    return {f: make_tiny_model(f, root / f, default_model_dir) for f in ("gpt2", "gemma3", "llama")}


@pytest.mark.parametrize("family, architecture, chat", [
    ("gpt2", "GPT2LMHeadModel", False),  # n_layer / n_embd in its config.json
    ("gemma3", "Gemma3ForCausalLM", True),
    ("llama", "LlamaForCausalLM", True),
])
def test_shape_and_chat_support_of_every_spelling(tiny, family, architecture, chat):
    info = read_model_info(tiny[family])
    assert (info.architecture, info.num_layers, info.hidden_size) == (architecture, NUM_LAYERS, HIDDEN)
    assert info.has_chat_template is chat
    assert info.name == family


def test_served_names(tmp_path, monkeypatch, tiny):
    snapshot = tmp_path / "hub" / "models--google--gemma-2-2b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert served_name(snapshot) == "google/gemma-2-2b"
    monkeypatch.chdir(tiny["gpt2"])
    assert served_name(tiny["gpt2"].__class__(".")) == "gpt2"  # '.' is named after the folder


def test_missing_models_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="not-an-org/not-a-model"):
        resolve_model_path("not-an-org/not-a-model")
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        read_model_info(tmp_path / "no-config")
