"""What the service reads from the dictionaries' feature indexes (``feature_index.sqlite``).

The index is built offline by ``sae-index`` and opened read-only by the registry
(``RegisteredDictionary.index``). This module turns it into wire models and applies it to
extracted features:

- the index part of a feature card (:func:`index_card`), search by label and top tokens
  (:func:`search`), and the ranking of search by example (:func:`example_scores`);
- the ``features`` options that need an index (``normalize``, ``labels``,
  ``exclude_dense_above``): checked before the engine (:func:`check_feature_options`), the
  request the worker gets widened so that leaving dense features out of the top k stays
  exact (:func:`worker_features`), and the engine's per-token features rewritten for the
  client (:func:`apply_feature_options`).

Every check raises :class:`ApiError` naming the field; nothing here touches the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sae_runtime.engine.spec import FeatureRequest, SpecLimits
from sae_runtime.feature_index import QUANTILE_LEVELS, FeatureIndex
from sae_runtime.registry import DictionaryRegistry, RegisteredDictionary
from sae_wire.models import (
    CooccurringFeature,
    DictionaryFeatures,
    FeatureExampleOut,
    FeatureIndexCard,
    FeatureSearchHit,
    TokenCountOut,
    TokenFeaturesOut,
)
from server.errors import ApiError, ErrorKind

MAX_EXAMPLES = 100
"""Most max-activating examples one feature card carries (``examples`` query parameter)."""
DEFAULT_EXAMPLES = 10
MAX_SEARCH_LIMIT = 1000


def require_index(entry: RegisteredDictionary, field: str = "dictionary") -> FeatureIndex:
    """The dictionary's index, or 409 / FAILED_PRECONDITION naming ``field``."""
    if entry.index is None:
        raise ApiError(ErrorKind.NO_INDEX, f"dictionary '{entry.id}' has no feature index "
                       "(build feature_index.sqlite in its folder with sae-index and restart the server)", field)
    return entry.index


# -- the feature card and search --------------------------------------------------------------

def index_card(index: FeatureIndex, feature: int, examples: int, token_text: Callable[[int], str]) -> FeatureIndexCard:
    rec = index.feature(feature)
    if rec is None:  # every feature has a row; a gap means a damaged file
        raise ApiError(ErrorKind.INTERNAL, f"the feature index has no row for feature {feature}")
    co_labels = index.labels(f for f, _ in rec.cooccur)
    return FeatureIndexCard(
        label=rec.label, label_source=rec.label_source, label_score=rec.label_score, max_activation=rec.max_act,
        density=rec.density, n_fired=rec.n_fired, quantile_levels=list(QUANTILE_LEVELS), quantiles=rec.quantiles,
        histogram=rec.hist, histogram_max=rec.max_act,
        top_tokens=[TokenCountOut(token_id=t.token_id, token=t.token, count=t.value) for t in rec.top_tokens],
        cooccurring=[CooccurringFeature(feature=f, jaccard=j, label=co_labels.get(f, "")) for f, j in rec.cooccur],
        examples=[FeatureExampleOut(activation=e.activation, tokens=[token_text(t) for t in e.token_ids],
                                    token_ids=e.token_ids, activations=e.acts, peak=e.peak, doc=e.doc,
                                    position=e.position)
                  for e in index.examples(feature, examples)],
    )


def search(index: FeatureIndex, q: str, limit: int) -> list[FeatureSearchHit]:
    if not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise ApiError.invalid("limit", f"must be between 1 and {MAX_SEARCH_LIMIT} (got {limit})")
    try:
        hits = index.search(q, limit)
    except ValueError as exc:
        raise ApiError.invalid("q", f"{exc}: give at least one word (letters or digits)") from None
    maxes, dens = index.max_activations, index.densities
    return [FeatureSearchHit(feature=h.feature, label=h.label, density=float(dens[h.feature]),
                             max_activation=float(maxes[h.feature])) for h in hits]


# -- the ``features`` options that read the index ---------------------------------------------

def _wants_index(f: FeatureRequest) -> str | None:
    """The first option of ``f`` that needs an index (its field name), or None."""
    if f.normalize != "none":
        return "features.normalize"
    if f.labels:
        return "features.labels"
    if f.exclude_dense_above is not None:
        return "features.exclude_dense_above"
    return None


def check_feature_options(features: FeatureRequest | None, registry: DictionaryRegistry) -> None:
    """400 naming the option when a dictionary of the request has no index (unknown
    dictionaries are left to the engine's validation, which answers 404)."""
    if features is None:
        return
    field = _wants_index(features)
    if field is None:
        return
    if features.exclude_dense_above is not None and features.top_k is None:
        raise ApiError.invalid("features.exclude_dense_above", "applies to top_k, and only feature_ids were asked")
    for name in features.dictionaries:
        if name in registry and registry.get(name).index is None:
            raise ApiError.invalid(field, f"dictionary '{name}' has no feature index, which this option reads "
                                   "(build one with sae-index)")


def _excluded(index: FeatureIndex, threshold: float) -> np.ndarray:
    return np.flatnonzero(index.densities > threshold)


def worker_features(features: FeatureRequest, registry: DictionaryRegistry, limits: SpecLimits) -> FeatureRequest:
    """The request the engine runs for ``features`` (already validated).

    With ``exclude_dense_above``, the worker is asked for ``top_k + E`` features per token,
    ``E`` the number of dense features of the dictionary with the most: whatever the token,
    at most ``E`` of those are dense, so after :func:`apply_feature_options` drops them at
    least ``top_k`` remain and they are exactly the ``top_k`` strongest non-dense features.
    """
    thr = features.exclude_dense_above
    if thr is None or features.top_k is None:
        return features
    entries = [registry.get(n) for n in features.dictionaries]
    dense = max(len(_excluded(require_index(e), thr)) for e in entries)
    if dense == 0:
        return features
    k = features.top_k + dense
    if k > limits.max_top_k:
        raise ApiError.invalid(
            "features.exclude_dense_above",
            f"excludes {dense} features, so the engine would rank top_k + {dense} = {k} features per token, over "
            f"the limit of {limits.max_top_k} (max_top_k); raise the threshold or lower top_k")
    return features.model_copy(update={"top_k": min(k, min(e.d_sae for e in entries))})


def _normalized(values: Sequence[float], ids: Sequence[int], maxes: np.ndarray) -> list[float]:
    """``value / max`` per feature; a feature whose indexed max is 0 (it never fired while
    indexing) gives 1.0 when it fires (beyond anything recorded) and 0.0 when it does not."""
    v = np.asarray(values, np.float64)
    m = maxes[np.asarray(ids, np.int64)].astype(np.float64) if len(ids) else np.zeros(0)
    out = np.where(m > 0, v / np.where(m > 0, m, 1.0), np.where(v != 0, 1.0, 0.0))
    return out.tolist()


def apply_feature_options(tokens: list[TokenFeaturesOut], features: FeatureRequest | None,
                          registry: DictionaryRegistry) -> list[TokenFeaturesOut]:
    """Rewrite the engine's features (in place) as ``features`` asks: dense features out of the
    top k (then cut to ``top_k``), values normalised, labels added."""
    if features is None or _wants_index(features) is None or not tokens:
        return tokens
    ids = features.feature_ids or []
    for name in features.dictionaries:
        index = registry.get(name).index
        if index is None:  # refused before the engine (check_feature_options)
            continue
        items = [d for t in tokens for d in t.features if d.dictionary == name]
        if features.exclude_dense_above is not None and features.top_k is not None:
            dens = index.densities
            for d in items:
                if d.indices is not None:
                    keep = [j for j, i in enumerate(d.indices) if dens[i] <= features.exclude_dense_above]
                    keep = keep[: features.top_k]
                    d.indices = [d.indices[j] for j in keep]
                    d.values = [d.values[j] for j in keep]
        if features.normalize == "max":
            maxes = index.max_activations
            for d in items:
                d.values = _normalized(d.values, d.indices if d.indices is not None else ids, maxes)
                if d.feature_values is not None:
                    d.feature_values = _normalized(d.feature_values, ids, maxes)
        if features.labels:
            seen = set(ids)
            for d in items:
                seen.update(d.indices or ())
            labels = index.labels(seen)
            for d in items:
                _label(d, ids, labels)
    return tokens


def _label(d: DictionaryFeatures, ids: Sequence[int], labels: dict[int, str]) -> None:
    d.labels = [labels.get(i, "") for i in (d.indices if d.indices is not None else ids)]
    if d.feature_values is not None:
        d.feature_labels = [labels.get(i, "") for i in ids]


# -- search by example ------------------------------------------------------------------------

def text_scores(tokens: list[TokenFeaturesOut], dictionary: str, maxes: np.ndarray,
                skip_ids: set[int]) -> dict[int, float] | None:
    """``max over tokens of activation / max_activation`` per feature of one text, over every
    token but position 0 and special tokens; None when no token is left."""
    scores: dict[int, float] = {}
    counted = 0
    for t in tokens:
        if t.position == 0 or t.token_id in skip_ids:
            continue
        counted += 1
        for d in t.features:
            if d.dictionary != dictionary or d.indices is None:
                continue
            for i, v in zip(d.indices, d.values, strict=True):
                m = float(maxes[i])
                if v > 0 and m > 0:
                    r = v / m
                    if r > scores.get(i, 0.0):
                        scores[i] = r
    return scores if counted else None


def example_scores(texts: list[dict[int, float]], contrast: list[dict[int, float]]) -> dict[int, float]:
    """Mean over ``texts`` of each feature's text score, minus the mean over ``contrast``;
    only features that fire on at least one of ``texts``."""
    out: dict[int, float] = {}
    for s in texts:
        for f, v in s.items():
            out[f] = out.get(f, 0.0) + v / len(texts)
    for s in contrast:
        for f, v in s.items():
            if f in out:
                out[f] -= v / len(contrast)
    return out
