"""Where a dictionary comes from: a local path, the Hugging Face cache, or a SAELens name.

Everything that takes a dictionary (``sae-serve --dictionary``, config files, the
registry, the worker) takes one of these *source strings*:

- a local path: a dictionary directory in any layout :meth:`SparseDictionary.load
  <sae_runtime.dictionary.SparseDictionary.load>` reads (SAELens, sparsify, Gemma Scope,
  Llama Scope), or a Gemma Scope ``.npz`` file;
- ``hf:ORG/REPO[@REVISION][/SUBPATH]``: the folder ``SUBPATH`` of a model repository in
  the local Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``, read when the string is resolved). ``REVISION`` is a
  branch, tag or commit hash (default ``main``);
- ``sae_lens:RELEASE/SAE_ID``: a name from SAELens' directory of pretrained dictionaries
  (the ``pretrained_saes.yaml`` inside the installed ``sae-lens`` package, read as a file:
  sae_lens itself is never imported). The release gives the repository, the folder, the
  conversion (SAELens layout, Gemma Scope npz, Llama Scope...), and values that change the
  numbers (``norm_scaling_factor``, ``config_overrides``); then it is read as ``hf:``.

Nothing is ever downloaded: a dictionary missing from the cache is an error that says
which repository and folder, which cache was searched, and the command that fetches it on
a machine with network.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .dictionary import DictionaryFormatError, SparseDictionary

HF_PREFIX = "hf:"
SAELENS_PREFIX = "sae_lens:"
SOURCE_PREFIXES = (HF_PREFIX, SAELENS_PREFIX)

SAELENS_DISTRIBUTION = "sae-lens"
SAELENS_YAML = "sae_lens/pretrained_saes.yaml"
# Point this at a pretrained_saes.yaml to use it without installing sae-lens.
SAELENS_YAML_ENV = "SAE_SERVE_SAELENS_YAML"

# SAELens conversion_func values whose files we read (see sae_runtime.dictionary_formats).
SUPPORTED_CONVERSIONS = {
    None: "SAELens directory",
    "sae_lens": "SAELens directory",
    "sparsify": "EleutherAI sparsify directory",
    "gemma_2": "Gemma Scope params.npz",
    "gemma_3": "Gemma Scope 2 params.safetensors",
    "llama_scope": "Llama Scope hyperparams.json + checkpoints/final.safetensors",
    "llama_scope_r1_distill": "Llama Scope R1 Distill config.json + sae_weights.safetensors",
}

_COMMIT = re.compile(r"[0-9a-f]{40}")


class DictionarySourceError(DictionaryFormatError):
    """A source string is malformed or names something that is not there."""


class DictionaryNotCachedError(DictionarySourceError):
    """The repository or folder a source names is not in the local Hugging Face cache."""


class SAELensNotInstalledError(DictionarySourceError):
    """``sae_lens:`` was used but SAELens' directory of releases is not available."""


def is_source_spec(spec: object) -> bool:
    """Whether ``spec`` is an ``hf:`` or ``sae_lens:`` string (not a local path)."""
    return isinstance(spec, str) and spec.strip().startswith(SOURCE_PREFIXES)


# --------------------------------------------------------------------------- HF cache


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now.

    Same rules as ``huggingface_hub.constants`` (which reads them once, at import):
    ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``).
    """
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache",
                                              "huggingface")
    return Path(home).expanduser() / "hub"


def _fetch_hint(repo_id: str, revision: str | None, subpath: str) -> str:
    rev = f" --revision {revision}" if revision and revision != "main" else ""
    include = f" --include '{subpath}/*'" if subpath else ""
    return (f"hf download {repo_id}{rev}{include}  (huggingface_hub < 1.0: "
            f"huggingface-cli download {repo_id}{rev}{include})")


def find_cached_folder(repo_id: str, subpath: str = "", revision: str | None = None, *,
                       cache_dir: str | Path | None = None, spec: str | None = None) -> Path:
    """``SUBPATH`` inside the cached snapshot of model repository ``repo_id``.

    Uses ``huggingface_hub.snapshot_download(local_files_only=True)``, which resolves a
    branch or tag through ``refs/`` and never touches the network. Raises
    :class:`DictionaryNotCachedError` when the repository, revision or folder is not in
    the cache, naming the cache searched and the command that would fetch it.
    """
    from huggingface_hub import snapshot_download

    cache = Path(cache_dir).expanduser() if cache_dir is not None else hf_hub_cache_dir()
    subpath = subpath.strip("/")
    what = spec or f"{HF_PREFIX}{repo_id}{'@' + revision if revision else ''}" \
                   f"{'/' + subpath if subpath else ''}"
    where = f"repository {repo_id}" + (f" at revision {revision}" if revision else "")
    fix = (f"Nothing is downloaded at run time: on a machine with network run "
           f"{_fetch_hint(repo_id, revision, subpath)} with HF_HUB_CACHE pointing at the cache "
           "to fill, then copy that cache here (or set HF_HUB_CACHE / HF_HOME to where it is)")
    try:
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache), local_files_only=True,
            allow_patterns=[f"{subpath}/*"] if subpath else None))
    except Exception as exc:  # LocalEntryNotFoundError, IncompleteSnapshotError, bad ids...
        reason = ("is not in the cache" if type(exc).__name__ == "LocalEntryNotFoundError"
                  else f"cannot be used from the cache ({type(exc).__name__}: {exc})")
        raise DictionaryNotCachedError(
            f"{what}: {where} {reason}"
            f"{' (wanted folder ' + repr(subpath) + ')' if subpath else ''}; searched the "
            f"Hugging Face cache {cache}. {fix}") from None
    target = snapshot / subpath if subpath else snapshot
    broken = target.is_dir() and any(p.is_symlink() and not p.exists() for p in target.iterdir())
    if not target.exists() or broken:
        state = "has files whose blobs are missing" if broken else "is not in the cached snapshot"
        raise DictionaryNotCachedError(
            f"{what}: folder {subpath!r} of {where} {state} {snapshot} (Hugging Face cache "
            f"{cache}). {fix}")
    return target


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:ORG/REPO[@REVISION][/SUBPATH]`` -> ``(repo_id, revision or None, subpath)``."""
    text = spec.strip()
    rest = text[len(HF_PREFIX):].lstrip("/") if text.startswith(HF_PREFIX) else text
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise DictionarySourceError(
            f"{spec}: expected hf:ORG/REPO[@REVISION][/SUBPATH], e.g. "
            "hf:google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
    org, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, _, revision = repo.partition("@")
        if not repo or not revision:
            raise DictionarySourceError(f"{spec}: empty repository name or revision around '@'")
    subparts = parts[2:]
    if any(p in (".", "..") for p in subparts):
        raise DictionarySourceError(f"{spec}: the folder must lie inside the repository "
                                    "('.' and '..' are not allowed)")
    return f"{org}/{repo}", revision, "/".join(subparts)


# --------------------------------------------------------------------------- SAELens


@dataclass(frozen=True)
class SAELensRelease:
    """One release of SAELens' ``pretrained_saes.yaml`` (what
    ``sae_lens.loading.pretrained_saes_directory.PretrainedSAELookup`` holds)."""

    release: str
    repo_id: str
    model: str | None
    conversion_func: str | None
    saes: dict[str, dict[str, Any]]
    """SAE id -> its YAML entry (``path``, and maybe ``l0``, ``neuronpedia``,
    ``norm_scaling_factor``, ``variance_explained``)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)


def parse_saelens_directory(data: Mapping[str, Any], where: str = "SAELens directory"
                            ) -> dict[str, SAELensRelease]:
    """Parse the mapping of SAELens' ``pretrained_saes.yaml`` (release -> ``repo_id``,
    ``model``, ``conversion_func``, ``config_overrides``, ``saes: [{id, path, ...}]``)."""
    if not isinstance(data, Mapping):
        raise DictionarySourceError(f"{where}: expected a mapping of release names")
    releases = {}
    for name, value in data.items():
        if not isinstance(value, Mapping) or "repo_id" not in value or not isinstance(
                value.get("saes"), list):
            raise DictionarySourceError(
                f"{where}: release {name!r} needs repo_id and a list of saes")
        saes = {}
        for entry in value["saes"]:
            if not isinstance(entry, Mapping) or "id" not in entry or "path" not in entry:
                raise DictionarySourceError(
                    f"{where}: release {name!r} has an SAE entry without id or path: {entry!r}")
            saes[str(entry["id"])] = dict(entry)
        releases[str(name)] = SAELensRelease(
            release=str(name), repo_id=str(value["repo_id"]), model=value.get("model"),
            conversion_func=value.get("conversion_func"), saes=saes,
            config_overrides=dict(value.get("config_overrides") or {}))
    return releases


def saelens_yaml_path() -> Path:
    """The ``pretrained_saes.yaml`` of the installed ``sae-lens`` (or ``$SAE_SERVE_SAELENS_YAML``).

    Found through the distribution's file list (``importlib.metadata``), so sae_lens,
    which imports torch, transformer_lens and more, is never imported.
    """
    override = os.environ.get(SAELENS_YAML_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SAELensNotInstalledError(f"{SAELENS_YAML_ENV}={override}: no such file")
        return path
    try:
        dist = importlib.metadata.distribution(SAELENS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SAELensNotInstalledError(
            "sae_lens: names are looked up in SAELens' directory of pretrained dictionaries "
            "(pretrained_saes.yaml), which comes with the sae-lens package, and sae-lens is "
            "not installed: pip install 'sae-serve[saelens]' (or pip install "
            f"sae-lens==6.54.0), or set {SAELENS_YAML_ENV} to a copy of that file, or name "
            "the files directly with hf:REPO/FOLDER") from None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == SAELENS_YAML:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise SAELensNotInstalledError(
        f"sae-lens {dist.version} is installed but has no {SAELENS_YAML}; set "
        f"{SAELENS_YAML_ENV} to a copy of that file")


@functools.lru_cache(maxsize=4)
def _read_saelens_yaml(path: str, mtime_ns: int) -> dict[str, SAELensRelease]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # ~5x faster on the 40k lines
    with open(path) as f:
        return parse_saelens_directory(yaml.load(f, Loader=loader), path)


def installed_saelens_directory() -> dict[str, SAELensRelease]:
    """SAELens' directory of releases from the installed package (cached per file version)."""
    path = saelens_yaml_path()
    return _read_saelens_yaml(str(path), path.stat().st_mtime_ns)


def parse_saelens_spec(spec: str) -> tuple[str, str]:
    """``sae_lens:RELEASE/SAE_ID`` -> ``(release, sae_id)`` (SAE ids may contain '/')."""
    text = spec.strip()
    rest = text[len(SAELENS_PREFIX):] if text.startswith(SAELENS_PREFIX) else text
    release, _, sae_id = rest.strip("/").partition("/")
    if not release or not sae_id:
        raise DictionarySourceError(
            f"{spec}: expected sae_lens:RELEASE/SAE_ID, e.g. "
            "sae_lens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    return release, sae_id


def _suggest(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if close:
        return f"; did you mean {', '.join(repr(c) for c in close)}?"
    shown = ", ".join(repr(k) for k in known[:5]) + (", ..." if len(known) > 5 else "")
    return f"; {len(known)} {what}: {shown}" if known else ""


def lookup_saelens(release: str, sae_id: str,
                   directory: Mapping[str, SAELensRelease] | Mapping[str, Any] | None = None,
                   spec: str | None = None) -> tuple[SAELensRelease, dict[str, Any]]:
    """The release and the SAE entry for ``release``/``sae_id``.

    ``directory``: parsed releases, or the raw YAML mapping (tests pass their own);
    default: the installed sae-lens package's.
    """
    what = spec or f"{SAELENS_PREFIX}{release}/{sae_id}"
    if directory is None:
        releases: Mapping[str, SAELensRelease] = installed_saelens_directory()
    elif all(isinstance(v, SAELensRelease) for v in directory.values()):
        releases = directory
    else:
        releases = parse_saelens_directory(directory)
    if release not in releases:
        raise DictionarySourceError(
            f"{what}: unknown SAELens release {release!r}"
            + _suggest(release, sorted(releases), "releases"))
    entry = releases[release]
    if sae_id not in entry.saes:
        raise DictionarySourceError(
            f"{what}: release {release!r} has no SAE id {sae_id!r}"
            + _suggest(sae_id, list(entry.saes), "ids"))
    if entry.conversion_func not in SUPPORTED_CONVERSIONS:
        names = sorted(k for k in SUPPORTED_CONVERSIONS if k)
        raise DictionarySourceError(
            f"{what}: release {release!r} uses SAELens conversion {entry.conversion_func!r}, "
            f"whose files sae-serve does not read (supported: {', '.join(names)})")
    return entry, entry.saes[sae_id]


# --------------------------------------------------------------------------- resolve + load


@dataclass(frozen=True)
class ResolvedSource:
    """A source string resolved to local files, plus what the source knows about them."""

    spec: str
    """The source string as given."""
    kind: Literal["path", "hf", "sae_lens"]
    path: Path
    """Local directory (or ``.npz`` file) to read."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config values that replace the files' (SAELens' ``cfg_overrides``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance recorded in the dictionary's metadata (release, repo, revision...)."""
    model_name: str | None = None
    """The model the source says the dictionary belongs to, where the files may not."""


def _snapshot_revision(path: Path) -> str | None:
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i + 2]
    return None


def resolve_dictionary_source(
    spec: str | Path, *,
    saelens_directory: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> ResolvedSource:
    """Turn a source string into local files (see the module docstring for the forms).

    ``saelens_directory`` replaces the installed SAELens directory (the parsed YAML
    mapping or :func:`parse_saelens_directory`'s result); ``cache_dir`` the HF cache.
    Raises :class:`DictionarySourceError` (or its subclasses
    :class:`DictionaryNotCachedError`, :class:`SAELensNotInstalledError`).
    """
    if not is_source_spec(spec):
        return ResolvedSource(spec=str(spec), kind="path", path=Path(spec).expanduser())
    text = str(spec).strip()
    if text.startswith(HF_PREFIX):
        repo_id, revision, subpath = parse_hf_spec(text)
        path = find_cached_folder(repo_id, subpath, revision, cache_dir=cache_dir, spec=text)
        metadata = {"hf_repo_id": repo_id, "hf_path": subpath,
                    "hf_revision": _snapshot_revision(path) or revision}
        return ResolvedSource(spec=text, kind="hf", path=path, metadata=metadata)

    release, sae_id = parse_saelens_spec(text)
    entry, sae = lookup_saelens(release, sae_id, saelens_directory, text)
    subpath = str(sae["path"]).strip("/")
    path = find_cached_folder(entry.repo_id, subpath, cache_dir=cache_dir, spec=text)
    # As SAE.from_pretrained: the release's config_overrides and Neuronpedia id replace
    # the files' values; its norm_scaling_factor is what gets folded when the config
    # says expected_average_only_in.
    overrides = dict(entry.config_overrides)
    if sae.get("neuronpedia") is not None:
        overrides["neuronpedia_id"] = sae["neuronpedia"]
    if sae.get("norm_scaling_factor") is not None:
        overrides["norm_scaling_factor"] = sae["norm_scaling_factor"]
    metadata = {"sae_lens_release": release, "sae_lens_id": sae_id,
                "sae_lens_release_model": entry.model, "hf_repo_id": entry.repo_id,
                "hf_path": subpath, "hf_revision": _snapshot_revision(path)}
    if sae.get("l0") is not None:
        metadata["sae_lens_l0"] = sae["l0"]
    return ResolvedSource(spec=text, kind="sae_lens", path=path, overrides=overrides,
                          metadata=metadata, model_name=entry.model)


def load_dictionary(
    spec: str | Path, *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    expected_d_in: int | None = None,
    expected_hook_point: str | None = None,
    hook_name: str | None = None,
    model_name: str | None = None,
    saelens_directory: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> SparseDictionary:
    """Load the dictionary a source string names (a path, ``hf:...`` or ``sae_lens:...``).

    ``hook_name``/``model_name`` fill in what neither the source nor the files say (the
    release's model comes before ``model_name``). The result's ``source`` is ``spec``, so
    ``SparseDictionary.load(d.source)`` loads it again; its ``path`` is the local folder.
    """
    source = resolve_dictionary_source(spec, saelens_directory=saelens_directory,
                                       cache_dir=cache_dir)
    try:
        dictionary = SparseDictionary.load(
            source.path, device=device, dtype=dtype, expected_d_in=expected_d_in,
            expected_hook_point=expected_hook_point, hook_name=hook_name,
            model_name=source.model_name or model_name, overrides=source.overrides,
            extra_metadata=source.metadata)
    except DictionaryFormatError as exc:
        if source.kind == "path":
            raise
        raise type(exc)(f"{source.spec}: {exc}") from None
    if source.kind != "path":  # a path's source is already the path (expanded)
        dictionary.source = source.spec
    return dictionary
