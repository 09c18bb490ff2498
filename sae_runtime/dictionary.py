"""Sparse dictionaries (sparse autoencoders) as the server loads, runs and saves them.

A dictionary maps a residual-stream vector ``x [d_in]`` to feature activations
``a [d_sae]`` and back:

    a = act((x - b_dec) @ W_enc + b_enc)        (b_dec subtracted if apply_b_dec_to_input)
    x_hat = a @ W_dec + b_dec,   error = x - x_hat

On disk it is a directory in SAELens' layout (``cfg.json`` + ``sae_weights.safetensors``
+ optional ``sparsity.safetensors``), so SAELens loads ours and we load theirs; EleutherAI
sparsify directories (``cfg.json`` + ``sae.safetensors``) are imported as top-k
dictionaries, and Gemma Scope / Llama Scope files through
:mod:`sae_runtime.dictionary_formats` (``hf:`` and ``sae_lens:`` names are resolved to
local files by :mod:`sae_runtime.dictionary_sources`). Everything that would make the
served numbers differ from the file's meaning (input normalisation, decoder-norm
rescaling, TransformerLens' centred writing weights) is folded into the weights at load
time, so the rest of the runtime only ever sees the plain formula above, applied to the
raw residual stream.

Files that cannot be served as they are raise ``DictionaryFormatError`` naming the file
and the problem, so that a bad directory fails at start-up with a readable message rather
than producing wrong features later.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .hook_points import canonical_hook_point, parse_hook_point, saelens_hook_name

Architecture = Literal["standard", "topk", "jumprelu", "gated"]
ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu", "gated")

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
_OWN_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)

# The SAELens release whose cfg.json layout ``save`` writes, recorded as
# ``metadata.sae_lens_version``. SAELens reads a config as its 6.x layout only when that
# version is >= 6.0 (sae_lens/loading/pretrained_sae_loaders.py, handle_config_defaulting);
# without it, handle_pre_6_0_config rebuilds ``metadata`` from top-level keys alone and
# drops what is in ours (hook_name, model_name).
SAELENS_FORMAT_VERSION = "6.54.0"
# Our own spelling of the hook point (``layers.L`` / ``embeddings``), written in ``metadata``
# next to SAELens' ``hook_name`` (``blocks.L.hook_resid_post`` / ``blocks.0.hook_resid_pre``).
HOOK_POINT_KEY = "hook_point"

# Every tensor name a dictionary can hold; the architecture decides which are present.
_TENSOR_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "b_gate", "r_mag", "b_mag")

# normalize_activations values we can serve: "none", and SAELens' constant input scaling
# (folded into the weights at load). The others SAELens 6.x knows are refused, with why:
_NORMALIZATIONS = ("none", "expected_average_only_in")
_REFUSED_NORMALIZATIONS = {
    # SAELens SAE._setup_activation_normalization: x * sqrt(d_in) / ||x|| per token.
    "constant_norm_rescale": "it rescales each token to norm sqrt(d_in) before encoding "
                             "(a per-token factor that cannot be folded into fixed weights)",
    # SAELens SAE._setup_activation_normalization: (x - mean(x)) / (std(x) + eps) per token.
    "layer_norm": "it centres each token and divides it by its own standard deviation "
                  "before encoding (per token, cannot be folded into fixed weights)",
    # SAELens SAETrainer folds the whitening into the weights when training ends and saves
    # "none"; a file that still says covariance_whitening has no statistics to fold.
    "covariance_whitening": "the whitening statistics are not stored with the weights "
                            "(SAELens folds them in at the end of training and saves 'none')",
}

# SAELens' LLM metadata keys (sae_lens.loading.pretrained_sae_loaders.LLM_METADATA_KEYS):
# config overrides with these names go into ``metadata``, everything else to the top level.
_METADATA_KEYS = frozenset({
    "model_name", "hook_name", "model_class_name", "hook_head_index",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
    "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
    "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name",
    "hf_hook_name_out",
})


class DictionaryFormatError(ValueError):
    """A dictionary directory, its config or its tensors cannot be served as they are."""


# --------------------------------------------------------------------------- config


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"torch.bfloat16"``, ``"bf16"``... -> a floating ``torch.dtype``."""
    dtype: object
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        name = str(value).strip().removeprefix("torch.")
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                "float": "float32", "half": "float16"}.get(name, name)
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unsupported dtype {value!r} (use float32, float16 or bfloat16)")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, the spelling SAELens writes in cfg.json."""
    return str(dtype).removeprefix("torch.")


def _merge_metadata(data: dict[str, Any]) -> dict[str, Any]:
    """Bring the SAELens config variants to one shape: model/hook names under ``metadata``.

    SAELens >= 6 writes them in ``metadata`` (a few 6.x releases called it ``meta``);
    older versions kept ``model_name`` and ``hook_name`` (before that ``hook_point``) at
    the top level. Top-level copies are left in place here; ``save`` moves them into
    ``metadata``. Ours since the SAELens 6 layout also carry ``metadata.hook_point``
    (``layers.L``), which stands in for a missing ``hook_name``.
    """
    data = dict(data)
    meta = data.pop("meta", None)
    metadata = data.get("metadata", meta)
    if isinstance(metadata, BaseModel):
        metadata = metadata.model_dump()
    metadata = dict(metadata or {})
    for key, aliases in (("model_name", ("model_name",)),
                         ("hook_name", ("hook_name", "hook_point"))):
        if metadata.get(key) is None:
            for alias in aliases:
                if data.get(alias) is not None:
                    metadata[key] = data[alias]
                    break
    if metadata.get("hook_name") is None and metadata.get(HOOK_POINT_KEY) is not None:
        metadata["hook_name"] = metadata[HOOK_POINT_KEY]
    data["metadata"] = metadata
    return data


class DictionaryMetadata(BaseModel):
    """Where the dictionary was trained: model and hook point (plus anything SAELens adds)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_name: str = "unknown"
    hook_name: str

    @field_validator("model_name", mode="before")
    @classmethod
    def _none_is_unknown(cls, value: Any) -> Any:
        return "unknown" if value is None or value == "" else value

    @field_validator("hook_name")
    @classmethod
    def _residual_stream_only(cls, value: str) -> str:
        parse_hook_point(value)  # raises ValueError with the accepted forms
        return value

    @model_validator(mode="after")
    def _one_hook_point(self) -> DictionaryMetadata:
        ours = (self.model_extra or {}).get(HOOK_POINT_KEY)
        if ours is None:
            return self
        try:
            point = canonical_hook_point(ours)
        except ValueError as exc:
            raise ValueError(f"{HOOK_POINT_KEY}: {exc}") from None
        if point != canonical_hook_point(self.hook_name):
            raise ValueError(
                f"hook_name {self.hook_name!r} ({canonical_hook_point(self.hook_name)}) and "
                f"{HOOK_POINT_KEY} {ours!r} ({point}) name different hook points")
        return self


class DictionaryConfig(BaseModel):
    """The contents of a SAELens ``cfg.json``.

    Only the fields that change the served numbers are typed; everything else SAELens
    writes (training settings, versions...) is kept as extra fields and written back on
    save, so a round trip through this server loses nothing.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    architecture: Architecture
    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    dtype: str = "float32"
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: DictionaryMetadata

    @model_validator(mode="before")
    @classmethod
    def _accept_saelens_variants(cls, data: Any) -> Any:
        return _merge_metadata(data) if isinstance(data, dict) else data

    @field_validator("architecture", mode="before")
    @classmethod
    def _known_architecture(cls, value: Any) -> Any:
        if value not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {value!r}; supported: {', '.join(ARCHITECTURES)} "
                "(a BatchTopK dictionary is served as jumprelu with its learned threshold)"
            )
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        parse_dtype(value)
        return value

    @field_validator("normalize_activations", mode="before")
    @classmethod
    def _foldable_normalization(cls, value: Any) -> Any:
        value = "none" if value is None else value
        if value not in _NORMALIZATIONS:
            why = _REFUSED_NORMALIZATIONS.get(value, "it is not a normalisation SAELens 6.x knows")
            raise ValueError(
                f"normalize_activations={value!r} is not supported: {why}; only 'none' and "
                "'expected_average_only_in' (a constant factor, folded into the weights "
                "at load) can be served"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DictionaryConfig:
        if self.architecture == "topk":
            if self.k is None:
                raise ValueError("architecture 'topk' needs k (active features per token)")
            if not 1 <= self.k <= self.d_sae:
                raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        if self.normalize_activations == "expected_average_only_in":
            factor = self.norm_scaling_factor
            if factor is None or not math.isfinite(factor) or factor <= 0:
                raise ValueError(
                    "normalize_activations='expected_average_only_in' needs a positive "
                    f"norm_scaling_factor in cfg.json or its metadata, got {factor!r}"
                )
        extra = self.model_extra or {}
        # Options that change the numbers in ways we do not implement: refuse rather
        # than serve features that differ from what the dictionary means.
        if extra.get("reshape_activations") not in (None, "none"):
            raise ValueError(f"reshape_activations={extra['reshape_activations']!r} is not "
                             "supported (only residual-stream dictionaries are served)")
        if extra.get("finetuning_scaling_factor"):
            raise ValueError("finetuning_scaling_factor=true is not supported")
        if self.architecture == "gated" and extra.get("normalize_decoder"):
            raise ValueError("gated dictionaries with normalize_decoder=true are not supported")
        return self

    @property
    def norm_scaling_factor(self) -> float | None:
        """SAELens' activation norm scaling factor, from cfg.json or its metadata."""
        for source in (self.model_extra or {}, self.metadata.model_extra or {}):
            value = source.get("norm_scaling_factor")
            if value is not None:
                try:
                    return float(value)
                except (TypeError, ValueError):
                    return math.nan
        return None


def _tensor_shapes(cfg: DictionaryConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a dictionary of this architecture must have."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
    }
    if cfg.architecture == "gated":
        # SAELens' gated SAE has no b_enc: b_gate and b_mag take its place.
        shapes.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    else:
        shapes["b_enc"] = (d_sae,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


def _check_tensors(shapes: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Tensor],
                   where: str, *, finite: bool = True) -> None:
    """Raise DictionaryFormatError for a missing, misshapen or non-finite tensor."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise DictionaryFormatError(f"{where}: missing tensor {name!r}")
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            hint = " (transposed?)" if tuple(tensor.shape) == tuple(shape)[::-1] else ""
            raise DictionaryFormatError(
                f"{where}: tensor {name!r} has the wrong shape: expected {list(shape)}, "
                f"got {list(tensor.shape)}{hint}"
            )
        if not tensor.is_floating_point():
            raise DictionaryFormatError(
                f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype")
        if finite and not bool(torch.isfinite(tensor).all()):
            raise DictionaryFormatError(f"{where}: tensor {name!r} contains NaN or Inf values")


# --------------------------------------------------------------------------- module


class DictionaryOutput(NamedTuple):
    """What a dictionary makes of a batch of residual-stream vectors."""

    feature_acts: Tensor
    """Dense feature activations ``a [..., d_sae]`` (zeros for inactive features)."""

    reconstruction: Tensor
    """``x_hat = a @ W_dec + b_dec [..., d_in]``."""

    error: Tensor
    """``x - x_hat [..., d_in]``: what the dictionary misses; steering edits keep it."""


# Attribute docstrings above are for readers; these make them visible to help() too.
DictionaryOutput.feature_acts.__doc__ = "Dense feature activations a [..., d_sae]."
DictionaryOutput.reconstruction.__doc__ = "x_hat = a @ W_dec + b_dec [..., d_in]."
DictionaryOutput.error.__doc__ = "x - x_hat [..., d_in]: what the dictionary misses."


class SparseDictionary(nn.Module):
    """A sparse autoencoder: encoder, activation and linear decoder.

    Weights are ``nn.Parameter``s so the training code can optimise this same module;
    ``load`` turns their gradients off because serving never needs them. Absent tensors
    (``threshold`` for non-JumpReLU, ``b_enc`` for gated...) are ``None`` attributes.

    Inputs of any float dtype are cast to the dictionary's dtype; they must be on the
    dictionary's device. Leading dimensions are free: ``x [..., d_in]``.
    """

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter | None
    b_dec: nn.Parameter
    threshold: nn.Parameter | None
    b_gate: nn.Parameter | None
    r_mag: nn.Parameter | None
    b_mag: nn.Parameter | None

    def __init__(
        self,
        cfg: DictionaryConfig,
        tensors: Mapping[str, Tensor] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        sparsity: Tensor | None = None,
    ):
        """Build a dictionary from its config and, optionally, its tensors.

        Without ``tensors`` every weight is zero (for training code to initialise).
        ``dtype`` defaults to ``cfg.dtype``.
        """
        super().__init__()
        self.cfg = cfg
        target = parse_dtype(dtype if dtype is not None else cfg.dtype)
        shapes = _tensor_shapes(cfg)
        if tensors is not None:
            _check_tensors(shapes, tensors, "tensors", finite=False)
        for name in _TENSOR_NAMES:
            if name not in shapes:
                self.register_parameter(name, None)
                continue
            value = tensors[name] if tensors is not None else torch.zeros(shapes[name])
            self.register_parameter(
                name, nn.Parameter(value.detach().to(device=device, dtype=target)))
        if sparsity is not None and tuple(sparsity.shape) != (cfg.d_sae,):
            raise DictionaryFormatError(
                f"sparsity: expected shape [{cfg.d_sae}], got {list(sparsity.shape)}")
        # log10 feature density, kept on CPU: it is metadata for clients, not compute.
        self.sparsity = None if sparsity is None else sparsity.detach().float().cpu()
        self.path: Path | None = None
        # What it was loaded from, as given (a directory, an .npz file, hf:..., sae_lens:...);
        # SparseDictionary.load(source) loads the same dictionary again.
        self.source: str | None = None

    # ------------------------------------------------------------ description

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def activation(self) -> str:
        """Activation function name: ``relu`` (standard), ``topk``, ``jumprelu`` or ``gated``."""
        return "relu" if self.cfg.architecture == "standard" else self.cfg.architecture

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int | None:
        """Active features per token for top-k dictionaries, else ``None``."""
        return self.cfg.k if self.cfg.architecture == "topk" else None

    @property
    def model_name(self) -> str:
        return self.cfg.metadata.model_name

    @property
    def hook_name(self) -> str:
        """The hook name as written in cfg.json (maybe SAELens' spelling)."""
        return self.cfg.metadata.hook_name

    @property
    def hook_point(self) -> str:
        """Canonical hook point ``layers.L``."""
        return canonical_hook_point(self.cfg.metadata.hook_name)

    @property
    def layer(self) -> int:
        return parse_hook_point(self.cfg.metadata.hook_name)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, "
                f"hook_point={self.hook_point}, dtype={dtype_name(self.dtype)}")

    # ------------------------------------------------------------ compute

    def _centered(self, x: Tensor) -> Tensor:
        """Encoder input: ``x`` in our dtype, minus ``b_dec`` if the config says so."""
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``(x - b_dec) @ W_enc + b_enc`` ``[..., d_sae]``.

        For gated dictionaries this is the gate pre-activation (``b_gate`` in place of
        ``b_enc``): a feature fires exactly where it is positive.
        """
        if self.cfg.architecture == "gated":
            bias = self._needed(self.b_gate, "b_gate")
        else:
            bias = self._needed(self.b_enc, "b_enc")
        return self._centered(x) @ self.W_enc + bias

    def _needed(self, value: Tensor | None, name: str) -> Tensor:
        """``value``, one of the optional tensors (``b_enc``, ``threshold``, ``b_gate``...).

        The constructor sets every tensor its architecture uses, so ``None`` here means
        code asked an architecture for a tensor it does not have.
        """
        if value is None:
            raise DictionaryFormatError(
                f"{self.architecture} dictionary has no tensor {name!r}")
        return value

    def _activations(self, x: Tensor, ids: Tensor | None,
                     matmul: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Activations of all features (``ids=None``) or of the columns ``ids``; ``matmul``
        computes the full ``xc @ W_enc`` of 2-D ``xc`` its own way wherever it is needed (every
        column, or top-k's); a column subset of another architecture needs only its columns
        (torch). Not for gated dictionaries."""
        xc = self._centered(x)
        arch = self.cfg.architecture
        if matmul is not None and arch == "gated":
            raise ValueError("matmul computes W_enc's pre-activations: a gated dictionary's are not those")

        def times_w_enc(t: Tensor) -> Tensor:
            if matmul is None:
                return t @ self.W_enc
            return matmul(t.reshape(-1, t.shape[-1])).reshape(*t.shape[:-1], self.d_sae)

        def pick(t: Tensor) -> Tensor:
            return t if ids is None else t[..., ids]

        if arch == "topk":
            k = self.cfg.k
            if k is None:  # DictionaryConfig requires k for top-k dictionaries
                raise DictionaryFormatError("topk dictionary without k")
            # Whether a feature survives depends on every other feature's value, so the
            # full pre-activation is needed even for a few columns.
            acts = (times_w_enc(xc) + self._needed(self.b_enc, "b_enc")).relu()
            # Keep values >= the k-th largest. Ties at the k-th value are all kept, so
            # the result never depends on how a sort breaks ties (CPU, CUDA and Triton
            # agree); with continuous values this is exactly top-k. When fewer than k
            # values are positive the k-th is 0 and every positive value is kept.
            kth = acts.topk(k, dim=-1, sorted=True).values[..., -1:]
            acts = pick(acts)
            return torch.where(acts >= kth, acts, torch.zeros_like(acts))

        W_enc = pick(self.W_enc)
        if arch == "gated":
            # SAELens' gated SAE: the gate decides which features fire, a magnitude
            # path sharing W_enc (rescaled per feature by exp(r_mag)) decides how much.
            gate = xc @ W_enc + pick(self._needed(self.b_gate, "b_gate"))
            magnitude = (xc @ (W_enc * pick(self._needed(self.r_mag, "r_mag")).exp())
                         + pick(self._needed(self.b_mag, "b_mag"))).relu()
            return magnitude * (gate > 0)
        pre = (xc @ W_enc if ids is not None else times_w_enc(xc)) + pick(self._needed(self.b_enc, "b_enc"))
        if arch == "jumprelu":
            # relu(pre) where pre > threshold, as SAELens and Gemma Scope compute it;
            # equal to pre * (pre > threshold) whenever the threshold is >= 0.
            return pre.relu() * (pre > pick(self._needed(self.threshold, "threshold")))
        return pre.relu()

    def encode(self, x: Tensor, matmul: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Dense feature activations ``a = act(encode_pre(x))`` ``[..., d_sae]``.

        ``matmul`` (optional, not for gated dictionaries) computes the encoder's ``xin @
        W_enc`` of a 2-D ``xin`` in its stead: the worker's prepacked copy of W_enc, so its
        steering edits, conditions and extraction compute pre-activations with the same GEMM.
        """
        return self._activations(x, None, matmul)

    def feature_activations(self, x: Tensor, feature_ids: Tensor | list[int],
                            matmul: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Activations of the given features only, ``[..., len(feature_ids)]``.

        Equal to ``encode(x)[..., feature_ids]`` but, except for top-k, computes only
        those columns. This is the torch reference the steering kernels are checked
        against. ``matmul`` as in :meth:`encode`: used by top-k, whose columns need the
        full pre-activation.
        """
        ids = torch.as_tensor(feature_ids, dtype=torch.long, device=self.W_enc.device)
        return self._activations(x, ids, matmul)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction ``a @ W_dec + b_dec`` ``[..., d_in]``."""
        return feature_acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> DictionaryOutput:
        acts = self.encode(x)
        reconstruction = self.decode(acts)
        return DictionaryOutput(acts, reconstruction, x.to(reconstruction.dtype) - reconstruction)

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """``x - x_hat`` ``[..., d_in]``: the part of ``x`` the dictionary does not explain."""
        return self.forward(x).error

    def fvu(self, x: Tensor) -> Tensor:
        """Fraction of variance unexplained over the batch (float32 scalar).

        ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` with the mean over all tokens.
        """
        error = self.reconstruction_error(x).float().reshape(-1, self.d_in)
        flat = x.to(self.dtype).float().reshape(-1, self.d_in)
        return error.pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()

    # ------------------------------------------------------------ saving

    def save(self, path: str | Path, *, extra_files: Mapping[str, Any] | None = None,
             storage_dtype: str | torch.dtype | None = None) -> Path:
        """Write the dictionary as a SAELens directory and return its path.

        ``storage_dtype`` stores the weights in another dtype than the one the dictionary
        computes in (``cfg.json``'s ``dtype``, which a loader casts them to): float16 halves
        the file of a float32 dictionary that is still served in float32.

        ``cfg.json`` is in SAELens 6's layout (see :func:`saelens_config_dict`), so
        ``SAE.load_from_disk`` reads every field, hook point included.
        Writes ``cfg.json``, ``sae_weights.safetensors`` and ``sparsity.safetensors``
        (removed if this dictionary has no sparsity, so a stale one cannot describe
        other weights). Other files in the directory (metrics, labels) are left alone
        unless named in ``extra_files``: ``{filename: dict|list (JSON) | str | bytes}``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # the tensors' dtype, even after .to()
        data = saelens_config_dict(self.cfg, dtype_name(self.dtype))
        stored = parse_dtype(storage_dtype) if storage_dtype is not None else None
        tensors = {name: param.detach().cpu().to(stored or param.dtype).contiguous()
                   for name, param in self.named_parameters()}
        _write_atomic(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        if self.sparsity is not None:
            sparsity = {"sparsity": self.sparsity.contiguous()}
            _write_atomic(path / SPARSITY_FILE, lambda tmp: save_file(sparsity, tmp))
        elif (path / SPARSITY_FILE).exists():
            (path / SPARSITY_FILE).unlink()
        # cfg.json last: a reader that sees the new config also sees the new weights.
        _write_text(path / CFG_FILE, json.dumps(data, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            if Path(name).name != name or name in _OWN_FILES:
                raise ValueError(f"extra file name {name!r} must be a plain file name "
                                 f"other than {', '.join(_OWN_FILES)}")
            if isinstance(content, (dict, list)):
                content = json.dumps(content, indent=2) + "\n"
            _write_text(path / name, content)
        return path

    # ------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        expected_d_in: int | None = None,
        expected_hook_point: str | None = None,
        *,
        hook_name: str | None = None,
        model_name: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> SparseDictionary:
        """Load a dictionary from a local directory or file, or from a source string.

        Local layouts (the files present decide): a SAELens directory (``cfg.json`` +
        ``sae_weights.safetensors``), an EleutherAI sparsify directory (``cfg.json`` +
        ``sae.safetensors``), a Gemma Scope folder holding ``params.npz`` (or the ``.npz``
        file itself), a Gemma Scope 2 folder holding ``params.safetensors``, and Llama
        Scope folders (see :mod:`sae_runtime.dictionary_formats`). A string
        ``hf:ORG/REPO[@REV][/SUBPATH]`` or ``sae_lens:RELEASE/SAE_ID`` is resolved from the
        local Hugging Face cache by :mod:`sae_runtime.dictionary_sources` (never downloaded).

        ``dtype`` defaults to the config's (SAELens) or the file's (sparsify).
        ``expected_d_in`` is the model's hidden size and ``expected_hook_point`` the hook
        point the caller wants; a mismatch is refused. ``hook_name``/``model_name`` fill
        in what the files do not say (for sparsify a folder named after the hook point, and
        for Gemma Scope the repository in the path, take precedence over ``model_name``).
        ``overrides`` replace config values the way SAELens' ``cfg_overrides`` do (its
        metadata keys such as ``model_name``, ``hook_name``, ``neuronpedia_id`` go into
        ``metadata``); ``extra_metadata`` is recorded in ``metadata`` (provenance).
        Raises ``DictionaryFormatError`` for anything that cannot be served.
        """
        from . import dictionary_sources

        if isinstance(path, str) and dictionary_sources.is_source_spec(path):
            return dictionary_sources.load_dictionary(
                path, device=device, dtype=dtype, expected_d_in=expected_d_in,
                expected_hook_point=expected_hook_point, hook_name=hook_name,
                model_name=model_name)

        path = Path(path)
        data, tensors, cfg_where, weights_where = _read_files(path, hook_name, model_name)
        data = _apply_overrides(data, overrides, extra_metadata)
        cfg = _parse_config(data, cfg_where)
        _check_tensors(_tensor_shapes(cfg), tensors, str(weights_where))

        if expected_d_in is not None and cfg.d_in != expected_d_in:
            raise DictionaryFormatError(
                f"{cfg_where}: d_in={cfg.d_in} does not match the model's hidden size "
                f"{expected_d_in} at {canonical_hook_point(cfg.metadata.hook_name)}")
        if expected_hook_point is not None:
            want = canonical_hook_point(expected_hook_point)
            got = canonical_hook_point(cfg.metadata.hook_name)
            if want != got:
                raise DictionaryFormatError(
                    f"{cfg_where}: hook point {got} does not match the expected {want}")

        cfg, tensors = _fold_into_weights(cfg, tensors)
        sparsity = _read_sparsity(path / SPARSITY_FILE, cfg.d_sae) if path.is_dir() else None
        dictionary = cls(cfg, tensors, device=device, dtype=dtype, sparsity=sparsity)
        dictionary.requires_grad_(False)
        dictionary.path = path
        dictionary.source = str(path)
        return dictionary


# --------------------------------------------------------------------------- cfg.json


def saelens_config_dict(cfg: DictionaryConfig, dtype: str | None = None) -> dict[str, Any]:
    """The ``cfg.json`` contents ``save`` writes: SAELens 6's layout.

    What SAELens 6.x does with a cfg.json (``SAE.load_from_disk`` in sae_lens/saes/sae.py):
    ``handle_config_defaulting`` (sae_lens/loading/pretrained_sae_loaders.py) treats it as
    6.x only if ``metadata.sae_lens_version`` (or a top-level one) is >= 6.0, else
    ``handle_pre_6_0_config`` rebuilds ``metadata`` from top-level keys and drops ours;
    ``SAEConfig.from_dict`` keeps the top-level keys that are fields of the architecture's
    config class (``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
    ``normalize_activations``, ``reshape_activations``; ``k`` and
    ``rescale_acts_by_decoder_norm`` for ``topk``, whose ``k`` would default to 100),
    picks the class by ``architecture`` and builds ``SAEMetadata`` from ``metadata`` as it
    is. So: the config fields at the top level, ``model_name`` / ``hook_name`` (in
    TransformerLens' ``blocks.L.hook_resid_post`` form) / ``sae_lens_version`` and the
    other SAELens metadata keys in ``metadata``, with our ``layers.L`` form beside them in
    ``metadata.hook_point``. Everything else we keep (training provenance...) stays where
    it was; SAELens ignores it. ``dtype`` replaces ``cfg.dtype`` (the tensors' dtype).
    """
    data = cfg.model_dump(mode="json")
    metadata = data.pop("metadata")
    # Layouts before SAELens 6 (and this server's, before it wrote SAELens 6's) keep
    # SAELens' metadata keys at the top level, where SAELens 6 no longer looks for them.
    for key in sorted(_METADATA_KEYS & data.keys()):
        value = data.pop(key)
        if metadata.get(key) is None:
            metadata[key] = value
    data.pop("hook_point", None)  # SAELens < 5's hook_name, already merged into metadata
    hook_point = canonical_hook_point(metadata.pop("hook_name"))
    head: dict[str, Any] = {
        "architecture": data.pop("architecture"),
        "d_in": data.pop("d_in"),
        "d_sae": data.pop("d_sae"),
        "dtype": dtype if dtype is not None else data["dtype"],
    }
    data.pop("dtype")
    k = data.pop("k", None)
    if head["architecture"] == "topk":
        head["k"] = k
        head["rescale_acts_by_decoder_norm"] = bool(
            data.pop("rescale_acts_by_decoder_norm", False))
    elif k is not None:
        data["k"] = k
    head["apply_b_dec_to_input"] = data.pop("apply_b_dec_to_input")
    head["normalize_activations"] = data.pop("normalize_activations")
    head["reshape_activations"] = data.pop("reshape_activations", None) or "none"
    for key in ("sae_lens_version", HOOK_POINT_KEY):
        metadata.pop(key, None)
    meta_head = {
        "model_name": metadata.pop("model_name"),
        "hook_name": saelens_hook_name(hook_point),
        HOOK_POINT_KEY: hook_point,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
    }
    return {**head, **data, "metadata": {**meta_head, **metadata}}


# --------------------------------------------------------------------------- file helpers


def _write_atomic(target: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(str(tmp))
    os.chmod(tmp, 0o644)  # safetensors writes 0600: a server running as another user could not read it
    os.replace(tmp, target)


def _write_text(target: Path, content: str | bytes) -> None:
    mode = "wb" if isinstance(content, bytes) else "w"

    def write(tmp: str) -> None:
        with open(tmp, mode) as f:
            f.write(content)

    _write_atomic(target, write)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DictionaryFormatError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DictionaryFormatError(f"{path}: invalid JSON: expected an object at the top")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise DictionaryFormatError(f"{path}: cannot read safetensors file: {exc}") from None


def _parse_config(data: dict[str, Any], where: Path) -> DictionaryConfig:
    """Validate a config dict, turning pydantic's errors into one readable line."""
    try:
        return DictionaryConfig.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            message = "missing" if err["type"] == "missing" else message
            # most of our own messages already name their field
            problems.append(message if not field or message.startswith(field.split(".")[-1])
                            else f"{field}: {message}")
        raise DictionaryFormatError(f"{where}: {'; '.join(problems)}") from None


def _fill_names(data: dict[str, Any], hook_name: str | None,
                model_name: str | None) -> dict[str, Any]:
    """Use the caller's hook/model names where the config has none."""
    data = _merge_metadata(data)
    if hook_name is not None and data["metadata"].get("hook_name") is None:
        data["metadata"]["hook_name"] = hook_name
    if model_name is not None and data["metadata"].get("model_name") in (None, "", "unknown"):
        data["metadata"]["model_name"] = model_name
    return data


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None,
                     extra_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Config overrides (SAELens' cfg_overrides; its metadata keys go into metadata) and
    provenance metadata, over a config dict already brought to one shape."""
    if not overrides and not extra_metadata:
        return data
    data = _merge_metadata(data)
    metadata = data["metadata"]
    for key, value in (overrides or {}).items():
        if key in _METADATA_KEYS:
            metadata[key] = value
            if key == "hook_name":  # an overridden hook name replaces ours too
                metadata.pop(HOOK_POINT_KEY, None)
        else:
            data[key] = value
    metadata.update(extra_metadata or {})
    return data


# What a reader returns: config dict (not validated yet), tensors in our names, the file
# to name in config errors and the file to name in tensor errors.
_Read = tuple[dict[str, Any], dict[str, Tensor], Path, Path]


def _read_files(path: Path, hook_name: str | None, model_name: str | None) -> _Read:
    """Read whichever known layout ``path`` is in."""
    from . import dictionary_formats as formats

    if path.is_file():
        if path.suffix == ".npz":
            return formats.read_gemma_scope(path, hook_name, model_name)
        raise DictionaryFormatError(
            f"{path}: not a dictionary: expected a directory (SAELens, sparsify, Gemma Scope, "
            "Llama Scope) or a Gemma Scope .npz file")
    if not path.is_dir():
        raise DictionaryFormatError(f"{path}: dictionary directory does not exist")
    cfg_path = path / CFG_FILE
    if cfg_path.is_file():
        raw = _read_json(cfg_path)
        if (path / WEIGHTS_FILE).is_file():
            return _read_saelens(path, raw, hook_name, model_name)
        if (path / SPARSIFY_WEIGHTS_FILE).is_file():
            return _read_sparsify(path, raw, hook_name, model_name)
        raise DictionaryFormatError(
            f"{path}: missing weights file: expected {WEIGHTS_FILE} (SAELens) "
            f"or {SPARSIFY_WEIGHTS_FILE} (EleutherAI sparsify)")
    reader = formats.reader_for(path)
    if reader is None:
        raise DictionaryFormatError(
            f"{path}: missing {CFG_FILE}: not a SAELens or sparsify directory, and no "
            f"{formats.describe_other_layouts(path)}")
    return reader(path, hook_name, model_name)


def _read_saelens(path: Path, raw: dict[str, Any], hook_name: str | None,
                  model_name: str | None) -> _Read:
    tensors = _read_safetensors(path / WEIGHTS_FILE)
    return _fill_names(raw, hook_name, model_name), tensors, path / CFG_FILE, path / WEIGHTS_FILE


def _read_sparsify(path: Path, raw: dict[str, Any], hook_name: str | None,
                   model_name: str | None) -> _Read:
    """Import an EleutherAI sparsify directory as a top-k dictionary.

    sparsify stores the encoder as an ``nn.Linear`` (``encoder.weight [d_sae, d_in]``),
    subtracts ``b_dec`` before encoding and keeps the top k of ReLU'd pre-activations,
    which is our top-k formula with ``W_enc = encoder.weight.T``.
    """
    cfg_path, weights_path = path / CFG_FILE, path / SPARSIFY_WEIGHTS_FILE
    for flag, why in (("transcode", "a transcoder predicts another module's output"),
                      ("skip_connection", "its skip connection has no SAELens equivalent"),
                      ("embed_skip", "its embedding skip has no SAELens equivalent"),
                      ("gram_lookup", "its n-gram lookup has no SAELens equivalent")):
        if raw.get(flag):
            raise DictionaryFormatError(f"{cfg_path}: {flag}=true is not supported ({why})")
    if raw.get("activation", "topk") != "topk":
        raise DictionaryFormatError(
            f"{cfg_path}: activation={raw['activation']!r} is not supported (only topk)")
    if raw.get("k") is None:
        raise DictionaryFormatError(f"{cfg_path}: missing k (active features per token)")

    tensors = _read_safetensors(weights_path)
    if "W_skip" in tensors:
        raise DictionaryFormatError(f"{weights_path}: W_skip (skip connection) is not supported")
    encoder = tensors.get("encoder.weight")
    if encoder is None:
        raise DictionaryFormatError(f"{weights_path}: missing tensor 'encoder.weight'")
    if encoder.ndim != 2:
        raise DictionaryFormatError(f"{weights_path}: tensor 'encoder.weight' has the wrong "
                                    f"shape: expected [d_sae, d_in], got {list(encoder.shape)}")
    d_sae, d_in = encoder.shape
    # d_in is in cfg.json only for newer sparsify; num_latents=0 means expansion_factor.
    d_in = int(raw.get("d_in") or d_in)
    d_sae = int(raw.get("num_latents") or d_in * int(raw.get("expansion_factor") or 0) or d_sae)
    _check_tensors({"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                    "W_dec": (d_sae, d_in), "b_dec": (d_in,)}, tensors, str(weights_path))

    folder = path.resolve().name
    try:
        parse_hook_point(folder)
        hook = folder
    except ValueError:
        if hook_name is None:
            raise DictionaryFormatError(
                f"{path}: cannot tell the hook point of this sparsify dictionary: folder "
                f"name {folder!r} is not a hook point; pass hook_name") from None
        hook = hook_name

    data = {
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": raw["k"],
        "dtype": dtype_name(encoder.dtype), "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"model_name": model_name or "unknown", "hook_name": hook,
                     "source_format": "sparsify", "sparsify_cfg": raw},
    }
    mapped = {"W_enc": encoder.T.contiguous(), "b_enc": tensors["encoder.bias"],
              "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return data, mapped, cfg_path, weights_path


def _read_sparsity(path: Path, d_sae: int) -> Tensor | None:
    if not path.is_file():
        return None
    tensors = _read_safetensors(path)
    # log10 density is -inf for dead features, so no finiteness check here.
    _check_tensors({"sparsity": (d_sae,)}, tensors, str(path), finite=False)
    return tensors["sparsity"]


def _fold_into_weights(cfg: DictionaryConfig, tensors: dict[str, Tensor]
                       ) -> tuple[DictionaryConfig, dict[str, Tensor]]:
    """Fold SAELens' input/decoder scalings into the weights (in float32).

    Afterwards the dictionary computes the plain formula on the raw residual stream and
    its config says so, so saving it again writes an equivalent plain dictionary.
    """
    data = cfg.model_dump()
    extra = cfg.model_extra or {}
    t = dict(tensors)
    folded = False

    # model_from_pretrained_kwargs: in metadata since SAELens 6, at the top level before.
    where = next((d for d in (data["metadata"], data)
                  if isinstance(d.get("model_from_pretrained_kwargs"), dict)), None)
    if where is not None and where["model_from_pretrained_kwargs"].get("center_writing_weights"):
        # Trained on a TransformerLens model loaded with center_writing_weights=True
        # (HookedTransformer.center_writing_weights: every write to the residual stream is
        # made mean-free), so the dictionary saw x - mean(x) (mean over d_in) of the raw
        # stream this server hooks. That is the linear map P = I - 11^T/d_in, which folds
        # into the encoder: (xP - b_dec) W_enc = (x - b_dec)(P W_enc) - mean(b_dec) 1^T W_enc.
        # TransformerLens only honours the flag for LayerNorm models (GPT-2 and the like),
        # whose LayerNorm removes the mean again, so decoding needs no change.
        W = t["W_enc"].float()
        if cfg.apply_b_dec_to_input:
            shift = t["b_dec"].float().mean() * W.sum(0)
            if cfg.architecture == "gated":
                t["b_gate"] = t["b_gate"].float() - shift
                t["b_mag"] = t["b_mag"].float() - shift * t["r_mag"].float().exp()
            else:
                t["b_enc"] = t["b_enc"].float() - shift
        t["W_enc"] = W - W.mean(0, keepdim=True)
        where["model_from_pretrained_kwargs"] = dict(
            where["model_from_pretrained_kwargs"], center_writing_weights=False)
        data["metadata"]["folded_center_writing_weights"] = True
        folded = True

    if cfg.architecture == "topk" and extra.get("rescale_acts_by_decoder_norm"):
        # SAELens top-k: pre-activations are multiplied by ||W_dec[i]|| and activations
        # divided by it before decoding. Scaling W_enc's columns and b_enc by the norm
        # and normalising W_dec's rows gives the same top-k choice and reconstruction.
        W_dec = t["W_dec"].float()
        norm = W_dec.norm(dim=-1).clamp(min=1e-8)
        t["W_enc"] = t["W_enc"].float() * norm
        t["b_enc"] = t["b_enc"].float() * norm
        t["W_dec"] = W_dec / norm[:, None]
        data["rescale_acts_by_decoder_norm"] = False
        folded = True

    if cfg.normalize_activations == "expected_average_only_in":
        # Trained on x * s. Encoding x * s with (W_enc, b_dec) equals encoding x with
        # (s * W_enc, b_dec / s); thresholds and encoder biases see the same
        # pre-activations. The reconstruction of x * s, divided by s, uses W_dec / s
        # and b_dec / s.
        s = cfg.norm_scaling_factor
        if s is None:  # DictionaryConfig's validator requires it for this normalization
            raise DictionaryFormatError(
                "normalize_activations='expected_average_only_in' without norm_scaling_factor")
        t["W_enc"] = t["W_enc"].float() * s
        t["W_dec"] = t["W_dec"].float() / s
        t["b_dec"] = t["b_dec"].float() / s
        data["normalize_activations"] = "none"
        data.pop("norm_scaling_factor", None)
        data["metadata"].pop("norm_scaling_factor", None)
        data["metadata"]["folded_norm_scaling_factor"] = s
        folded = True

    return (DictionaryConfig.model_validate(data), t) if folded else (cfg, tensors)
