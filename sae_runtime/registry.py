"""The dictionaries one model is served with, under stable client-facing ids.

Clients name a dictionary by id in every feature and steering request, so ids must be
stable across restarts and unique: an id is given explicitly, or taken from the
dictionary's cfg.json (``metadata.sae_id`` or ``id``), or derived as
``{hook_point}/{architecture}-{d_sae}`` (e.g. ``layers.12/topk-4608``). A clash is an
error; silently adding a suffix would make an id depend on load order.

Loading checks each dictionary against the model it will be hooked into (name, number
of layers, hidden size), so a mismatch fails at start-up instead of as wrong features.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dictionary import SparseDictionary
from .dictionary_sources import load_dictionary
from .feature_index import INDEX_FILE, FeatureIndex, FeatureIndexError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TRAINING_LOG_FILE = "training_log.jsonl"
"""``sae-train``'s curves beside a dictionary: one JSON object per log interval (step, tokens,
loss, fvu, l0, dead), read by ``GET /v1/dictionaries/{id}/summary``."""


class RegistryError(ValueError):
    """A set of dictionaries cannot be served with this model."""


class UnknownDictionaryError(KeyError):
    """No dictionary has the requested id."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RegisteredDictionary:
    """One served dictionary and what clients see of it."""

    id: str
    path: Path | None
    hook_point: str
    layer: int
    dictionary: SparseDictionary
    architecture: str
    d_sae: int
    k: int | None
    metrics: dict[str, Any] | None = None
    source: str | None = None
    """What the dictionary was loaded from (a path, ``hf:...``, ``sae_lens:...``):
    ``SparseDictionary.load(source)`` loads it again, e.g. in the worker process."""
    index: FeatureIndex | None = None
    """Its feature index (``feature_index.sqlite`` in its folder, opened read-only), if any."""

    @property
    def d_in(self) -> int:
        return self.dictionary.d_in


def default_dictionary_id(dictionary: SparseDictionary) -> str:
    """The id a dictionary gets when neither the caller nor its cfg.json names one."""
    cfg = dictionary.cfg
    for source in (cfg.metadata.model_extra or {}, cfg.model_extra or {}):
        for key in ("sae_id", "id"):
            value = source.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return f"{dictionary.hook_point}/{dictionary.architecture}-{dictionary.d_sae}"


# TransformerLens / SAELens short names whose Hugging Face repository has another name
# (lower case; TransformerLens' OFFICIAL_MODEL_NAMES aliases). Names that differ only in
# case or in the organisation prefix need no entry.
MODEL_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "mistral-7b": "mistral-7b-v0.1",
    "mistral-7b-instruct": "mistral-7b-instruct-v0.1",
}


def model_identities(name: str) -> set[str]:
    """The lower-case names a model (name, hub id or local path) goes by.

    The name itself and its last path component; for a path into a Hugging Face cache
    (``.../models--google--gemma-2-2b/snapshots/<hash>``) the repository id instead
    (``google/gemma-2-2b``, ``gemma-2-2b``); plus the Hugging Face name of a
    TransformerLens short name (``gpt2-small`` -> ``gpt2``).
    """
    text = name.strip().replace("\\", "/").rstrip("/")
    parts = [p for p in text.split("/") if p]
    for part in parts:
        if part.startswith("models--") and len(part) > len("models--"):
            text = part[len("models--"):].replace("--", "/", 1)
            parts = text.split("/")
            break
    names = {text.lower(), parts[-1].lower() if parts else ""}
    names |= {MODEL_ALIASES[n] for n in names if n in MODEL_ALIASES}
    return names - {""}


def same_model(dictionary_model: str | None, served_model: str) -> bool:
    """Whether a dictionary trained on ``dictionary_model`` fits ``served_model``.

    Unknown/empty names are accepted. Otherwise the two must share an identity (see
    :func:`model_identities`), ignoring case: the same name, the same last path component
    (``HuggingFaceTB/SmolLM2-135M-Instruct`` vs ``SmolLM2-135M-Instruct``, or a local
    checkpoint directory named after the model), a Hugging Face cache snapshot of the
    repository (``google/gemma-2-2b`` vs ``.../models--google--gemma-2-2b/snapshots/<hash>``),
    or a TransformerLens short name (``gpt2-small`` vs ``gpt2``). Different models, base
    and instruct variants included (``gemma-2-2b`` vs ``gemma-2-2b-it``), do not match.
    """
    if not dictionary_model or dictionary_model.strip().lower() == "unknown":
        return True
    return bool(model_identities(dictionary_model) & model_identities(served_model))


def _open_index(path: Path | None) -> FeatureIndex | None:
    """The feature index in a dictionary's folder, or None when it has none."""
    if path is None or not path.is_dir() or not (path / INDEX_FILE).exists():
        return None
    try:
        return FeatureIndex(path / INDEX_FILE)
    except FeatureIndexError as e:
        raise RegistryError(f"{e} (move it away to serve the dictionary without its index)") from e


def _read_metrics(path: Path | None) -> dict[str, Any] | None:
    if path is None or not (path / METRICS_FILE).is_file():
        return None
    try:
        metrics = json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError) as exc:
        # Metrics are informational: a broken file must not stop the dictionary serving.
        logger.warning("ignoring unreadable %s: %s", path / METRICS_FILE, exc)
        return None
    return metrics if isinstance(metrics, dict) else {"value": metrics}


class DictionaryRegistry:
    """The dictionaries of one served model, by id and by hook point."""

    def __init__(self, entries: Sequence[RegisteredDictionary], *, model_name: str,
                 num_layers: int, hidden_size: int, model_path: str | Path | None = None):
        self.model_name = model_name
        # Where the served checkpoint is (a hub cache snapshot says which repository it
        # is when model_name, its folder name, is only a commit hash).
        self.model_path = model_path
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self._entries: dict[str, RegisteredDictionary] = {}
        for entry in entries:
            self._check(entry)
            if entry.id in self._entries:
                other = self._entries[entry.id]
                raise RegistryError(
                    f"dictionary id {entry.id!r} is used twice ({other.path} and "
                    f"{entry.path}); give one of them an explicit id")
            self._entries[entry.id] = entry

    def _check(self, entry: RegisteredDictionary) -> None:
        """Refuse a dictionary that does not fit the served model."""
        d = entry.dictionary
        where = entry.path if entry.path is not None else entry.id
        if not (same_model(d.model_name, self.model_name) or (
                self.model_path is not None and same_model(d.model_name, str(self.model_path)))):
            at = f" ({self.model_path})" if self.model_path is not None else ""
            raise RegistryError(
                f"{where}: dictionary was trained on model {d.model_name!r}, but the "
                f"served model is {self.model_name!r}{at}")
        if d.layer >= self.num_layers:
            raise RegistryError(
                f"{where}: hook point {d.hook_point} does not exist: the model has "
                f"{self.num_layers} decoder layers (layers.0 .. layers.{self.num_layers - 1})")
        if d.d_in != self.hidden_size:
            raise RegistryError(
                f"{where}: d_in={d.d_in} does not match the model's hidden size "
                f"{self.hidden_size}")

    @classmethod
    def load(
        cls,
        dirs: Sequence[str | Path],
        *,
        model_name: str,
        num_layers: int,
        hidden_size: int,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        ids: Sequence[str | None] | None = None,
        model_path: str | Path | None = None,
    ) -> DictionaryRegistry:
        """Load dictionaries for a model with ``num_layers`` decoder layers of width
        ``hidden_size``. ``ids[i]`` (if given and not None) names ``dirs[i]``.

        Each of ``dirs`` is a source string (see :mod:`sae_runtime.dictionary_sources`):
        a dictionary directory in any supported layout, a Gemma Scope ``.npz`` file,
        ``hf:ORG/REPO[@REV]/FOLDER`` or ``sae_lens:RELEASE/SAE_ID`` (from the local Hugging
        Face cache only). ``model_path`` is the served checkpoint's folder, used with
        ``model_name`` to check that each dictionary belongs to the served model.

        Raises ``DictionaryFormatError`` for an unreadable dictionary (its subclass
        ``DictionarySourceError`` for a source that is malformed or not cached) and
        ``RegistryError`` for a dictionary that does not fit the model or a repeated id.
        """
        if ids is not None and len(ids) != len(dirs):
            raise RegistryError(f"got {len(ids)} ids for {len(dirs)} dictionary directories")
        entries = []
        for i, directory in enumerate(dirs):
            dictionary = load_dictionary(
                directory, device=device, dtype=dtype, expected_d_in=hidden_size,
                model_name=model_name)
            explicit = ids[i] if ids is not None else None
            entries.append(cls.entry(dictionary, id=explicit))
        return cls(entries, model_name=model_name, num_layers=num_layers,
                   hidden_size=hidden_size, model_path=model_path)

    @staticmethod
    def entry(dictionary: SparseDictionary, *, id: str | None = None) -> RegisteredDictionary:
        """Wrap a loaded dictionary as a registry entry (metrics read from its folder)."""
        return RegisteredDictionary(
            id=id if id else default_dictionary_id(dictionary),
            path=dictionary.path,
            hook_point=dictionary.hook_point,
            layer=dictionary.layer,
            dictionary=dictionary,
            architecture=dictionary.architecture,
            d_sae=dictionary.d_sae,
            k=dictionary.k,
            metrics=_read_metrics(dictionary.path if dictionary.path is None
                                  or dictionary.path.is_dir() else None),
            source=dictionary.source,
            index=_open_index(dictionary.path),
        )

    # ------------------------------------------------------------ lookup

    def get(self, id: str) -> RegisteredDictionary:
        try:
            return self._entries[id]
        except KeyError:
            known = ", ".join(repr(i) for i in self._entries) or "none"
            raise UnknownDictionaryError(
                f"unknown dictionary {id!r}; known dictionaries: {known}") from None

    def ids(self) -> list[str]:
        return list(self._entries)

    def by_hook_point(self) -> dict[str, list[RegisteredDictionary]]:
        """Entries grouped by canonical hook point, hook points in layer order."""
        groups: dict[str, list[RegisteredDictionary]] = {}
        for entry in sorted(self._entries.values(), key=lambda e: e.layer):
            groups.setdefault(entry.hook_point, []).append(entry)
        return groups

    def hook_points(self) -> list[str]:
        """Hook points that carry at least one dictionary, sorted by layer."""
        return list(self.by_hook_point())

    def describe(self) -> list[dict[str, Any]]:
        """Plain-dict description of every dictionary, for listing endpoints."""
        return [
            {
                "id": e.id,
                "model": self.model_name,
                "hook_point": e.hook_point,
                "layer": e.layer,
                "architecture": e.architecture,
                "d_in": e.d_in,
                "d_sae": e.d_sae,
                "k": e.k,
                "path": None if e.path is None else str(e.path),
                "metrics": e.metrics,
            }
            for e in self._entries.values()
        ]

    def __contains__(self, id: object) -> bool:
        return id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[RegisteredDictionary]:
        return iter(self._entries.values())
