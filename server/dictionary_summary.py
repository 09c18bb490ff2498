"""``GET /v1/dictionaries/{id}/summary``: a dictionary's evaluation, feature densities and
training curves in one answer (the playground's dictionary page).

Three sources, each optional: ``metrics.json`` (``sae-train``'s held-out evaluation, read by
the registry), the feature index (densities of every feature) and ``training_log.jsonl``
(``sae-train``'s curves, :data:`sae_runtime.registry.TRAINING_LOG_FILE`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sae_runtime.registry import TRAINING_LOG_FILE, RegisteredDictionary
from sae_wire.models import DictionarySummary, TrainingLogPoint

logger = logging.getLogger(__name__)

DENSITY_BIN_WIDTH = 0.25
"""Width of the log10-density histogram's bins (in decades)."""
MAX_LOG_POINTS = 2000
"""Most training-log points one summary carries (a longer log is thinned evenly, last point kept)."""


def density_histogram(densities: np.ndarray) -> tuple[list[float], list[int], int]:
    """``(edges, counts, never_fired)``: features per bin of log10 density, bins
    :data:`DENSITY_BIN_WIDTH` wide from the rarest firing feature's decade to 10^0."""
    fired = densities[densities > 0].astype(np.float64)
    never = int(densities.size - fired.size)
    if fired.size == 0:
        return [], [], never
    logs = np.log10(np.minimum(fired, 1.0))
    lo = min(-1, math.floor(float(logs.min())))
    n_bins = round(-lo / DENSITY_BIN_WIDTH)
    edges = np.linspace(lo, 0.0, n_bins + 1)
    counts, _ = np.histogram(logs, bins=edges)
    return [float(e) for e in edges], [int(c) for c in counts], never


def read_training_log(path: Path | None) -> list[TrainingLogPoint]:
    """The points of ``training_log.jsonl`` in ``path`` (none when absent); unreadable lines
    are skipped with a warning, a long log is thinned to :data:`MAX_LOG_POINTS`."""
    if path is None or not (path / TRAINING_LOG_FILE).is_file():
        return []
    points: list[TrainingLogPoint] = []
    bad = 0
    with open(path / TRAINING_LOG_FILE, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                points.append(TrainingLogPoint.model_validate(json.loads(line)))
            except ValueError:
                bad += 1
    if bad:
        logger.warning("%s: skipped %d unreadable lines", path / TRAINING_LOG_FILE, bad)
    if len(points) > MAX_LOG_POINTS:
        keep = np.unique(np.linspace(0, len(points) - 1, MAX_LOG_POINTS).round().astype(int))
        points = [points[i] for i in keep]
    return points


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summary(entry: RegisteredDictionary, model: str) -> DictionarySummary:
    evaluation = (entry.metrics or {}).get("eval")
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    out = DictionarySummary(
        id=entry.id, model=model, hook_point=entry.hook_point, architecture=entry.architecture,
        d_in=entry.d_in, d_sae=entry.d_sae, k=entry.k, has_index=entry.index is not None,
        fvu=_num(evaluation.get("fvu")), l0=_num(evaluation.get("l0")),
        dead_frac=_num(evaluation.get("dead_frac")), ce_loss_recovered=_num(evaluation.get("ce_loss_recovered")),
        training_log=read_training_log(entry.path),
    )
    eval_tokens = _num(evaluation.get("eval_tokens"))
    out.eval_tokens = None if eval_tokens is None else int(eval_tokens)
    if entry.index is not None:
        out.density_log10_edges, out.density_counts, out.never_fired = density_histogram(entry.index.densities)
        scored = entry.index.meta.get("tokens_scored")
        out.index_tokens = int(scored) if scored and scored.isdigit() else None
    return out
