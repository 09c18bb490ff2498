"""vLLM general plugin: put the SAE step into Llama-style decoder layers before compilation.

Registered as the ``vllm.general_plugins`` entry point ``sae_serve`` in pyproject.toml.
vLLM calls :func:`register` in each of its processes at start-up, in the worker before the
model is built, which is the only moment a change to the forward can still be traced into
the compiled graph. It only acts when ``SAE_SERVE_HOOKS=1`` (set by ``SAEEngine.start``),
so a plain vLLM run in the same environment is untouched.
"""

from __future__ import annotations

import functools
import os

import torch

HOOKS_ENV = "SAE_SERVE_HOOKS"
LAYER_ATTR = "_sae_layer_index"


def _patch_decoder_layer(cls: type) -> None:
    if getattr(cls, "_sae_patched", False):
        return
    from vllm.model_executor.models.utils import extract_layer_index

    import sae_runtime.worker.residual_op  # noqa: F401  (registers the op)

    orig_init, orig_forward = cls.__init__, cls.forward

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        prefix = kwargs.get("prefix", "")
        # "model.layers.12" -> 12; the hook point layers.12 is this layer's output.
        setattr(self, LAYER_ATTR, extract_layer_index(prefix) if prefix else None)

    @functools.wraps(orig_forward)
    def forward(self, *args, **kwargs):
        hidden, residual = orig_forward(self, *args, **kwargs)
        layer = getattr(self, LAYER_ATTR, None)
        if layer is not None:
            hidden = torch.ops.sae_serve.residual_step(hidden, residual, layer)
        return hidden, residual

    cls.__init__, cls.forward, cls._sae_patched = __init__, forward, True


def register() -> None:
    if os.environ.get(HOOKS_ENV) != "1":
        return
    from vllm.model_executor.models.llama import LlamaDecoderLayer

    _patch_decoder_layer(LlamaDecoderLayer)
