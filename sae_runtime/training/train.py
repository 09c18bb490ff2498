"""The training run: data -> activations -> optimisation -> dictionary directory + metrics.

``run(cfg, out_dir)`` is what ``sae-train`` calls. The output directory is servable as it
is: ``cfg.json`` + ``sae_weights.safetensors`` + ``sparsity.safetensors`` (SAELens layout),
``metrics.json`` (held-out evaluation, training statistics, the resolved config and the
command), ``training_command.txt`` and ``training_log.jsonl`` (the curves: step, tokens,
loss, fvu, l0, dead every ``log_every`` steps). While training, ``checkpoints/`` holds the latest
checkpoint; running the same command again resumes from it and ends where an
uninterrupted run would. It is removed at the end unless ``keep_checkpoints``.

Input normalisation (``normalize_activations='expected_average_only_in'``) trains on
``x * s`` with ``s = sqrt(d_in) / mean ||x||`` so that learning rates and sparsity
coefficients mean the same for every model; ``s`` is folded into the saved weights
(``W_enc * s``, ``W_dec / s``, ``b_dec / s``), so the saved dictionary computes on the raw
residual stream like every other and SAELens reads it with the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..dictionary import DictionaryConfig, SparseDictionary, dtype_name
from ..registry import TRAINING_LOG_FILE
from .activations import (
    ActivationCache,
    HarvestSource,
    ModelActivations,
    RowTables,
    ShuffledBatches,
    StreamingBatches,
    cache_fingerprint,
    kept_rows,
    sink_rows,
)
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import SourceBudget, SplitContexts, load_split, source_budgets, source_identity, take_tokens
from .evaluate import evaluate
from .trainers import SAETrainer, train_step

METRICS_FILE = "metrics.json"
COMMAND_FILE = "training_command.txt"
CHECKPOINT_DIR = "checkpoints"
SCALE_SAMPLE = 16384


def resolve_model(name: str) -> tuple[Path, str]:
    """``'default'`` -> the prepared embedded model; else a checkpoint directory (or a hub
    id in the local Hugging Face cache). Returns its path and the name the server serves it
    under (``ModelInfo.name``), which the dictionary records as its ``model_name``."""
    from ..default_model import MODEL_NAME, prepare_default_model
    from ..model_info import read_model_info

    if name in ("default", MODEL_NAME):
        return prepare_default_model(), MODEL_NAME
    info = read_model_info(name)
    path = info.path.resolve()
    return path, info.name or path.name  # `--model .`: a folder name, never an empty one


def check_model(cfg: TrainConfig) -> tuple[Path, str, int]:
    """Resolve ``cfg.model`` and check ``cfg.hook_point`` against its layers, from its config
    files alone (before any weights load). Returns (path, served name, hook point index);
    raises ``FileNotFoundError``/``ValueError`` with a message for the user."""
    from ..hook_points import parse_hook_point, validate_hook_point
    from ..model_info import read_model_info

    path, name = resolve_model(cfg.model)
    info = read_model_info(path, name=name)
    return path, name, parse_hook_point(validate_hook_point(cfg.hook_point, info.num_layers))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last ``decay_fraction``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = total - int(total * cfg.decay_fraction)
    if step >= decay_start and total > decay_start:
        return cfg.lr * max(0.0, (total - step) / (total - decay_start))
    return cfg.lr


@dataclass
class DrawnPool:
    """One pool of training text as drawn for a run: its budget, split, training contexts
    (empty when its activation cache is already complete) and cache."""

    pool: SourceBudget
    split: SplitContexts
    train: list[Tensor]
    cache: ActivationCache | None
    rows: Tensor | None = None
    """The cache rows that train (attention sinks left out), once opened."""

    def train_tokens(self) -> int:
        """Context tokens of its training side, from the cache when they were not tokenized."""
        if self.train or self.cache is None:
            return SplitContexts.tokens(self.train)
        return int(self.cache.meta["capacity"])

    def record(self) -> dict[str, Any]:
        return {"sources": list(self.pool.sources), "max_tokens": self.pool.max_tokens,
                "train_documents": self.split.n_train_docs, "eval_documents": self.split.n_eval_docs,
                "train_context_tokens": self.train_tokens(),
                "train_activations": None if self.rows is None else int(self.rows.numel())}


def eval_shares(drawn: Sequence[DrawnPool], eval_tokens: int) -> list[list[Tensor]]:
    """Each pool's held-out contexts for the final evaluation: the first ``eval_tokens`` of one
    pool's; with pools drawn apart, each pool's share of ``eval_tokens`` in proportion to its
    training tokens (the evaluation mixes sources as training did)."""
    weights = [d.train_tokens() for d in drawn]
    total = max(sum(weights), 1)
    return [take_tokens(d.split.eval, max(1, round(eval_tokens * w / total)))
            for d, w in zip(drawn, weights, strict=True)]


def mixed(shares: Sequence[Sequence[Tensor]], seed: int) -> list[Tensor]:
    """The pools' held-out contexts as one evaluation set (seeded order when there are several)."""
    out = [c for share in shares for c in share]
    if len(shares) > 1:
        order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed + 2)).tolist()
        out = [out[i] for i in order]
    return out


def build_trainer(cfg: TrainConfig, d_in: int) -> SAETrainer:
    return SAETrainer(cfg.architecture, d_in, cfg.width(d_in), k=cfg.k, auxk_alpha=cfg.auxk_alpha,
                      dead_window=cfg.dead_window, l0_coeff=cfg.l0_coeff, l1_coeff=cfg.l1_coeff,
                      jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                      jumprelu_bandwidth=cfg.jumprelu_bandwidth, seed=cfg.seed)


def to_dictionary(trainer: SAETrainer, cfg: TrainConfig, scale: float, model_name: str,
                  extra_cfg: dict[str, Any] | None = None) -> SparseDictionary:
    """The served dictionary: trainer tensors with the input scale folded in."""
    t = trainer.to_tensors()
    t["W_enc"] = t["W_enc"] * scale
    t["W_dec"] = t["W_dec"] / scale
    t["b_dec"] = t["b_dec"] / scale
    arch = trainer.saved_architecture
    # hook_name in our form here; SparseDictionary.save writes SAELens' (blocks.L.hook_resid_post)
    # with ours beside it in metadata.hook_point.
    data: dict[str, Any] = {
        "architecture": arch, "d_in": trainer.d_in, "d_sae": trainer.d_sae,
        "dtype": cfg.weights_dtype, "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": cfg.hook_point,
                     "trained_with": "sae-train", "trainer": cfg.architecture,
                     "folded_norm_scaling_factor": scale,
                     "context_size": cfg.ctx_len,
                     "excluded_positions": "position 0, special tokens and attention sinks (norm over 10x the median)"},
    }
    if arch == "topk":
        data["k"] = cfg.k
    if cfg.architecture == "batchtopk":
        data["metadata"]["batchtopk_k"] = cfg.k
    data.update(extra_cfg or {})
    return SparseDictionary(DictionaryConfig.model_validate(data), t, dtype=cfg.weights_dtype)


class TrainingLog:
    """``training_log.jsonl`` in the output directory: one JSON line per log interval. A run
    that starts at step 0 rewrites it; a resumed one keeps the lines up to its step (a line
    written after the checkpoint it resumes from would be repeated otherwise)."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept: list[str] = []
        if start_step and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, point: dict[str, float | int]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")


def _served_copy(dictionary: SparseDictionary) -> SparseDictionary:
    """Round-trip through the on-disk format, so evaluation sees exactly what is served."""
    with tempfile.TemporaryDirectory() as tmp:
        dictionary.save(tmp)
        return SparseDictionary.load(tmp)


def run(cfg: TrainConfig, out_dir: str | os.PathLike, *, command: str | None = None,
        stop_after: int | None = None, source: ModelActivations | None = None,
        harvester: HarvestSource | None = None,
        log: Callable[[str], None] = tqdm.write) -> dict[str, Any]:
    """Train (or resume) and write the dictionary directory; returns the metrics.

    ``stop_after`` ends the run after that many steps *without* finishing (as a kill
    would, after a checkpoint): used to test resuming. ``source`` reuses an already
    loaded transformers model (it must be ``cfg.model``; evaluation runs on it, and so does
    the harvest with ``harvest="transformers"``). ``harvester`` reuses a harvest source
    (e.g. an ``EngineActivations`` on a running engine); else ``cfg.harvest`` decides, and
    an engine started here is shut down once it is no longer needed.
    """
    started: list[HarvestSource] = []  # harvest sources _run started (closed here whatever happens)
    try:
        return _run(cfg, out_dir, command, stop_after, source, harvester, log, started)
    finally:
        for own in started:
            own.close()


def _run(cfg: TrainConfig, out_dir: str | os.PathLike, command: str | None, stop_after: int | None,
         source: ModelActivations | None, harvester: HarvestSource | None, log: Callable[[str], None],
         own_box: list[HarvestSource]) -> dict[str, Any]:
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model_path, model_name, _ = check_model(cfg)
    if harvester is None:
        if cfg.harvest == "transformers":
            if source is None:
                source = ModelActivations(model_path, device=device)
            harvester = source
        else:
            from .engine_harvest import EngineActivations

            harvester = EngineActivations(model_path, max_model_len=cfg.ctx_len + 1)
            own_box.append(harvester)
    layer = harvester.layer_of(cfg.hook_point)
    d_in = harvester.d_model

    # ---------------------------------------------------------------- data
    pools = source_budgets(cfg.data, cfg.max_tokens)  # one pool, or one per source with its own budget
    cache_root_dir = None
    if cfg.cache:
        from ..default_model import cache_root

        cache_root_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "activations"
    drawn: list[DrawnPool] = []
    for pool in pools:
        cache: ActivationCache | None = None
        fp = ""  # the cache's fingerprint, set with it
        if cache_root_dir is not None:
            fp = cache_fingerprint(version=2, model=model_name if cfg.model == "default" else str(model_path),
                                   layers=[layer], ctx_len=cfg.ctx_len, data=list(pool.sources),
                                   text=[source_identity(s) for s in pool.sources],
                                   text_field=cfg.text_field, eval_fraction=cfg.eval_fraction,
                                   seed=cfg.data_seed, max_tokens=pool.max_tokens)
            cache = ActivationCache(cache_root_dir / fp)
        # With a complete cache the training text is not needed again: tokenize only the held-out side.
        cached = cache is not None and cache.complete(fp)
        split = load_split(list(pool.sources), harvester.tokenizer, ctx_len=cfg.ctx_len,
                           eval_fraction=cfg.eval_fraction, seed=cfg.data_seed,
                           text_field=cfg.text_field, eval_only=cached)
        train_ctx = take_tokens(split.train, pool.max_tokens)
        if not train_ctx and not cached:
            raise ValueError(f"no training text in {', '.join(pool.sources)} after the held-out split")
        if cache is not None:
            cache.harvest(harvester, train_ctx, [layer], fingerprint=fp,
                          tokens_per_batch=cfg.harvest_tokens_per_batch, progress=cfg.progress)
        drawn.append(DrawnPool(pool, split, train_ctx, cache))
    if own_box and cache_root_dir is not None:  # everything is on disk: free the engine before training
        harvester.close()
    shares = eval_shares(drawn, cfg.eval_tokens)
    eval_ctx = mixed(shares, cfg.data_seed)
    if cache_root_dir is not None:
        tables, parts, start = [], [], 0
        for d in drawn:
            assert d.cache is not None
            t = d.cache.open(layer)
            d.rows = kept_rows(t)  # attention sinks beyond position 0 left out
            tables.append(t)
            parts.append(d.rows + start)
            start += t.shape[0]
        table: Tensor | RowTables = tables[0] if len(tables) == 1 else RowTables(tables)
        rows = torch.cat(parts)
        n_train = rows.numel()
        batches: ShuffledBatches | StreamingBatches = ShuffledBatches(table, cfg.batch_size, cfg.seed, rows)
        gen = torch.Generator().manual_seed(cfg.seed + 17)
        pick = rows[torch.randperm(n_train, generator=gen)[:SCALE_SAMPLE]].sort().values
        sample = table[pick].float()
    else:
        train_ctx = [c for d in drawn for c in d.train]
        if len(drawn) > 1:  # sources drawn apart are mixed here, not fed one after another
            order = torch.randperm(len(train_ctx), generator=torch.Generator().manual_seed(cfg.data_seed + 3))
            train_ctx = [train_ctx[i] for i in order.tolist()]
        n_train = sum(max(len(c) - 1, 0) for c in train_ctx)
        batches = StreamingBatches(harvester, train_ctx, layer, cfg.batch_size, cfg.seed,
                                   buffer_tokens=cfg.buffer_tokens,
                                   tokens_per_batch=cfg.harvest_tokens_per_batch)
        sample_ctx = take_tokens(train_ctx, SCALE_SAMPLE)
        sample = torch.cat([harvester.harvest(sample_ctx[i:i + 8], [layer])[layer]
                            for i in range(0, len(sample_ctx), 8)])
        sample = sample[~sink_rows(sample)]
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    total = cfg.steps or max(1, int(cfg.epochs * steps_per_epoch))
    scale = (math.sqrt(d_in) / float(sample.norm(dim=1).mean())
             if cfg.normalize_activations == "expected_average_only_in" else 1.0)

    if source is None:  # evaluation runs on transformers (CE loss with the reconstruction spliced in)
        source = ModelActivations(model_path, device=device)

    # ---------------------------------------------------------------- trainer
    trainer = build_trainer(cfg, d_in)
    trainer.init_b_dec(sample * scale, cfg.b_dec_init)
    trainer.to(device).train()
    optimizer = torch.optim.Adam(trainer.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    fingerprint = cfg.run_fingerprint()
    step = 0
    ckpt_dir = out / CHECKPOINT_DIR
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = load_checkpoint(latest)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{latest} was written by a run with another configuration; "
                             f"delete {ckpt_dir} or use another output directory")
        trainer.load_state_dict(state["trainer"])
        optimizer.load_state_dict(state["optimizer"])
        step, scale = int(state["step"]), float(state["scale"])
        log(f"sae-train: resuming from {latest} (step {step}/{total})")
    if isinstance(batches, StreamingBatches) and step:
        batches.skip(step)

    def checkpoint(at: int) -> None:
        save_checkpoint(ckpt_dir, at, {"step": at, "scale": scale, "fingerprint": fingerprint,
                                       "trainer": trainer.state_dict(),
                                       "optimizer": optimizer.state_dict()})

    curves = TrainingLog(out / TRAINING_LOG_FILE, step)
    use_bf16 = cfg.autocast == "bfloat16"
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.architecture} {cfg.hook_point}",
               unit="step", disable=not cfg.progress, dynamic_ncols=True)
    ema_fvu: float | None = None
    ema_l0: float | None = None
    recent_fvu: list[float] = []
    t_train = time.time()
    start_step = step
    while step < total:
        if stop_after is not None and step - start_step >= stop_after:
            bar.close()
            return {"interrupted_at": step}
        x = batches(step).to(device, non_blocking=True).float() * scale
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        trainer.sparsity_scale = (min(1.0, (step + 1) / cfg.sparsity_warmup_steps)
                                  if cfg.sparsity_warmup_steps else 1.0)
        out_step = train_step(trainer, optimizer, x, bf16=use_bf16)
        step += 1
        fvu, l0 = float(out_step.fvu), float(out_step.l0)
        ema_fvu = fvu if ema_fvu is None else 0.95 * ema_fvu + 0.05 * fvu
        ema_l0 = l0 if ema_l0 is None else 0.95 * ema_l0 + 0.05 * l0
        recent_fvu = ([*recent_fvu, fvu])[-50:]
        dead = float(trainer.dead_mask().float().mean())
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            curves.write({"step": step, "tokens": step * cfg.batch_size, "loss": float(out_step.loss.detach()),
                          "fvu": fvu, "l0": l0, "dead": dead})
        bar.set_postfix(fvu=f"{ema_fvu:.3f}", l0=f"{ema_l0:.1f}", dead=f"{dead:.1%}", lr=f"{lr:.1e}",
                        refresh=False)
        if step % cfg.checkpoint_every == 0 and step < total:
            checkpoint(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            m, _ = evaluate(_served_copy(to_dictionary(trainer, cfg, scale, model_name)), source,
                            take_tokens(eval_ctx, 2048), layer=layer, lm_metrics=False)
            log(f"step {step}: held-out fvu {m['fvu']:.4f} l0 {m['l0']:.1f}")
    bar.close()
    train_time = time.time() - t_train
    checkpoint(total)

    # ---------------------------------------------------------------- save + evaluate
    trainer.eval()
    dictionary = to_dictionary(trainer, cfg, scale, model_name)
    dictionary.save(out)
    served = SparseDictionary.load(out)
    ebar = tqdm(total=sum(len(c) for c in eval_ctx), desc="evaluate", unit="tok",
                disable=not cfg.progress, dynamic_ncols=True)
    metrics, stats = evaluate(served, source, eval_ctx, layer=layer,
                              dense_threshold=cfg.dense_threshold, progress=ebar.update)
    ebar.set_postfix(fvu=f"{metrics['fvu']:.3f}", ce_rec=f"{metrics.get('ce_loss_recovered', 0):.3f}")
    ebar.close()
    per_source = {}
    if len(drawn) > 1:  # the same held-out contexts, source by source
        for d, share in zip(drawn, shares, strict=True):
            per_source[",".join(d.pool.sources)], _ = evaluate(served, source, share, layer=layer,
                                                               dense_threshold=cfg.dense_threshold)
    trained_steps = total - start_step
    result = {
        "model_name": model_name, "hook_point": cfg.hook_point,
        "trainer": cfg.architecture, "architecture": served.architecture,
        "d_in": d_in, "d_sae": served.d_sae, "k": cfg.k if cfg.architecture in ("topk", "batchtopk") else None,
        "eval": metrics,
        **({"eval_per_source": per_source} if per_source else {}),
        "eval_note": ("held-out documents; evaluated positions exclude position 0 and special "
                      "tokens; dead/dense over eval_tokens; CE/KL with the reconstruction "
                      "spliced in at the evaluated positions"
                      + ("; sources drawn on their own budgets contribute held-out tokens in proportion "
                         "to their training tokens, and eval_per_source scores each one's alone"
                         if per_source else "")),
        "training": {
            "steps": total, "batch_size": cfg.batch_size, "tokens_seen": total * cfg.batch_size,
            "train_activations": n_train, "final_train_fvu_last50": sum(recent_fvu) / max(len(recent_fvu), 1),
            "dead_frac_training_window": float(trainer.dead_mask().float().mean()),
            "dead_window_tokens": cfg.dead_window,
            "norm_scaling_factor": scale,
            "batchtopk_threshold": float(trainer.batch_threshold) if cfg.architecture == "batchtopk" else None,
            "wall_time_s": time.time() - t_start, "train_time_s_this_process": train_time,
            "tokens_per_s": trained_steps * cfg.batch_size / max(train_time, 1e-9),
            "device": str(device), "threads": torch.get_num_threads(),
        },
        "data": {"sources": cfg.data,
                 "train_documents": sum(d.split.n_train_docs for d in drawn),
                 "eval_documents": sum(d.split.n_eval_docs for d in drawn), "eval_contexts": len(eval_ctx),
                 "ctx_len": cfg.ctx_len,
                 **({"per_source": [d.record() for d in drawn]} if len(drawn) > 1 else {})},
        "config": cfg.model_dump(),
        "command": command,
        "versions": {"torch": torch.__version__, "sae_serve_dictionary_dtype": dtype_name(dictionary.dtype)},
    }
    dictionary.sparsity = stats.log10_density()
    dictionary.save(out, extra_files={METRICS_FILE: result, COMMAND_FILE: command + "\n"})
    if not cfg.keep_checkpoints:
        for p in ckpt_dir.glob("*"):
            p.unlink()
        ckpt_dir.rmdir()
    return result
