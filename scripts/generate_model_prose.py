"""Model-written everyday English: the embedded model answering "Write <genre> about <topic>."

The general corpus (``sae-corpus``) has no modern everyday prose: no package of the
registries carries news, stories or letters under a clean licence. The served model can
write it: SmolLM2-135M-Instruct (Apache-2.0) answers genre x topic prompts (25 genres x
168 everyday topics, a seeded sample of them), sampled through vLLM. Its text is simple
and sometimes incoherent, but it is the register and vocabulary the hand-written
evaluation passages (``sae_runtime/data/general_english_eval.jsonl``) are in, and exactly
what the model itself produces when served. The topics leave out those of the evaluation
passages (no ferry, library, Rome, storm, bread, election, ...), so a dictionary trained
on this text is not scored on the subjects it was given; one slipped through, "a bicycle
repair shop" (the passages have a bicycle), kept so that the run in
``benchmarks/README.md`` can be reproduced: 4 of its 1,185 kept answers.

Writes JSONL (``text``, ``genre``, ``topic``), one record per prompt whose answer has at
least ``--min-words`` words, readable by ``sae-train --data``.

    .venv/bin/python scripts/generate_model_prose.py --out prose.jsonl --prompts 1200

The shipped source ``prose`` (``sae_runtime/data/model_prose.jsonl.gz``, part of the default
dictionary's training text) is two batches of one seeded shuffle of the prompts, written one
after the other and gzipped (answers under 40 words dropped)::

    scripts/generate_model_prose.py --out a.jsonl --prompts 1200
    scripts/generate_model_prose.py --out b.jsonl --prompts 1500 --skip 1200

On this 2-core CPU 1,200 prompts (377 k generated tokens) took 47 minutes beside other jobs.
vLLM on CPU cannot seed requests one by one, so the engine is seeded once (``--seed``) and
a rerun gives the same text only on the same machine and vLLM build.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GENRES = [
    "a short story", "a diary entry", "a news report", "a blog post", "a letter to a friend",
    "an encyclopedia paragraph", "a how-to guide", "a product review", "a travel description",
    "an explanation for a ten-year-old", "a short essay", "a speech", "an email to a colleague",
    "a magazine article", "a description", "a set of instructions", "a memory from childhood",
    "a conversation between two people", "a short report", "an opinion piece", "a restaurant review",
    "a paragraph from a textbook", "a social media post", "a complaint letter", "a thank-you note",
]
TOPICS = [
    "a rainy afternoon", "a lost cat", "the first day at a new school", "a hospital visit", "a football match",
    "a wedding", "learning to swim", "a camping trip", "a broken phone", "a supermarket", "a city park",
    "moving to a new house", "a birthday party", "an old photograph", "a marathon", "climate change",
    "electric cars", "the human heart", "how vaccines work", "the water cycle", "earthquakes", "coral reefs",
    "the invention of the printing press", "a mountain village", "a desert", "a farmer's market",
    "making pancakes", "a vegetable curry", "coffee", "tea ceremonies", "a job interview", "working from home",
    "a small business", "saving money", "taxes", "a concert", "learning the guitar", "a painting in a gallery",
    "a film premiere", "a dentist appointment", "a cold winter morning", "spring flowers", "autumn leaves",
    "a heatwave", "a snowstorm", "a road trip", "an airport", "a taxi ride", "a bicycle repair shop", "a car accident",
    "a neighbour's dog", "a goldfish", "horses", "elephants", "penguins", "butterflies", "ants",
    "black holes", "a telescope", "a science fair", "robots", "computers", "the internet", "smartphones",
    "video games", "a password", "online shopping", "a newspaper", "a police officer", "a fire station",
    "a nurse", "a teacher", "a grandmother", "a new baby", "a teenager's bedroom", "a family dinner",
    "a picnic", "a beach holiday", "a fishing trip", "a lighthouse", "a castle", "a cathedral", "a bridge",
    "a river", "a lake in summer", "a forest walk", "mushrooms", "apple trees", "a vineyard", "cheese",
    "chocolate", "a broken washing machine", "a power cut", "a plumber", "painting a room", "a garage sale",
    "a flea market", "a theatre play", "a poem", "a novel", "writing a letter", "a post office", "a hotel",
    "a zoo", "a circus", "a carnival", "a parade", "a holiday tradition", "New Year's Eve",
    "a marriage proposal", "friendship", "a quarrel", "an apology", "loneliness", "happiness",
    "fear of flying", "a nightmare", "dreams", "exercise", "running shoes", "yoga", "a cold", "a headache",
    "healthy eating", "a pharmacy", "a first aid kit", "the brain", "memory", "languages", "learning French",
    "a dictionary", "mathematics", "a calculator", "a clock", "time zones", "a map", "a compass", "sailing",
    "a submarine", "a spaceship", "an astronaut's day", "a satellite", "renewable energy", "wind turbines",
    "recycling", "plastic waste", "a factory", "a construction site", "a skyscraper", "a farm tractor",
    "wheat", "rice", "a harvest festival", "a bakery", "a butcher's shop", "a wedding cake", "a kitchen knife",
    "a sewing machine", "knitting", "a tailor", "a shoe shop", "fashion", "a haircut", "a barber",
    "a tattoo", "a rock band", "a jazz club", "an orchestra",
]


def prompts(n: int, seed: int, skip: int = 0) -> list[tuple[str, str]]:
    """``n`` (genre, topic) pairs of a seeded shuffle of all of them, after its first ``skip``."""
    pairs = [(g, t) for g in GENRES for t in TOPICS]
    if skip < 0 or not 0 < n <= len(pairs) - skip:
        raise SystemExit(f"--prompts must be 1..{len(pairs) - max(skip, 0)} (--skip {skip} of {len(pairs)} pairs)")
    random.Random(seed).shuffle(pairs)
    return pairs[skip:skip + n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--prompts", type=int, default=1200, help="how many genre x topic prompts")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first SKIP pairs of the shuffle (a later batch of the same sample)")
    p.add_argument("--max-tokens", type=int, default=400, help="new tokens per answer at most")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--min-words", type=int, default=40, help="answers with fewer words are dropped")
    p.add_argument("--max-num-seqs", type=int, default=96, help="sequences decoded together")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt sample and the engine")
    args = p.parse_args(argv)

    from vllm import LLM, SamplingParams

    from sae_runtime.training.train import resolve_model

    pairs = prompts(args.prompts, args.seed, args.skip)
    llm = LLM(model=str(resolve_model("default")[0]), dtype="float32", max_model_len=1024, seed=args.seed,
              max_num_seqs=args.max_num_seqs)
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Write {g} about {t}."}], tokenize=False,
                                     add_generation_prompt=True) for g, t in pairs]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            repetition_penalty=args.repetition_penalty)
    t0 = time.time()
    outs = llm.generate(texts, params)
    kept = tokens = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for (genre, topic), o in zip(pairs, outs, strict=True):
            text = o.outputs[0].text.strip()
            tokens += len(o.outputs[0].token_ids)
            if len(text.split()) >= args.min_words:
                f.write(json.dumps({"text": text, "genre": genre, "topic": topic}, ensure_ascii=False) + "\n")
                kept += 1
    print(f"{args.out}: {kept} of {len(outs)} answers kept, {tokens} generated tokens, {time.time() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
