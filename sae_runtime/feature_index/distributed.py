"""``sae-index --ray-address``: the corpus' shards over engine actors on a Ray cluster.

Each actor (:class:`IndexWorker`, ``--ray-workers`` of them, one per alive node by default,
spread over the nodes) starts its own :class:`~sae_runtime.engine.engine.SAEEngine` serving
the dictionary and runs whole shards through it exactly as a one-engine build does
(:func:`.build._local_harvest`: ``SAEEngine.harvest_features``, the training token mask,
the attention-sink rule with its median over the shard), into a fresh
:class:`~.stats.IndexStats` per shard that it sends back. Ray's ``ActorPool.map`` hands the
shards out to whichever actor is free and returns the partial statistics in shard order;
the driver merges each one into the run's statistics
(:meth:`IndexStats.merge`, exact: statistics depend only on which contexts were seen) and
saves the work dir after it, so an interrupted distributed run resumes like a local one,
and the index it writes equals a one-engine build of the same corpus.

The driver reads the corpus and sends each actor the token ids of its shard's contexts, so
only the driver needs the corpus; every node needs the model, the dictionary (at the same
path) and sae-serve installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, overload

from ..engine.background import EngineThread
from .build import (
    ENGINE_THREAD,
    START_TIMEOUT_S,
    Context,
    Harvest,
    IndexBuildError,
    ServedModel,
    _local_harvest,
    new_stats,
    start_engine,
)
from .config import IndexConfig
from .stats import IndexStats

logger = logging.getLogger("sae_runtime.feature_index")


class _Shard(Sequence[Context]):
    """The contexts of one shard, indexed by their global ids ``start..start+len``."""

    def __init__(self, start: int, contexts: list[Context]):
        self.start, self.contexts = start, contexts

    @overload
    def __getitem__(self, i: int) -> Context: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Context]: ...

    def __getitem__(self, i: int | slice) -> Context | Sequence[Context]:
        if isinstance(i, slice):
            raise TypeError("a shard is indexed by context id")
        return self.contexts[i - self.start]

    def __len__(self) -> int:
        return self.start + len(self.contexts)


class IndexWorker:
    """A Ray actor: one engine serving the dictionary, harvesting whole shards."""

    def __init__(self, cfg_json: str):
        self.cfg = IndexConfig.model_validate_json(cfg_json)
        self.runner = EngineThread(name=ENGINE_THREAD)
        eng = start_engine(self.runner, self.cfg)
        self.model = ServedModel.of_engine(eng, self.cfg)
        self.harvest = _local_harvest(self.cfg, self.runner, eng, self.model)

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def harvest_shard(self, start: int, contexts: list[Context], top_k: int) -> dict[str, Any]:
        """The statistics (state dict) of the contexts ``start..start+len(contexts)``."""
        from tqdm import tqdm

        stats = new_stats(self.cfg, self.model.entry.d_sae)
        with tqdm(disable=True) as bar:
            self.harvest(_Shard(start, contexts), [range(start, start + len(contexts))], 0, stats, top_k, bar,
                         lambda s: None)
        return stats.state_dict()

    def close(self) -> None:
        self.runner.close()


def _connect(address: str) -> bool:
    """Join the cluster (unless this process already has); True when we did."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise IndexBuildError(f"ray_address: cannot join the Ray cluster at {address!r}: {exc}") from None
    return True


@contextmanager
def ray_harvest(cfg: IndexConfig, model: ServedModel) -> Iterator[Harvest]:
    """Engine actors on the cluster at ``cfg.ray_address``, started here and stopped on exit;
    yields the :data:`.build.Harvest` that runs shards on them."""
    import ray
    from ray.util import ActorPool

    assert cfg.ray_address
    ours = _connect(cfg.ray_address)
    actors: list[Any] = []
    try:
        n = cfg.ray_workers or max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
        worker_cfg = cfg.model_copy(update={"ray_address": None, "explainer": None, "explainer_api_key": None,
                                            "progress": False})
        remote = ray.remote(IndexWorker).options(num_cpus=cfg.ray_cpus_per_worker, scheduling_strategy="SPREAD",
                                                 max_restarts=0)
        actors = [remote.remote(worker_cfg.model_dump_json()) for _ in range(n)]
        try:
            nodes = ray.get([a.node.remote() for a in actors], timeout=START_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise IndexBuildError(f"ray_address: the engine actors did not start: {exc}") from None
        logger.warning("sae-index: %d engine actors on %d Ray nodes", n, len(set(nodes)))
        pool = ActorPool(actors)

        def harvest(contexts: Sequence[Context], shards: Sequence[range], start: int, stats: IndexStats,
                    top_k: int, bar: Any, after_shard: Callable[[int], None]) -> None:
            todo = list(range(start, len(shards)))

            def submit(actor: Any, s: int) -> Any:
                ids = shards[s]
                return actor.harvest_shard.remote(ids.start, [contexts[i] for i in ids], top_k)

            for s, state in zip(todo, pool.map(submit, todo), strict=True):
                stats.merge(IndexStats.from_state_dict(state))
                bar.update(sum(len(contexts[i].token_ids) for i in shards[s]))
                after_shard(s)

        yield harvest
    finally:
        for a in actors:
            try:
                ray.get(a.close.remote(), timeout=120)
            except Exception:  # an actor that died or hangs is killed below anyway
                pass
            ray.kill(a)
        if ours:
            ray.shutdown()
