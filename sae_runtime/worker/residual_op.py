"""The SAE step as opaque custom ops, so it survives vLLM's compilation.

Python forward hooks only run in eager mode: under vLLM's compiled mode a hook registered
after load never runs, and one registered before compilation is traced once and frozen.
So the SAE step is a ``torch.library`` custom op, placed at every hook point of the model
*before* vLLM compiles it (see ``plugin.py`` and ``decoder_layers.py``). Dynamo sees an
opaque call with a fake (shape-only) implementation and keeps it in the graph; the real
implementation runs every step and reads the step's plan from the worker's
:class:`~sae_runtime.worker.runtime.SAEWorkerRuntime`, which the model runner's
``execute_model`` wrapper sets before each forward. Nothing about the batch is a graph
input, so changing batches never recompiles.

Decoder layers hand the residual stream on in one of two shapes, hence two ops:

- ``sae_serve::residual_step(hidden, residual, layer)``: layers that return a
  ``(hidden_states, residual)`` pair whose sum is the stream (Llama, Qwen, Gemma, Phi-3,
  ... in vLLM); the op returns the new ``hidden_states``.
- ``sae_serve::stream_step(stream, layer)``: layers that return the stream itself (GPT-2,
  and every model vLLM serves through its Transformers backend, e.g. GPT-NeoX, OLMo 2);
  the op returns the new stream.

``layer`` is the hook point's index: ``L >= 0`` is the stream after decoder layer ``L``,
``-1`` the stream entering layer 0 (the embeddings, scaled where the model scales them).

The ops are functional: they return a new tensor (a copy when nothing is edited this
step), because custom ops may not return an alias of an input. On GPU they are graph split
points (``compilation_config.splitting_ops``), so they run outside CUDA graphs and may
synchronise with the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sae_runtime.protocol import OP_NAME, OP_NAMES, STREAM_OP_NAME  # noqa: F401  (names shared with the engine)

StepFunction = Callable[[int, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]
"""``fn(layer, hidden, residual_or_None)``: the new ``hidden`` (the stream when residual is
None), or None when this step leaves the hook point untouched."""

# Set in the worker by SAEWorkerRuntime.install(); None everywhere else.
_step: StepFunction | None = None


def set_step_function(fn: StepFunction | None) -> None:
    global _step
    _step = fn


# Defined with ``torch.library.Library`` rather than the ``torch.library.custom_op`` decorator:
# same schema and the same behaviour under compilation (an opaque op with a fake), but the
# decorator's Python wrapper costs ~7 µs per call on this CPU, more than the op's own work
# when idle (31 calls per step with the default model; benchmarks/README.md).
_LIB = torch.library.Library(OP_NAME.split("::")[0], "DEF")
_LIB.define(f"{OP_NAME.split('::')[1]}(Tensor hidden, Tensor residual, int layer) -> Tensor")
_LIB.define(f"{STREAM_OP_NAME.split('::')[1]}(Tensor stream, int layer) -> Tensor")


def residual_step(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """``hidden_states`` after the SAE step at hook point ``layer``.

    The residual stream there is ``hidden + residual``; edits are added to ``hidden``.
    """
    fn = _step
    if fn is not None:
        out = fn(layer, hidden, residual)
        if out is not None:
            return out
    return hidden.clone()


def stream_step(stream: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after the SAE step at hook point ``layer``."""
    fn = _step
    if fn is not None:
        out = fn(layer, stream, None)
        if out is not None:
            return out
    return stream.clone()


# One kernel for every device (CPU, CUDA): the step itself dispatches on its tensors' device.
_LIB.impl(OP_NAME.split("::")[1], residual_step, "CompositeExplicitAutograd")
_LIB.impl(STREAM_OP_NAME.split("::")[1], stream_step, "CompositeExplicitAutograd")


@torch.library.register_fake(OP_NAME)
def _(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


@torch.library.register_fake(STREAM_OP_NAME)
def _(stream: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(stream)
