"""Benchmark the sparse SAE kernels against the dense torch way of doing the same thing.

* decode: ``sparse_decode(indices, values, W_dec)`` vs ``dense_acts @ W_dec`` (the dense
  activations [N, d_sae] given, as a dense encode would leave them).
* steer:  ``steering_edit`` (E edits per token, clamp/scale/ablate/add mixed, ReLU
  dictionary) vs full encode then edit: ``a = relu((x - b_dec) @ W_enc + b_enc)``, the
  per-edit activation changes scattered into a dense [N, d_sae] delta, ``x + delta @ W_dec``.

On CUDA it times the Triton kernels (default backend), on CPU the torch path (the
runtime's CPU path; Triton-interpreter timings would be meaningless). The CPU grid is
capped (tokens <= 1024 and tokens*d_in*d_sae <= 2**32 per matmul) so that it finishes in a
few minutes on 2 cores; ``--full`` lifts the cap, ``--quick`` runs a small subset,
``--tiny`` a toy one (the CPU dry run of ``gpu_check.py``). ``--budget S`` stops starting
new cells after S seconds. Every cell also checks that the sparse result agrees with the
dense one (``max err``, relative to the largest dense output; a cell above 5e-2 fails the
run with exit status 1).

    python benchmarks/kernels.py [--tiny|--quick|--full] [--ops decode,steer] [--budget S]
                                 [--markdown out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sae_runtime import kernels as K

CPU_FLOP_CAP = 2**32  # tokens * d_in * d_sae per matmul, CPU default grid
MAX_REL_ERR = 5e-2  # sparse vs dense, relative to max |dense output| (bf16 both sides on CUDA)


def grid(args, device):
    if args.tiny:
        return [(64, 512, 32, t) for t in (1, 16)]
    if args.quick:
        return [(576, 4608, 32, t) for t in (1, 64)] + [(2048, 16384, 128, 64)]
    d_ins, d_saes, ks = (576, 2048), (4608, 16384, 65536), (32, 128)
    tokens = (1, 16, 128, 1024, 4096)
    out = []
    for d_in, d_sae, k, n in itertools.product(d_ins, d_saes, ks, tokens):
        if device.type == "cpu" and not args.full and (n > 1024 or n * d_in * d_sae > CPU_FLOP_CAP):
            continue
        out.append((d_in, d_sae, k, n))
    return out


def timeit(fn, min_run_time):
    fn()  # warm-up (Triton compile, allocator)
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a toy grid (dry runs)")
    p.add_argument("--quick", action="store_true", help="a small subset")
    p.add_argument("--full", action="store_true", help="no CPU cap on the grid")
    p.add_argument("--ops", default="decode,steer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (CPU default float32, CUDA bfloat16)")
    p.add_argument("--edits", type=int, default=4, help="edits per token for steer")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget", type=float, default=None, help="start no new cell after this many seconds")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    p.add_argument("--json", default=None, help="also write header, rows and skipped cells as JSON to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        os.environ["SAE_KERNELS_BACKEND"] = "torch"
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    min_rt = args.min_run_time or (0.2 if device.type == "cpu" else 0.5)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    backend = K.backend_for(device)
    header = f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), dtype={str(dtype)[6:]}, sparse backend={backend}"  # noqa: E501
    print(header, flush=True)

    rows = []
    cols = ("op", "d_in", "d_sae", "k", "tokens", "dense ms", "sparse ms", "dense/sparse", "max err")
    print("{:>6} {:>5} {:>6} {:>4} {:>6} {:>10} {:>10} {:>12} {:>8}".format(*cols), flush=True)
    weights = {}
    t_start = time.time()
    cells = grid(args, device)
    skipped = 0
    for ci, (d_in, d_sae, k, n) in enumerate(cells):
        if args.budget is not None and time.time() - t_start > args.budget:
            skipped = len(cells) - ci
            print(f"(budget of {args.budget:g} s reached: {skipped} of {len(cells)} cells not run)", flush=True)
            break
        if (d_in, d_sae) not in weights:
            weights.clear()
            g = torch.Generator(device=device).manual_seed(0)
            W_enc = (torch.randn(d_in, d_sae, device=device, generator=g) / d_in**0.5).to(dtype)
            W_dec = (torch.randn(d_sae, d_in, device=device, generator=g) / d_in**0.5).to(dtype)
            b_enc = torch.zeros(d_sae, device=device, dtype=dtype)
            b_dec = torch.zeros(d_in, device=device, dtype=dtype)
            weights[(d_in, d_sae)] = (W_enc, b_enc, W_dec, b_dec)
        W_enc, b_enc, W_dec, b_dec = weights[(d_in, d_sae)]
        x = torch.randn(n, d_in, device=device, dtype=dtype)
        for op in ops:
            if op == "decode":
                idx = torch.randint(0, d_sae, (n, k), device=device)
                val = torch.rand(n, k, device=device, dtype=dtype)
                # scatter_add_: a feature drawn twice counts twice, as in the sparse sum
                dense_acts = torch.zeros(n, d_sae, device=device, dtype=dtype).scatter_add_(1, idx, val)
                dense_fn = functools.partial(torch.matmul, dense_acts, W_dec)
                sparse_fn = functools.partial(K.sparse_decode, idx, val, W_dec)
            elif op == "steer":
                if k != 32:  # steering does not depend on k: one row per (d_in, d_sae, tokens)
                    continue
                E = args.edits
                feats = torch.randint(0, d_sae, (1, E), device=device)
                modes = torch.tensor(([2, 3, 4, 1] * E)[:E], device=device, dtype=torch.int8)[None]
                vals = torch.full((1, E), 2.0, device=device)
                slots = torch.zeros(n, dtype=torch.int64, device=device)
                w = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation="relu")

                def dense_steer(x=x, b_dec=b_dec, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, feats=feats, modes=modes,
                                vals=vals):
                    a = torch.relu((x - b_dec) @ W_enc + b_enc).float()
                    af = a[:, feats[0]]
                    m = modes[0].long()
                    coef = torch.where(m == 1, vals[0], torch.zeros((), device=device))
                    coef = torch.where(m == 2, vals[0] - af, coef)
                    coef = torch.where(m == 3, (vals[0] - 1) * af, coef)
                    coef = torch.where(m == 4, -af, coef)
                    delta = torch.zeros_like(a).index_add_(1, feats[0], coef)
                    return (x.float() + delta.to(dtype) @ W_dec).to(dtype)

                dense_fn = dense_steer
                sparse_fn = functools.partial(K.steering_edit, x, slots, feats, modes, vals, **w)
            else:
                raise SystemExit(f"unknown op {op!r}")
            ref, got = dense_fn().float(), sparse_fn().float()
            err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
            t_dense = timeit(dense_fn, min_rt)
            t_sparse = timeit(sparse_fn, min_rt)
            kk = k if op == "decode" else "-"
            row = (op, d_in, d_sae, kk, n, t_dense * 1e3, t_sparse * 1e3, t_dense / t_sparse, err)
            rows.append(row)
            flag = "  MISMATCH" if not err <= MAX_REL_ERR else ""
            print("{:>6} {:>5} {:>6} {:>4} {:>6} {:>10.3f} {:>10.3f} {:>11.1f}x {:>8.1e}".format(*row) + flag,
                  flush=True)
    print(f"({time.time() - t_start:.0f} s)")
    bad = [r for r in rows if not r[-1] <= MAX_REL_ERR]
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{header}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for r in rows:
                f.write("| {} | {} | {} | {} | {} | {:.3f} | {:.3f} | {:.1f}x | {:.1e} |\n".format(*r))
        print(f"markdown written to {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "device": str(device), "dtype": str(dtype)[6:], "backend": backend,
                       "columns": cols, "rows": rows, "cells_not_run": skipped,
                       "max_rel_err_allowed": MAX_REL_ERR, "mismatches": len(bad)}, f, indent=1)
    if bad:
        print(f"{len(bad)} cell(s) where the sparse result differs from the dense one by more than "
              f"{MAX_REL_ERR:g} (relative to the largest output)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
