"""The contract between the engine (API process) and the worker (vLLM worker process).

``sae_runtime/engine/`` and ``sae_runtime/worker/`` never import each other; everything
both sides must agree on lives here, and both import it:

- names: the environment variable that turns the worker plugin on, the custom op names,
  the ``SamplingParams.extra_args`` key, the worker extension class and its RPC names
  (this module);
- the per-request worker spec and the install configuration, typed, with their plain-dict
  encodings (:mod:`sae_runtime.protocol.worker_spec`);
- the frame format of the feature side channel (:mod:`sae_runtime.protocol.feature_frames`).

Changing any of these is changing both ends: the engine writes, the worker reads (and the
other way round for feature frames). ``tests/test_protocol.py`` round-trips each encoding
and ``tests/test_import_rules.py`` enforces the import rule.
"""

from __future__ import annotations

from sae_runtime.protocol.feature_frames import (  # noqa: F401
    Chunk,
    FeatureChunk,
    FeatureFrameError,
    StreamChunk,
    decode_message,
    encode_message,
)
from sae_runtime.protocol.worker_spec import (  # noqa: F401
    DictionaryToLoad,
    EditSpec,
    FeatureSpec,
    InstallConfig,
    VectorSpec,
    WatchSpec,
    WorkerSpec,
    WorkerSpecError,
)

HOOKS_ENV = "SAE_SERVE_HOOKS"
"""Environment variable: ``"1"`` makes the ``sae_serve`` vLLM plugin put the SAE step into
the model's decoder layers. Set by the engine before vLLM starts (worker processes inherit
it); a plain vLLM run in the same environment leaves it unset and is untouched."""

MODEL_OPTIONS_KEY = "sae_serve"
"""Key of the engine's model options in vLLM's ``additional_config`` (the config field vLLM
carries to every process for plugins), read by the ``sae_serve`` plugin when the model is
loaded. Its value: ``{STOP_AFTER_LAYER: int}`` or nothing."""
STOP_AFTER_LAYER = "stop_after_layer"
"""Model option: run the decoder layers only through this one (the deeper ones are removed
once the model is loaded). For engines that only read streams and features (sae-train's and
sae-index's harvests): their logits, hence any generated text, are meaningless."""

OP_NAME = "sae_serve::residual_step"
"""Custom op of the SAE step for layers that hand on ``(hidden_states, residual)``."""
STREAM_OP_NAME = "sae_serve::stream_step"
"""Custom op of the SAE step for layers that hand on the residual stream itself."""
OP_NAMES = (OP_NAME, STREAM_OP_NAME)
"""Both ops; the engine makes them graph split points on CUDA."""

SPEC_KEY = "sae"
"""Key of the encoded :class:`WorkerSpec` in ``SamplingParams.extra_args``."""

WORKER_EXTENSION = "sae_runtime.worker.extension.SAEWorkerExtension"
"""vLLM ``worker_extension_cls``: the class vLLM mixes into its worker (by this name, so
the engine never imports the worker package)."""
INSTALL_RPC = "sae_install"
"""``collective_rpc`` method that installs the SAE runtime; argument: an encoded
:class:`InstallConfig`; returns ``{"layers": int, "dictionaries": [str]}``."""
STATS_RPC = "sae_stats"
"""``collective_rpc`` method returning the worker's SAE state counters (a dict)."""
