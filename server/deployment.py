"""The Ray Serve deployment: one :class:`SAEEngine` per replica, HTTP and gRPC on it.

HTTP goes through Ray Serve's HTTP proxy to the FastAPI app this class builds at replica
start (``__serve_build_asgi_app__``, so routes close over the replica's own service);
gRPC goes through Ray Serve's gRPC proxy to the methods inherited from
:class:`SAEGrpcMethods`. Replicas are independent engines; Ray Serve load-balances them
and, with ``autoscaling`` set, scales them between bounds.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

from ray import serve
from ray.serve.deployment import Application, Deployment

from sae_runtime.engine.engine import SAEEngine
from server import faults
from server.auth import ApiKeys
from server.config import ServeConfig
from server.grpc_service import SAEGrpcMethods
from server.http_api import build_http_app
from server.metrics import ServiceMetrics
from server.service import SAEService
from server.vector_store import deployment_store

logger = logging.getLogger("sae_serve.deployment")
DEPLOYMENT_NAME = "SAEDeployment"


@serve.ingress()
class SAEDeployment(SAEGrpcMethods):
    """One replica: starts the engine (tens of seconds on CPU) before taking requests."""

    # Ray Serve awaits an async constructor; Python's typing knows no such thing.
    async def __init__(self, config_json: str, api_key_digests: list[str] | None = None):  # type: ignore[misc]
        self.config = ServeConfig.model_validate_json(config_json)
        self._tls: bool | None = None  # whether this deployment serves TLS (known on first need)
        self.max_request_bytes = self.config.max_request_bytes
        self.api_keys = ApiKeys(api_key_digests or [])
        engine_config = self.config.resolved_engine()
        if not engine_config.dictionaries:
            logger.warning("sae-serve: serving without dictionaries; feature and steering requests will be refused")
        self.engine: SAEEngine | None = None
        self.engine = await SAEEngine.start(engine_config)
        try:
            context = serve.get_replica_context()
            replica, app = context.replica_id.unique_id, context.app_name
        except Exception:  # outside Serve (unit use)
            replica, app = None, None
        self.service = SAEService(self.engine, ServiceMetrics(replica), self.config.feature_top_n,
                                  max_concurrent_streams=self.config.max_concurrent_streams,
                                  vectors=deployment_store(app),
                                  direct_ingress=self._direct_ingress if self.config.direct_ingress else None)

    async def _direct_ingress(self) -> list[dict[str, Any]]:
        """The replicas' own addresses (``--direct-ingress``), for ``/health?detail=1``."""
        from server import launcher, proxy_auth

        if self._tls is None:  # this copy of the config has no TLS files: the proxies' settings say
            self._tls = bool(proxy_auth.load_settings().get("tls"))
        return await launcher.direct_ingress_async(self.config, self._tls)

    def __serve_build_asgi_app__(self) -> Any:
        return build_http_app(self.service, self.config.max_request_bytes, self.api_keys,
                              fault_injection=faults.enabled())

    async def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises 3 times in a row (the vLLM engine
        died, or the feature side channel gave up restarting itself).

        Meanwhile the replica answers: requests get 503 / UNAVAILABLE and ``/health`` 503.
        """
        if not self.service.engine_alive():
            failure = self.service.channel_failure()
            raise RuntimeError(f"the feature side channel of this replica failed: {failure}" if failure
                               else "the vLLM engine of this replica is not running")

    def __del__(self) -> None:
        # Called by Ray Serve on graceful replica shutdown: stop vLLM's engine process
        # so that no process outlives the server.
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            try:
                engine.shutdown()
            except Exception:  # shutting down anyway; nothing useful to do
                logger.exception("engine shutdown failed")


def replica_env(config: ServeConfig) -> dict[str, str]:
    """Environment of each replica (and of the vLLM processes it spawns)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(config.engine.kv_cache_gib))),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if faults.enabled():  # chaos tests only (server/faults.py); explicit, so that it reaches other nodes
        env[faults.FAULT_INJECTION_ENV] = "1"
    return env


def build_app(config: ServeConfig) -> Application:
    """The Serve application for ``config`` (bind it with ``serve.run``)."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.replica_num_cpus,
                              "runtime_env": {"env_vars": replica_env(config)}},
        # vLLM start-up on CPU takes tens of seconds; give health checks room.
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }
    if config.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = config.max_replicas_per_node
    if config.autoscaling is not None:
        a = config.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.replicas
    # Ray annotates serve.deployment as returning a decorator even when it is given the
    # class, in which case it returns the Deployment.
    deployment = cast(Deployment, serve.deployment(SAEDeployment))
    # The replicas get the config without the API keys, and the keys' digests only.
    return deployment.options(**options).bind(config.replica_config_json(), config.api_key_digests())
