"""Checkpoints for resuming: everything that the rest of a run depends on.

A checkpoint holds the trainer's parameters *and* buffers (dead-latent counters, the
BatchTopK threshold), the optimiser's moments, the step, the input scale, and the config
fingerprint. Batches are a pure function of (seed, step) and the learning rate of the
step, so a run resumed from step ``s`` computes the same updates as one that never
stopped. Files are written to a temporary name and renamed, so a kill during the write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"step_(\d+)\.pt")


def checkpoint_paths(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    paths = checkpoint_paths(directory)
    return paths[-1] if paths else None


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 1) -> Path:
    """Write ``state`` as ``step_{step}.pt`` and delete all but the ``keep`` newest."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step_{step}.pt"
    tmp = directory / f".step_{step}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, target)
    for old in checkpoint_paths(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
