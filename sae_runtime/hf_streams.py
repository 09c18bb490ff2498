"""The residual stream of a transformers (Hugging Face) decoder-only model at sae-serve's hook points.

This is the transformers side of the hook point contract (``sae_runtime.hook_points``):
training harvests and evaluates through it, and tests use it as the reference the served
(vLLM) stream is compared with. It knows nothing of any one architecture; it relies on
two facts about transformers' decoder-only models, which hold for every family in
``tests/tiny_models.py`` (Llama, Mistral, Qwen 2/3/3-MoE, Gemma 2/3, Phi-3, GPT-2,
GPT-NeoX, OLMo 2):

1. The decoder layers are one ``nn.ModuleList`` with one entry per hidden layer of the
   text config (``model.layers``, ``transformer.h``, ``gpt_neox.layers``...). It is found
   by shape, not by name: the module list of that length outside any vision/audio tower.
2. A decoder layer is called with the stream as its first argument (``hidden_states``)
   and returns the stream after it: a tensor (transformers 5) or the first element of a
   tuple (older versions, remote code).

Hook point ``L >= 0`` (``layers.L``) is then the output of layer ``L``, taken with a
forward hook. That is transformers' ``output_hidden_states[L + 1]`` for every layer but
the last: for the last, most models put the *final-norm* output into ``hidden_states[-1]``,
whereas ``layers.{n-1}`` is the raw output of the last layer. Hook point ``-1``
(``embeddings``) is the input of layer 0, taken with a forward pre-hook: the embeddings
exactly as the model hands them to its first layer (Gemma's scaled embeddings, GPT-2's
token + position embeddings), i.e. ``hidden_states[0]``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

EMBEDDINGS_LAYER = -1
"""Hook point index of the stream entering layer 0 (``embeddings``)."""

# Module-path parts of non-text towers whose layer lists must not be taken for the
# decoder's (a vision encoder can have as many layers as the language model).
_OTHER_TOWERS = ("vision", "visual", "audio", "image", "encoder", "speech", "mm_projector")

# Decoder layers seen returning a bare tensor: for those the prefix of a spliced run can be
# skipped (see forward_with_stream).
_TENSOR_LAYERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class DecoderLayersNotFound(ValueError):
    """The model has no list of decoder layers that the hook points can be placed on."""


class _StopForward(Exception):
    """Raised by the hook at the deepest requested hook point: the rest is not needed."""


# --------------------------------------------------------------------------- layers


def text_config(model: nn.Module) -> Any:
    """The text (language model) config of ``model``: ``config.get_text_config()``.

    Any: a config is a bag of per-family attributes (``num_hidden_layers``...), untyped
    even in transformers' own ``PreTrainedConfig``.
    """
    # object: nn.Module types unknown attributes as Tensor | Module
    config: object = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_hidden_layers(model: nn.Module) -> int:
    """Number of decoder layers according to the text config."""
    return int(text_config(model).num_hidden_layers)


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream according to the text config."""
    return int(text_config(model).hidden_size)


def find_decoder_layers(model: nn.Module, num_layers: int | None = None) -> tuple[str, nn.ModuleList]:
    """The module path and the ``nn.ModuleList`` of ``model``'s decoder layers.

    The list is the one whose length is ``num_layers`` (default: the text config's
    ``num_hidden_layers``), outside vision/audio towers; if several fit, the one holding
    the most parameters. Raises :class:`DecoderLayersNotFound` if there is none.
    """
    n = num_hidden_layers(model) if num_layers is None else int(num_layers)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != n:
            continue
        parts = name.lower().split(".")
        if any(tower in part for part in parts for tower in _OTHER_TOWERS):
            continue
        candidates.append((name, module))
    if not candidates:
        raise DecoderLayersNotFound(
            f"{type(model).__name__}: no list of {n} decoder layers (nn.ModuleList of "
            f"num_hidden_layers entries) outside vision/audio towers")
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model``'s decoder layers (see :func:`find_decoder_layers`)."""
    return find_decoder_layers(model)[1]


def layer_output_stream(output: Any) -> Tensor:
    """The residual stream in a decoder layer's output: the tensor, or a tuple's first element."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_output_stream(output: Any, stream: Tensor) -> Any:
    if isinstance(output, tuple):
        return (stream, *output[1:])
    if isinstance(output, list):
        return [stream, *output[1:]]
    return stream


def _first_param(layer: nn.Module) -> str:
    try:
        params = [p for p in inspect.signature(layer.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return params[0].name if params else "hidden_states"
    except (TypeError, ValueError):
        return "hidden_states"


def layer_input_stream(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The stream a decoder layer was called with (its first argument, positional or not)."""
    if args:
        return args[0]
    name = _first_param(layer)
    if name in kwargs:
        return kwargs[name]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise DecoderLayersNotFound(f"{type(layer).__name__} was called without a hidden_states argument")


def _with_input_stream(layer: nn.Module, args: tuple, kwargs: dict[str, Any],
                       stream: Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (stream, *args[1:]), kwargs
    name = _first_param(layer)
    key = name if name in kwargs else "hidden_states"
    return args, {**kwargs, key: stream}


def _check_layer(layer: int, n: int) -> None:
    if not -1 <= layer < n:
        raise ValueError(f"hook point index {layer} out of range: the model has {n} decoder "
                         f"layers (valid: -1 = embeddings, 0 .. {n - 1})")


def _observe(module: nn.Module, output: Any) -> None:
    if isinstance(output, Tensor):
        _TENSOR_LAYERS.add(module)


# --------------------------------------------------------------------------- capture


@contextmanager
def capturing_streams(model: nn.Module, layers: Sequence[int], *,
                      stop_after_deepest: bool = False) -> Iterator[dict[int, Tensor]]:
    """While active, every forward of ``model`` records the stream at hook points ``layers``.

    Yields a dict filled by the forward: ``{L: stream}`` (detached, in the model's dtype,
    ``[batch, seq, hidden]``). With ``stop_after_deepest`` the forward is cut short right
    after the deepest requested hook point by an internal exception that this context
    swallows; so put exactly one forward call inside the ``with`` block in that case.
    """
    layer_list = decoder_layers(model)
    n = len(layer_list)
    wanted = sorted(set(int(L) for L in layers))
    if not wanted:
        raise ValueError("no hook points requested")
    for L in wanted:
        _check_layer(L, n)
    deepest = wanted[-1]
    captured: dict[int, Tensor] = {}
    handles = []

    if EMBEDDINGS_LAYER in wanted:
        first = layer_list[0]

        def pre(module, args, kwargs):
            captured[EMBEDDINGS_LAYER] = layer_input_stream(module, args, kwargs).detach()
            if stop_after_deepest and deepest == EMBEDDINGS_LAYER:
                raise _StopForward

        handles.append(first.register_forward_pre_hook(pre, with_kwargs=True))

    def post_for(L: int) -> Callable:
        def post(module, _args, output):
            _observe(module, output)
            if L in wanted:
                captured[L] = layer_output_stream(output).detach()
                if stop_after_deepest and L == deepest:
                    raise _StopForward
        return post

    for L in range(deepest + 1):  # every layer up to the deepest: also learns their output type
        handles.append(layer_list[L].register_forward_hook(post_for(L)))
    try:
        yield captured
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def residual_streams(model: nn.Module, input_ids: Tensor, layers: Sequence[int], *,
                     stop_early: bool = True, **forward_kwargs: Any) -> dict[int, Tensor]:
    """The residual stream of ``model`` at hook points ``layers`` for ``input_ids [batch, seq]``.

    Returns ``{L: float32 [batch, seq, hidden]}``. ``L >= 0`` is the stream after decoder
    layer ``L`` (``hidden_states[L + 1]``, and for the last layer its raw output, before
    the final norm); ``-1`` is the stream entering layer 0 (``hidden_states[0]``). With
    ``stop_early`` the forward stops right after the deepest requested hook point, so
    layer 12 of 30 costs 13/30 of a forward pass. ``forward_kwargs`` go to the model's
    forward (``use_cache`` defaults to False).
    """
    forward_kwargs.setdefault("use_cache", False)
    device = next(model.parameters()).device
    with capturing_streams(model, layers, stop_after_deepest=stop_early) as captured:
        model(input_ids=input_ids.to(device), **forward_kwargs)
    missing = set(int(L) for L in layers) - set(captured)
    if missing:
        raise RuntimeError(f"{type(model).__name__}: the forward pass never reached hook points {sorted(missing)}")
    return {int(L): captured[int(L)].float() for L in layers}


# --------------------------------------------------------------------------- splice


@contextmanager
def replacing_stream(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, the stream at hook point ``layer`` is ``fn(stream)`` in every forward.

    The next layer (or the final norm, after the last layer) sees the replaced stream:
    for ``layer >= 0`` it replaces layer ``layer``'s output, for ``-1`` layer 0's input.
    """
    layer_list = decoder_layers(model)
    _check_layer(layer, len(layer_list))
    if layer == EMBEDDINGS_LAYER:
        def pre(module, args, kwargs):
            stream = layer_input_stream(module, args, kwargs)
            return _with_input_stream(module, args, kwargs, fn(stream))

        handle = layer_list[0].register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module, _args, output):
            return _with_output_stream(output, fn(layer_output_stream(output)))

        handle = layer_list[layer].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _skipping_layers(layer_list: nn.ModuleList, upto: int, stream: Tensor) -> Iterator[None]:
    """Layers ``0..upto-1`` return their input unchanged and layer ``upto`` returns ``stream``."""
    def passthrough(module: nn.Module) -> Callable:
        def forward(*args, **kwargs):
            return layer_input_stream(module, args, kwargs)
        return forward

    def give(*_args, **_kwargs):
        return stream

    with ExitStack() as stack:
        for L in range(upto + 1):
            module = layer_list[L]
            had = "forward" in module.__dict__
            old = module.__dict__.get("forward")
            module.forward = give if L == upto else passthrough(module)

            def restore(module=module, had=had, old=old):
                if had:
                    module.forward = old
                else:
                    del module.forward

            stack.callback(restore)
        yield


@torch.no_grad()
def forward_with_stream(model: nn.Module, input_ids: Tensor, layer: int, stream: Tensor, *,
                        skip_prefix: bool = True, **forward_kwargs: Any) -> Any:
    """The model's forward on ``input_ids`` with the stream at hook point ``layer`` set to ``stream``.

    ``stream`` is ``[batch, seq, hidden]`` (cast to the model's dtype). Returns the model's
    output (``.logits`` for a causal LM: final norm, head and any logit soft-capping are
    the model's own). With ``skip_prefix`` the layers up to ``layer`` are not computed
    (their result is given) when they are known to return a bare tensor, which any
    earlier :func:`capturing_streams` / :func:`residual_streams` call on this model
    establishes; otherwise the whole model runs and layer ``layer``'s output is replaced.
    """
    forward_kwargs.setdefault("use_cache", False)
    layer_list = decoder_layers(model)
    _check_layer(layer, len(layer_list))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stream = stream.to(device=device, dtype=dtype)
    ids = input_ids.to(device)
    if (skip_prefix and layer >= 0
            and all(layer_list[L] in _TENSOR_LAYERS for L in range(layer + 1))):
        with _skipping_layers(layer_list, layer, stream):
            return model(input_ids=ids, **forward_kwargs)
    with replacing_stream(model, layer, lambda _old: stream):
        return model(input_ids=ids, **forward_kwargs)
