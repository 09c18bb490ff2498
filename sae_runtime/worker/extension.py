"""The vLLM worker extension that carries the SAE runtime into the worker process.

vLLM's documented ``worker_extension_cls`` mechanism mixes this class into the worker
class, and ``collective_rpc("sae_install", ...)`` then runs :meth:`sae_install` in every
worker. We chose it over a general plugin (which would run in every vLLM process,
including the API process, and need an entry point) and over a custom worker class (which
would tie us to one device's worker implementation): an extension works with the CPU and
GPU workers alike, and its methods are called by name, so no code or pickle ever travels
(``VLLM_ALLOW_INSECURE_SERIALIZATION`` stays off).
"""

from __future__ import annotations

from typing import Any

import torch


class SAEWorkerExtension:
    """Methods added to vLLM's worker. Names start with ``sae_`` to avoid collisions."""

    def sae_install(self, config: dict[str, Any]) -> dict[str, Any]:
        """Load the dictionaries once and install the hooks (``protocol.INSTALL_RPC``).

        ``config``: an encoded :class:`~sae_runtime.protocol.InstallConfig`; paths were
        checked by the API process.
        """
        from sae_runtime import vllm_surface
        from sae_runtime.dictionary import SparseDictionary
        from sae_runtime.protocol import InstallConfig
        from sae_runtime.worker.feature_sender import FeatureSender
        from sae_runtime.worker.runtime import SAEWorkerRuntime

        install = InstallConfig.decode(config)

        existing = getattr(self, "_sae_runtime", None)
        if existing is not None:
            existing.uninstall()
        runner = vllm_surface.worker_model_runner(self)
        model = vllm_surface.runner_model(runner)
        device = next(model.parameters()).device
        hidden = vllm_surface.runner_hidden_size(runner)
        dtype = install.dtype
        dictionaries = {}
        for entry in install.dictionaries:
            d = SparseDictionary.load(entry.path, device=device, expected_d_in=hidden,
                                      dtype=getattr(torch, dtype) if dtype else None)
            d.requires_grad_(False)
            d.eval()
            dictionaries[entry.id] = d
        address = install.feature_address
        sender = FeatureSender(address) if address else None
        runtime = SAEWorkerRuntime(runner, dictionaries, sender)
        runtime.install()
        self._sae_runtime = runtime
        return {"layers": len(runtime.layers), "dictionaries": sorted(dictionaries)}

    def sae_stats(self) -> dict[str, Any]:
        """Counters of the worker-side state (``protocol.STATS_RPC``; used by tests and ``/health``)."""
        runtime = getattr(self, "_sae_runtime", None)
        return runtime.stats() if runtime is not None else {"installed": False}
