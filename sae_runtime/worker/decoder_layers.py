"""Where the SAE step goes in a model vLLM built: its decoder layers, whatever the architecture.

This module is the one place that knows how vLLM's models are shaped. It relies on two
facts, checked here and nowhere else:

1. A decoder-only model keeps its decoder layers in one ``nn.ModuleList`` with one entry
   per hidden layer (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...;
   models served through vLLM's Transformers backend keep Hugging Face's own list). It is
   found by shape, not by name: the module list whose length is the config's number of
   hidden layers, outside any vision/audio tower.
2. A decoder layer's forward returns the residual stream in one of two shapes: the
   stream itself (GPT-2, Transformers-backend models such as GPT-NeoX and OLMo 2), or a
   ``(hidden_states, residual)`` pair whose sum is the stream (Llama, Mistral, Qwen 2/3,
   Gemma 2/3, Phi-3, ... : the next layer's fused add-norm and the final norm sum them).

Each layer's class gets a forward that calls the original and then the SAE step op of
``residual_op`` at hook point ``L`` (the stream after layer ``L``); layer 0 also runs the
step at hook point ``-1`` on its input (the embeddings as the model hands them to layer 0,
Gemma's scaling included). Patching the class (once) rather than hooking instances is what
lets the step be traced into vLLM's compiled graph; instances that were not hooked (no
index attribute) pass straight through. A model whose layers cannot be found, or whose
layers return anything else, is refused when it loads or at its first (profiling) forward,
so it is never served unhooked.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from sae_runtime.worker import residual_op  # noqa: F401  (registers the ops)

LAYER_ATTR = "_sae_layer_index"
"""Instance attribute of a hooked decoder layer: its index ``L``."""
PRE_STEP_ATTR = "_sae_pre_step"
"""Instance attribute of layer 0: also run the step at hook point -1 on its input."""
MODEL_ATTR = "_sae_decoder_layers"
"""Attribute set on the hooked model: the module path of its decoder layer list."""
_PATCHED_ATTR = "_sae_patched"
"""Class attribute of a decoder layer class whose forward this module wrapped."""
_WRAPPED_ATTR = "_sae_wrapped"
"""Attribute of the wrapping forward function (a subclass inheriting it is not wrapped again)."""

TESTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
    "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Olmo2ForCausalLM",
)
"""Architectures the test suite serves with features and steering checked against
transformers. Others are hooked by the same mechanism when their layers have one of the
two shapes above."""

class UnsupportedModelError(RuntimeError):
    """The SAE step cannot be placed in this model."""


def _refusal(architecture: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot serve {architecture} with SAE hooks: {why}. sae-serve hooks decoder-only "
        f"models whose decoder layers return the residual stream or a (hidden_states, "
        f"residual) pair; tested: {', '.join(TESTED_ARCHITECTURES)}")


def find_decoder_layers(model: nn.Module, num_layers: int, architecture: str = "") -> tuple[str, nn.ModuleList]:
    """The module path and list of ``model``'s ``num_layers`` decoder layers.

    The same search as the transformers side (:func:`sae_runtime.hf_streams.find_decoder_layers`):
    the module list of that length outside vision/audio towers, the heaviest if several.
    """
    from sae_runtime.hf_streams import DecoderLayersNotFound
    from sae_runtime.hf_streams import find_decoder_layers as find

    try:
        return find(model, num_layers)
    except DecoderLayersNotFound:
        raise _refusal(architecture or type(model).__name__,
                       f"no list of {num_layers} decoder layers in {type(model).__name__}") from None


def hook_decoder_layers(model: nn.Module, num_layers: int, architecture: str = "") -> str:
    """Put the SAE step into every decoder layer of ``model``; returns the layers' path."""
    architecture = architecture or type(model).__name__
    path, layers = find_decoder_layers(model, num_layers, architecture)
    for index, layer in enumerate(layers):
        _patch_layer_class(type(layer), architecture)
        setattr(layer, LAYER_ATTR, index)
    setattr(layers[0], PRE_STEP_ATTR, True)
    setattr(model, MODEL_ATTR, path)
    return path


def stop_after_layer(model: nn.Module, last: int) -> None:
    """Drop the decoder layers after ``last`` from ``model`` (hooked first by
    :func:`hook_decoder_layers`), so that its forward ends there: the streams at layers
    ``embeddings .. layers.{last}`` are what the full model computes, the logits are not.
    The models vLLM ships loop over their layer list (``islice(self.layers, start, end)``
    or a slice), which a shorter list ends early."""
    layers = hooked_layers(model)
    if not 0 <= last < len(layers):
        raise ValueError(f"stop_after_layer {last} is not a decoder layer of {type(model).__name__} "
                         f"(layers.0 .. layers.{len(layers) - 1})")
    del layers[last + 1:]


def hooked_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers :func:`hook_decoder_layers` hooked in ``model``."""
    path = getattr(model, MODEL_ATTR, None)
    if path is None:
        raise UnsupportedModelError(
            f"the SAE step is not in {type(model).__name__}: the sae_serve vLLM plugin did not "
            f"hook this model (is sae-serve installed in this environment, and was "
            f"SAE_SERVE_HOOKS=1 set before the engine started?)")
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):  # hook_decoder_layers only records a ModuleList's path
        raise UnsupportedModelError(
            f"{type(model).__name__}.{path} is a {type(layers).__name__}, not the nn.ModuleList of "
            f"decoder layers that was hooked")
    return layers


# --------------------------------------------------------------------------- the patch


def _flat(x: torch.Tensor) -> torch.Tensor:
    """The ops work on ``[tokens, hidden]``; the Transformers backend passes ``[1, T, H]``."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _stream(x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.ops.sae_serve.stream_step(_flat(x), layer).view_as(x)


def _pair(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.ops.sae_serve.residual_step(_flat(hidden), _flat(residual), layer).view_as(hidden)


def _after_layer(out: Any, layer: int, where: str) -> Any:
    """The layer's output with the step at hook point ``layer`` applied."""
    if isinstance(out, torch.Tensor):
        return _stream(out, layer)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        hidden, residual = out
        if residual is None:
            return _stream(hidden, layer), None
        if isinstance(residual, torch.Tensor) and residual.shape == hidden.shape:
            return _pair(hidden, residual, layer), residual
    raise UnsupportedModelError(
        f"{where} returned {type(out).__name__}"
        f"{'' if not isinstance(out, tuple) else ' of ' + str(len(out))}, neither the residual "
        f"stream nor a (hidden_states, residual) pair; sae-serve cannot hook this model")


def _argument_slots(forward: Any) -> tuple[int | None, int | None]:
    """Positional indices (after self) of ``hidden_states`` and ``residual``."""
    names = [p for p in inspect.signature(forward).parameters][1:]
    hidden = names.index("hidden_states") if "hidden_states" in names else None
    residual = names.index("residual") if "residual" in names else None
    return hidden, residual


def _before_first_layer(args: tuple, kwargs: dict, slots: tuple[int | None, int | None],
                        where: str) -> tuple[tuple, dict]:
    """Arguments of layer 0 with the step at hook point -1 applied to its input stream."""
    h_slot, r_slot = slots

    def get(name: str, slot: int | None) -> tuple[Any, str | int | None]:
        if name in kwargs:
            return kwargs[name], name
        if slot is not None and slot < len(args):
            return args[slot], slot
        return None, None

    hidden, h_at = get("hidden_states", h_slot)
    if not isinstance(hidden, torch.Tensor) or h_at is None:
        raise UnsupportedModelError(f"{where}: cannot find the hidden_states argument of layer 0")
    residual, _ = get("residual", r_slot)
    new = _stream(hidden, -1) if residual is None else _pair(hidden, residual, -1)
    if isinstance(h_at, str):
        kwargs = {**kwargs, h_at: new}
    else:
        args = (*args[:h_at], new, *args[h_at + 1:])
    return args, kwargs


def _patch_layer_class(cls: type[nn.Module], architecture: str) -> None:
    # Once per class; a subclass that inherits an already wrapped forward (Mistral's layer
    # from Llama's) must not wrap it again, or the step would run twice.
    if cls.__dict__.get(_PATCHED_ATTR, False) or getattr(cls.forward, _WRAPPED_ATTR, False):
        return
    orig_forward = cls.forward
    slots = _argument_slots(orig_forward)
    where = f"{architecture} decoder layer {cls.__name__}"

    @functools.wraps(orig_forward)
    def forward(self, *args, **kwargs):
        layer = getattr(self, LAYER_ATTR, None)
        if layer is None:
            return orig_forward(self, *args, **kwargs)
        if getattr(self, PRE_STEP_ATTR, False):
            args, kwargs = _before_first_layer(args, kwargs, slots, where)
        return _after_layer(orig_forward(self, *args, **kwargs), layer, where)

    # Marks set with setattr: they are sae-serve's own attributes on a function and on a
    # class that declare neither, which is what the checks above read back with getattr.
    setattr(forward, _WRAPPED_ATTR, True)
    cls.forward = forward
    setattr(cls, _PATCHED_ATTR, True)
