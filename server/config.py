"""Server configuration: one pydantic model, filled from a YAML file, ``SAE_SERVE_*``
environment variables and CLI flags (in that order, the later winning; ``sae-serve``
generates one flag and one variable per field, see :mod:`sae_runtime.config_cli`).

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
      model: null                # null = the embedded default model; a checkpoint dir or a cached hub id ORG/NAME
      dictionaries: [sae_runtime/data/default_dictionary]
      dtype: float32
      kv_cache_gib: 1
      cpu_threads_bind: all      # VLLM_CPU_OMP_THREADS_BIND of the engine's worker (flag --cpu-threads-bind)
    # limits (per request unless said otherwise); over them: 400/413/429
    max_request_bytes: 4194304   # HTTP body / gRPC message
    max_edits: 256               # steering edits per request
    max_vectors: 32              # raw steering vectors per request
    max_top_k: 256               # features.top_k
    max_feature_ids: 1024        # len(features.feature_ids)
    max_response_feature_values: 2000000  # tokens x (top_k + feature ids) x dictionaries x choices (n, x2 with compare)
    max_concurrent_streams: 32   # streaming requests at once, per replica (429 / RESOURCE_EXHAUSTED)
    api_keys: []                 # or SAE_SERVE_API_KEYS=k1,k2 / --api-key K (repeatable)
    tls_cert: null               # PEM certificate (chain) file: HTTPS and gRPC over TLS (with tls_key)
    tls_key: null                # PEM private key file
    # multi-node: join a running Ray cluster instead of starting one (README: "Multi-node")
    ray_address: null            # e.g. 10.0.0.5:6379 or auto
    proxy_location: EveryNode    # HeadOnly / EveryNode: where Serve runs HTTP+gRPC proxies
    direct_ingress: false        # replicas also answer on their own ports, without Ray's proxy (printed at start)
    max_replicas_per_node: null  # 1 = at most one engine per node
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from sae_runtime.engine.engine import EngineConfig
from sae_runtime.engine.spec import SpecLimits

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DICTIONARY_DIR = REPO_ROOT / "sae_runtime" / "data" / "default_dictionary"
# Dictionaries of the embedded model at other depths (one folder per hook point), served
# beside the others with --depth-dictionaries (README, "Dictionaries at several depths").
DEPTH_DICTIONARIES_DIR = REPO_ROOT / "sae_runtime" / "data" / "depth_dictionaries"


def depth_dictionary_dirs() -> list[Path]:
    """The shipped depth dictionaries' folders, shallowest first."""
    if not DEPTH_DICTIONARIES_DIR.is_dir():
        return []
    found = [p for p in DEPTH_DICTIONARIES_DIR.iterdir() if (p / "cfg.json").is_file()]

    def depth(p: Path) -> tuple[int, str]:
        tail = p.name.rsplit(".", 1)[-1]
        return (int(tail) if tail.isdigit() else 10**6, p.name)

    return sorted(found, key=depth)


@functools.cache
def _dictionary_id(folder: Path) -> str:
    from sae_runtime.dictionary import SparseDictionary
    from sae_runtime.registry import default_dictionary_id

    return default_dictionary_id(SparseDictionary.load(folder))
APP_NAME = "sae-serve"
ENV_PREFIX = "SAE_SERVE_"  # SAE_SERVE_<FIELD> sets a field (see server/cli.py)
API_KEYS_ENV = ENV_PREFIX + "API_KEYS"
CLIENT_API_KEY_ENV = "SAE_SERVE_API_KEY"  # what clients (sae-client) read; never passed to a server child either
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LIMIT_FIELDS = ("max_edits", "max_vectors", "max_top_k", "max_feature_ids",
                "max_response_feature_values")  # -> engine SpecLimits


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling bounds; when set it replaces the fixed ``replicas``."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(default=1, ge=0, description="autoscaling: fewest replicas")
    max_replicas: int = Field(default=2, ge=1, description="autoscaling: most replicas")
    target_ongoing_requests: float = Field(default=8, gt=0,
                                           description="autoscaling: requests per replica it aims at")


class ServeEngineConfig(EngineConfig):
    """Each replica's engine: :class:`EngineConfig` with the CPU binding sae-serve chose."""

    cpu_threads_bind: str | None = Field(
        default="all",
        description="VLLM_CPU_OMP_THREADS_BIND of each replica's engine on CPU: 'all' = one worker thread on "
        "every CPU of the replica's machine (1.2-1.6x the tokens/s of vLLM's own choice under serving on 2 "
        "cores, benchmarks/README.md 'Serving efficiency'); 'auto' = vLLM's choice (one thread per physical "
        "core, some left to the API process and Ray; consider it with several replicas on one machine); CPU ids "
        "such as '0-1'; None = leave the variable as the environment has it (which wins when set)",
    )


class ServeConfig(BaseModel):
    """Everything ``sae-serve`` needs to start; defaults serve the default model locally."""

    # Errors name the field but never echo its value: it may be an API key.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    engine: ServeEngineConfig = Field(default_factory=ServeEngineConfig)
    host: str = Field(default="127.0.0.1", description="HTTP bind address (gRPC: see README)")
    http_port: int = Field(default=8000, ge=1, le=65535, description="HTTP port (OpenAI-compatible API)")
    grpc_port: int = Field(default=50051, ge=1, le=65535, description="gRPC port")
    replicas: int = Field(default=1, ge=1, description="number of replicas, each its own engine")
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Ray Serve autoscaling bounds (replace replicas when set)")
    max_ongoing_requests: int = Field(default=64, ge=1, description="per replica, before queueing")
    max_queued_requests: int = Field(
        default=256, ge=-1, description="beyond this: 503 / RESOURCE_EXHAUSTED; -1 = unbounded"
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="largest accepted HTTP body / gRPC message, bytes; larger HTTP bodies "
        "get 413, larger gRPC messages RESOURCE_EXHAUSTED",
    )
    grpc_max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="hard cap of Ray's gRPC proxy on any message, either way (Ray's default is 2 GiB); "
        "requests between max_request_bytes and this are refused by the replica",
    )
    max_edits: int | None = Field(
        default=None, ge=0, description=f"steering edits per request; unset = {SpecLimits.max_edits}"
    )
    max_vectors: int | None = Field(
        default=None, ge=0, description=f"raw steering vectors per request; unset = {SpecLimits.max_vectors}"
    )
    max_top_k: int | None = Field(
        default=None, ge=1, description=f"largest features.top_k; unset = {SpecLimits.max_top_k}"
    )
    max_feature_ids: int | None = Field(
        default=None, ge=1, description=f"most features.feature_ids per request; unset = {SpecLimits.max_feature_ids}"
    )
    max_response_feature_values: int | None = Field(
        default=None,
        ge=1,
        description="most feature values one response may carry: tokens (prompt and/or max_tokens, by "
        "features.scope) x (top_k + len(feature_ids)) x dictionaries x choices (n, doubled by compare); "
        f"more is refused with 400 before generation; unset = {SpecLimits.max_response_feature_values:,}",
    )
    max_concurrent_streams: int = Field(
        default=32, ge=1, description="streaming requests open at once per replica; more get 429 / RESOURCE_EXHAUSTED"
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="accept this API key (at least 8 printable characters). With keys, every route and RPC but "
        "plain /health and gRPC Health/Check needs 'Authorization: Bearer KEY' (Ray's /-/* routes included; gRPC "
        "reflection is off); none = no authentication. Keys from the flag, --api-key-file and the variable are "
        "all accepted; sae-serve hides them from `ps`, child processes and Ray once started",
    )
    tls_cert: str | None = Field(
        default=None,
        min_length=1,
        description="PEM certificate (chain): serve HTTPS and gRPC over TLS (needs tls_key); "
        "keys are bearer tokens, so use TLS beyond this machine",
    )
    tls_key: str | None = Field(default=None, min_length=1, description="PEM private key of tls_cert")
    health_check_period_s: float = Field(
        default=5.0, gt=0, description="Ray Serve health-check period (3 failures restart a replica)"
    )
    replica_num_cpus: float = Field(default=1.0, ge=0, description="Ray CPUs reserved per replica")
    ray_num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="CPUs Ray may schedule; unset = this machine's (at least enough for the replicas)",
    )
    ray_address: str | None = Field(
        default=None,
        min_length=1,
        description="join this running Ray cluster ('HOST:PORT' of its head, or 'auto') instead of starting a local "
        "Ray; the replicas then run wherever the cluster has room",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode", description="Ray Serve's HTTP/gRPC proxies on every node or on the head node only"
    )
    direct_ingress: bool = Field(
        default=False,
        description="each replica also answers HTTP and gRPC on its own port (Ray Serve's direct ingress: the "
        "first free ports from 30000 / 40000 on its node, printed once ready), with the same keys, TLS and "
        "/health; clients there skip Ray's proxy (faster: benchmarks/README.md, serving efficiency). The "
        "proxy's ports keep working",
    )
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, description="at most this many replicas (engines) on one Ray node; 1 spreads them"
    )
    feature_top_n: int = Field(default=10, ge=1, le=1000, description="default tokens per list in feature info")
    use_default_dictionary: bool = Field(
        default=True,
        description="serve sae_runtime/data/default_dictionary (if present) when no dictionary is "
        "given; --no-default-dictionary: none unless given",
    )

    depth_dictionaries: bool = Field(
        default=False,
        description="also serve the embedded model's dictionaries at other depths shipped in "
        "sae_runtime/data/depth_dictionaries (an early and a late layer), to compare layers",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_usable(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for i, k in enumerate(keys):
            v = k.get_secret_value()
            if len(v) < 8 or any(c.isspace() for c in v) or not v.isprintable():
                raise ValueError(f"API key #{i + 1} must be at least 8 printable characters without spaces")
        return keys

    def api_key_digests(self) -> list[str]:
        """What replicas get instead of the keys (see :mod:`server.auth`)."""
        from server.auth import key_digest

        return [key_digest(k.get_secret_value()) for k in self.api_keys]

    def replica_config_json(self) -> str:
        """This config for the replicas, without the API keys (they get digests only) and the
        TLS files (only the proxies use them)."""
        return self.model_dump_json(exclude={"api_keys", "tls_cert", "tls_key"})

    @property
    def exposed(self) -> bool:
        return self.host not in LOCAL_HOSTS

    @model_validator(mode="after")
    def _depths_available(self) -> ServeConfig:
        if self.depth_dictionaries:
            if not depth_dictionary_dirs():
                raise ValueError(f"depth_dictionaries: no dictionary found in {DEPTH_DICTIONARIES_DIR}")
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> ServeConfig:
        if self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port are both {self.http_port}")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (--tls-cert FILE --tls-key FILE) or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None:
                resolved = Path(path).expanduser().resolve()
                if not resolved.is_file():
                    raise ValueError(f"{name}: {path} is not a readable file")
                setattr(self, name, str(resolved))  # the proxies read it from their own working directory
        if self.tls_cert is not None:
            import ssl

            try:  # a clear error now rather than a proxy that fails to start
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"tls_cert/tls_key: cannot load the certificate and key: {exc}") from None
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def resolved_engine(self) -> EngineConfig:
        """The engine config with the default dictionary filled in (if wanted and present)
        and the request limits set here (they win over ``engine.limits``)."""
        update: dict[str, Any] = {}
        limits = {**self.engine.limits, **{f: getattr(self, f) for f in LIMIT_FIELDS if getattr(self, f) is not None}}
        if limits != self.engine.limits:
            update["limits"] = limits
        if (
            not self.engine.dictionaries
            and self.use_default_dictionary
            and (DEFAULT_DICTIONARY_DIR / "cfg.json").is_file()
        ):
            update["dictionaries"] = [str(DEFAULT_DICTIONARY_DIR)]
        if self.depth_dictionaries:
            served = update.get("dictionaries", self.engine.dictionaries)
            have = {str(Path(d).resolve()) for d in served}
            extra = [p for p in depth_dictionary_dirs() if str(p.resolve()) not in have]
            update["dictionaries"] = [*served, *map(str, extra)]
            if self.engine.dictionary_ids is not None:  # the depth dictionaries keep their own ids
                update["dictionary_ids"] = [*self.engine.dictionary_ids, *(_dictionary_id(p) for p in extra)]
        return self.engine.model_copy(update=update) if update else self.engine

    def total_ray_cpus(self) -> int:
        if self.ray_num_cpus is not None:
            return self.ray_num_cpus
        most = self.autoscaling.max_replicas if self.autoscaling else self.replicas
        import math
        import os

        return max(os.cpu_count() or 1, math.ceil(most * self.replica_num_cpus))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated later, with variables and flags merged in)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of settings")
    return data
