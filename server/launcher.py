"""Start and stop Ray + Ray Serve with the sae-serve application (used by the CLI and tests).

Ray is started locally on 127.0.0.1 with a CPU count sized for the replicas (this
project's machines have 2 cores), no dashboard, and usage stats off; with
``ray_address`` set, sae-serve joins that running cluster instead (multi-node) and
its replicas go wherever the cluster has room. HTTP binds to
``config.host``; Ray 2.60's gRPC proxy always listens on all interfaces (``[::]``;
``gRPCOptions`` has no host), which the README states.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from server.config import APP_NAME, ServeConfig

logger = logging.getLogger("sae_serve.launcher")


def start(config: ServeConfig, after_ray_init: Callable[[], None] | None = None) -> None:
    """Start Ray (if not yet running in this process), Serve's proxies and the app; block until ready.

    ``after_ray_init`` runs right after ``ray.init``: Ray's core worker installs its own
    SIGTERM handler in the driver (it aborts the process), so a caller that wants a
    graceful shutdown on SIGTERM must install its handler again at that point.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Read by Ray Serve's proxies at import, so set before Ray starts its processes (which
    # inherit this environment; on a multi-node cluster set them where `ray start` runs):
    # /health answered in the proxy while no replica runs (server.proxy_health), and a cap
    # on gRPC messages (Ray's default accepts 2 GiB requests).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "server.proxy_health.proxy_middlewares")
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.grpc_max_message_bytes))
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from server.deployment import build_app
    from server.grpc_service import SERVICER_FUNCTIONS

    if not ray.is_initialized():
        if config.ray_address:
            # The cluster's nodes were started with `ray start`; their resources are theirs.
            ray.init(address=config.ray_address, namespace="sae-serve", logging_level=logging.WARNING,
                     log_to_driver=True)
        else:
            ray.init(
                # "local": a fresh Ray of our own, even when `ray start` left a cluster
                # address in /tmp/ray for plain ray.init() to join.
                address="local",
                num_cpus=config.total_ray_cpus(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                namespace="sae-serve",
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
    if after_ray_init is not None:
        after_ray_init()
    serve.start(
        proxy_location=config.proxy_location,
        http_options=HTTPOptions(host=config.host, port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                 enable_reflection=True),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def stop() -> None:
    """Shut the app down gracefully (replicas stop their engines), then Ray."""
    import ray
    from ray import serve

    t0 = time.monotonic()
    try:
        serve.shutdown()
    except Exception:  # Ray may already be gone (second Ctrl-C); still stop what is left
        logger.exception("serve.shutdown failed")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    logger.info("stopped in %.1fs", time.monotonic() - t0)
