"""The service's use of a feature index, without an engine: the ``features`` options
(normalize, labels, exclude_dense_above), the card of a dictionary without an index, the
errors, and the search-by-example arithmetic. Through the real server:
tests/test_server_feature_index.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sae_runtime.default_model import MODEL_NAME
from sae_runtime.engine.spec import FeatureRequest, SpecLimits
from sae_runtime.feature_index import HIST_BINS, QUANTILE_LEVELS, FeatureIndex, FeatureRecord, IndexWriter
from sae_runtime.registry import DictionaryRegistry
from sae_wire.models import DictionaryFeatures, TokenFeaturesOut
from server import index_views
from server.errors import ApiError, ErrorKind
from server.metrics import ServiceMetrics
from server.service import SAEService
from tests.dictionary_factory import make_dictionary

# feature: (max_act, density, label)
FEATURES = {0: (2.0, 0.5, "dense zero"), 1: (4.0, 0.01, "one"), 2: (0.0, 0.0, "never"), 3: (8.0, 0.02, "three"),
            4: (1.0, 0.9, "dense four"), 5: (5.0, 0.001, "five")}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> DictionaryRegistry:
    from sae_runtime.dictionary import SparseDictionary

    root = tmp_path_factory.mktemp("idx")
    with_index = make_dictionary(root / "with", layer=1, d_sae=6, architecture="standard", seed=3)
    with IndexWriter(with_index / "feature_index.sqlite", {"d_sae": 6}) as w:
        w.add_features([FeatureRecord(f, m, int(d * 100), d, [0.0] * len(QUANTILE_LEVELS), [0] * HIST_BINS, label=lab)
                        for f, (m, d, lab) in FEATURES.items()])
    without = make_dictionary(root / "without", layer=1, d_sae=6, architecture="standard", seed=4)
    entries = [DictionaryRegistry.entry(SparseDictionary.load(str(with_index)), id="with"),
               DictionaryRegistry.entry(SparseDictionary.load(str(without)), id="without")]
    return DictionaryRegistry(entries, model_name=MODEL_NAME, num_layers=30, hidden_size=576)


def tokens(*per_token: DictionaryFeatures) -> list[TokenFeaturesOut]:
    return [TokenFeaturesOut(position=p, token_id=7, token="x", is_prompt=True, features=[d])
            for p, d in enumerate(per_token)]


def test_normalize_labels_and_dense_exclusion_rewrite_the_engine_features(registry):
    idx = registry.get("with").index
    assert isinstance(idx, FeatureIndex)
    req = FeatureRequest(dictionaries=["with"], top_k=2, feature_ids=[3, 2], normalize="max", labels=True,
                         exclude_dense_above=0.1)
    # What the worker returned for top_k + 2 dense features = 4, strongest first.
    toks = tokens(DictionaryFeatures(dictionary="with", indices=[4, 3, 0, 2], values=[9.0, 4.0, 3.0, 0.5],
                                     feature_values=[4.0, 0.5]))
    out = index_views.apply_feature_options(toks, req, registry)[0].features[0]
    assert out.indices == [3, 2]  # 4 and 0 are denser than 0.1; then cut to top_k
    assert out.values == pytest.approx([0.5, 1.0])  # 4/8; feature 2 never fired while indexing: 1.0
    assert out.feature_values == pytest.approx([0.5, 1.0])
    assert out.labels == ["three", "never"] and out.feature_labels == ["three", "never"]
    # Only feature_ids: values and labels follow the ids.
    ids_only = FeatureRequest(dictionaries=["with"], feature_ids=[5, 1], normalize="max", labels=True)
    out = index_views.apply_feature_options(
        tokens(DictionaryFeatures(dictionary="with", values=[0.0, 2.0])), ids_only, registry)[0].features[0]
    assert out.values == [0.0, 0.5] and out.labels == ["five", "one"] and out.feature_labels is None
    # No option asked: untouched.
    plain = tokens(DictionaryFeatures(dictionary="with", indices=[4], values=[9.0]))
    assert index_views.apply_feature_options(plain, FeatureRequest(dictionaries=["with"]), registry)[0] \
        .features[0].values == [9.0]


def test_dense_exclusion_widens_the_worker_request_exactly(registry):
    req = FeatureRequest(dictionaries=["with"], top_k=2, exclude_dense_above=0.1)
    assert index_views.worker_features(req, registry, SpecLimits()).top_k == 4  # 2 + the 2 dense ones
    assert index_views.worker_features(req.model_copy(update={"top_k": 5}), registry, SpecLimits()).top_k == 6  # d_sae
    assert index_views.worker_features(req.model_copy(update={"exclude_dense_above": 0.95}), registry,
                                       SpecLimits()).top_k == 2  # nothing that dense
    with pytest.raises(ApiError) as err:
        index_views.worker_features(req, registry, SpecLimits(max_top_k=3))
    assert err.value.field == "features.exclude_dense_above" and "max_top_k" in err.value.message


@pytest.mark.parametrize("option,field", [({"normalize": "max"}, "features.normalize"),
                                          ({"labels": True}, "features.labels"),
                                          ({"exclude_dense_above": 0.5}, "features.exclude_dense_above")])
def test_options_need_an_index(registry, option, field):
    index_views.check_feature_options(FeatureRequest(dictionaries=["with"], **option), registry)
    with pytest.raises(ApiError) as err:
        index_views.check_feature_options(FeatureRequest(dictionaries=["with", "without"], **option), registry)
    assert err.value.field == field and err.value.http_status == 400 and "'without'" in err.value.message


def test_exclusion_needs_top_k(registry):
    with pytest.raises(ApiError) as err:
        index_views.check_feature_options(
            FeatureRequest(dictionaries=["with"], feature_ids=[1], exclude_dense_above=0.5), registry)
    assert err.value.field == "features.exclude_dense_above"


def _service(registry) -> SAEService:
    tokenizer = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
    engine = SimpleNamespace(model_name="m", registry=registry, tokenizer=tokenizer,
                             config=SimpleNamespace(max_model_len=64))
    service = SAEService(engine, ServiceMetrics("test"))  # type: ignore[arg-type]
    service._unembedding = SimpleNamespace(top_tokens=lambda d, n: ([(1, 0.5)], [(2, -0.5)]))  # type: ignore
    return service


def test_card_says_when_the_index_is_missing_and_search_needs_one(registry):
    service = _service(registry)
    card = service.feature_info("without", 1)
    assert card.has_index is False and card.index is None and card.top_promoted[0].token == "<1>"
    card = service.feature_info("with", 3, examples=0)
    assert card.has_index and card.index is not None and card.index.label == "three" and card.density == 0.02
    with pytest.raises(ApiError) as err:
        service.search_features("without", "one")
    assert (err.value.kind, err.value.http_status, err.value.grpc_code.name, err.value.field) == (
        ErrorKind.NO_INDEX, 409, "FAILED_PRECONDITION", "dictionary")
    assert {h.feature for h in service.search_features("with", "dense").results} == {0, 4}


def test_example_scores_are_relative_to_the_max_and_minus_the_contrast():
    maxes = np.array([2.0, 4.0, 0.0], "float32")
    toks = [TokenFeaturesOut(position=p, token_id=t, token="", is_prompt=True,
                             features=[DictionaryFeatures(dictionary="d", indices=[0, 1, 2], values=v)])
            for p, t, v in [(0, 5, [100.0, 100.0, 1.0]),  # position 0: left out
                            (1, 9, [50.0, 50.0, 1.0]),  # a special token: left out
                            (2, 6, [1.0, 2.0, 1.0]), (3, 6, [2.0, 1.0, 0.0])]]
    s = index_views.text_scores(toks, "d", maxes, skip_ids={9})
    assert s == {0: 1.0, 1: 0.5}  # max over tokens of a / max; feature 2 has no max
    assert index_views.text_scores(toks[:2], "d", maxes, {9}) is None
    assert index_views.example_scores([s, {0: 0.5}], [{0: 0.25, 1: 1.0}]) == {0: 0.75 - 0.25, 1: 0.25 - 1.0}
