"""benchmarks/steering_eval.py in its dry-run size on the session engine: every method of the
evaluation runs through the real engine (SAE edits, a contrastive vector made by the server's
own code, prompting, the unsteered baseline) and is scored and reported."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow


def test_dry_run_reports_every_method(sae_engine):
    if sae_engine.mode != "eager":
        pytest.skip("the evaluation's logic is the same in both modes; run once, on the eager engine")
    from benchmarks import steering_eval as se

    if "trained" not in sae_engine.ids:
        pytest.skip("the default dictionary (with its feature index) is not in this checkout")
    settings = se.Settings.dry_run()
    report = sae_engine.run(se.evaluate(sae_engine.engine, sae_engine.ids["trained"], settings, log=lambda m: None))

    methods = ["prompting", *se.SWEEPS]
    assert [b["method"] for b in report["best"]] == methods
    swept = {(r["method"], r["strength"]) for r in report["sweep"]}
    assert swept == {("prompting", None)} | {(m, s) for m, (_, _, ss) in se.SWEEPS.items() for s in ss[:2]}
    (concept,) = report["concepts"]
    assert concept["concept"] == se.CONCEPTS[0].word and concept["label_score"] >= settings.min_label_score
    assert se.CONCEPTS[0].word in concept["label"].split("→")[0]
    completions = report["completions"]
    # one unsteered sample, prompting, and two strengths of each sweep, for one concept and one prompt
    assert len(completions) == 1 + 1 + 2 * len(se.SWEEPS)
    for j in completions:
        assert 0 < len(j["text"]) and -1.0 <= j["concept_score"] <= 1.0 and j["word_hit"] in (0.0, 1.0)
        assert math.isfinite(j["ppl"]) and j["ppl"] >= 1.0
    base = report["baseline"]
    assert math.isfinite(base["ppl_median"]) and report["ppl_bound"] == pytest.approx(2 * base["ppl_median"])
    assert report["vectors"]["norms"][concept["concept"]] > 0
    # steering reached the engine: some steered completion differs from the unsteered one
    # (same prompt, same sampling seed)
    unsteered = next(j["text"] for j in completions if j["method"] == "unsteered")
    assert any(j["text"] != unsteered for j in completions if j["method"] in se.SWEEPS)
    table = se.markdown(report)
    for m in methods:
        assert f"| {m} |" in table
