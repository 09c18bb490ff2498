"""The SAE step as an opaque custom op, so it survives vLLM's compilation.

Python forward hooks only run in eager mode: under vLLM's compiled mode a hook registered
after load never runs, and one registered before compilation is traced once and frozen.
So the SAE step is a ``torch.library`` custom op, ``sae_serve::residual_step``, placed at
the end of every decoder layer's forward *before* vLLM compiles the model (see
``plugin.py``). Dynamo sees an opaque call with a fake (shape-only) implementation and
keeps it in the graph; the real implementation runs every step and reads the step's plan
from the worker's :class:`~sae_runtime.worker.runtime.SAEWorkerRuntime`, which the model
runner's ``execute_model`` wrapper sets before each forward. Nothing about the batch is a
graph input, so changing batches never recompiles.

The op is functional: it returns the new ``hidden_states`` (a copy when nothing is edited
this step), because custom ops may not return an alias of an input. On GPU it is also a
graph split point (``compilation_config.splitting_ops``), so it runs outside CUDA graphs
and may synchronise with the host.
"""

from __future__ import annotations

from typing import Callable

import torch

OP_NAME = "sae_serve::residual_step"

# Set in the worker by SAEWorkerRuntime.install(); None everywhere else.
_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None


def set_step_function(fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None) -> None:
    global _step
    _step = fn


@torch.library.custom_op(OP_NAME, mutates_args=())
def residual_step(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """``hidden_states`` after the SAE step at hook point ``layers.{layer}``.

    The residual stream there is ``hidden + residual``; edits are added to ``hidden``.
    """
    fn = _step
    if fn is not None:
        out = fn(layer, hidden, residual)
        if out is not None:
            return out
    return hidden.clone()


@residual_step.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)
