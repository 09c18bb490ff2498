"""Start and stop Ray + Ray Serve with the sae-serve application (used by the CLI and tests).

Ray is started locally on 127.0.0.1 with a CPU count sized for the replicas (this
project's machines have 2 cores), no dashboard, and usage stats off; with
``ray_address`` set, sae-serve joins that running cluster instead (multi-node) and
its replicas go wherever the cluster has room. HTTP binds to
``config.host``; Ray 2.60's gRPC proxy always listens on all interfaces (``[::]``;
``gRPCOptions`` has no host), which the README states.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from server.config import APP_NAME, ServeConfig

if TYPE_CHECKING:
    from sae_runtime.model_info import ModelInfo

logger = logging.getLogger("sae_serve.launcher")


class StartupError(Exception):
    """The configuration cannot be served; the message (one line) says why.

    ``exit_code`` is 2 for a problem in what the user asked for (a model that is not
    there, a dictionary that does not fit it), 1 for anything else.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))
        self.exit_code = exit_code


def check_model_and_dictionaries(config: ServeConfig) -> ModelInfo | None:
    """Resolve the model and check every configured dictionary against it, before Ray starts.

    The replicas run the same checks when their engines start, but there a failure only
    shows as Ray's "Failed to update the deployments" with the reason far up in its log.
    Here it is a :class:`StartupError` whose message names the reason. Loads each
    dictionary's weights once in this process. The default model is prepared here (once,
    rather than racing in every replica). With ``ray_address`` set, a model that is not on
    this machine is left to the replicas to find on their nodes (``None`` is returned).
    """
    from sae_runtime.dictionary import DictionaryFormatError
    from sae_runtime.model_info import ModelNotFoundError, read_model_info
    from sae_runtime.registry import DictionaryRegistry, RegistryError

    engine = config.resolved_engine()
    try:
        if engine.model is None:
            from sae_runtime.default_model import MODEL_NAME, prepare_default_model

            info = read_model_info(prepare_default_model(), name=MODEL_NAME)
        else:
            info = read_model_info(engine.model)
    except ModelNotFoundError as exc:
        if config.ray_address:
            logger.warning("%s; the replicas look for it on their nodes", exc)
            return None
        raise StartupError(str(exc)) from None
    except (ValueError, OSError, AttributeError, KeyError) as exc:  # unreadable config.json
        raise StartupError(f"cannot read model {engine.model}: {exc}") from None
    except Exception as exc:  # default model preparation (ModelPreparationError) and the like
        raise StartupError(f"cannot prepare the model: {exc}", exit_code=1) from None
    try:
        DictionaryRegistry.load(engine.dictionaries, model_name=info.name, num_layers=info.num_layers,
                                hidden_size=info.hidden_size, ids=engine.dictionary_ids)
    except (RegistryError, DictionaryFormatError) as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot read dictionary: {exc}") from None
    except Exception as exc:  # anything else a dictionary source raises: still one readable line
        raise StartupError(f"cannot load the dictionaries: {type(exc).__name__}: {exc}") from None
    return info


def start(config: ServeConfig, after_ray_init: Callable[[], None] | None = None, check: bool = True) -> None:
    """Start Ray (if not yet running in this process), Serve's proxies and the app; block until ready.

    With ``check`` (default) :func:`check_model_and_dictionaries` runs first and raises
    :class:`StartupError` before Ray starts; pass ``False`` when the caller already ran it.
    ``after_ray_init`` runs right after ``ray.init``: Ray's core worker installs its own
    SIGTERM handler in the driver (it aborts the process), so a caller that wants a
    graceful shutdown on SIGTERM must install its handler again at that point.
    """
    if check:
        check_model_and_dictionaries(config)
    # Keys never reach a child's environment: Ray's processes (and through them the
    # replicas and vLLM's) inherit this process's environment from here on.
    scrub_key_environment()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Read by Ray Serve's proxies at import, so set before Ray starts its processes (which
    # inherit this environment; on a multi-node cluster set them where `ray start` runs):
    # /health answered in the proxy while no replica runs (server.proxy_health), and a cap
    # on gRPC messages (Ray's default accepts 2 GiB requests).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "server.proxy_health.proxy_middlewares")
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.grpc_max_message_bytes))
    if config.direct_ingress:
        # Replicas start their own HTTP and gRPC servers (Ray's replica port ranges), with the
        # proxy's middlewares (the callback above) and gRPC patch (keys, TLS). Ray holds a
        # stopping replica for 30 s so that a load balancer in front notices; none is assumed.
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from server.deployment import build_app
    from server.grpc_service import SERVICER_FUNCTIONS

    if not ray.is_initialized():
        with entrypoint_without_keys(config):
            _ray_init(config)
    if after_ray_init is not None:
        after_ray_init()
    # What Ray's proxies need for keys and TLS (digests and file paths only), read by each
    # proxy when it starts (server.proxy_auth).
    from server import proxy_auth

    proxy_auth.publish(config.api_key_digests(), config.tls_cert, config.tls_key)
    tls: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key} if config.tls_enabled else {}
    serve.start(
        proxy_location=config.proxy_location,
        http_options=HTTPOptions(host=config.host, port=config.http_port, **tls),
        # Reflection is answered by Ray's proxy itself, past any key check: off with keys.
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                 enable_reflection=not config.api_keys),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def direct_ingress_addresses(config: ServeConfig, groups: list[Any], tls: bool | None = None) -> list[dict[str, Any]]:
    """Every running replica's own server (``direct_ingress``) from Ray's controller target
    groups (``get_target_groups(APP_NAME)``), HTTP first: ``{"protocol": "http", "address":
    "https://127.0.0.1:30000/v1", "tls": true}``, ``{"protocol": "grpc", "address":
    "10.0.0.5:40000", "tls": true}``. Empty when Ray's Serve runs without direct ingress (on a
    cluster, ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` must be set where ``ray start`` runs) or no
    replica is running (the controller then names the proxies, which are left out). ``tls``:
    whether they serve TLS (default ``config.tls_enabled``; a replica's copy of the config has
    no TLS files, so a replica says it from sae-serve's published proxy settings)."""
    tls = config.tls_enabled if tls is None else tls
    proxy_ports = {"http": config.http_port, "grpc": config.grpc_port}
    targets: list[tuple[str, str, int]] = []
    for group in groups:
        protocol = str(getattr(group.protocol, "value", group.protocol)).lower()
        for t in group.targets:
            if t.port == proxy_ports.get(protocol):
                continue
            # a replica's HTTP server listens on `host` (its node's address only for 0.0.0.0 / ::);
            # its gRPC server on every interface, as Ray's proxy's does
            ip = config.host if protocol == "http" and config.host not in ("0.0.0.0", "::") else t.ip
            targets.append((protocol, ip, int(t.port)))
    scheme = "https" if tls else "http"
    return [{"protocol": protocol,
             "address": f"{scheme}://{ip}:{port}/v1" if protocol == "http" else f"{ip}:{port}",
             "tls": tls}
            for protocol, ip, port in sorted(targets, key=lambda t: (t[0] != "http", t[1], t[2]))]


def _serve_controller() -> Any:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def direct_ingress(config: ServeConfig) -> list[dict[str, Any]]:
    """:func:`direct_ingress_addresses` as Ray's controller lists them now (for the CLI)."""
    import ray

    groups = ray.get(_serve_controller().get_target_groups.remote(APP_NAME), timeout=30)
    return direct_ingress_addresses(config, groups)


async def direct_ingress_async(config: ServeConfig, tls: bool | None = None) -> list[dict[str, Any]]:
    """:func:`direct_ingress` from an event loop (a replica's ``/health?detail=1``)."""
    return direct_ingress_addresses(config, await _serve_controller().get_target_groups.remote(APP_NAME), tls)


def scrub_key_environment() -> None:
    """Remove API keys from this process's environment before any child is started."""
    from server.config import API_KEYS_ENV, CLIENT_API_KEY_ENV

    for name in (API_KEYS_ENV, CLIENT_API_KEY_ENV):
        os.environ.pop(name, None)


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


@contextlib.contextmanager
def entrypoint_without_keys(config: ServeConfig) -> Iterator[None]:
    """While ``ray.init`` runs: the command line Ray records as the job's entrypoint (its
    ``get_entrypoint_name``, this process's command line) with every key replaced by ``***``.
    ``sae-serve`` also rewrites its own process title (``ps``); this covers callers that do not."""
    import ray._private.utils as ray_utils

    secrets = [k.get_secret_value() for k in config.api_keys]
    original = ray_utils.get_entrypoint_name
    if not secrets:
        yield
        return

    def redacted() -> str:
        # A rewritten title reads back as one argument plus empty ones: drop those.
        return redact(re.sub(r'(?: "")+$', "", original()), secrets)

    ray_utils.get_entrypoint_name = redacted
    try:
        yield
    finally:
        ray_utils.get_entrypoint_name = original


def _ray_init(config: ServeConfig) -> None:
    import ray

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
