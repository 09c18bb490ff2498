"""vLLM general plugin: put the SAE step into the model's decoder layers before compilation.

Registered as the ``vllm.general_plugins`` entry point ``sae_serve`` in pyproject.toml.
vLLM calls :func:`register` in each of its processes at start-up, in the worker before the
model is built. It wraps vLLM's model loader so that, as soon as the served model is
built and loaded and before its first forward (which is when vLLM compiles it), the SAE
step ops are placed at every hook point (:mod:`sae_runtime.worker.decoder_layers`). That
is the only moment a change to the forward can still be traced into the compiled graph.
It only acts when ``SAE_SERVE_HOOKS=1`` (set by ``SAEEngine.start``), so a plain vLLM run
in the same environment is untouched.
"""

from __future__ import annotations

import functools
import os

HOOKS_ENV = "SAE_SERVE_HOOKS"


def register() -> None:
    if os.environ.get(HOOKS_ENV) != "1":
        return
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if BaseModelLoader.__dict__.get("_sae_patched", False):
        return
    from sae_runtime.worker.decoder_layers import hook_decoder_layers

    orig_load = BaseModelLoader.load_model

    @functools.wraps(orig_load)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = orig_load(self, vllm_config, model_config, *args, **kwargs)
        # Only the served model; a speculative decoder's draft model is left alone.
        if model_config is vllm_config.model_config:
            architectures = getattr(model_config, "architectures", None) or [type(model).__name__]
            hook_decoder_layers(model, model_config.get_total_num_hidden_layers(), architectures[0])
        return model

    BaseModelLoader.load_model = load_model
    BaseModelLoader._sae_patched = True
