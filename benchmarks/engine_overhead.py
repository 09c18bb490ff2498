"""Throughput cost of the SAE step in the engine, side by side in one run.

For each mode (vLLM compiled, the default, and eager), the same 32 concurrent requests ×
64 new tokens (greedy, ignore_eos) go through:

1. plain vLLM (AsyncLLM, no worker extension, no SAE op in the layers);
2. the SAE engine with no spec on any request (op in every layer, idle);
3. top-8 feature extraction at one hook point on every request;
4. top-64 extraction at that hook point on every request;
5. top-8 extraction at four hook points (the default dictionary's and three more of its
   shape at layers 4, 20 and 28) on every request;
6. steering (a clamp and an add) on half of the requests;
7. extraction on all and steering on half.

Per mode, plain vLLM and the SAE engine run at once and the configurations take turns:
after a warm-up of each, ``--repeats`` rounds of one batch per configuration (each round
starting one configuration later), so a change in the machine's speed during the run falls
on every row alike; tokens/s is the median of the rounds. The ratios are to plain vLLM in
the same mode and to plain compiled vLLM. The binding is vLLM's
(``VLLM_CPU_OMP_THREADS_BIND``, inherited by both engines).
Run: ``.venv/bin/python benchmarks/engine_overhead.py [--modes compiled,eager]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from rounds import interleaved  # noqa: E402  (benchmarks/rounds.py)

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPTS = [
    f"Write a short paragraph about topic number {i}: the history of {topic}."
    for i, topic in enumerate(
        ["rivers", "bread", "clocks", "bridges", "music", "maps", "glass", "paper"] * 4
    )
]


EXTRA_LAYERS = (4, 20, 28)
"""Layers of the extra dictionaries (random, the default dictionary's shape) for extraction at
several hook points."""


def extra_dictionaries(tmp: Path, count: int = len(EXTRA_LAYERS)) -> list[Path]:
    """The first ``count`` extra dictionaries (random, the default's shape) at EXTRA_LAYERS."""
    from tests.dictionary_factory import make_dictionary

    return [make_dictionary(tmp / f"extra_{L}", layer=L, d_sae=4608, architecture="topk", k=64, seed=L)
            for L in EXTRA_LAYERS[:count]]


def dictionary_dir(tmp: Path) -> Path:
    default = REPO / "sae_runtime" / "data" / "default_dictionary"
    if (default / "cfg.json").is_file():
        return default
    from tests.dictionary_factory import make_dictionary

    # Same shape as the default dictionary: 8× width topk at a middle layer.
    return make_dictionary(tmp / "bench", layer=12, d_sae=4608, architecture="topk", k=32)


async def run_batch(submit, n_tokens: int) -> float:
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[submit(i) for i in range(len(PROMPTS))])
    dt = time.perf_counter() - t0
    total = sum(outs)
    assert total == len(PROMPTS) * n_tokens, total
    return total / dt


async def start_plain(args, eager: bool) -> tuple[dict, object]:
    """Plain vLLM (no worker extension, no SAE op in the layers): ``{"plain vLLM": submit}``
    and the engine."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from sae_runtime import vllm_surface
    from sae_runtime.default_model import prepare_default_model

    model_dir = prepare_default_model()
    vllm_surface.configure_environment(2.0)
    os.environ.pop("SAE_SERVE_HOOKS", None)  # plain vLLM: no SAE step op in the layers
    llm = vllm_surface.start_async_llm(
        model=str(model_dir), dtype="float32", enforce_eager=eager, max_model_len=1024,
        max_num_seqs=64, seed=0,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                            output_kind=vllm_surface.output_kind("FINAL_ONLY"))
    counter = iter(range(10**9))

    async def submit(i):
        n = 0
        async for out in llm.generate(vllm_surface.token_prompt(ids[i]), params, f"p{next(counter)}"):
            n = len(out.outputs[0].token_ids)
        return n

    return {"plain vLLM": submit}, llm


async def start_sae(args, dict_dir: Path, tmp: Path, eager: bool) -> tuple[dict, object]:
    """The SAE engine (the op in every layer) and one submit function per configuration."""
    from vllm import SamplingParams

    from sae_runtime.engine.engine import EngineConfig, SAEEngine
    from sae_runtime.engine.spec import SAERequestSpec

    extra = extra_dictionaries(tmp)
    did = "main"
    extra_ids = [f"layers.{L}" for L in EXTRA_LAYERS]
    eng = await SAEEngine.start(EngineConfig(dictionaries=[str(dict_dir), *map(str, extra)],
                                             dictionary_ids=[did, *extra_ids], max_model_len=1024, max_num_seqs=64,
                                             enforce_eager=eager, kv_cache_gib=2.0))
    ids = [eng.encode_text(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    extract = {"dictionaries": [did], "top_k": 8}
    extract64 = {"dictionaries": [did], "top_k": 64}
    extract4 = {"dictionaries": [did, *extra_ids], "top_k": 8}
    steer = {"edits": [{"dictionary": did, "feature": 10, "mode": "clamp", "value": 5.0},
                       {"dictionary": did, "feature": 20, "mode": "add", "value": 3.0}]}
    configs = {
        "hooks idle (no spec)": lambda i: None,
        "extract top-8, all requests": lambda i: SAERequestSpec.model_validate({"features": extract}),
        "extract top-64, all requests": lambda i: SAERequestSpec.model_validate({"features": extract64}),
        "extract top-8 at 4 hook points, all requests": lambda i: SAERequestSpec.model_validate(
            {"features": extract4}),
        "steer half the requests": lambda i: SAERequestSpec.model_validate({"steering": steer}) if i % 2 else None,
        "extract all + steer half": lambda i: SAERequestSpec.model_validate(
            {"features": extract, **({"steering": steer} if i % 2 else {})}),
    }
    submits = {}
    for name, make_spec in configs.items():
        async def submit(i, make_spec=make_spec):
            out = await eng.complete(ids[i], params, make_spec(i))
            return out.num_generated_tokens

        submits[name] = submit
    return submits, eng


async def bench_mode(args, dict_dir: Path, tmp: Path, eager: bool) -> dict[str, float]:
    """Both engines at once (an idle vLLM engine parks its processes after a second), their
    configurations in turn (:func:`rounds.interleaved`, ``--repeats`` rounds)."""
    plain, llm = await start_plain(args, eager)
    engines = [llm]
    try:
        sae, eng = await start_sae(args, dict_dir, tmp, eager)
        engines.append(eng)
        submits = {**plain, **sae}
        batches = {name: (lambda submit=submit: run_batch(submit, args.tokens)) for name, submit in submits.items()}
        rates = await interleaved(batches, args.repeats)
    finally:
        for e in engines:
            e.shutdown()
        llm.shutdown = lambda *a, **k: None  # AsyncLLM.__del__ calls it again at exit (see SAEEngine.shutdown)
    return {name: statistics.median(v) for name, v in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="compiled,eager", help="comma-separated: compiled, eager")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dict_dir = dictionary_dir(Path(tmp))
        for mode in modes:
            for name, rate in asyncio.run(bench_mode(args, dict_dir, Path(tmp), mode == "eager")).items():
                rows.append((mode, name, rate))
                print(f"# measured: {rows[-1]}", flush=True)  # partial results survive a kill
    plain = {mode: rate for mode, name, rate in rows if name == "plain vLLM"}
    base = plain.get("compiled", next(iter(plain.values())))
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "(vLLM default)")
    print(f"\n{len(PROMPTS)} requests × {args.tokens} tokens, float32, "
          f"VLLM_CPU_OMP_THREADS_BIND={bind}, dictionary {dict_dir.name}\n")
    print("| mode | configuration | tokens/s | ratio to plain (same mode) | ratio to plain compiled |")
    print("|---|---|---:|---:|---:|")
    for mode, name, rate in rows:
        print(f"| {mode} | {name} | {rate:.1f} | {rate / plain[mode]:.2f} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
