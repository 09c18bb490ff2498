"""Explainer labels against deterministic labels, both scored by the same detection test.

On a copy of the default dictionary's index (``sae_runtime/data/default_dictionary``):

1. if the index has no ``random_windows`` table (it was built before the table existed),
   harvest it as ``sae-index --label-only`` does (only the reservoir's contexts);
2. start ``sae-serve`` (the default model, eager) as the explainer endpoint;
3. for a seeded sample of ``--features`` features that fired (at least 2 examples), label
   them with the explainer (:func:`sae_runtime.feature_index.explainer.label_index`: the
   endpoint writes the label from the even-ranked examples and answers the yes/no
   detection test on the odd-ranked ones and as many random non-firing windows);
4. score the same features' *deterministic* labels (``" sea", " ocean" → ...``) with the
   same endpoint and the same test (:func:`~sae_runtime.feature_index.explainer.score_label`),
   and report beside them the deterministic labels' own word-matching score (the one stored
   in the index).

Prints, for each labelling, the mean detection score, the share above chance (> 0.5), the
mean true- and false-positive rates, and the best and worst explainer labels.
Run: ``.venv/bin/python benchmarks/explainer_labels.py [--features 24]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def summary(scores: list[dict]) -> dict:
    got = [s for s in scores if s["score"] is not None]
    n = max(len(got), 1)
    return {"features": len(got), "mean_score": round(sum(s["score"] for s in got) / n, 3),
            "above_chance": round(sum(s["score"] > 0.5 for s in got) / n, 3),
            "tpr": round(sum(s["tpr"] for s in got) / n, 3), "fpr": round(sum(s["fpr"] for s in got) / n, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=24, help="features in the sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--start-timeout", type=float, default=900)
    args = parser.parse_args()

    from load import free_port, start_server, stop_server  # benchmarks/load.py
    from transformers import AutoTokenizer

    from sae_runtime.default_model import prepare_default_model
    from sae_runtime.engine.background import EngineThread
    from sae_runtime.feature_index import INDEX_FILE, FeatureIndex
    from sae_runtime.feature_index.build import ENGINE_THREAD, ServedModel, harvest_reservoir, start_engine
    from sae_runtime.feature_index.config import DEFAULT_DICTIONARY_DIR, IndexConfig
    from sae_runtime.feature_index.explainer import Explainer, ExplainerSettings, label_index, score_label
    from sae_runtime.feature_index.labels import pick_non_activating
    from sae_runtime.feature_index.store import update_labels

    tok = AutoTokenizer.from_pretrained(prepare_default_model())
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path = tmp / INDEX_FILE
        shutil.copyfile(DEFAULT_DICTIONARY_DIR / INDEX_FILE, path)
        idx = FeatureIndex(path)
        meta, windows = idx.meta, idx.random_windows()
        idx.close()
        harvest_s = 0.0
        if windows is None:
            t0 = time.monotonic()
            cfg = IndexConfig(out=str(path), progress=False)
            runner = EngineThread(name=ENGINE_THREAD)
            try:
                eng = start_engine(runner, cfg)
                windows = harvest_reservoir(cfg, meta, runner, eng, ServedModel.of_engine(eng, cfg))
            finally:
                runner.close()
            update_labels(path, path, [], windows)
            harvest_s = time.monotonic() - t0
            print(f"harvested {len(windows)} random windows in {harvest_s:.0f}s", flush=True)

        idx = FeatureIndex(path)
        usable = [f for f in range(idx.d_sae) if len(idx.examples(f, limit=2)) == 2]
        sample = sorted(random.Random(args.seed).sample(usable, min(args.features, len(usable))))
        det = {f: idx.feature(f) for f in sample}
        exs = {f: idx.examples(f) for f in sample}
        idx.close()
        firing = {f: [f in w.active for w in windows] for f in sample}

        http_port = free_port()
        server = start_server(SimpleNamespace(dictionary_dir=None, server_args="--eager",
                                              start_timeout=args.start_timeout), http_port, free_port(), tmp)
        try:
            url = f"http://127.0.0.1:{http_port}/v1"
            settings = ExplainerSettings(url=url, concurrency=args.concurrency)
            t0 = time.monotonic()
            report = label_index(path, settings, tok.decode, features=sample, progress=True)
            explain_s = time.monotonic() - t0
            idx = FeatureIndex(path)
            expl = {f: idx.feature(f) for f in sample}
            idx.close()

            async def score_deterministic() -> dict:
                explainer = Explainer(settings)
                try:
                    await explainer.connect()
                    got = await asyncio.gather(*[
                        score_label(explainer, f, det[f].label, exs[f], windows,
                                    pick_non_activating(f, firing[f], len(exs[f]) // 2), tok.decode)
                        for f in sample])
                finally:
                    await explainer.close()
                return {r.feature: r for r in got}

            t0 = time.monotonic()
            det_llm = asyncio.run(score_deterministic())
            det_s = time.monotonic() - t0
        finally:
            stop_server(server)

    def rates(act: list[bool], non: list[bool]) -> dict:
        return {"tpr": sum(act) / max(len(act), 1), "fpr": sum(non) / max(len(non), 1)}

    rows = {
        "explainer label, explainer detection": [
            {"feature": f, "score": r.score, **rates(r.activating, r.non_activating)}
            for f, r in sorted(report.results.items())],
        "deterministic label, explainer detection": [
            {"feature": f, "score": det_llm[f].score, **rates(det_llm[f].activating, det_llm[f].non_activating)}
            for f in sample],
        "deterministic label, word matching (stored)": [
            {"feature": f, "score": det[f].label_score, "tpr": float("nan"), "fpr": float("nan")} for f in sample],
    }
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
        "sample": len(sample), "explainer": report.source, "failed": report.failed, "unclear_answers": report.unclear,
        "seconds": {"harvest_random_windows": round(harvest_s), "explainer_labels": round(explain_s),
                    "rescore_deterministic": round(det_s)},
        "summary": {k: summary(v) for k, v in rows.items()},
    }
    ranked = sorted((f for f in sample if expl[f].label_source.startswith("explainer:")),
                    key=lambda f: -(expl[f].label_score or 0))
    result["best"] = [{"feature": f, "explainer": expl[f].label, "score": expl[f].label_score,
                       "deterministic": det[f].label, "det_score_llm": det_llm[f].score} for f in ranked[:4]]
    result["worst"] = [{"feature": f, "explainer": expl[f].label, "score": expl[f].label_score,
                        "deterministic": det[f].label, "det_score_llm": det_llm[f].score} for f in ranked[-4:]]
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
