"""sae-train vs EleutherAI sparsify: same activations, same TopK width, k and token budget.

    .venv/bin/python benchmarks/train_vs_sparsify.py [--tokens 200000] [--k 64] [--expansion 8]

1. Activations of the default model at ``layers.L`` (reuses sae-train's activation cache
   when one with enough tokens exists, else harvests its own), plus held-out activations
   from the held-out documents.
2. sae-train's TopK trainer (``SAETrainer`` + ``train_step``, its defaults: Adam, warm-up
   and decay, AuxK, input normalisation, geometric-median b_dec).
3. eai-sparsify's ``SparseCoder`` with the optimiser its Trainer uses by default (signum
   with schedule-free, lr 5e-3/sqrt(d_sae/2^14); ``--sparsify-optimizer adam`` for Adam
   at its default lr), b_dec initialised to the first batch's mean and decoder
   normalisation as its Trainer does. It runs in a subprocess with eai-sparsify and its
   pure-Python dependencies installed into their own ``--target`` directory
   (``.cache/sparsify-env``; sparsify's own ``__init__`` pulls in ``datasets``, so its
   modules are imported directly), sharing this venv's torch, so both sides run the same
   torch build and BLAS.
4. The same batches (same order), then held-out FVU (about the mean), L0 and dead latents
   (none fired on the held-out tokens) of each, wall time of the optimisation loop,
   tokens/s and the ratios. Results go to stdout and ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPARSIFY_VERSION = "1.3.3"
SPARSIFY_PKGS = [f"eai-sparsify=={SPARSIFY_VERSION}", "einops", "natsort", "simple-parsing",
                 "schedulefree", "docstring-parser"]

WORKER = r'''
import json, math, sys, time, types
import numpy as np, torch
env, train_path, eval_path, out_path, cfg = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
torch.set_num_threads(cfg["threads"])
pkg = types.ModuleType("sparsify"); pkg.__path__ = [env + "/sparsify"]; sys.modules["sparsify"] = pkg
from sparsify.sparse_coder import SparseCoder
from sparsify.config import SparseCoderConfig
torch.manual_seed(cfg["seed"])
train = torch.from_numpy(np.load(train_path)); held = torch.from_numpy(np.load(eval_path)).float()
order = torch.from_numpy(np.load(cfg["order"]))
sae_cfg = SparseCoderConfig(expansion_factor=cfg["expansion"], k=cfg["k"])
sae = SparseCoder(train.shape[1], sae_cfg, "cpu", dtype=torch.float32)
bs, steps = cfg["batch_size"], cfg["steps"]
if cfg["optimizer"] == "adam":
    from transformers import get_linear_schedule_with_warmup
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
    sched = get_linear_schedule_with_warmup(opt, min(1000, steps // 10), steps)
else:
    from sparsify.sign_sgd import SignSGD
    from schedulefree import ScheduleFreeWrapper
    lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train(); sched = None
t0 = time.time()
for s in range(steps):
    x = train[order[s * bs:(s + 1) * bs].sort().values].float()
    if s == 0:
        sae.b_dec.data = x.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    out = sae(x)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step(); opt.zero_grad()
    if sched: sched.step()
wall = time.time() - t0
if hasattr(opt, "eval"): opt.eval()
sae.set_decoder_norm_to_unit_norm()
with torch.no_grad():
    err = 0.0; fired = torch.zeros(sae.num_latents, dtype=torch.bool); l0 = 0.0
    for i in range(0, len(held), 4096):
        x = held[i:i + 4096]; o = sae(x)
        err += float((o.sae_out - x).double().pow(2).sum())
        nz = o.latent_acts > 0
        l0 += float(nz.sum()); fired[o.latent_indices[nz]] = True
    var = float((held.double() - held.double().mean(0)).pow(2).sum())
result = {"wall_s": wall, "fvu": err / var, "l0": l0 / len(held), "dead_frac": float((~fired).float().mean())}
json.dump(result, open(out_path, "w"))
'''


def ensure_sparsify(env: Path) -> Path:
    if not (env / "sparsify" / "sparse_coder.py").is_file():
        print(f"installing eai-sparsify {SPARSIFY_VERSION} into {env} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", "--target", str(env), *SPARSIFY_PKGS],
                       check=True)
    return env


def activations(args) -> tuple[np.ndarray, np.ndarray, str]:
    """Training table (float16) and held-out activations (float16) at args.layer."""
    from sae_runtime.default_model import MODEL_NAME, cache_root, prepare_default_model
    from sae_runtime.training.activations import ActivationCache, ModelActivations, cache_fingerprint
    from sae_runtime.training.data import load_split, take_tokens

    source = ModelActivations(prepare_default_model())
    split = load_split(["sotu"], source.tokenizer, ctx_len=256, eval_fraction=0.05, seed=0)
    table = None
    for budget in (1_000_000, args.tokens):  # sae-train's default cache first
        fp = cache_fingerprint(version=1, model=MODEL_NAME, layers=[args.layer], ctx_len=256,
                               data=["sotu"], text_field="text", eval_fraction=0.05, seed=0,
                               max_tokens=budget)
        cache = ActivationCache(cache_root() / "activations" / fp)
        if cache.complete(fp) and cache.tokens() >= args.tokens:
            table, where = cache.open(args.layer)[: args.tokens], f"cache {fp}"
            break
    if table is None:
        cache.harvest(source, take_tokens(split.train, args.tokens), [args.layer], fingerprint=fp)
        table, where = cache.open(args.layer)[: args.tokens], f"harvested {fp}"
    held = []
    for i in range(0, len(split.eval), 8):
        held.append(source.harvest(split.eval[i:i + 8], [args.layer])[args.layer])
        if sum(len(h) for h in held) >= args.eval_tokens:
            break
    held_t = torch.cat(held)[: args.eval_tokens]
    return table.numpy(), held_t.half().numpy(), where


def run_ours(train: np.ndarray, held: np.ndarray, order: torch.Tensor, args) -> dict:
    from sae_runtime.training.config import TrainConfig
    from sae_runtime.training.evaluate import RunningStats
    from sae_runtime.training.train import build_trainer, lr_at, to_dictionary, train_step

    d_in = train.shape[1]
    cfg = TrainConfig(k=args.k, expansion_factor=args.expansion, batch_size=args.batch_size,
                      steps=args.steps, seed=args.seed, hook_point=f"layers.{args.layer}",
                      warmup_steps=min(100, args.steps // 10), **({"lr": args.lr} if args.lr else {}))
    table = torch.from_numpy(train)
    sample = table[torch.randperm(len(table), generator=torch.Generator().manual_seed(17))[:16384]].float()
    scale = math.sqrt(d_in) / float(sample.norm(dim=1).mean())
    trainer = build_trainer(cfg, d_in)
    trainer.init_b_dec(sample * scale, cfg.b_dec_init)
    opt = torch.optim.Adam(trainer.parameters(), lr=cfg.lr)
    t0 = time.time()
    for s in range(args.steps):
        x = table[order[s * args.batch_size:(s + 1) * args.batch_size].sort().values].float() * scale
        for g in opt.param_groups:
            g["lr"] = lr_at(s, args.steps, cfg)
        train_step(trainer, opt, x)
    wall = time.time() - t0
    d = to_dictionary(trainer.eval(), cfg, scale, "bench")
    stats = RunningStats(d.d_in, d.d_sae)
    x_all = torch.from_numpy(held).float()
    with torch.no_grad():
        for i in range(0, len(x_all), 4096):
            out = d(x_all[i:i + 4096])
            stats.update(x_all[i:i + 4096], out.reconstruction, out.feature_acts)
    r = stats.result()
    return {"wall_s": wall, "fvu": r["fvu"], "l0": r["l0"], "dead_frac": r["dead_frac"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--tokens", type=int, default=200_000, help="training token budget")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="sae-train's learning rate (default: TrainConfig's)")
    p.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum")
    p.add_argument("--env", type=Path, default=ROOT / ".cache" / "sparsify-env")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = ensure_sparsify(args.env)
    train, held, where = activations(args)
    args.steps = len(train) // args.batch_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "tmp"
    tmp.mkdir(exist_ok=True)
    np.save(tmp / "train.npy", train)
    np.save(tmp / "held.npy", held)
    np.save(tmp / "order.npy", order.numpy())

    print(f"activations: {len(train)} train ({where}), {len(held)} held-out, layer {args.layer}; "
          f"d_sae {train.shape[1] * args.expansion}, k {args.k}, {args.steps} steps of "
          f"{args.batch_size}, {args.threads} threads, device cpu", flush=True)
    ours = run_ours(train, held, order, args)
    print("sae-train:", json.dumps(ours), flush=True)
    worker_cfg = {"threads": args.threads, "seed": args.seed, "expansion": args.expansion, "k": args.k,
                  "batch_size": args.batch_size, "steps": args.steps, "order": str(tmp / "order.npy"),
                  "optimizer": args.sparsify_optimizer}
    envvars = dict(os.environ, PYTHONPATH=str(env), SPARSIFY_DISABLE_TRITON="1")
    subprocess.run([sys.executable, "-c", WORKER, str(env), str(tmp / "train.npy"),
                    str(tmp / "held.npy"), str(tmp / "sparsify.json"), json.dumps(worker_cfg)],
                   check=True, env=envvars)
    theirs = json.loads((tmp / "sparsify.json").read_text())
    print("sparsify: ", json.dumps(theirs), flush=True)
    tokens = args.steps * args.batch_size
    result = {
        "setup": {**vars(args), "env": str(args.env), "out": str(args.out), "activations": where,
                  "train_tokens": tokens, "torch": torch.__version__, "device": "cpu"},
        "sae_train": {**ours, "tokens_per_s": tokens / ours["wall_s"]},
        "sparsify": {**theirs, "tokens_per_s": tokens / theirs["wall_s"],
                     "optimizer": args.sparsify_optimizer},
    }
    result["ratios_sae_train_over_sparsify"] = {
        "tokens_per_s": result["sae_train"]["tokens_per_s"] / result["sparsify"]["tokens_per_s"],
        "fvu": ours["fvu"] / theirs["fvu"],
    }
    print(f"\n{'':12}{'wall s':>9}{'tok/s':>10}{'FVU':>8}{'L0':>7}{'dead':>8}")
    for name in ("sae_train", "sparsify"):
        r = result[name]
        print(f"{name:12}{r['wall_s']:9.1f}{r['tokens_per_s']:10.0f}{r['fvu']:8.4f}{r['l0']:7.1f}{r['dead_frac']:8.2%}")
    ratios = result["ratios_sae_train_over_sparsify"]
    print(f"ratios sae-train/sparsify: tokens/s {ratios['tokens_per_s']:.2f}, FVU {ratios['fvu']:.2f}")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    (args.out / "train_vs_sparsify.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
