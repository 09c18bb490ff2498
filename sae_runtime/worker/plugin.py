"""vLLM general plugin: put the SAE step into the model's decoder layers before compilation.

Registered as the ``vllm.general_plugins`` entry point ``sae_serve`` in pyproject.toml.
vLLM calls :func:`register` in each of its processes at start-up, in the worker before the
model is built. It wraps vLLM's model loader so that, as soon as the served model is
built and loaded and before its first forward (which is when vLLM compiles it), the SAE
step ops are placed at every hook point (:mod:`sae_runtime.worker.decoder_layers`). That
is the only moment a change to the forward can still be traced into the compiled graph.
The loader hook itself is :func:`sae_runtime.vllm_surface.wrap_model_loader`. It only
acts when ``SAE_SERVE_HOOKS=1`` (``protocol.HOOKS_ENV``, set by ``SAEEngine.start``), so a
plain vLLM run in the same environment is untouched. An engine that only harvests can ask,
through vLLM's ``additional_config``, for the layers after its deepest hook point to be
dropped (:func:`sae_runtime.worker.decoder_layers.stop_after_layer`).
"""

from __future__ import annotations

import os
from typing import Any

from sae_runtime.protocol import HOOKS_ENV, MODEL_OPTIONS_KEY, STOP_AFTER_LAYER


def register() -> None:
    if os.environ.get(HOOKS_ENV) != "1":
        return
    from sae_runtime import vllm_surface

    vllm_surface.wrap_model_loader(on_model_loaded)


def on_model_loaded(model: Any, num_layers: int, architecture: str, additional_config: dict[str, Any]) -> None:
    """Hook every decoder layer; with the engine's ``stop_after_layer`` option
    (``protocol.MODEL_OPTIONS_KEY``), then drop the layers after that one."""
    from sae_runtime.worker.decoder_layers import hook_decoder_layers, stop_after_layer

    hook_decoder_layers(model, num_layers, architecture)
    options = additional_config.get(MODEL_OPTIONS_KEY) or {}
    last = options.get(STOP_AFTER_LAYER)
    if last is not None:
        stop_after_layer(model, int(last))
