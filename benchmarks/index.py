"""sae-index throughput against plain vLLM prefill of the same contexts, in one run.

The contexts are the ones ``sae-index`` reads (``--max-tokens`` of the built-in corpus,
``--ctx-len`` tokens each, its seeded sample). They go through:

1. plain vLLM (AsyncLLM, no worker extension, no SAE op): every context a ``max_tokens=1``
   request, ``--group-tokens`` in flight at once (``benchmarks/harvest.py``'s
   ``bench_plain``; median of ``--repeats`` after a warm-up);
2. ``sae-index``'s build (:func:`sae_runtime.feature_index.build.build`) of the default
   dictionary on an engine started beforehand (its start is not counted). Two rates: the
   *pass* (engine harvest and statistics, shards after the first, timed between the
   shards' ends) and the *whole build* (also tokenizing the corpus, the logit lens, labels
   and writing the file).

Both vLLM engines in the same mode (eager unless ``--compiled``), prefix caching off.
Run: ``.venv/bin/python benchmarks/index.py [--max-tokens 16384]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--shard-tokens", type=int, default=4096)
    parser.add_argument("--group-tokens", type=int, default=8192, help="tokens in flight at once (both paths)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compiled", action="store_true", help="vLLM in compiled mode (default: eager)")
    args = parser.parse_args()

    import torch
    from harvest import bench_plain  # benchmarks/harvest.py
    from transformers import AutoTokenizer

    from sae_runtime.default_model import prepare_default_model
    from sae_runtime.engine.background import EngineThread
    from sae_runtime.engine.engine import EngineConfig
    from sae_runtime.feature_index.build import ENGINE_THREAD, build, corpus_contexts
    from sae_runtime.feature_index.config import DEFAULT_DICTIONARY_DIR, IndexConfig

    model_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = IndexConfig(max_tokens=args.max_tokens, ctx_len=args.ctx_len, shard_tokens=args.shard_tokens,
                          batch_tokens=args.group_tokens, out=str(Path(tmp) / "index.sqlite"), progress=False,
                          enforce_eager=not args.compiled, max_model_len=args.ctx_len + 1)
        contexts = [torch.from_numpy(c.token_ids) for c in corpus_contexts(cfg, tok)]
        n_tokens = sum(len(c) for c in contexts)
        args.ctx_len = cfg.ctx_len
        plain = bench_plain(args, model_dir, contexts)
        print(f"# measured: plain {plain:.1f} tokens/s", flush=True)

        runner = EngineThread(name=ENGINE_THREAD)
        engine_cfg = EngineConfig(dictionaries=[str(DEFAULT_DICTIONARY_DIR)], enforce_eager=not args.compiled,
                                  max_model_len=args.ctx_len + 1, enable_prefix_caching=False)
        engine = runner.start(engine_cfg, 1800)
        marks: list[float] = []
        try:
            t0 = time.perf_counter()
            build(cfg, engine=engine, loop=runner.loop, on_shard=lambda s: marks.append(time.perf_counter()))
            whole = n_tokens / (time.perf_counter() - t0)
        finally:
            runner.close()
        from sae_runtime.feature_index.build import _shards

        shards = _shards(corpus_contexts(cfg, tok), cfg.shard_tokens)
        later = sum(len(contexts[i]) for s in shards[1:] for i in s)
        passing = later / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    mode = "compiled" if args.compiled else "eager"
    print(f"\n{len(contexts)} contexts ({n_tokens} tokens, ctx_len {args.ctx_len}) of the built-in corpus, default "
          f"dictionary (layers.12, 4608 features, k=64), float32, vLLM {mode}, {args.group_tokens} tokens in flight; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| path | tokens/s | ratio to plain vLLM prefill |")
    print("|---|---:|---:|")
    for name, rate in (("plain vLLM prefill (max_tokens=1)", plain), ("sae-index pass (harvest + statistics)", passing),
                       ("sae-index whole build", whole)):
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
