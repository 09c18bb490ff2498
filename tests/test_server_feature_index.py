"""The feature index through the running server, over HTTP and gRPC: the feature card, search
by label and token, search by example, and the ``features`` options that read the index
(``normalize``, ``labels``, ``exclude_dense_above``).

The session server's dictionary has an index built from the default model's real
activations over a small corpus (``tests/index_factory.py``), so the server's numbers and
the index's agree: every expectation is read from the index file itself.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from sae_runtime.feature_index import INDEX_FILE, QUANTILE_LEVELS, FeatureIndex
from tests.index_factory import CORPUS
from tests.server_fixtures import DICTIONARY_ID

pytestmark = pytest.mark.slow

D = DICTIONARY_ID


@pytest.fixture(scope="module")
def index(sae_server) -> FeatureIndex:
    return FeatureIndex(sae_server.dictionary_dir / INDEX_FILE)


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=300) as c:
        yield c


@pytest.fixture
def rpc(live_server):
    from clients.grpc_client import SAEClient

    with SAEClient(live_server.grpc_target, timeout_s=300) as c:
        yield c


def same(a: Any, b: Any, rel: float = 1e-6) -> bool:
    """Equal, floats to ``rel`` (gRPC carries float32)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-7)
    return a == b


def test_feature_card_carries_what_the_index_holds(http, rpc, index):
    f = int(np.argmax(index.max_activations))
    rec = index.feature(f)
    card = http.get(f"/v1/dictionaries/{D}/features/{f}", params={"examples": 2}).json()
    assert card["has_index"] is True and card["density"] == pytest.approx(rec.density)
    c = card["index"]
    assert (c["label"], c["label_source"], c["label_score"]) == (rec.label, rec.label_source, rec.label_score)
    assert c["max_activation"] == pytest.approx(rec.max_act) and c["n_fired"] == rec.n_fired
    assert c["quantile_levels"] == list(QUANTILE_LEVELS) and c["quantiles"] == pytest.approx(rec.quantiles)
    assert c["histogram"] == rec.hist and c["histogram_max"] == pytest.approx(rec.max_act)
    assert [(t["token_id"], t["token"], t["count"]) for t in c["top_tokens"]] == [
        (t.token_id, t.token, t.value) for t in rec.top_tokens]
    co_labels = index.labels(g for g, _ in rec.cooccur)
    assert rec.cooccur and [(x["feature"], x["jaccard"], x["label"]) for x in c["cooccurring"]] == [
        (g, pytest.approx(j), co_labels[g]) for g, j in rec.cooccur]
    stored = index.examples(f, 2)
    assert len(c["examples"]) == 2
    for got, e in zip(c["examples"], stored, strict=True):
        assert got["token_ids"] == e.token_ids and got["activations"] == pytest.approx(e.acts)
        assert (got["peak"], got["doc"], got["position"]) == (e.peak, e.doc, e.position)
        assert got["activation"] == pytest.approx(e.activation) and len(got["tokens"]) == len(e.token_ids)
    # The example's token texts put together are its corpus text.
    assert "".join(c["examples"][0]["tokens"]).strip() == CORPUS[int(stored[0].doc.split("-")[1])].strip()
    # gRPC: the same card.
    assert same(rpc.get_feature(D, f, examples=2).model_dump(), card)
    # examples=0: the card without contexts; the default is ten (at most what is stored).
    assert http.get(f"/v1/dictionaries/{D}/features/{f}", params={"examples": 0}).json()["index"]["examples"] == []
    assert len(http.get(f"/v1/dictionaries/{D}/features/{f}").json()["index"]["examples"]) == len(index.examples(f))


def test_search_finds_features_by_label_and_by_top_token(http, rpc, index):
    # A feature whose second top token is a word that is not in its label: found by the token.
    for f in range(index.d_sae):
        rec = index.feature(f)
        if len(rec.top_tokens) >= 2:
            word = rec.top_tokens[1].token.strip()
            if word.isalpha() and len(word) >= 4 and word.lower() not in rec.label.lower():
                break
    else:
        pytest.fail("no feature with a word as its second top token")
    r = http.get(f"/v1/dictionaries/{D}/features", params={"q": word, "limit": 100}).json()
    hits = {h["feature"]: h for h in r["results"]}
    assert r["dictionary"] == D and r["query"] == word and f in hits
    assert hits[f]["label"] == rec.label and hits[f]["density"] == pytest.approx(rec.density)
    assert hits[f]["max_activation"] == pytest.approx(rec.max_act)
    # By label: every word of a label, as prefixes, finds that feature.
    label_words = " ".join(w[:4] for w in rec.label.split())
    by_label = http.get(f"/v1/dictionaries/{D}/features", params={"q": label_words, "limit": 1000}).json()
    assert f in [h["feature"] for h in by_label["results"]]
    assert http.get(f"/v1/dictionaries/{D}/features", params={"q": "zzqxj"}).json()["results"] == []
    assert len(http.get(f"/v1/dictionaries/{D}/features", params={"q": word, "limit": 1}).json()["results"]) == 1
    assert same(rpc.search_features(D, word, 100).model_dump(), r)


def _extract(http: httpx.Client, text: str, **features: Any) -> list[dict]:
    r = http.post("/v1/features/extract", json={"text": text, "features": {"dictionaries": [D], **features}})
    assert r.status_code == 200, r.text
    return [t["features"][0] for t in r.json()["tokens"]]


def test_normalize_max_divides_by_the_indexed_max_and_labels_come_beside(http, rpc, index):
    text = CORPUS[1]
    maxes = index.max_activations
    fired = [int(f) for f in np.flatnonzero(maxes > 0)[:5]]
    base = _extract(http, text, top_k=16, feature_ids=fired)
    norm = _extract(http, text, top_k=16, feature_ids=fired, normalize="max", labels=True)
    labels = index.labels(range(index.d_sae))
    checked = 0
    for b, n in zip(base, norm, strict=True):
        assert n["indices"] == b["indices"]
        for i, raw, got in zip(b["indices"], b["values"], n["values"], strict=True):
            if maxes[i] > 0:
                assert got == pytest.approx(raw / float(maxes[i]), rel=1e-6, abs=1e-9)
                checked += 1
            else:  # never fired while indexing: 1.0 when it fires now
                assert got == (1.0 if raw != 0 else 0.0)
        expected = [v / float(maxes[f]) for v, f in zip(b["feature_values"], fired, strict=True)]
        assert n["feature_values"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert n["labels"] == [labels[i] for i in b["indices"]]
        assert n["feature_labels"] == [labels[f] for f in fired]
        assert b["labels"] is None and b["feature_labels"] is None  # only when asked
    assert checked > len(base)
    # gRPC: the same request, the same answer.
    over_grpc = rpc.extract(text, features={"dictionaries": [D], "top_k": 16, "feature_ids": fired,
                                            "normalize": "max", "labels": True})
    assert same([t.features[0].model_dump() for t in over_grpc.tokens], norm, rel=1e-5)


def test_exclude_dense_above_gives_the_top_k_among_the_other_features(http, rpc, index):
    dens = index.densities
    thr = float(np.sort(dens)[::-1][20])  # about 20 features are denser than this
    text = CORPUS[4]
    full = _extract(http, text, top_k=16)  # every active feature of the k=16 dictionary
    assert any(dens[i] > thr for b in full for i in b["indices"]), "no dense feature fires on the text"
    got = _extract(http, text, top_k=4, exclude_dense_above=thr)
    for b, g in zip(full, got, strict=True):
        keep = [j for j, i in enumerate(b["indices"]) if dens[i] <= thr][:4]
        assert g["indices"] == [b["indices"][j] for j in keep]
        assert g["values"] == pytest.approx([b["values"][j] for j in keep], rel=1e-5, abs=1e-6)
    assert sum(len(g["indices"]) == 4 for g in got) > len(got) // 2
    over_grpc = rpc.extract(text, features={"dictionaries": [D], "top_k": 4, "exclude_dense_above": thr})
    assert same([t.features[0].model_dump() for t in over_grpc.tokens], got, rel=1e-5)


def test_streamed_features_carry_labels(http, rpc, index):
    feats = {"dictionaries": [D], "top_k": 3, "labels": True, "scope": "generated"}
    chunks = list(rpc.generate("The capital of France is", sampling={"max_tokens": 4, "temperature": 0},
                               features=feats))
    streamed = [d for ch in chunks for t in ch.features for d in t.features]
    assert streamed and all(d.labels == [index.labels(d.indices)[i] for i in d.indices] for d in streamed)
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True,
            "features": feats}
    seen = 0
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                for t in choice.get("features") or []:
                    d = t["features"][0]
                    assert d["labels"] == [index.labels(d["indices"])[i] for i in d["indices"]]
                    seen += 1
    assert seen >= 1


def test_search_by_example_ranks_features_that_fire_on_the_texts(http, rpc, index):
    maxes, dens = index.max_activations, index.densities
    # A rare feature whose strongest context is a corpus text: its score there is ~1.
    rare = [f for f in range(index.d_sae) if 0 < dens[f] < 0.05 and index.examples(f, 1)]
    f = max(rare, key=lambda g: maxes[g])
    doc = int(index.examples(f, 1)[0].doc.split("-")[1])
    text = CORPUS[doc]
    # A feature that fired while indexing, but on none of this text's scored tokens.
    silent = next(g for g in range(index.d_sae) if maxes[g] > 0 and len(index.examples(g)) < 5
                  and all(e.doc != f"doc-{doc}" for e in index.examples(g)))
    body = {"dictionary": D, "texts": [text], "limit": 512}
    r = http.post("/v1/features/search", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    scores = {h["feature"]: h["score"] for h in results}
    assert scores[f] == pytest.approx(1.0, abs=0.02)
    assert scores.get(silent, 0.0) < scores[f]
    assert [h["score"] for h in results] == sorted(scores.values(), reverse=True)
    hit = next(h for h in results if h["feature"] == f)
    assert hit["label"] == index.feature(f).label and hit["max_activation"] == pytest.approx(float(maxes[f]))
    # Contrast texts lower the score of what fires on them too: the text against itself scores ~0.
    contrast = http.post("/v1/features/search", json={**body, "contrast_texts": [text]}).json()["results"]
    assert {h["feature"]: h["score"] for h in contrast}[f] < scores[f] - 0.9
    # Dense features left out.
    thr = float(np.sort(dens)[::-1][20])
    sparse = http.post("/v1/features/search", json={**body, "exclude_dense_above": thr}).json()["results"]
    assert f in [h["feature"] for h in sparse] and all(h["density"] <= thr for h in sparse)
    assert len(sparse) < len(results)
    # gRPC: the same ranking.
    assert same(rpc.search_by_example(body).model_dump(), r.json(), rel=1e-5)
