"""Reading and writing ``feature_index.sqlite`` (the format is in :mod:`.schema`).

:class:`IndexWriter` is what ``sae-index`` writes through; :class:`FeatureIndex` is what a
server opens, read-only, and shares between requests (SQLite in read-only, immutable mode:
any number of processes may hold it open).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .schema import DDL, HIST_BINS, QUANTILE_LEVELS, RANDOM_WINDOWS_DDL, SCHEMA_VERSION


class FeatureIndexError(ValueError):
    """An index file that is missing, of another schema version, or malformed."""


@dataclass(frozen=True)
class Example:
    """One max-activating context of a feature."""

    activation: float
    """The feature's activation at the peak token."""
    token_ids: list[int]
    """The window of tokens around the peak."""
    acts: list[float]
    """The feature's activation at each token of the window."""
    peak: int
    """Offset of the peak token in the window."""
    doc: str
    """Id of the corpus document the context came from."""
    position: int
    """Position of the peak token in its context (as the engine saw it)."""
    context_offset: int = 0
    """Where the context starts in its document (tokens, no special tokens added)."""


@dataclass(frozen=True)
class TokenCount:
    token_id: int
    token: str
    value: float
    """A count (top tokens) or a logit-lens score (promoted/suppressed)."""


@dataclass(frozen=True)
class FeatureRecord:
    """Everything the index holds about one feature but its examples."""

    feature: int
    max_act: float
    n_fired: int
    density: float
    quantiles: list[float]
    """At :data:`~.schema.QUANTILE_LEVELS`, of the nonzero activations."""
    hist: list[int]
    """:data:`~.schema.HIST_BINS` counts over ``(0, max_act]`` in equal bins."""
    top_tokens: list[TokenCount] = field(default_factory=list)
    promoted: list[TokenCount] = field(default_factory=list)
    suppressed: list[TokenCount] = field(default_factory=list)
    cooccur: list[tuple[int, float]] = field(default_factory=list)
    """``(feature, jaccard)`` of the features firing with it most often."""
    label: str = ""
    label_source: str = "tokens"
    label_score: float | None = None


@dataclass(frozen=True)
class RandomWindow:
    """A random corpus window of the detection test (the ``random_windows`` table)."""

    ctx: int
    """The context's id in the build's sample."""
    token_ids: list[int]
    active: list[int]
    """Features firing at a scored token of the window, ascending."""


@dataclass(frozen=True)
class LabelUpdate:
    """A new label of one feature (what ``sae-index --explainer`` writes)."""

    feature: int
    label: str
    label_source: str
    label_score: float | None


@dataclass(frozen=True)
class SearchHit:
    feature: int
    label: str
    rank: float
    """FTS5's bm25 rank: lower is a better match."""


def _tokens_json(items: Sequence[TokenCount]) -> str:
    return json.dumps([[t.token_id, t.token, t.value] for t in items])


def _tokens_from(text: str) -> list[TokenCount]:
    return [TokenCount(int(i), str(s), float(v)) for i, s, v in json.loads(text)]


def _fts_text(rec: FeatureRecord) -> str:
    """What the search matches besides the label: top and promoted tokens, as words."""
    return " ".join(t.token.strip() for t in (*rec.top_tokens, *rec.promoted) if t.token.strip())


class IndexWriter:
    """Writes a new index file (replacing nothing: the path must not exist yet)."""

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; remove it or write elsewhere")
        self._db = sqlite3.connect(self.path)
        self._db.executescript(DDL)
        rows = {"schema_version": SCHEMA_VERSION, "quantile_levels": list(QUANTILE_LEVELS),
                "hist_bins": HIST_BINS, **meta}
        self._db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in rows.items()])

    def add_features(self, records: Iterable[FeatureRecord]) -> None:
        for rec in records:
            if len(rec.quantiles) != len(QUANTILE_LEVELS) or len(rec.hist) != HIST_BINS:
                raise ValueError(f"feature {rec.feature}: {len(rec.quantiles)} quantiles / "
                                 f"{len(rec.hist)} bins, expected {len(QUANTILE_LEVELS)} / {HIST_BINS}")
            self._db.execute(
                "INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.feature, float(rec.max_act), int(rec.n_fired), float(rec.density),
                 np.asarray(rec.quantiles, np.float32).tobytes(),
                 np.asarray(rec.hist, np.int32).tobytes(),
                 _tokens_json(rec.top_tokens), _tokens_json(rec.promoted),
                 _tokens_json(rec.suppressed),
                 json.dumps([[int(f), float(j)] for f, j in rec.cooccur]),
                 rec.label, rec.label_source, rec.label_score))
            self._db.execute("INSERT INTO features_fts(rowid, label, tokens) VALUES (?,?,?)",
                             (rec.feature, rec.label, _fts_text(rec)))

    def add_examples(self, feature: int, examples: Sequence[Example]) -> None:
        """The feature's examples, strongest first (ranks 0, 1, ...)."""
        for rank, ex in enumerate(examples):
            if len(ex.token_ids) != len(ex.acts) or not 0 <= ex.peak < len(ex.token_ids):
                raise ValueError(f"feature {feature} example {rank}: window and peak do not agree")
            self._db.execute(
                "INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?)",
                (feature, rank, float(ex.activation), np.asarray(ex.token_ids, np.int32).tobytes(),
                 np.asarray(ex.acts, np.float32).tobytes(), ex.peak, ex.doc, ex.position, ex.context_offset))

    def add_random_windows(self, windows: Sequence[RandomWindow]) -> None:
        """The detection test's random windows, in the reservoir's order."""
        _insert_random_windows(self._db, windows)

    def close(self) -> None:
        """Commit and compact the file."""
        self._db.commit()
        self._db.execute("INSERT INTO features_fts(features_fts) VALUES ('optimize')")
        self._db.commit()
        self._db.execute("VACUUM")
        self._db.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # a half-written index is worse than none
            self._db.close()
            self.path.unlink(missing_ok=True)


def _insert_random_windows(db: sqlite3.Connection, windows: Sequence[RandomWindow]) -> None:
    db.executemany("INSERT INTO random_windows VALUES (?,?,?,?)",
                   [(i, int(w.ctx), np.asarray(w.token_ids, np.int32).tobytes(),
                     np.asarray(sorted(w.active), np.int32).tobytes()) for i, w in enumerate(windows)])


def update_labels(src: str | Path, dst: str | Path, updates: Iterable[LabelUpdate],
                  random_windows: Sequence[RandomWindow] | None = None) -> None:
    """Write a copy of the index ``src`` to ``dst`` with new labels (and the search text
    following them) and, when given, the ``random_windows`` table of an index written before
    it existed. ``dst`` is written under a temporary name and then renamed over, so a served
    file (opened immutable) is replaced whole, never changed under its readers; ``dst`` may
    be ``src``."""
    src, dst = Path(src), Path(dst)
    FeatureIndex(src).close()  # a readable index of this schema
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    shutil.copyfile(src, tmp)
    db = sqlite3.connect(tmp)
    try:
        for u in updates:
            cur = db.execute("UPDATE features SET label = ?, label_source = ?, label_score = ? WHERE feature = ?",
                             (u.label, u.label_source, u.label_score, int(u.feature)))
            if cur.rowcount != 1:
                raise FeatureIndexError(f"{src}: no feature {u.feature}")
            db.execute("UPDATE features_fts SET label = ? WHERE rowid = ?", (u.label, int(u.feature)))
        if random_windows is not None:
            db.executescript(RANDOM_WINDOWS_DDL)
            db.execute("DELETE FROM random_windows")
            _insert_random_windows(db, random_windows)
        db.commit()
        db.execute("INSERT INTO features_fts(features_fts) VALUES ('optimize')")
        db.commit()
        db.execute("VACUUM")
        db.close()
    except BaseException:
        db.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)


_WORD = re.compile(r"\w+", re.UNICODE)


def fts_query(q: str) -> str:
    """A user's search text as an FTS5 query: its words, each a prefix, all required.

    Raises ``ValueError`` when ``q`` has no word characters.
    """
    words = _WORD.findall(q)
    if not words:
        raise ValueError(f"search text {q!r} has no words")
    return " ".join(f'"{w}"*' for w in words)


class FeatureIndex:
    """A feature index opened read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureIndexError(f"no feature index at {self.path}")
        try:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True,
                                       check_same_thread=False)
            self.meta: dict[str, str] = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as e:
            raise FeatureIndexError(f"{self.path}: not a feature index ({e})") from e
        version = self.meta.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise FeatureIndexError(
                f"{self.path}: schema version {version}, this server reads {SCHEMA_VERSION}; "
                "rebuild it with sae-index")
        self.d_sae = int(self.meta["d_sae"])

    def close(self) -> None:
        self._db.close()

    @cached_property
    def max_activations(self) -> np.ndarray:
        """``max_act`` of every feature, float32 ``[d_sae]`` (0 for one that never fired)."""
        out = np.zeros(self.d_sae, np.float32)
        for f, m in self._db.execute("SELECT feature, max_act FROM features"):
            out[f] = m
        return out

    @cached_property
    def densities(self) -> np.ndarray:
        """Firing density of every feature, float32 ``[d_sae]``."""
        out = np.zeros(self.d_sae, np.float32)
        for f, d in self._db.execute("SELECT feature, density FROM features"):
            out[f] = d
        return out

    def labels(self, features: Iterable[int]) -> dict[int, str]:
        ids = sorted({int(f) for f in features})
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return dict(self._db.execute(
            f"SELECT feature, label FROM features WHERE feature IN ({marks})", ids))

    def feature(self, feature: int) -> FeatureRecord | None:
        row = self._db.execute("SELECT * FROM features WHERE feature = ?", (int(feature),)).fetchone()
        if row is None:
            return None
        (f, max_act, n_fired, density, quantiles, hist, top, promoted, suppressed, cooccur,
         label, label_source, label_score) = row
        return FeatureRecord(
            feature=f, max_act=max_act, n_fired=n_fired, density=density,
            quantiles=np.frombuffer(quantiles, np.float32).tolist(),
            hist=np.frombuffer(hist, np.int32).tolist(),
            top_tokens=_tokens_from(top), promoted=_tokens_from(promoted),
            suppressed=_tokens_from(suppressed),
            cooccur=[(int(a), float(b)) for a, b in json.loads(cooccur)],
            label=label, label_source=label_source, label_score=label_score)

    def examples(self, feature: int, limit: int | None = None) -> list[Example]:
        rows = self._db.execute(
            "SELECT activation, token_ids, acts, peak, doc, position, context_offset FROM examples "
            "WHERE feature = ? ORDER BY rank LIMIT ?", (int(feature), -1 if limit is None else limit))
        return [Example(activation=a, token_ids=np.frombuffer(t, np.int32).tolist(),
                        acts=np.frombuffer(x, np.float32).tolist(), peak=p, doc=d, position=pos,
                        context_offset=off)
                for a, t, x, p, d, pos, off in rows]

    def random_windows(self) -> list[RandomWindow] | None:
        """The detection test's random windows; None for an index written before the table
        existed."""
        has = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'random_windows'")
        if has.fetchone() is None:
            return None
        rows = self._db.execute("SELECT ctx, token_ids, active FROM random_windows ORDER BY slot")
        return [RandomWindow(ctx=c, token_ids=np.frombuffer(t, np.int32).tolist(),
                             active=np.frombuffer(a, np.int32).tolist()) for c, t, a in rows]

    def label_sources(self) -> dict[int, str]:
        """``label_source`` of every feature."""
        return dict(self._db.execute("SELECT feature, label_source FROM features"))

    def search(self, q: str, limit: int = 20) -> list[SearchHit]:
        """Features whose label or top tokens match every word of ``q`` (as prefixes), best
        first. Raises ``ValueError`` for a query with no words."""
        rows = self._db.execute(
            "SELECT f.feature, f.label, fts.rank FROM features_fts AS fts "
            "JOIN features AS f ON f.feature = fts.rowid "
            "WHERE features_fts MATCH ? ORDER BY fts.rank LIMIT ?", (fts_query(q), int(limit)))
        return [SearchHit(feature=f, label=label, rank=rank) for f, label, rank in rows]
