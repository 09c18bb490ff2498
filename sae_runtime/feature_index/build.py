"""Building a feature index (``sae-index``): corpus → serving engine → statistics → file.

The corpus' documents are tokenized without special tokens and cut into contexts of
``ctx_len`` tokens that never cross a document (as sae-train does); a seeded sample of
them, ``max_tokens`` in all, is read. Every context runs through the same vLLM engine and
feature extraction the server uses (:meth:`SAEEngine.harvest_features`: prefill only, the
dictionary's top-k features of every token, and with them each token's residual-stream
norm at the hook point). Statistics skip position 0 and special tokens
(``HarvestSource.training_mask``, the rule training uses) and attention sinks beyond
position 0 (:func:`exclude_sinks`: training's ``sink_norms`` rule, the median taken over the
scored tokens of the shard), and accumulate in :class:`~.stats.IndexStats`.

Contexts are processed in shards of about ``shard_tokens`` tokens; after each shard the
accumulated statistics and the count of shards done go to the work dir (``<out>.work``),
so an interrupted run, started again with the same settings, continues after the last
completed shard and writes the same file. The label step (:mod:`.labels`) runs on the
final statistics only, separate from them. The engine computes the next batch while the
statistics of the previous one are added.

With ``ray_address`` the shards run on engine actors on a Ray cluster instead
(:mod:`.distributed`; the same statistics, merged). With ``explainer`` the written index is
then labelled by a language model (:mod:`.explainer`); :func:`relabel` does that alone for
an existing index (``--label-only``).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..engine.background import EngineThread
from ..training.activations import SINK_NORM_FACTOR, HarvestSource, sink_norms
from ..training.data import DataError, iter_documents, source_budgets
from .config import DEFAULT_TOP_K_CAP, IndexConfig
from .labels import METHOD, label_feature
from .schema import HIST_BINS, QUANTILE_LEVELS
from .stats import FINE_BINS, FINE_LOG10_MAX, FINE_LOG10_MIN, ContextFeatures, IndexStats
from .store import Example, FeatureRecord, IndexWriter, RandomWindow, TokenCount

if TYPE_CHECKING:
    from ..engine.engine import HarvestEngineConfig, SAEEngine

logger = logging.getLogger("sae_runtime.feature_index")

START_TIMEOUT_S = 1800.0
CALL_TIMEOUT_S = 3600.0
MIN_CONTEXT = 2
TOP_TOKENS = 10
SINK_RULE = (f"scored tokens whose residual-stream norm at the hook point exceeds {SINK_NORM_FACTOR:g} x the "
             "median norm of the scored tokens of their shard are attention sinks, left out of every statistic")
"""The attention-sink rule, as the index's meta (``sink_rule``) and the run fingerprint record it."""


class IndexBuildError(ValueError):
    """A build that cannot start (bad settings, missing input, an existing output)."""


@dataclass(frozen=True)
class Context:
    doc: str
    offset: int
    """Token offset of the context in its document."""
    token_ids: np.ndarray


class _TokenRules(HarvestSource):
    """The training token rules (which positions count) for a tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._token_rules()

    def mask(self, ids: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(ids.astype(np.int64))
        return self.training_mask(t[None], torch.tensor([len(t)]))[0].numpy()


def corpus_contexts(cfg: IndexConfig, tokenizer: Any) -> list[Context]:
    """The contexts of the corpus the index reads: a seeded sample of ``max_tokens``, or, where
    sources have their own budgets (``SOURCE@TOKENS``, as in sae-train), a seeded sample of each
    source to its budget, mixed in a seeded order."""
    pools = source_budgets(cfg.data, cfg.max_tokens)
    out: list[Context] = []
    for pool in pools:
        contexts: list[Context] = []
        for doc in iter_documents(pool.sources, text_field=cfg.text_field):
            if not doc.text.strip():
                continue
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), cfg.ctx_len):
                piece = ids[start:start + cfg.ctx_len]
                if len(piece) >= MIN_CONTEXT:
                    contexts.append(Context(doc.doc_id, start, np.asarray(piece, np.int64)))
        if not contexts:
            raise IndexBuildError(f"data: no text in {list(pool.sources)} (every document is empty or shorter "
                                  f"than {MIN_CONTEXT} tokens)")
        order = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(cfg.data_seed)).tolist()
        total = 0
        for i in order:
            if pool.max_tokens is not None and total >= pool.max_tokens:
                break
            out.append(contexts[i])
            total += len(contexts[i].token_ids)
    if len(pools) > 1:
        mix = torch.randperm(len(out), generator=torch.Generator().manual_seed(cfg.data_seed + 1)).tolist()
        out = [out[i] for i in mix]
    return out


def _shards(contexts: Sequence[Context], shard_tokens: int) -> list[range]:
    out, start, total = [], 0, 0
    for i, c in enumerate(contexts):
        total += len(c.token_ids)
        if total >= shard_tokens:
            out.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(contexts):
        out.append(range(start, len(contexts)))
    return out


def _batches(ids: range, contexts: Sequence[Context], batch_tokens: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    total = 0
    for i in ids:
        if out[-1] and total + len(contexts[i].token_ids) > batch_tokens:
            out.append([])
            total = 0
        out[-1].append(i)
        total += len(contexts[i].token_ids)
    return [b for b in out if b]


ENGINE_THREAD = "sae-index-engine"
"""The name of the thread an engine started here runs its event loop in."""


def engine_config(cfg: IndexConfig) -> HarvestEngineConfig:
    """The engine sae-index starts for ``cfg``: its model and settings, serving its dictionary,
    the model stopped after the dictionary's layer (prefix caching off: every harvest request
    skips reading it)."""
    from ..engine.engine import DEEPEST_DICTIONARY, HarvestEngineConfig

    return HarvestEngineConfig(model=None if cfg.model == "default" else cfg.model,
                               dictionaries=[str(cfg.dictionary_dir())], dtype=cfg.dtype,
                               enforce_eager=cfg.enforce_eager, max_model_len=cfg.max_model_len,
                               max_num_seqs=cfg.max_num_seqs, kv_cache_gib=cfg.kv_cache_gib,
                               enable_prefix_caching=False, stop_after_layer=DEEPEST_DICTIONARY)


def start_engine(runner: EngineThread, cfg: IndexConfig) -> SAEEngine:
    """``runner``'s engine: the one handed in to it, else one started for ``cfg``
    (:func:`engine_config`) within ``START_TIMEOUT_S``."""
    if runner.engine is not None:
        return runner.engine
    return runner.start(engine_config(cfg), START_TIMEOUT_S)


def _served_entry(engine: Any, dictionary_dir: Path) -> Any:
    want = dictionary_dir.resolve()
    for entry in engine.registry:
        if entry.path is not None and Path(entry.path).resolve() == want:
            return entry
    raise IndexBuildError(f"dictionary: the engine does not serve {dictionary_dir}")


def check_inputs(cfg: IndexConfig) -> None:
    """What can be checked before an engine starts; raises :class:`IndexBuildError`."""
    d = cfg.dictionary_dir()
    if not (d / "cfg.json").is_file():
        raise IndexBuildError(f"dictionary: no dictionary at {d} (a folder with cfg.json and "
                              "sae_weights.safetensors)")
    out = cfg.out_path()
    if out.exists() and not cfg.overwrite:
        raise IndexBuildError(f"out: {out} exists; pass --overwrite to replace it or --out to write elsewhere")
    if cfg.explainer:
        explainer_base_url(cfg.explainer)  # a malformed URL fails now, not after the build
    if cfg.ctx_len >= cfg.max_model_len:
        raise IndexBuildError(f"ctx_len: {cfg.ctx_len} must be below max_model_len ({cfg.max_model_len})")
    from ..default_model import MODEL_NAME, prepare_default_model
    from ..model_info import read_model_info
    from ..registry import DictionaryRegistry

    try:
        info = (read_model_info(prepare_default_model(), name=MODEL_NAME) if cfg.model == "default"
                else read_model_info(cfg.model))
        # What the engine checks when it loads the dictionary (model, hook point, width).
        DictionaryRegistry.load([str(d)], model_name=info.name, num_layers=info.num_layers,
                                hidden_size=info.hidden_size)
    except (ValueError, OSError) as exc:
        raise IndexBuildError(f"dictionary: {exc}") from None


class _Work:
    """The work dir: accumulated statistics after the completed shards, and their count."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path, self.fingerprint = path, fingerprint
        self.progress_file, self.state_file = path / "progress.json", path / "state.pt"

    def load(self, resume: bool) -> tuple[int, IndexStats | None]:
        if not self.progress_file.is_file():
            return 0, None
        progress = json.loads(self.progress_file.read_text())
        if not resume:
            shutil.rmtree(self.path)
            return 0, None
        if progress.get("fingerprint") != self.fingerprint:
            raise IndexBuildError(
                f"work_dir: {self.path} holds an unfinished run with other settings; pass --no-resume to "
                "start over (it is deleted) or use another --work-dir")
        return int(progress["shards_done"]), IndexStats.load(self.state_file)

    def save(self, shards_done: int, stats: IndexStats) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stats.save(self.state_file)
        tmp = self.progress_file.with_name("progress.json.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards_done": shards_done}))
        tmp.replace(self.progress_file)


@dataclass
class ServedModel:
    """What a build needs of the model and the dictionary besides the engine's harvest: the
    tokenizer, the checkpoint (logit lens), the model's name and the dictionary's entry."""

    tokenizer: Any
    model_dir: Path
    model_name: str
    entry: Any

    @classmethod
    def of_engine(cls, eng: Any, cfg: IndexConfig) -> ServedModel:
        return cls(eng.tokenizer, Path(eng.model_dir), eng.model_name, _served_entry(eng, cfg.dictionary_dir()))

    @classmethod
    def load(cls, cfg: IndexConfig) -> ServedModel:
        """Without an engine: the same model information and registry entry the engine has."""
        from transformers import AutoTokenizer

        from ..default_model import MODEL_NAME, prepare_default_model
        from ..model_info import read_model_info
        from ..registry import DictionaryRegistry

        info = (read_model_info(prepare_default_model(), name=MODEL_NAME) if cfg.model == "default"
                else read_model_info(cfg.model))
        registry = DictionaryRegistry.load([str(cfg.dictionary_dir())], model_name=info.name,
                                           num_layers=info.num_layers, hidden_size=info.hidden_size)
        return cls(AutoTokenizer.from_pretrained(info.path), Path(info.path), info.name, next(iter(registry)))


Harvest = Callable[[Sequence[Context], Sequence[range], int, IndexStats, int, Any, Callable[[int], None]], None]
"""Runs shards ``start..`` of the contexts through engines into the statistics: ``(contexts,
shards, start, stats, top_k, progress bar, after_shard)``; ``after_shard(s)`` is called once
shard ``s``'s contexts are in ``stats``, in shard order."""


def build(cfg: IndexConfig, *, engine: Any = None, loop: asyncio.AbstractEventLoop | None = None,
          on_shard: Callable[[int], None] | None = None) -> Path:
    """Build the index ``cfg`` describes and return its path. ``engine``/``loop``: a running
    :class:`SAEEngine` serving the dictionary (else one is started and shut down here, or
    engine actors on a Ray cluster with ``cfg.ray_address``: :mod:`.distributed`);
    ``on_shard(i)`` is called after shard ``i`` is saved to the work dir. With
    ``cfg.explainer`` the written index is then labelled by it (:mod:`.explainer`)."""
    check_inputs(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.ray_address and engine is None:
        from .distributed import ray_harvest

        model = ServedModel.load(cfg)
        with ray_harvest(cfg, model) as harvest:
            out = _build(cfg, model, harvest, on_shard)
    else:
        runner = EngineThread(engine, loop, name=ENGINE_THREAD)
        try:
            eng = start_engine(runner, cfg)
            model = ServedModel.of_engine(eng, cfg)
            out = _build(cfg, model, _local_harvest(cfg, runner, eng, model), on_shard)
        finally:
            runner.close()
    if cfg.explainer:
        try:
            run_explainer(cfg, out, model.tokenizer)
        except ValueError as exc:
            raise IndexBuildError(f"{exc} (the index was written with its deterministic labels: {out}; "
                                  "label it later with --label-only)") from None
    return out


def _local_harvest(cfg: IndexConfig, runner: EngineThread, eng: Any, model: ServedModel) -> Harvest:
    """The shards through this process' engine, each batch's features with its tokens' stream
    norms; a shard's statistics are added once all of it is harvested (the attention-sink
    rule takes the median over the whole shard), while the engine computes the next shard's
    first batch."""
    rules = _TokenRules(model.tokenizer)
    entry_id = model.entry.id

    def harvest(contexts: Sequence[Context], shards: Sequence[range], start: int, stats: IndexStats, top_k: int,
                bar: Any, after_shard: Callable[[int], None]) -> None:
        def submit(batch: list[int]) -> Any:
            ids = [contexts[i].token_ids.tolist() for i in batch]
            return runner.submit(eng.harvest_features(ids, entry_id, top_k, stream_norms=True))

        jobs = [(s, batch) for s in range(start, len(shards))
                for batch in _batches(shards[s], contexts, cfg.batch_tokens)]
        pending = submit(jobs[0][1]) if jobs else None
        shard: list[tuple[list[int], Any]] = []
        for j, (s, batch) in enumerate(jobs):
            assert pending is not None
            results = pending.result(CALL_TIMEOUT_S)
            if j + 1 < len(jobs):
                pending = submit(jobs[j + 1][1])  # the engine runs it while we add this one
            shard.append((batch, results))
            bar.update(sum(len(contexts[i].token_ids) for i in batch))
            if j + 1 == len(jobs) or jobs[j + 1][0] != s:
                ids = [i for b, _ in shard for i in b]
                feats = context_features(contexts, ids, [r for _, rs in shard for r in rs], rules)
                stats.sinks += exclude_sinks(feats, [r[2] for _, rs in shard for r in rs])
                stats.update(feats)
                shard = []
                after_shard(s)

    return harvest


def context_features(contexts: Sequence[Context], batch: Sequence[int], results: Sequence[tuple[np.ndarray, ...]],
                     rules: _TokenRules) -> list[ContextFeatures]:
    """The engine's features of the contexts ``batch`` (their indices), as the statistics take them
    (the mask: the training token rules; :func:`exclude_sinks` then takes attention sinks out)."""
    return [ContextFeatures(ctx_id=i, token_ids=contexts[i].token_ids, mask=rules.mask(contexts[i].token_ids),
                            indices=r[0], values=r[1]) for i, r in zip(batch, results, strict=True)]


def exclude_sinks(feats: Sequence[ContextFeatures], norms: Sequence[np.ndarray]) -> int:
    """Take the attention sinks beyond position 0 out of the contexts' masks, in place: the
    scored tokens whose stream norm at the hook point (``norms``, per context ``[T]``) exceeds
    ``SINK_NORM_FACTOR`` × the median norm of all the scored tokens of ``feats`` (sae-train's
    rule, :func:`~sae_runtime.training.activations.sink_norms`). Returns how many there were."""
    scored = [np.asarray(n, np.float32)[c.mask] for c, n in zip(feats, norms, strict=True)]
    if not scored:
        return 0
    sinks = sink_norms(torch.from_numpy(np.concatenate(scored))).numpy()
    off = 0
    for c, n in zip(feats, scored, strict=True):
        where = np.flatnonzero(c.mask)[sinks[off:off + len(n)]]
        c.mask = c.mask.copy()
        c.mask[where] = False
        off += len(n)
    return int(sinks.sum())


def resolve_top_k(cfg: IndexConfig, entry: Any) -> tuple[int, bool]:
    """Features read per token, and whether that is every nonzero feature."""
    complete = entry.architecture == "topk" and entry.k is not None
    top_k = cfg.top_k or (entry.k if complete else DEFAULT_TOP_K_CAP)
    top_k = min(top_k, entry.d_sae)
    return top_k, complete and top_k >= entry.k


def _build(cfg: IndexConfig, model: ServedModel, harvest: Harvest, on_shard: Callable[[int], None] | None) -> Path:
    from tqdm import tqdm

    entry = model.entry
    top_k, complete = resolve_top_k(cfg, entry)
    try:
        contexts = corpus_contexts(cfg, model.tokenizer)
    except DataError as exc:
        raise IndexBuildError(f"data: {exc}") from None
    shards = _shards(contexts, cfg.shard_tokens)
    work = _Work(cfg.work_path(), cfg.run_fingerprint())
    done, stats = work.load(cfg.resume)
    if stats is None:
        stats = new_stats(cfg, entry.d_sae)
    total = sum(len(c.token_ids) for c in contexts)
    done_tokens = sum(len(contexts[i].token_ids) for s in shards[:done] for i in s)
    bar = tqdm(total=total, initial=done_tokens, unit="tok", desc="sae-index", disable=not cfg.progress)

    def after_shard(s: int) -> None:
        work.save(s + 1, stats)
        if on_shard is not None:
            on_shard(s)

    try:
        harvest(contexts, shards, done, stats, top_k, bar, after_shard)
    finally:
        bar.close()
    meta = {"dictionary_id": entry.id, "model": model.model_name, "hook_point": entry.hook_point,
            "d_sae": entry.d_sae, "architecture": entry.architecture, "corpus": json.dumps(cfg.data),
            "contexts": len(contexts), "context_tokens": total, "tokens_scored": stats.tokens,
            "ctx_len": cfg.ctx_len, "data_seed": cfg.data_seed, "top_n": cfg.top_n, "window": cfg.window,
            "top_k": top_k, "top_k_complete": json.dumps(complete), "sink_rule": SINK_RULE,
            "sink_tokens": stats.sinks,
            "quantile_method": f"fine log-spaced histogram ({FINE_BINS} bins over 1e{FINE_LOG10_MIN:g}.."
                               f"1e{FINE_LOG10_MAX:g}), inverted CDF interpolated in the bin",
            "label_method": METHOD, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "builder": f"sae-serve {_version()}"}
    out = cfg.out_path()
    write_index(out, stats, contexts, model, meta, cfg)
    if not cfg.keep_work:
        shutil.rmtree(work.path, ignore_errors=True)
    return out


def new_stats(cfg: IndexConfig, d_sae: int) -> IndexStats:
    return IndexStats(d_sae, top_n=cfg.top_n, window=cfg.window, reservoir=cfg.random_windows, seed=cfg.data_seed)


def _version() -> str:
    try:
        return importlib.metadata.version("sae-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _logit_lens(model_dir: Path, entry: Any,
                n: int) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]]:
    from ..unembedding import Unembedding

    unemb = Unembedding.load(model_dir)
    W_dec = entry.dictionary.W_dec.detach().float().cpu()
    if unemb.norm_gain is not None:
        W_dec = W_dec * unemb.norm_gain
    promoted, suppressed = [], []
    for s in range(0, len(W_dec), 256):
        scores = W_dec[s:s + 256] @ unemb.W_U.T
        hi, lo = torch.topk(scores, n, dim=1), torch.topk(-scores, n, dim=1)
        for vh, ih, vl, il in zip(hi.values.tolist(), hi.indices.tolist(), lo.values.tolist(),
                                  lo.indices.tolist(), strict=True):
            promoted.append(list(zip(ih, vh, strict=True)))
            suppressed.append([(i, -v) for i, v in zip(il, vl, strict=True)])
    return promoted, suppressed


def write_index(out: Path, stats: IndexStats, contexts: Sequence[Context], model: ServedModel,
                meta: dict[str, Any], cfg: IndexConfig) -> None:
    """Finish the statistics (quantiles, histograms, co-occurrence, logit lens, labels) and
    write the file (to a temporary name first: a finished index replaces the old one at once)."""
    texts: dict[int, str] = {}

    def text(t: int) -> str:
        if t not in texts:
            texts[t] = model.tokenizer.decode([t])
        return texts[t]

    quantiles = stats.quantiles(QUANTILE_LEVELS)
    hist = stats.coarse_hist(HIST_BINS)
    density = stats.density()
    cooc = stats.cooccurring(cfg.cooccur_top)
    promoted, suppressed = _logit_lens(model.model_dir, model.entry, cfg.logit_top)
    randoms = reservoir_windows(stats)
    random_tokens = [w.token_ids for w in randoms]
    random_active = active_matrix(randoms, stats.d)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with IndexWriter(tmp, meta) as writer:
        records = []
        for f in range(stats.d):
            exs = stats.examples(f)
            peaks = Counter(e["token_ids"][e["peak"]] for e in exs)
            label, score = label_feature(f, [e["token_ids"] for e in exs], [e["peak"] for e in exs],
                                         [t for t, _ in promoted[f]], random_tokens, random_active[f], text)
            records.append(FeatureRecord(
                feature=f, max_act=float(stats.max_act[f]), n_fired=int(stats.n_fired[f]),
                density=float(density[f]), quantiles=quantiles[f].tolist(), hist=hist[f].tolist(),
                top_tokens=[TokenCount(t, text(t), c) for t, c in peaks.most_common(TOP_TOKENS)],
                promoted=[TokenCount(t, text(t), round(s, 4)) for t, s in promoted[f]],
                suppressed=[TokenCount(t, text(t), round(s, 4)) for t, s in suppressed[f]],
                cooccur=[(g, round(j, 4)) for g, j in cooc[f]], label=label.text, label_source="tokens",
                label_score=score))
            writer.add_examples(f, [Example(
                activation=e["activation"], token_ids=e["token_ids"], acts=e["acts"], peak=e["peak"],
                doc=contexts[e["ctx"]].doc, position=e["position"], context_offset=contexts[e["ctx"]].offset)
                for e in exs])
        writer.add_features(records)
        writer.add_random_windows(randoms)
    os.replace(tmp, out)


def reservoir_windows(stats: IndexStats) -> list[RandomWindow]:
    """The statistics' random windows as the index stores them."""
    return [RandomWindow(ctx=int(c), token_ids=tokens, active=torch.nonzero(active).flatten().tolist())
            for (tokens, active), c in zip(stats.random_windows(), stats.rnd_ctx.tolist(), strict=False)]


def active_matrix(windows: Sequence[RandomWindow], d_sae: int) -> np.ndarray:
    """bool ``[d_sae, windows]``: whether each feature fires in each window."""
    out = np.zeros((d_sae, len(windows)), bool)
    for j, w in enumerate(windows):
        out[w.active, j] = True
    return out


# -- labels by an explainer (after a build, or --label-only on an existing index) -----------------


def explainer_settings(cfg: IndexConfig) -> Any:
    from .explainer import ExplainerSettings

    assert cfg.explainer
    key = cfg.explainer_api_key.get_secret_value() if cfg.explainer_api_key else os.environ.get("OPENAI_API_KEY")
    return ExplainerSettings(url=explainer_base_url(cfg.explainer), model=cfg.explainer_model, api_key=key,
                             concurrency=cfg.explainer_concurrency, timeout_s=cfg.explainer_timeout_s)


def explainer_base_url(url: str) -> str:
    """An endpoint's base URL as the OpenAI client takes it: ``http://host:8000`` means
    ``http://host:8000/v1``; a URL with a path is taken as it is."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise IndexBuildError(f"explainer: {url!r} is not an http(s) URL")
    return url.rstrip("/") + "/v1" if parts.path in ("", "/") else url


def run_explainer(cfg: IndexConfig, out: Path, tokenizer: Any) -> Any:
    """Label the index at ``out`` with ``cfg.explainer`` (:func:`.explainer.label_index`) and
    log what happened; returns the report. Raises ValueError (ExplainerError) when the
    endpoint cannot be used."""
    from .explainer import label_index

    report = label_index(out, explainer_settings(cfg), lambda ids: tokenizer.decode(ids),
                         features=cfg.explainer_features, progress=cfg.progress)
    logger.warning("sae-index: %s labelled %d features (%d already were, %d unclear yes/no answers)",
                   report.source, len(report.labelled), len(report.skipped), report.unclear)
    for f, why in sorted(report.failed.items()):
        logger.warning("sae-index: feature %d keeps its label, the explainer failed: %s", f, why)
    if report.unscorable:
        logger.warning("sae-index: features %s have fewer than 2 examples or no non-firing random window: "
                       "not labelled", report.unscorable)
    return report


def relabel(cfg: IndexConfig, *, engine: Any = None, loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """``sae-index --label-only``: label an existing index with the explainer, reading no
    corpus; an index written before the ``random_windows`` table existed first gets it (the
    same windows a build keeps: only their contexts run through the engine). Returns the
    explainer's report."""
    from .store import FeatureIndex, update_labels

    out = cfg.out_path()
    if not cfg.explainer:
        raise IndexBuildError("explainer: --label-only labels an existing index with an explainer; pass "
                              "--explainer URL")
    if not out.is_file():
        raise IndexBuildError(f"out: no index at {out} to relabel; build it first (without --label-only)")
    explainer_base_url(cfg.explainer)
    idx = FeatureIndex(out)
    meta, missing = idx.meta, idx.random_windows() is None
    idx.close()
    if not missing:
        model = ServedModel.load(cfg)
    else:
        runner = EngineThread(engine, loop, name=ENGINE_THREAD)
        try:
            eng = start_engine(runner, cfg)
            model = ServedModel.of_engine(eng, cfg)
            windows = harvest_reservoir(cfg, meta, runner, eng, model)
        finally:
            runner.close()
        update_labels(out, out, [], windows)
    return run_explainer(cfg, out, model.tokenizer)


def harvest_reservoir(cfg: IndexConfig, meta: dict[str, str], runner: EngineThread, eng: Any,
                      model: ServedModel) -> list[RandomWindow]:
    """The random windows a build with the index's settings (``meta``: corpus, ``ctx_len``,
    ``data_seed``, ``contexts``, ``window``) keeps, harvesting only the contexts they come from
    (the reservoir holds the contexts with the smallest seeded keys of their ids), each only
    up to its window's end: the model is causal, so those tokens' features are the ones the
    whole context gives; the positions after it are passed on as not firing."""
    from .stats import random_key

    sample_cfg = cfg.model_copy(update={"data": json.loads(meta["corpus"]), "ctx_len": int(meta["ctx_len"]),
                                        "data_seed": int(meta["data_seed"]), "max_tokens": None})
    contexts = corpus_contexts(sample_cfg, model.tokenizer)[:int(meta["contexts"])]
    if len(contexts) != int(meta["contexts"]):
        raise IndexBuildError(f"data: the corpus {meta['corpus']} now has {len(contexts)} contexts, the index was "
                              f"built from {meta['contexts']}; rebuild the index")
    keys = random_key(np.arange(len(contexts)), int(meta["data_seed"]))
    chosen = np.argsort(keys, kind="stable")[:cfg.random_windows].tolist()
    stats = IndexStats(model.entry.d_sae, top_n=1, window=int(meta["window"]), reservoir=cfg.random_windows,
                       seed=int(meta["data_seed"]), cooccurrence=False)
    top_k, _ = resolve_top_k(cfg.model_copy(update={"top_k": int(meta["top_k"])}), model.entry)
    rules = _TokenRules(model.tokenizer)
    stop = {i: stats.reservoir_span(int(keys[i]), len(contexts[i].token_ids))[1] for i in chosen}
    prefixes = [Context(contexts[i].doc, contexts[i].offset, contexts[i].token_ids[:stop[i]]) for i in chosen]
    ids, padded = [], []
    for batch in _batches(range(len(chosen)), prefixes, cfg.batch_tokens):
        ids += [chosen[j] for j in batch]
        results = runner.submit(eng.harvest_features([prefixes[j].token_ids.tolist() for j in batch],
                                                     model.entry.id, top_k, stream_norms=True)).result(CALL_TIMEOUT_S)
        for j, (ix, vx, nx) in zip(batch, results, strict=True):
            rest = len(contexts[chosen[j]].token_ids) - len(ix)
            padded.append((np.pad(ix, ((0, rest), (0, 0))), np.pad(vx, ((0, rest), (0, 0))), np.pad(nx, (0, rest))))
    # The sink rule's median here: over the scored tokens of the windows' contexts (their
    # shards are not harvested; a sink's norm is far beyond 10x either median).
    feats = context_features(contexts, ids, padded, rules)
    for c in feats:  # the positions after the window were not harvested: not scored
        c.mask = c.mask & (np.arange(len(c.mask)) < stop[c.ctx_id])
    exclude_sinks(feats, [r[2] for r in padded])
    stats.update(feats)
    return reservoir_windows(stats)
