"""The feature index file: what the writer puts in, the read-only reader gets back."""

from __future__ import annotations

import sqlite3

import pytest

from sae_runtime.feature_index import (
    HIST_BINS,
    QUANTILE_LEVELS,
    SCHEMA_VERSION,
    Example,
    FeatureIndex,
    FeatureIndexError,
    FeatureRecord,
    IndexWriter,
    TokenCount,
)


def _record(f: int, label: str, max_act: float = 1.0, **kw) -> FeatureRecord:
    return FeatureRecord(feature=f, max_act=max_act, n_fired=3, density=0.25,
                         quantiles=[0.1 * (i + 1) for i in range(len(QUANTILE_LEVELS))],
                         hist=[i % 3 for i in range(HIST_BINS)], label=label, **kw)


@pytest.fixture()
def index_path(tmp_path):
    path = tmp_path / "feature_index.sqlite"
    with IndexWriter(path, {"d_sae": 4, "dictionary_id": "d"}) as w:
        w.add_features([
            _record(0, "ocean waves and the sea", 5.0,
                    top_tokens=[TokenCount(11, " sea", 4)], promoted=[TokenCount(12, " tide", 0.5)],
                    cooccur=[(2, 0.5)]),
            _record(1, "tax policy", 2.5, label_score=0.8),
            _record(2, "sailing ships", 0.0),
            _record(3, "numbers", 7.0, top_tokens=[TokenCount(5, " oceanic", 2)]),
        ])
        w.add_examples(0, [Example(5.0, [1, 2, 3], [0.0, 5.0, 1.0], 1, "doc-a", 7),
                           Example(4.0, [4, 5], [4.0, 0.0], 0, "doc-b", 0, context_offset=512)])
    return path


def test_round_trip(index_path):
    idx = FeatureIndex(index_path)
    assert idx.meta["schema_version"] == str(SCHEMA_VERSION) and idx.d_sae == 4
    rec = idx.feature(0)
    assert rec is not None and rec.label == "ocean waves and the sea" and rec.max_act == 5.0
    assert rec.quantiles == pytest.approx([0.1, 0.2, 0.3, 0.4]) and len(rec.hist) == HIST_BINS
    assert rec.top_tokens == [TokenCount(11, " sea", 4.0)] and rec.cooccur == [(2, 0.5)]
    assert idx.feature(1).label_score == pytest.approx(0.8) and idx.feature(0).label_score is None
    assert idx.feature(9) is None
    ex = idx.examples(0)
    assert [e.activation for e in ex] == [5.0, 4.0] and ex[0].token_ids == [1, 2, 3] and ex[0].peak == 1
    assert ex[0].context_offset == 0 and ex[1].context_offset == 512 and ex[1].doc == "doc-b"
    assert idx.examples(0, limit=1) == ex[:1] and idx.examples(1) == []
    assert idx.max_activations.tolist() == [5.0, 2.5, 0.0, 7.0]
    assert idx.labels([1, 3, 1]) == {1: "tax policy", 3: "numbers"}


def test_search_matches_labels_and_tokens_by_prefix(index_path):
    idx = FeatureIndex(index_path)
    # "ocean" is in feature 0's label and is a prefix of feature 3's top token " oceanic"
    assert {h.feature for h in idx.search("ocean")} == {0, 3}
    assert [h.feature for h in idx.search("tide")] == [0]  # a promoted token
    assert [h.feature for h in idx.search("Sailing SHIP")] == [2]
    assert idx.search("submarine") == []
    assert len(idx.search("ocean", limit=1)) == 1
    with pytest.raises(ValueError, match="no words"):
        idx.search(" \"*() ")


def test_reader_is_read_only_and_checks_the_version(index_path, tmp_path):
    idx = FeatureIndex(index_path)
    with pytest.raises(sqlite3.OperationalError):
        idx._db.execute("DELETE FROM features")
    db = sqlite3.connect(index_path)
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(FeatureIndexError, match="schema version 999"):
        FeatureIndex(index_path)
    with pytest.raises(FeatureIndexError, match="no feature index"):
        FeatureIndex(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(FeatureIndexError, match="not a feature index"):
        FeatureIndex(tmp_path / "junk.sqlite")


def test_writer_refuses_bad_records_and_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "i.sqlite"
    with pytest.raises(ValueError, match="feature 0: 1 quantiles"):
        with IndexWriter(path, {"d_sae": 1}) as w:
            w.add_features([FeatureRecord(0, 1.0, 1, 1.0, [1.0], [0] * HIST_BINS)])
    assert not path.exists()
    with IndexWriter(path, {"d_sae": 1}) as w:
        pass
    with pytest.raises(FileExistsError):
        IndexWriter(path, {"d_sae": 1})
