"""sae-train's harvest through the vLLM engine (``--harvest vllm``, the default).

Each context runs as a prefill-only request (``max_tokens=1``, prefix-cache reading
skipped) that asks the worker for the raw residual stream at the hook points
(``WorkerSpec.streams``); the rows come back over the engine's feature side channel
(:meth:`sae_runtime.engine.engine.SAEEngine.harvest_streams`). Every context of a
``harvest`` call is in flight at once, so vLLM batches them as it batches any prefill.
The tokens kept are the transformers harvest's (``HarvestSource.training_mask``: not
position 0, not special tokens), in the same order, so the activation cache and its
fingerprint do not depend on the source.

The engine runs on its own asyncio loop in a background thread (sae-train is synchronous;
:class:`sae_runtime.engine.background.EngineThread`) and is started on the first ``harvest``
call, so a run whose activation cache is already complete never starts it. It runs the model
only through the deepest layer asked for (``HarvestEngineConfig.stop_after_layer``): a
harvest at ``layers.12`` of the embedded 30-layer model computes 13 layers, as the
transformers harvest does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..engine.background import EngineThread
from ..model_info import read_model_info
from .activations import HarvestSource

START_TIMEOUT_S = 1800.0
"""Engine start (model load, and compilation when not eager) must finish within this."""
CALL_TIMEOUT_S = 3600.0
"""One ``harvest`` call must finish within this."""


class EngineActivations(HarvestSource):
    """Residual streams at hook points from the vLLM engine (an :class:`SAEEngine` without
    dictionaries, or a running one handed in with its event loop)."""

    def __init__(self, model_path: str | os.PathLike, *, engine: Any = None,
                 loop: asyncio.AbstractEventLoop | None = None, max_model_len: int = 2048,
                 enforce_eager: bool = True, stop_after_hook_point: bool = True):
        from transformers import AutoTokenizer

        self._runner = EngineThread(engine, loop, name="sae-train-engine")  # checks engine and loop first
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        info = read_model_info(self.model_path)
        self.num_layers, self.d_model = info.num_layers, info.hidden_size
        self._token_rules()
        self._max_model_len, self._eager = max_model_len, enforce_eager
        self._truncate = stop_after_hook_point

    # -- engine ---------------------------------------------------------------------------

    def _start(self, layers: Sequence[int]) -> Any:
        if self._runner.engine is not None:
            return self._runner.engine
        from ..engine.engine import HarvestEngineConfig

        # No dictionaries: hook points need none to hand their stream out. Prefix caching
        # off: every request skips reading it anyway. The model stops after the deepest
        # layer asked for (the later calls of a run ask for the same layers).
        config = HarvestEngineConfig(model=self.model_path, max_model_len=self._max_model_len,
                                     enforce_eager=self._eager, enable_prefix_caching=False,
                                     stop_after_layer=max(0, *layers) if self._truncate else None)
        return self._runner.start(config, START_TIMEOUT_S)

    def close(self) -> None:
        """Shut the engine down if it was started here (a handed-in one keeps running)."""
        self._runner.close()

    # -- harvest --------------------------------------------------------------------------

    def residuals(self, contexts: Sequence[Tensor], layers: Sequence[int]) -> list[dict[int, Tensor]]:
        """Per context ``{layer: float32 [T, d]}``: the stream of every token (position 0 too)."""
        engine = self._start(layers)
        ids = [[int(t) for t in c.tolist()] for c in contexts]
        return self._runner.run(engine.harvest_streams(ids, list(layers)), CALL_TIMEOUT_S)

    def harvest(self, contexts: Sequence[Tensor], layers: Sequence[int]) -> dict[int, Tensor]:
        streams = self.residuals(contexts, layers)
        masks = [self.training_mask(c[None].long(), torch.tensor([len(c)]))[0] for c in contexts]
        return {L: torch.cat([s[L][m] for s, m in zip(streams, masks, strict=True)]) for L in layers}
