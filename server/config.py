"""Server configuration: one pydantic model, filled from a YAML file and then CLI flags.

The engine part is :class:`sae_runtime.engine.engine.EngineConfig` itself (one definition
of model, dictionaries, dtype, eager, KV cache...); this module adds what only the
serving layer knows: addresses, replicas/autoscaling, request-size limit and how much of
the machine Ray may use.

YAML example (every key optional)::

    host: 127.0.0.1
    http_port: 8000
    grpc_port: 50051
    replicas: 1
    engine:
      model: null                # null = the embedded default model
      dictionaries: [sae_runtime/data/default_dictionary]
      dtype: float32
      kv_cache_gib: 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_runtime.engine.engine import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DICTIONARY_DIR = REPO_ROOT / "sae_runtime" / "data" / "default_dictionary"
APP_NAME = "sae-serve"


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling bounds; when set it replaces the fixed ``replicas``."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)


class ServeConfig(BaseModel):
    """Everything ``sae-serve`` needs to start; defaults serve the default model locally."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    host: str = Field(default="127.0.0.1", description="HTTP bind address (gRPC: see README)")
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=64, ge=1, description="per replica, before queueing")
    max_queued_requests: int = Field(default=256, ge=-1, description="beyond this: 503 / RESOURCE_EXHAUSTED; -1 = unbounded")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger HTTP bodies get 413")
    replica_num_cpus: float = Field(default=1.0, ge=0, description="Ray CPUs reserved per replica")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="CPUs given to ray.init; None = enough for the replicas")
    cpu_threads_bind: str | None = Field(
        default=None,
        description="VLLM_CPU_OMP_THREADS_BIND for the engine (e.g. '0-1'); None = vLLM's default, "
        "which leaves one core to the API process and Ray",
    )
    feature_top_n: int = Field(default=10, ge=1, le=1000, description="default tokens per list in feature info")
    use_default_dictionary: bool = Field(
        default=True, description="serve sae_runtime/data/default_dictionary when no dictionaries are given")

    @model_validator(mode="after")
    def _ports_differ(self) -> "ServeConfig":
        if self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port are both {self.http_port}")
        return self

    def resolved_engine(self) -> EngineConfig:
        """The engine config with the default dictionary filled in (if wanted and present)."""
        if self.engine.dictionaries or not self.use_default_dictionary:
            return self.engine
        if (DEFAULT_DICTIONARY_DIR / "cfg.json").is_file():
            return self.engine.model_copy(update={"dictionaries": [str(DEFAULT_DICTIONARY_DIR)]})
        return self.engine

    def total_ray_cpus(self) -> int:
        if self.ray_num_cpus is not None:
            return self.ray_num_cpus
        most = self.autoscaling.max_replicas if self.autoscaling else self.replicas
        import math
        import os

        return max(os.cpu_count() or 1, math.ceil(most * self.replica_num_cpus))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated later, after flags are merged)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of settings")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``overrides`` (flags) into ``base`` (YAML): flags win."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
