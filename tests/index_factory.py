"""A small feature index for a test dictionary, built from real activations.

The session server's dictionary gets ``feature_index.sqlite`` before the server starts, so
the index endpoints are tested through the real server with numbers that agree with what
the engine extracts: the activations here come from the default model in transformers (the
reference stream, ``sae_runtime/hf_streams.py``) over :data:`CORPUS`, encoded by the
dictionary itself. Statistics follow the schema (``sae_runtime/feature_index/schema.py``):
position 0 and special tokens are left out; each example is a whole corpus text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sae_runtime.feature_index import HIST_BINS, INDEX_FILE, QUANTILE_LEVELS, Example, FeatureRecord, IndexWriter
from sae_runtime.feature_index.store import TokenCount

CORPUS = (
    "The ocean waves crashed against the rocky shore all night.",
    "Paris is the capital of France and its largest city.",
    "def add(a, b):\n    return a + b",
    "The stock market fell sharply after the interest rate decision.",
    "She planted tomatoes, basil and peppers in her garden this spring.",
    "The cat slept on the warm windowsill while rain fell outside.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "In 1969 astronauts landed on the Moon for the first time.",
)
TOP_N = 5


def corpus_activations(model_dir: Path, dictionary_dir: Path) -> list[tuple[list[int], np.ndarray]]:
    """``(token ids, activations [tokens, d_sae])`` of each corpus text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.dictionary import SparseDictionary
    from sae_runtime.hf_streams import residual_streams

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d = SparseDictionary.load(str(dictionary_dir))
    layer = d.layer
    out = []
    with torch.no_grad():
        for text in CORPUS:
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
            x = residual_streams(model, torch.tensor([ids]), [layer])[layer][0]
            out.append((ids, d.encode(x.to(d.dtype)).float().numpy()))
    return out


def write_index(dictionary_dir: Path, model_dir: Path, dictionary_id: str) -> Path:
    """Write ``feature_index.sqlite`` into ``dictionary_dir``; returns its path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    texts = corpus_activations(model_dir, dictionary_dir)
    d_sae = texts[0][1].shape[1]
    # The scored tokens: every token but position 0 and special tokens.
    kept = [(ids, acts, [p for p in range(1, len(ids)) if ids[p] not in special]) for ids, acts in texts]
    scored = np.concatenate([acts[pos] for _ids, acts, pos in kept])
    fired = scored > 0
    n_tokens = scored.shape[0]
    records, examples = [], {}
    for f in range(d_sae):
        nz = scored[fired[:, f], f]
        max_act = float(nz.max()) if nz.size else 0.0
        quantiles = np.quantile(nz, QUANTILE_LEVELS).tolist() if nz.size else [0.0] * len(QUANTILE_LEVELS)
        hist = np.histogram(nz, bins=HIST_BINS, range=(0.0, max_act))[0].tolist() if nz.size else [0] * HIST_BINS
        exs = []
        for t, (ids, acts, pos) in enumerate(kept):
            col = acts[pos, f]
            if col.max() > 0:
                peak = pos[int(col.argmax())]
                exs.append(Example(float(acts[peak, f]), ids, acts[:, f].tolist(), peak, f"doc-{t}", peak))
        exs.sort(key=lambda e: -e.activation)
        exs = exs[:TOP_N]
        peaks: dict[int, int] = {}
        for e in exs:
            peaks[e.token_ids[e.peak]] = peaks.get(e.token_ids[e.peak], 0) + 1
        top_tokens = [TokenCount(t, tok.decode([t]), c) for t, c in sorted(peaks.items(), key=lambda tc: -tc[1])]
        inter = (fired & fired[:, [f]]).sum(0)
        union = (fired | fired[:, [f]]).sum(0)
        jac = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        jac[f] = 0.0
        co = [(int(g), float(jac[g])) for g in np.argsort(-jac)[:3] if jac[g] > 0]
        word = top_tokens[0].token.strip() if top_tokens else ""
        label = f"fires on {word}" if word else "never fired"
        records.append(FeatureRecord(
            feature=f, max_act=max_act, n_fired=int(nz.size), density=nz.size / n_tokens, quantiles=quantiles,
            hist=hist, top_tokens=top_tokens, cooccur=co, label=label, label_source="tokens",
            label_score=0.75 if f % 2 else None))
        examples[f] = exs
    path = dictionary_dir / INDEX_FILE
    meta = {"dictionary_id": dictionary_id, "d_sae": d_sae, "corpus": "tests/index_factory.py",
            "tokens_scored": n_tokens, "top_n": TOP_N}
    with IndexWriter(path, meta) as w:
        w.add_features(records)
        for f, exs in examples.items():
            w.add_examples(f, exs)
    return path
