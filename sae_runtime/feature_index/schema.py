"""The feature index's on-disk format: one SQLite file beside a dictionary.

``feature_index.sqlite`` holds, for every feature of one dictionary, what ``sae-index``
measured over a corpus (its max-activating contexts, the distribution of its nonzero
activations, how often it fires, the tokens it promotes and suppresses, the features it
fires with) and a label with the score of a detection test. Servers open it read-only
(every replica, concurrently). The tables:

``meta(key TEXT PRIMARY KEY, value TEXT)``
    ``schema_version`` (:data:`SCHEMA_VERSION`), ``dictionary_id``, ``model``,
    ``hook_point``, ``d_sae``, ``corpus`` (what was read), ``tokens_scored`` (tokens the
    statistics are over: position 0, special tokens and attention sinks excluded), ``top_n``, ``window``,
    ``quantile_levels`` and ``hist_bins`` (JSON), ``label_method``, ``created`` (UTC ISO
    time), ``builder`` (the sae-serve version); ``sae-index`` adds ``architecture``,
    ``contexts`` and ``context_tokens`` (what was read), ``ctx_len`` and ``data_seed`` (how
    the corpus was cut and sampled: documents tokenized without special tokens, contexts of
    ``ctx_len`` tokens never crossing a document), ``top_k`` (features read per token) and
    ``top_k_complete`` (``true`` when that is every nonzero feature: a TopK dictionary; for
    other architectures the statistics see only each token's ``top_k`` strongest),
    ``quantile_method``, ``sink_rule`` (which tokens beyond position 0 were left out as
    attention sinks: those whose residual-stream norm at the hook point exceeds 10x the
    median norm of the scored tokens of their shard, sae-train's rule,
    ``sae_runtime.training.activations.SINK_NORM_FACTOR``) and ``sink_tokens`` (how many
    were; not in ``tokens_scored``). Values are text; numbers as decimal, lists as JSON.

``features`` — one row per feature, every feature present (a feature that never fired
has ``n_fired = 0``, ``max_act = 0`` and no examples):
    ``feature INTEGER PRIMARY KEY`` — the feature's index in the dictionary;
    ``max_act REAL`` — largest activation seen;
    ``n_fired INTEGER`` and ``density REAL`` — tokens where it was nonzero, and that count
    over ``tokens_scored``;
    ``quantiles BLOB`` — float32 × len(:data:`QUANTILE_LEVELS`), quantiles of its nonzero
    activations, not exact: read from a fine log-spaced histogram (2048 bins over
    1e-3..1e5, each ×1.009 wide; the inverted-CDF quantile interpolated in its bin, capped
    at ``max_act``), so within ~1% of the exact value;
    ``hist BLOB`` — int32 × :data:`HIST_BINS`, counts of its nonzero activations in equal
    bins over ``(0, max_act]`` (bin ``b`` holds ``(b/B·max, (b+1)/B·max]``), from the same
    fine histogram (a count whose fine bin straddles a boundary may sit one bin off); the
    counts add up to ``n_fired``;
    ``top_tokens TEXT`` — JSON ``[[token_id, token, count], ...]``: the tokens at which its
    top examples peak, most frequent first;
    ``promoted TEXT``, ``suppressed TEXT`` — JSON ``[[token_id, token, score], ...]``: the
    logit-lens tokens of its decoder direction;
    ``cooccur TEXT`` — JSON ``[[feature, jaccard], ...]``: the features firing on the same
    tokens most often, by Jaccard index of their firing sets;
    ``label TEXT``, ``label_source TEXT`` (``"tokens"`` for the deterministic label,
    ``"explainer:<model>"`` for one written by a language model), ``label_score REAL`` —
    the label's detection score (balanced accuracy of picking held-out activating contexts
    out of non-activating ones using the label; 0.5 is chance), NULL when not scored: for a
    ``tokens`` label the contexts holding one of its words (:mod:`.labels`), for an
    explainer's label those the explainer itself says match it (:mod:`.explainer`).

``examples`` — the top-N max-activating contexts of each feature:
    ``feature INTEGER``, ``rank INTEGER`` (0 = strongest), ``activation REAL`` (the peak),
    ``token_ids BLOB`` (int32 × window), ``acts BLOB`` (float32 × window: the feature's
    activation at each token of the window; 0 at positions the statistics exclude: position 0,
    special tokens and attention sinks), ``peak INTEGER`` (offset of the peak token in the window),
    ``doc TEXT`` (document id in the corpus), ``position INTEGER`` (the peak's position in its context),
    ``context_offset INTEGER`` (where the context starts in its document, in tokens of the
    document tokenized without special tokens: the context is that token list's slice
    ``[context_offset, context_offset + ctx_len)``, so ``position + 1`` tokens from there
    reproduce the peak); primary key ``(feature, rank)``.

``random_windows`` — the random corpus windows of the detection test (the non-activating
side of every label's score, :mod:`.labels` and :mod:`.explainer`), kept so that labels can
be made and scored again without reading the corpus (``sae-index --label-only``):
    ``slot INTEGER PRIMARY KEY`` (0, 1, ...: the reservoir's order), ``ctx INTEGER`` (the
    context's id in the build's sample: the contexts with the smallest seeded hash of their
    id, :func:`.stats.random_key`), ``token_ids BLOB`` (int32 × up to ``window`` tokens),
    ``active BLOB`` (int32, ascending: the features firing at a scored token of the window).
    An index written before this table existed has none; ``--label-only`` then harvests the
    same windows again (only their contexts) and adds it.

``features_fts`` — FTS5 over ``label`` and ``tokens`` (the top and promoted tokens as
text), ``rowid`` = feature; searched by ``GET /v1/dictionaries/{id}/features?q=``.
"""

from __future__ import annotations

INDEX_FILE = "feature_index.sqlite"
"""The index's file name inside a dictionary's folder."""

SCHEMA_VERSION = 1

QUANTILE_LEVELS: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
"""Levels of the stored quantiles of each feature's nonzero activations."""

HIST_BINS = 32
"""Bins of each feature's activation histogram (equal width over ``(0, max_act]``)."""

RANDOM_WINDOWS_DDL = """
CREATE TABLE IF NOT EXISTS random_windows (
    slot INTEGER PRIMARY KEY,
    ctx INTEGER NOT NULL,
    token_ids BLOB NOT NULL,
    active BLOB NOT NULL
);
"""

DDL = RANDOM_WINDOWS_DDL + """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    feature INTEGER PRIMARY KEY,
    max_act REAL NOT NULL,
    n_fired INTEGER NOT NULL,
    density REAL NOT NULL,
    quantiles BLOB NOT NULL,
    hist BLOB NOT NULL,
    top_tokens TEXT NOT NULL,
    promoted TEXT NOT NULL,
    suppressed TEXT NOT NULL,
    cooccur TEXT NOT NULL,
    label TEXT NOT NULL,
    label_source TEXT NOT NULL,
    label_score REAL
);
CREATE TABLE examples (
    feature INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    activation REAL NOT NULL,
    token_ids BLOB NOT NULL,
    acts BLOB NOT NULL,
    peak INTEGER NOT NULL,
    doc TEXT NOT NULL,
    position INTEGER NOT NULL,
    context_offset INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (feature, rank)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE features_fts USING fts5(label, tokens, tokenize = 'unicode61');
"""
