"""Dictionary layouts other than SAELens and sparsify directories.

Each reader turns one published layout into what :meth:`SparseDictionary.load
<sae_runtime.dictionary.SparseDictionary.load>` works with: a SAELens-style config dict
(not validated yet), the tensors under our names, and the files to name in error
messages. The numbers follow SAELens 6.x's own converters
(``sae_lens/loading/pretrained_sae_loaders.py``), so a dictionary loaded here computes what
``SAE.from_pretrained(...).encode`` computes:

- **Gemma Scope** (``google/gemma-scope-{2b,9b,27b}-{pt,it}-res``; SAELens ``gemma_2``):
  a folder ``layer_L/width_W/average_l0_N/`` holding ``params.npz`` with ``W_enc [d_in,
  d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``. JumpReLU, b_dec
  not subtracted from the input (``apply_b_dec_to_input=false``), no normalisation. The
  hook point is the residual stream after layer ``L`` (``blocks.L.hook_resid_post``); the
  model comes from the repository name when the path shows it (a Hugging Face cache
  ``models--google--gemma-scope-2b-pt-res`` folder, or a folder named after the repo).
  MLP, attention, transcoder and embedding releases are refused.
- **Gemma Scope 2** (``google/gemma-scope-2-*``; SAELens ``gemma_3``): a folder
  ``resid_post/layer_L_width_W_l0_X/`` holding ``params.safetensors`` (lower-case
  ``w_enc``/``w_dec``) and maybe ``config.json``. Same formula as Gemma Scope.
- **Llama Scope** (``fnlp/Llama3_1-8B-Base-L*``; SAELens ``llama_scope``): a folder
  holding ``hyperparams.json`` and ``checkpoints/final.safetensors`` (``encoder.weight
  [d_sae, d_in]``, ``decoder.weight [d_in, d_sae]``). Trained on inputs scaled by
  ``s = sqrt(d_model) / dataset_average_activation_norm.in``; SAELens sets every
  threshold to ``jump_relu_threshold * s`` and folds ``s`` into the weights
  (``normalize_activations="expected_average_only_in"``), which is what happens here.
  A ``norm_scaling_factor`` override (the release's value in SAELens' directory) replaces
  ``s`` for the fold, as in ``SAE.from_pretrained``.
- **Llama Scope R1 Distill** (``fnlp/Llama-Scope-R1-Distill``; SAELens
  ``llama_scope_r1_distill``): ``config.json`` + ``sae_weights.safetensors`` with
  ``log_jumprelu_threshold``; its ``norm_scaling_factor`` exists only in SAELens'
  directory, so load it as ``sae_lens:llama_scope_r1_distill/<id>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, SupportsFloat, SupportsIndex

import torch
from torch import Tensor

from .dictionary import (
    DictionaryFormatError,
    _check_tensors,
    _read_json,
    _read_safetensors,
)

GEMMA_SCOPE_FILE = "params.npz"
GEMMA_SCOPE_2_FILE = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
LLAMA_SCOPE_CONFIG = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
LLAMA_SCOPE_R1_CONFIG = "config.json"
LLAMA_SCOPE_R1_WEIGHTS = "sae_weights.safetensors"

# (config dict, tensors, file for config errors, file for tensor errors)
Read = tuple[dict[str, Any], dict[str, Tensor], Path, Path]
Reader = Callable[[Path, "str | None", "str | None"], Read]

_GEMMA_SCOPE_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
# google/gemma-scope-2b-pt-res, gemma-scope-9b-it-res, gemma-scope-2b-pt-transcoders...
_GEMMA_SCOPE_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-([a-z]+)")
_LAYER_FOLDER = re.compile(r"layer_(\d+)")
# Words in a folder name that mark a dictionary as reading something else than the
# residual stream (split on - _ . so that e.g. "matt" does not count as "att").
_NOT_RESIDUAL = {"mlp": "MLP output", "att": "attention output", "attn": "attention output",
                 "transcoder": "transcoder", "transcoders": "transcoder",
                 "embedding": "embedding (hook_embed)", "clt": "cross-layer transcoder"}


def reader_for(path: Path) -> Reader | None:
    """The reader for a directory without ``cfg.json``, or None if no layout fits."""
    if (path / GEMMA_SCOPE_FILE).is_file():
        return read_gemma_scope
    if (path / GEMMA_SCOPE_2_FILE).is_file():
        return read_gemma_scope_2
    if (path / LLAMA_SCOPE_CONFIG).is_file():
        return read_llama_scope
    if (path / LLAMA_SCOPE_R1_CONFIG).is_file() and (path / LLAMA_SCOPE_R1_WEIGHTS).is_file():
        return read_llama_scope_r1
    return None


def describe_other_layouts(path: Path | None = None) -> str:
    """The files the other layouts need, for "not a dictionary" messages; names loadable
    subfolders of ``path`` (e.g. the ``average_l0_*`` folders of a Gemma Scope width)."""
    text = (f"Gemma Scope {GEMMA_SCOPE_FILE} / {GEMMA_SCOPE_2_FILE} or Llama Scope "
            f"{LLAMA_SCOPE_CONFIG} either")
    if path is not None and path.is_dir():
        subs = sorted(p.name for p in path.iterdir() if p.is_dir() and (
            (p / "cfg.json").is_file() or reader_for(p) is not None))
        if subs:
            shown = ", ".join(subs[:6]) + (", ..." if len(subs) > 6 else "")
            text += f"; these subfolders are dictionaries: {shown}"
    return text


# --------------------------------------------------------------------------- where from


def hub_location(path: Path) -> tuple[str | None, list[str]]:
    """``(repo id, components inside the repo)`` for a path in a Hugging Face cache
    snapshot (``.../models--ORG--NAME/snapshots/REV/SUB...``); else ``(None, components)``.

    Symlinks are not followed: cached files are links into ``blobs/``, which would lose
    the repository and folder names.
    """
    parts = path.absolute().parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/", 1), list(parts[i + 3:])
    return None, list(parts)


def _words(name: str) -> set[str]:
    return set(re.split(r"[-_.]", name.lower()))


def gemma_scope_model(repo: str) -> str | None:
    """SAELens' model name for a Gemma Scope repository (``get_gemma_2_config_from_hf``):
    ``google/gemma-scope-2b-pt-res`` -> ``gemma-2-2b``, ``...-9b-it-res`` -> ``gemma-2-9b-it``."""
    match = _GEMMA_SCOPE_REPO.search(repo)
    if match is None:
        return None
    size, kind = match.group(1), match.group(2)
    return f"gemma-2-{size}" + ("-it" if kind == "it" else "")


def _gemma_scope_origin(folder: Path, where: Path, hook_name: str | None
                        ) -> tuple[str, str | None, dict[str, Any]]:
    """``(hook name, model name or None, provenance)`` of a Gemma Scope folder."""
    repo, inner = hub_location(folder)
    if repo is None:  # a folder named after the repo (huggingface-cli download --local-dir)
        for i in range(len(inner) - 1, -1, -1):
            if inner[i].startswith("gemma-scope-"):
                repo, inner = inner[i], inner[i + 1:]
                break
    provenance: dict[str, Any] = {"source_format": "gemma_scope"}
    if repo is not None:
        provenance["hf_repo_id"] = repo
    if hook_name is not None:
        return hook_name, gemma_scope_model(repo or ""), provenance

    layer_at = next((i for i in range(len(inner) - 1, -1, -1)
                     if _LAYER_FOLDER.fullmatch(inner[i])), None)
    match = _GEMMA_SCOPE_REPO.search(repo or "")
    if match is not None:
        # SAELens get_gemma_2_config_from_hf decides by the repository name.
        kind = match.group(3)
        if kind != "res":
            what = _NOT_RESIDUAL.get(kind.rstrip("s"), _NOT_RESIDUAL.get(kind, kind))
            raise DictionaryFormatError(
                f"{where}: {repo} is a Gemma Scope {what} release; only residual-stream "
                "dictionaries (gemma-scope-*-res) can be served")
        near = inner
    else:
        # No repository name: look at the folders around the layer folder only, so that
        # an unrelated parent directory cannot decide.
        near = inner[max(0, layer_at - 1):] if layer_at is not None else inner[-3:]
        for name in near:
            for word in _words(name) & set(_NOT_RESIDUAL):
                raise DictionaryFormatError(
                    f"{where}: folder {name!r} says this is not a residual-stream dictionary "
                    f"({_NOT_RESIDUAL[word]}); only residual-stream dictionaries can be served")
    if any("embedding" in _words(name) for name in near):
        raise DictionaryFormatError(
            f"{where}: a Gemma Scope embedding dictionary reads the scaled embeddings "
            "(hook_embed), not the output of a decoder layer; it cannot be served")
    if layer_at is None:
        raise DictionaryFormatError(
            f"{where}: cannot tell the hook point: no 'layer_N' folder in the path (Gemma "
            "Scope layout: layer_12/width_16k/average_l0_71/params.npz); keep that layout "
            "or pass hook_name")
    layer = int(_LAYER_FOLDER.fullmatch(inner[layer_at]).group(1))  # type: ignore[union-attr]
    return f"blocks.{layer}.hook_resid_post", gemma_scope_model(repo or ""), provenance


# --------------------------------------------------------------------------- Gemma Scope


def _load_npz(path: Path) -> dict[str, Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # BadZipFile, OSError, ValueError (pickled objects)...
        raise DictionaryFormatError(f"{path}: cannot read npz file: {exc}") from None
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


def _gemma_tensors(raw: dict[str, Tensor], where: Path) -> tuple[dict[str, Tensor], int, int]:
    """Our tensor names (SAELens maps ``w_enc`` -> ``W_enc``), d_in and d_sae."""
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    for name in _GEMMA_SCOPE_TENSORS:
        if name not in tensors:
            raise DictionaryFormatError(
                f"{where}: missing key {name!r} (Gemma Scope parameters are "
                f"{', '.join(_GEMMA_SCOPE_TENSORS)}; found {', '.join(sorted(raw)) or 'none'})")
    if "affine_skip_connection" in tensors:
        raise DictionaryFormatError(
            f"{where}: affine_skip_connection (a skip transcoder) is not supported")
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not bool(torch.all(scaling == 1)):
        raise DictionaryFormatError(
            f"{where}: scaling_factor other than 1 (finetuning scaling) is not supported")
    b_enc, b_dec = tensors["b_enc"], tensors["b_dec"]
    if b_enc.ndim != 1 or b_dec.ndim != 1:
        bad = "b_enc" if b_enc.ndim != 1 else "b_dec"
        raise DictionaryFormatError(
            f"{where}: tensor {bad!r} has the wrong shape: expected one dimension, got "
            f"{list(tensors[bad].shape)}")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()
            if k in _GEMMA_SCOPE_TENSORS}, int(b_dec.shape[0]), int(b_enc.shape[0])


def _jumprelu_cfg(d_in: int, d_sae: int, hook: str, model: str | None,
                  provenance: dict[str, Any]) -> dict[str, Any]:
    return {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
        # Gemma Scope encodes x @ W_enc + b_enc: b_dec is not subtracted first.
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"model_name": model or "unknown", "hook_name": hook, **provenance},
    }


def read_gemma_scope(path: Path, hook_name: str | None, model_name: str | None) -> Read:
    """A Gemma Scope folder holding ``params.npz``, or the ``.npz`` file itself."""
    npz = path if path.is_file() else path / GEMMA_SCOPE_FILE
    tensors, d_in, d_sae = _gemma_tensors(_load_npz(npz), npz)
    hook, model, provenance = _gemma_scope_origin(npz.parent, npz, hook_name)
    return _jumprelu_cfg(d_in, d_sae, hook, model or model_name, provenance), tensors, npz, npz


def _gemma_3_model(raw_model: object, repo: str | None) -> str | None:
    """SAELens get_gemma_3_config_from_hf / _infer_gemma_3_raw_cfg_dict's model name."""
    name = raw_model if isinstance(raw_model, str) and raw_model else None
    if name is None and repo is not None and "gemma-scope-2" in repo:
        name = repo.replace("gemma-scope-2", "gemma-3")
    if name is None:
        return None
    name = name if "google" in name else "google/" + name
    name = name.replace("-v3", "-3")
    return name.replace("-pt", "") if "270m" in name else name


def read_gemma_scope_2(path: Path, hook_name: str | None, model_name: str | None) -> Read:
    """A Gemma Scope 2 folder: ``params.safetensors`` (+ optional ``config.json``)."""
    weights, config = path / GEMMA_SCOPE_2_FILE, path / GEMMA_SCOPE_2_CONFIG
    raw = _read_json(config) if config.is_file() else {}
    if raw.get("architecture", "jump_relu") != "jump_relu":
        raise DictionaryFormatError(
            f"{config}: architecture={raw['architecture']!r} is not supported (only jump_relu)")
    if raw.get("affine_connection"):
        raise DictionaryFormatError(
            f"{config}: affine_connection=true (a transcoder) is not supported")
    tensors, d_in, d_sae = _gemma_tensors(_read_safetensors(weights), weights)
    repo, inner = hub_location(path)
    provenance: dict[str, Any] = {"source_format": "gemma_scope_2"}
    if repo is not None:
        provenance["hf_repo_id"] = repo
    hook = hook_name
    if hook is None:
        # SAELens get_gemma_3_config_from_hf decides by the folder names.
        near = inner[-2:]
        words = set().union(*(_words(name) for name in near))
        if "transcoder" in words or "clt" in words or any("transcoder" in n for n in near):
            raise DictionaryFormatError(f"{weights}: a Gemma Scope 2 transcoder cannot be served")
        if not any("resid_post" in name for name in near):
            kind = next((n for n in near if "attn_out" in n or "mlp_out" in n), None)
            raise DictionaryFormatError(
                f"{weights}: " + (f"folder {kind!r} is not the residual stream; only resid_post "
                                  "dictionaries can be served" if kind else
                                  "cannot tell the hook point: expected the Gemma Scope 2 "
                                  "layout resid_post/layer_L_.../params.safetensors; keep "
                                  "that layout or pass hook_name"))
        layer = next((m for m in (_LAYER_FOLDER.search(n) for n in reversed(near)) if m), None)
        if layer is None:
            raise DictionaryFormatError(f"{weights}: cannot tell the layer: no 'layer_N' in "
                                        f"the folder name {path.name!r}")
        hook = f"blocks.{int(layer.group(1))}.hook_resid_post"
    model = _gemma_3_model(raw.get("model_name"), repo) or model_name
    return _jumprelu_cfg(d_in, d_sae, hook, model, provenance), tensors, \
        (config if config.is_file() else weights), weights


# --------------------------------------------------------------------------- Llama Scope

# SAELens get_llama_scope_config_from_hf: every Llama Scope release is on this model.
_LLAMA_SCOPE_MODEL = "meta-llama/Llama-3.1-8B"


def _llama_scope_model(path: Path, raw: dict[str, Any], model_name: str | None) -> str | None:
    repo, inner = hub_location(path)
    names = ([repo] if repo else []) + inner[-2:]
    if any(re.search(r"llama(3_1|-scope)", n, re.IGNORECASE) for n in names):
        return _LLAMA_SCOPE_MODEL
    return raw.get("model_name") or model_name


def _llama_scope_hook(raw: dict[str, Any], where: Path, hook_name: str | None) -> str:
    hook_in, hook_out = raw.get("hook_point_in"), raw.get("hook_point_out")
    if hook_in is None:
        if hook_name is None:
            raise DictionaryFormatError(f"{where}: missing hook_point_in")
        return hook_name
    if hook_out is not None and hook_out != hook_in:
        raise DictionaryFormatError(
            f"{where}: reads {hook_in} and writes {hook_out} (a transcoder); only "
            "dictionaries that reconstruct their own input can be served")
    return hook_in


def _llama_tensors(tensors: dict[str, Tensor], d_in: int, d_sae: int, where: Path
                   ) -> dict[str, Tensor]:
    _check_tensors({"encoder.weight": (d_sae, d_in), "decoder.weight": (d_in, d_sae),
                    "encoder.bias": (d_sae,), "decoder.bias": (d_in,)}, tensors, str(where))
    # SAELens loads them in the dtype it was asked for (float32 by default).
    return {"W_enc": tensors["encoder.weight"].float().T.contiguous(),
            "W_dec": tensors["decoder.weight"].float().T.contiguous(),
            "b_enc": tensors["encoder.bias"].float(), "b_dec": tensors["decoder.bias"].float()}


def _positive(raw: dict[str, Any], key: str, where: Path) -> float:
    value: object = raw
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    number = math.nan
    if isinstance(value, str | bytes | SupportsFloat | SupportsIndex):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(number) or number <= 0:
        raise DictionaryFormatError(f"{where}: {key} must be a positive number, got {value!r}")
    return number


def read_llama_scope(path: Path, hook_name: str | None, model_name: str | None) -> Read:
    """A Llama Scope folder: ``hyperparams.json`` + ``checkpoints/final.safetensors``
    (SAELens ``get_llama_scope_config_from_hf`` / ``llama_scope_sae_huggingface_loader``)."""
    config, weights = path / LLAMA_SCOPE_CONFIG, path / LLAMA_SCOPE_WEIGHTS
    raw = _read_json(config)
    if not weights.is_file():
        raise DictionaryFormatError(f"{path}: missing weights file {LLAMA_SCOPE_WEIGHTS}")
    d_in, d_sae = int(_positive(raw, "d_model", config)), int(_positive(raw, "d_sae", config))
    jump = raw.get("jump_relu_threshold")
    if not isinstance(jump, (int, float)) or not math.isfinite(jump):
        raise DictionaryFormatError(
            f"{config}: jump_relu_threshold must be a number, got {jump!r}")
    # Trained on x * s; SAELens scales the (scalar) threshold by the same s so that it
    # still applies after s is folded into W_enc.
    s = d_in ** 0.5 / _positive(raw, "dataset_average_activation_norm.in", config)
    tensors = _llama_tensors(_read_safetensors(weights), d_in, d_sae, weights)
    tensors["threshold"] = torch.full((d_sae,), float(jump) * s, dtype=torch.float32)
    data = {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
        "apply_b_dec_to_input": False, "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": s,
        "metadata": {"model_name": _llama_scope_model(path, raw, model_name) or "unknown",
                     "hook_name": _llama_scope_hook(raw, config, hook_name),
                     "source_format": "llama_scope", "llama_scope_jump_relu_threshold": jump,
                     "llama_scope_norm_scaling_factor": s},
    }
    return data, tensors, config, weights


def read_llama_scope_r1(path: Path, hook_name: str | None, model_name: str | None) -> Read:
    """A Llama Scope R1 Distill folder: ``config.json`` + ``sae_weights.safetensors``
    (SAELens ``llama_scope_r1_distill_sae_huggingface_loader``)."""
    config, weights = path / LLAMA_SCOPE_R1_CONFIG, path / LLAMA_SCOPE_R1_WEIGHTS
    raw = _read_json(config)
    if "d_model" not in raw or "hook_point_in" not in raw:
        raise DictionaryFormatError(
            f"{path}: missing cfg.json (a SAELens directory); {config.name} here is not a "
            "Llama Scope config either (no d_model / hook_point_in)")
    d_in = int(_positive(raw, "d_model", config))
    d_sae = d_in * int(_positive(raw, "expansion_factor", config))
    loaded = _read_safetensors(weights)
    if "log_jumprelu_threshold" not in loaded:
        raise DictionaryFormatError(f"{weights}: missing tensor 'log_jumprelu_threshold'")
    tensors = _llama_tensors(loaded, d_in, d_sae, weights)
    tensors["threshold"] = loaded["log_jumprelu_threshold"].float().exp()
    data = {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
        "apply_b_dec_to_input": False, "normalize_activations": "expected_average_only_in",
        "metadata": {"model_name": _llama_scope_model(path, raw, model_name) or "unknown",
                     "hook_name": _llama_scope_hook(raw, config, hook_name),
                     "source_format": "llama_scope_r1_distill"},
    }
    # Its norm_scaling_factor is only in SAELens' directory: without it the config check
    # refuses the folder, naming norm_scaling_factor.
    if "norm_scaling_factor" in raw:
        data["norm_scaling_factor"] = raw["norm_scaling_factor"]
    return data, tensors, config, weights
