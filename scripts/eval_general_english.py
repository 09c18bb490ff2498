"""FVU and CE loss recovered of a dictionary on general English.

Two kinds of text, both unseen by a dictionary trained with sae-train's defaults:

* the committed evaluation set ``sae_runtime/data/general_english_eval.jsonl``: 32 short
  passages in many genres, written for this project (one context each);
* the held-out split of each part of the general corpus (``sae-corpus``; sae-train's
  split: ``--eval-fraction 0.05 --data-seed 0``), and of the shipped model-written prose
  (``--data prose``), the first ``--tokens-per-part`` tokens of its shuffled held-out contexts.

Metrics come from ``sae_runtime.training.evaluate`` as in ``metrics.json``: position 0 and
special tokens excluded, FVU about the mean, CE loss recovered against zero ablation.

    python scripts/eval_general_english.py                          # the default dictionary
    python scripts/eval_general_english.py --dictionary sae_out/layers.12 --corpus corpus/
    python scripts/eval_general_english.py --no-corpus              # the evaluation set alone
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_DICTIONARY = ROOT / "sae_runtime" / "data" / "default_dictionary"
KEYS = ("fvu", "ce_loss_recovered", "l0", "kl_div", "ce_loss_clean", "ce_loss_with_sae", "eval_tokens")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dictionary", default=str(DEFAULT_DICTIONARY), help="dictionary directory")
    p.add_argument("--model", default="default", help="as sae-train --model")
    p.add_argument("--corpus", default="general",
                   help="built general corpus directory ('general' = the cache's, built on first use)")
    p.add_argument("--no-corpus", action="store_true", help="only the evaluation set")
    p.add_argument("--parts", help="comma-separated corpus parts (default: all)")
    p.add_argument("--tokens-per-part", type=int, default=4096, help="held-out tokens per corpus part")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--record", action="store_true",
                   help="write the evaluation set's figures into the dictionary's metrics.json "
                        "('general_english'; what tests/test_training_default_dictionary.py re-checks)")
    args = p.parse_args(argv)

    import torch

    from sae_runtime.dictionary import SparseDictionary
    from sae_runtime.training.activations import ModelActivations
    from sae_runtime.training.data import (
        GENERAL_ENGLISH_PASSAGES,
        MODEL_PROSE,
        chunk_documents,
        general_english_passages,
        is_held_out,
        iter_documents,
        load_split,
        take_tokens,
    )
    from sae_runtime.training.evaluate import evaluate
    from sae_runtime.training.train import resolve_model

    torch.set_num_threads(args.threads)
    model_path, model_name = resolve_model(args.model)
    dictionary = SparseDictionary.load(args.dictionary)
    source = ModelActivations(model_path)
    tok = source.tokenizer

    passages = chunk_documents(general_english_passages(), tok, args.ctx_len)
    sets: list[tuple[str, list]] = [("eval set (32 passages)", passages)]
    if not args.no_corpus:
        from sae_runtime.training.corpus import general_corpus_dir

        corpus = general_corpus_dir() if args.corpus == "general" else Path(args.corpus)
        wanted = set(filter(None, (args.parts or "").split(",")))
        for f in sorted(corpus.glob("*.jsonl")):
            if wanted and f.stem not in wanted:
                continue
            if not any(is_held_out(d.doc_id, 0.05, 0) for d in iter_documents([str(f)])):
                print(f"{f.stem + ' held-out':32} (no held-out documents)")  # load_split would take a training one
                continue
            split = load_split([str(f)], tok, ctx_len=args.ctx_len, eval_fraction=0.05, seed=0, eval_only=True)
            sets.append((f"{f.stem} held-out", take_tokens(split.eval, args.tokens_per_part)))
        # the shipped model-written prose (sae-train --data prose), its held-out split
        split = load_split([MODEL_PROSE], tok, ctx_len=args.ctx_len, eval_fraction=0.05, seed=0, eval_only=True)
        sets.append(("prose held-out", take_tokens(split.eval, args.tokens_per_part)))

    results = {"dictionary": str(args.dictionary), "model": model_name, "hook_point": dictionary.hook_point,
               "date": time.strftime("%Y-%m-%d"), "sets": {}}
    print(f"{'set':32} {'fvu':>7} {'CE rec':>7} {'l0':>6} {'KL':>6} {'CE clean':>8} {'CE sae':>7} {'tokens':>7}")
    for name, contexts in sets:
        if not contexts:
            print(f"{name:32} (no held-out contexts)")
            continue
        m, _ = evaluate(dictionary, source, contexts, layer=dictionary.layer)
        results["sets"][name] = {k: m.get(k) for k in KEYS}
        print(f"{name:32} {m['fvu']:7.3f} {m.get('ce_loss_recovered', float('nan')):7.3f} {m['l0']:6.1f} "
              f"{m.get('kl_div', float('nan')):6.3f} {m.get('ce_loss_clean', float('nan')):8.3f} "
              f"{m.get('ce_loss_with_sae', float('nan')):7.3f} {m['eval_tokens']:7d}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.record:
        metrics_path = Path(args.dictionary) / "metrics.json"
        metrics = json.loads(metrics_path.read_text())
        metrics["general_english"] = {
            **results["sets"][sets[0][0]], "set": GENERAL_ENGLISH_PASSAGES.relative_to(ROOT).as_posix(),
            "ctx_len": args.ctx_len, "note": "the 32 passages, one context each; as eval: position 0, special "
                                             "tokens and sinks excluded"}
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"recorded in {metrics_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
