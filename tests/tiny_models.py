"""Tiny randomly initialised checkpoints of every decoder family the server hooks.

Real weights of these models cannot be downloaded here, and the server must not depend on
them: each family is built offline from its transformers config class (a few layers,
hidden size 128, heads of 32, which vLLM's CPU attention supports) with the default
model's tokenizer, saved as a normal checkpoint, and served by vLLM like any other. The
families that have no chat template upstream (GPT-2, GPT-NeoX) are saved without one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NUM_LAYERS = 3
HIDDEN = 128

_COMMON = dict(vocab_size=49152, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


def _llama_like(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, **_COMMON, **extra)


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(**_llama_like(tie_word_embeddings=True)),
        "mistral": lambda: t.MistralConfig(**_llama_like(sliding_window=None)),
        "qwen2": lambda: t.Qwen2Config(**_llama_like(tie_word_embeddings=True)),
        "qwen3": lambda: t.Qwen3Config(**_llama_like()),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**_llama_like(
            moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=[], norm_topk_prob=True)),
        "gemma2": lambda: t.Gemma2Config(**_llama_like(
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=64,
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
        "gemma3": lambda: t.Gemma3TextConfig(**_llama_like(
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=64)),
        "phi3": lambda: t.Phi3Config(**_llama_like(pad_token_id=0)),
        "gpt2": lambda: t.GPT2Config(n_embd=HIDDEN, n_layer=NUM_LAYERS, n_head=4, n_positions=2048,
                                     vocab_size=49152, bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=NUM_LAYERS,
                                            num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                            **_COMMON),
        "olmo2": lambda: t.Olmo2Config(**{k: v for k, v in _llama_like().items() if k != "head_dim"}),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "gpt2",
            "gpt_neox", "olmo2")
WITHOUT_CHAT_TEMPLATE = ("gpt2", "gpt_neox")


def make_tiny_model(family: str, path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny float32 checkpoint of ``family`` to ``path`` (reused if present)."""
    if (path / "config.json").is_file():
        return path
    from transformers import AutoModelForCausalLM

    config = _configs()[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random init at the default scale gives near-uniform next-token distributions;
        # larger embeddings make greedy decoding decisive, so a steering edit that changes
        # the stream visibly changes the text.
        model.get_input_embeddings().weight.mul_(8.0)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    if family in WITHOUT_CHAT_TEMPLATE:
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        tok_cfg = tmp / "tokenizer_config.json"
        if tok_cfg.is_file():
            data = json.loads(tok_cfg.read_text())
            data.pop("chat_template", None)
            tok_cfg.write_text(json.dumps(data, indent=2))
    tmp.rename(path)
    return path
