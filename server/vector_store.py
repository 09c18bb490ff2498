"""Where a deployment keeps its contrastive steering vectors (``/v1/steering/vectors``).

Every replica must see the same vectors (one replica creates a vector, any replica may
serve a request that steers with it, and a deletion must hold everywhere), on one
machine and on a multi-node Ray cluster alike. The store is therefore Ray's own
cluster-wide key-value store in the GCS (:class:`RayKVVectorStore`), the store Ray keeps
its own cluster metadata in: every node reaches it, it needs no extra process (a named
actor would be one more process to place, restart and own) and no shared disk (a
directory would need one mounted on every node). Vectors live as long as the Ray
cluster's GCS does: a cluster that restarts without GCS persistence (external Redis) starts
with none. Each replica reads a vector from the store whenever a request names it, so a
deleted vector is gone for every replica at once. Outside Ray (the service without
Ray Serve, unit use) :class:`MemoryVectorStore` keeps them in the process.

A record is plain data, never pickle: one line of JSON (the metadata,
:class:`~sae_wire.models.SteeringVectorInfo`), a newline, and the vector as little-endian
float32 bytes. A record that does not decode to exactly that is refused.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from sae_wire.models import SteeringVectorInfo

KV_NAMESPACE = "sae_serve_steering_vectors"
"""Namespace of the records in Ray's internal key-value store."""


@dataclass
class StoredVector:
    info: SteeringVectorInfo
    vector: np.ndarray  # float32 [d_in]


class VectorRecordError(ValueError):
    """Stored bytes that are not a steering vector record."""


def encode_record(info: SteeringVectorInfo, vector: np.ndarray) -> bytes:
    vec = np.ascontiguousarray(vector, dtype="<f4")
    if vec.ndim != 1 or vec.shape[0] != info.d_in:
        raise ValueError(f"vector of shape {vec.shape}, expected [{info.d_in}]")
    header = info.model_dump(exclude={"vector"})
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + vec.tobytes()


def decode_record(data: bytes) -> StoredVector:
    head, sep, body = data.partition(b"\n")
    if not sep:
        raise VectorRecordError("no header line")
    try:
        info = SteeringVectorInfo.model_validate_json(head)
    except ValueError as exc:
        raise VectorRecordError(f"bad header: {exc}") from None
    if info.vector is not None or len(body) != 4 * info.d_in:
        raise VectorRecordError(f"{len(body)} bytes of vector; the header says d_in={info.d_in}")
    return StoredVector(info, np.frombuffer(body, dtype="<f4").astype(np.float32))


class VectorStore(ABC):
    """The vectors of one deployment, by id."""

    @abstractmethod
    async def put(self, info: SteeringVectorInfo, vector: np.ndarray) -> None: ...

    @abstractmethod
    async def get(self, vector_id: str) -> StoredVector | None: ...

    @abstractmethod
    async def list(self) -> list[SteeringVectorInfo]: ...

    @abstractmethod
    async def delete(self, vector_id: str) -> bool: ...

    async def count(self) -> int:
        return len(await self.list())


class MemoryVectorStore(VectorStore):
    """One process's vectors (the records themselves, so the format is the same)."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}

    async def put(self, info: SteeringVectorInfo, vector: np.ndarray) -> None:
        self._records[info.id] = encode_record(info, vector)

    async def get(self, vector_id: str) -> StoredVector | None:
        data = self._records.get(vector_id)
        return None if data is None else decode_record(data)

    async def list(self) -> list[SteeringVectorInfo]:
        return sorted((decode_record(d).info for d in self._records.values()), key=lambda i: i.created_at)

    async def delete(self, vector_id: str) -> bool:
        return self._records.pop(vector_id, None) is not None


class RayKVVectorStore(VectorStore):
    """The vectors of the Serve application ``app`` in Ray's cluster-wide key-value store
    (keys ``{app}/{id}`` in namespace :data:`KV_NAMESPACE`); needs a connected Ray worker
    (a Serve replica is one). The store's calls block briefly (one GCS round trip): they
    run in a thread."""

    def __init__(self, app: str) -> None:
        self.prefix = f"{app}/"

    def _key(self, vector_id: str) -> bytes:
        return (self.prefix + vector_id).encode()

    async def put(self, info: SteeringVectorInfo, vector: np.ndarray) -> None:
        from ray.experimental import internal_kv

        data = encode_record(info, vector)
        await asyncio.to_thread(internal_kv._internal_kv_put, self._key(info.id), data, True, namespace=KV_NAMESPACE)

    async def get(self, vector_id: str) -> StoredVector | None:
        from ray.experimental import internal_kv

        data = await asyncio.to_thread(internal_kv._internal_kv_get, self._key(vector_id), namespace=KV_NAMESPACE)
        return None if data is None else decode_record(data)

    async def list(self) -> list[SteeringVectorInfo]:
        from ray.experimental import internal_kv

        def read() -> list[SteeringVectorInfo]:
            out = []
            for key in internal_kv._internal_kv_list(self.prefix, namespace=KV_NAMESPACE):
                data = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
                if data is not None:  # deleted meanwhile
                    out.append(decode_record(data).info)
            return sorted(out, key=lambda i: i.created_at)

        return await asyncio.to_thread(read)

    async def delete(self, vector_id: str) -> bool:
        from ray.experimental import internal_kv

        n = await asyncio.to_thread(internal_kv._internal_kv_del, self._key(vector_id), namespace=KV_NAMESPACE)
        return bool(n)

    async def count(self) -> int:
        from ray.experimental import internal_kv

        keys = await asyncio.to_thread(internal_kv._internal_kv_list, self.prefix, namespace=KV_NAMESPACE)
        return len(keys)


def deployment_store(app: str | None) -> VectorStore:
    """Ray's store when this process is a connected Ray worker, else one in memory."""
    try:
        import ray

        if ray.is_initialized():
            return RayKVVectorStore(app or "sae-serve")
    except ImportError:
        pass
    return MemoryVectorStore()
