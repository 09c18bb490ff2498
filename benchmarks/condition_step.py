"""One decode step's conditions (``when``) at a hook point: grouped per dictionary against
one evaluation per request.

A batch of requests that each steer with a ``when`` on a feature of one top-k dictionary
(the default dictionary: the activation of a top-k feature needs the full encode) at one
decode step. The worker (``SAEWorkerRuntime._apply_layer``) evaluates all conditions on one
dictionary at a hook point from one encode of the rows they cover; before, each request's
condition ran its own encode of its rows (reproduced here as ``per request``, the loop the
worker had). Both through the worker's packed encoder matmul, same rows, same thresholds;
the script reports any row where the two disagree (only possible where an
activation sits on the rounding of the two GEMM shapes).

    .venv/bin/python benchmarks/condition_step.py [--requests 32] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sae_runtime import vllm_surface  # noqa: E402
from sae_runtime.dictionary import SparseDictionary  # noqa: E402
from sae_runtime.worker.runtime import SAEWorkerRuntime, _stream_rows  # noqa: E402
from sae_runtime.worker.step_plan import ConditionGroup, ConditionJob, LayerPlan  # noqa: E402


def per_request(rt: Any, jobs: list[ConditionJob], hidden: torch.Tensor) -> dict[int, torch.Tensor]:
    """The worker's earlier loop: one activation pass per condition."""
    out = {}
    for job in jobs:
        d = rt.dictionaries[job.dictionary]
        x = _stream_rows(hidden, None, job.rows).to(d.dtype)
        act = d.feature_activations(x, torch.tensor([job.feature]), rt.encoders[job.dictionary])[:, 0].float()
        fired = torch.zeros(hidden.shape[0], dtype=torch.bool)
        fired[job.rows] = act > job.above
        out[job.cid] = fired
    return out


def ms_per_call(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dictionary", default=str(REPO / "sae_runtime/data/default_dictionary"))
    p.add_argument("--requests", type=int, default=32, help="decode rows, one request each (default 32)")
    p.add_argument("--threads", default="1,2", help="torch thread counts to run, comma-separated")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()

    d = SparseDictionary.load(args.dictionary)
    rt: Any = object.__new__(SAEWorkerRuntime)
    matmul = vllm_surface.cpu_packed_matmul(d.W_enc)
    rt.dictionaries, rt.encoders, rt._fired = {"d": d}, {"d": matmul}, {}
    n = args.requests
    hidden = torch.randn(n, d.d_in, generator=torch.Generator().manual_seed(0)) * 2
    feats = torch.randperm(d.d_sae, generator=torch.Generator().manual_seed(1))[:n]
    jobs = [ConditionJob(cid=i, dictionary="d", feature=int(feats[i]), above=0.0, rows=torch.tensor([i]))
            for i in range(n)]
    # the grouping is the step plan's, built once per batch layout: not timed
    plan = LayerPlan(conditions={"d": ConditionGroup.of(jobs, torch.device("cpu"))})
    print(f"{d.cfg.architecture} dictionary {d.d_in}x{d.d_sae} (k={d.k}), {n} requests with a condition each, "
          f"packed matmul: {matmul is not None}")
    print("| threads | per request (ms) | grouped (ms) | speed-up |\n|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            rt._apply_layer(0, plan, hidden, None)
            before = per_request(rt, jobs, hidden)
            # (the two can differ only where an activation sits on the rounding of two GEMM shapes)
            differ = sum(int((before[c] != rt._fired[c]).sum()) for c in before)
            old = ms_per_call(lambda: per_request(rt, jobs, hidden), args.repeats)
            new = ms_per_call(lambda: rt._apply_layer(0, plan, hidden, None), args.repeats)
        note = f" ({differ} rows differ)" if differ else ""
        print(f"| {threads} | {old:.2f} | {new:.2f} | {old / new:.1f}x |{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
