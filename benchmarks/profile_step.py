"""Where a hooked step's time goes: a py-spy profile of the engine and its share table.

``run`` drives the engine (default model and dictionary, eager mode so that Python frames of
the model stay visible) through ``--batches`` batches of 32 concurrent requests × 64 new
tokens with top-8 extraction at the dictionary's hook point on every request (``--dicts 4``:
at four hook points, as engine_overhead.py's row). ``shares``
reads py-spy's collapsed stacks (``--format raw``) and prints, among the samples of the vLLM
worker's ``execute_model``, the share of each part of the SAE step.

    py-spy record --subprocesses --rate 50 --format raw -o /tmp/step.txt -- \\
        .venv/bin/python benchmarks/profile_step.py run
    .venv/bin/python benchmarks/profile_step.py shares /tmp/step.txt

``plan`` times getting a step's plan with and without the cache, ``features`` each stage of
the features' path for one decode step (neither starts an engine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# (label, (function, file)): a sample counts for the first part one of whose frames is that
# function of that file, in this order.
PARTS = [
    ("the step plan (`_resolve_plan`: layout key, cached or built plan)", ("_resolve_plan", "runtime.py")),
    ("encode (`encode_pre`: the matmul)", ("encode_pre", "*")),
    ("top-k and the rest of `encode_features`", ("encode_features", "*")),
    ("the rest of the extraction (gather, host copy, chunks)", ("_extract", "runtime.py")),
    ("the rest of the hooked layer's step (`_apply_layer`)", ("_apply_layer", "runtime.py")),
    ("idle hook points (the op's dispatch, `_step` returning nothing, the copy)", ("residual_step", "residual_op.py")),
    ("side channel send (`FeatureSender.send`, after the forward)", ("send", "feature_sender.py")),
]
STEP = ("residual_step", "residual_op.py")
WORKER = ("_execute_model", "runtime.py")


def frames(stack: str) -> set[tuple[str, str]]:
    """``(function, file name)`` of each frame of one collapsed py-spy stack."""
    out = set()
    for frame in stack.split(";"):
        func, _, where = frame.partition(" (")
        # py-spy names methods Class.method (and closures outer.<locals>.inner): keep the last part
        out.add((func.strip().rsplit(".", 1)[-1], Path(where.rsplit(":", 1)[0]).name))
    return out


async def run(args: argparse.Namespace) -> None:
    import tempfile

    from vllm import SamplingParams

    from sae_runtime.engine.engine import EngineConfig, SAEEngine
    from sae_runtime.engine.spec import SAERequestSpec

    sys.path.insert(0, str(REPO / "benchmarks"))
    from engine_overhead import extra_dictionaries  # the four-hook-point row's dictionaries

    default = REPO / "sae_runtime" / "data" / "default_dictionary"
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        extra = extra_dictionaries(Path(tmp), args.dicts - 1)
        eng = await SAEEngine.start(EngineConfig(dictionaries=[str(default), *map(str, extra)], max_model_len=1024,
                                                 max_num_seqs=64, enforce_eager=not args.compiled))
        try:
            ids = [eng.encode_text(f"Write a short paragraph about topic number {i}.") for i in range(32)]
            params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
            spec = SAERequestSpec.model_validate({"features": {"dictionaries": eng.registry.ids(), "top_k": 8}})
            for b in range(args.batches):
                t0 = time.perf_counter()
                outs = await asyncio.gather(*[eng.complete(x, params, spec) for x in ids])
                n = sum(o.num_generated_tokens for o in outs)
                print(f"batch {b}: {n / (time.perf_counter() - t0):.1f} tokens/s", flush=True)
            print("worker stats:", await eng.worker_stats(), flush=True)
        finally:
            eng.shutdown()


def shares(path: Path) -> None:
    total = step = 0
    counts = {label: 0 for label, _ in PARTS}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        fr = frames(stack)
        if WORKER not in fr:
            continue
        k = int(n)
        total += k
        step += k if STEP in fr else 0
        names = {f for f, _ in fr}
        for label, (func, file) in PARTS:
            if (func, file) in fr or (file == "*" and func in names):  # "*": that function in any file
                counts[label] += k
                break
    if not total:
        raise SystemExit("no samples of the worker's execute_model (was py-spy run with --subprocesses?)")
    print(f"{total} samples in the worker's execute_model\n")
    print("| part | share |\n|---|---:|")
    print(f"| the whole SAE step (the op at every hook point) | {100 * step / total:.1f}% |")
    for label, _ in PARTS:
        print(f"| {label} | {100 * counts[label] / total:.1f}% |")


def plan_cost(args: argparse.Namespace) -> None:
    """µs per step to get the plan of a 32-request decode batch (top-8 extraction on every
    request, steering on half), built each step vs reused from the cache; no engine."""
    import timeit

    import numpy as np
    import torch

    from sae_runtime.protocol import EditSpec, FeatureSpec, WorkerSpec
    from sae_runtime.worker.step_plan import PlanCache, build_step_plan, parse_request

    feats = FeatureSpec(dicts=["d"], top_k=8, feature_ids=None, scope="all")
    edits = [EditSpec(dictionary="d", feature=10, mode="clamp", value=5.0, scope="all"),
             EditSpec(dictionary="d", feature=20, mode="add", value=3.0, scope="all")]
    states = [parse_request(WorkerSpec(rid=f"r{i}", features=feats, edits=edits if i % 2 else []),
                            prompt_len=20, hidden_size=576) for i in range(args.requests)]
    layers, cpu = {"d": 12}, torch.device("cpu")
    pos = [30]

    def items():
        pos[0] += 1
        return [(s, i, np.array([pos[0]])) for i, s in enumerate(states)]

    cache = PlanCache()
    n = 2000
    build = min(timeit.repeat(lambda: build_step_plan(items(), layers, cpu), number=n, repeat=3)) / n * 1e6
    reuse = min(timeit.repeat(lambda: cache.get(items(), layers, cpu), number=n, repeat=3)) / n * 1e6
    print(f"{args.requests} requests, one decode row each: plan built {build:.0f} µs/step, "
          f"reused {reuse:.0f} µs/step ({cache.builds} build, {cache.reuses} reuses)")


def features_path(args: argparse.Namespace) -> None:
    """ms per decode step of each stage features go through, for 32 requests × one token and
    top-8 features of ``--dicts`` dictionaries of the default shape, outside the engine (one
    thread): the worker's encode and top-k and chunks, the side channel's encoding, the API
    process's decoding and per-request tables, and the per-token objects the engine hands out."""
    import timeit

    import numpy as np
    import torch

    from sae_runtime import kernels, vllm_surface
    from sae_runtime.engine.engine import SAEEngine
    from sae_runtime.engine.feature_channel import RequestFeatures
    from sae_runtime.protocol import FeatureChunk, decode_message, encode_message

    torch.set_num_threads(1)
    n, d_in, d_sae, k = args.requests, 576, 4608, 8
    g = torch.Generator().manual_seed(0)
    dicts = [(f"d{i}", torch.randn(d_in, d_sae, generator=g) / 24, torch.zeros(d_sae), torch.zeros(d_in))
             for i in range(args.dicts)]
    x = torch.randn(n, d_in, generator=g)
    pos = np.array([40], np.int32)

    def worker() -> list:
        chunks = []
        for name, W_enc, b_enc, b_dec in dicts:
            idx, vals = kernels.encode_features(x, W_enc, b_enc, b_dec, k, activation="relu")
            idx_np, vals_np = idx.to(torch.int32).cpu().numpy(), vals.float().cpu().numpy()
            chunks += [FeatureChunk(f"r{r}", name, pos, idx_np[r:r + 1], vals_np[r:r + 1]) for r in range(n)]
        return chunks

    chunks = worker()
    frames = [bytes(f) for f in encode_message(chunks)]
    names = [d[0] for d in dicts]

    def api() -> None:
        tables = {f"r{r}": RequestFeatures(dictionaries=names) for r in range(n)}
        for c in decode_message(frames):
            tables[c.rid].add(c)

    def hand_out() -> None:
        for r in range(n):
            t = RequestFeatures(dictionaries=names)
            for c in chunks[r::n]:
                t.add(c)
            SAEEngine._take(t, range(40, 41), [0] * 20, [0] * 21, 20)

    def ms(fn) -> float:
        return min(timeit.repeat(fn, number=50, repeat=3)) / 50 * 1e3

    packed = [vllm_surface.cpu_packed_matmul(W) for _, W, _, _ in dicts]
    encode_only = ms(lambda: [kernels.encode_features(x, W, b, bd, k, activation="relu") for _, W, b, bd in dicts])
    encode_packed = ms(lambda: [kernels.encode_features(x, W, b, bd, k, activation="relu", matmul=m)
                                for (_, W, b, bd), m in zip(dicts, packed, strict=True)])
    print(f"{n} requests × 1 token, top-{k} of {args.dicts} dictionar{'y' if args.dicts == 1 else 'ies'} "
          f"({len(chunks)} chunks per step), ms per step, one thread:")
    print(f"  worker: encode + top-k {encode_only:.2f} (torch's matmul), {encode_packed:.2f} (the prepacked "
          f"matmul the worker uses); torch's with host copy and chunks {ms(worker):.2f}")
    print(f"  side channel: encode_message {ms(lambda: encode_message(chunks)):.2f}")
    print(f"  API process: decode_message + per-request tables {ms(api):.2f}; "
          f"per-token objects handed out {ms(hand_out):.2f} (includes building the tables again)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--batches", type=int, default=4)
    r.add_argument("--dicts", type=int, default=1, choices=range(1, 5),
                   help="dictionaries to extract from (1: the default; more: engine_overhead.py's random ones, "
                   "EXTRA_LAYERS)")
    r.add_argument("--compiled", action="store_true", help="torch.compile the model (Python frames of the model "
                   "are then hidden from the profile)")
    s = sub.add_parser("shares")
    s.add_argument("path", type=Path)
    c = sub.add_parser("plan")
    c.add_argument("--requests", type=int, default=32)
    f = sub.add_parser("features")
    f.add_argument("--requests", type=int, default=32)
    f.add_argument("--dicts", type=int, default=1)
    args = p.parse_args()
    if args.cmd == "run":
        asyncio.run(run(args))
    elif args.cmd == "plan":
        plan_cost(args)
    elif args.cmd == "features":
        features_path(args)
    else:
        shares(args.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
