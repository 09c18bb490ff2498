"""Configurations measured side by side in one run: one batch of each in turn, round after round.

``engine_overhead.py`` and ``serving_efficiency.py`` report ratios between configurations
measured on a VM whose speed drifts by 5-10% over minutes. Each configuration is warmed up
once, then every round runs one batch of each, the round starting one configuration later
than the one before, so a change in the machine's speed falls on every configuration alike;
the median of the rounds is what the benchmarks report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractContextManager
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


async def interleaved(batches: dict[K, Callable[[], Awaitable[float]]], repeats: int,
                      around: Callable[[K], AbstractContextManager[None]] | None = None) -> dict[K, list[float]]:
    """Tokens/s of every round of every batch (key -> ``async () -> tokens/s``): a warm-up of
    each, then ``repeats`` rounds in turn, printed as they end. ``around(key)``, if given,
    wraps each timed batch (what else a benchmark measures over it, CPU use...)."""
    for batch in batches.values():
        await batch()
    keys = list(batches)
    rates: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            with around(key) if around is not None else contextlib.nullcontext():
                rates[key].append(await batches[key]())
        print(f"# round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    return rates

