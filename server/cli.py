"""``sae-serve``: start the sae-serve server (Ray Serve: OpenAI-compatible HTTP + gRPC).

With no arguments it serves the embedded default model (SmolLM2-135M-Instruct) with the
default dictionary (``sae_runtime/data/default_dictionary``) when that exists, otherwise
with no dictionary (a warning says so; pass ``--dictionary DIR``), on 127.0.0.1: HTTP on
port 8000, gRPC on 50051. Every field of :class:`server.config.ServeConfig` is a flag
(``--max-model-len``) and a variable (``SAE_SERVE_MAX_MODEL_LEN``), generated from the
model; precedence: flags > variables > ``--config FILE.yaml`` > defaults. Ctrl-C or
SIGTERM shuts down the replicas (and their vLLM processes) and Ray.

Before Ray starts, the model is resolved and every dictionary is checked against it; a
problem (model not found, a dictionary trained on another model, a hook point beyond the
model's layers, a d_in that is not its hidden size) ends the command with one line
``sae-serve: error: REASON`` and exit status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sae_runtime.config_cli import ConfigError, FieldSpec, Option, add_options, field_specs, resolve

if TYPE_CHECKING:
    from server.config import ServeConfig

# How sae-serve's flags deviate from the generated ``--field-name`` (see
# :mod:`sae_runtime.config_cli`); every other field of ServeConfig (engine and autoscaling
# flattened) is ``--field-name`` / ``SAE_SERVE_FIELD_NAME`` as it is.
OPTIONS = {
    "dictionaries": Option(flag="--dictionary", metavar="DIR", repeat=True,
                           default_text="the default dictionary if present"),
    "dictionary_ids": Option(flag="--dictionary-id", metavar="ID", repeat=True),
    "model": Option(metavar="DIR|ORG/NAME"),
    "enforce_eager": Option(flag="--eager", default_text="compiled"),
    "use_default_dictionary": Option(flag="--default-dictionary"),
    "api_keys": Option(flag="--api-key", metavar="KEY", repeat=True, accumulate=True, default_text="none"),
    "tls_cert": Option(metavar="FILE"),
    "tls_key": Option(metavar="FILE"),
    "limits": Option(metavar="NAME=N"),
}

GROUPS = {
    ("engine",): ("engine (YAML: under engine:)", None),
    ("autoscaling",): ("autoscaling (YAML: under autoscaling:)",
                       ("Off unless one of these is given; then Ray Serve scales between the bounds instead of "
                        "running --replicas.")),
}


def serve_specs() -> list[FieldSpec]:
    from server.config import ENV_PREFIX, ServeConfig

    return field_specs(ServeConfig, ENV_PREFIX, OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-serve", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config file (keys as in server/config.py; "
                   "environment variables and flags override it)")
    p.add_argument("--api-key-file", metavar="FILE", help="file with one API key per line (keeps keys out of your "
                   "shell history; sae-serve also hides --api-key values from `ps` and Ray once started)")
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {
        path: p.add_argument_group(title, text) for path, (title, text) in GROUPS.items()
    }
    add_options(p, serve_specs(), groups)
    return p


EPILOG = """precedence: flags > environment variables (SAE_SERVE_<FIELD>) > --config file > defaults.
API keys are the exception: those of --api-key, --api-key-file and SAE_SERVE_API_KEYS (k1,k2)
are all accepted (and replace the file's api_keys).
Environment values: none/null clears an optional setting; lists are comma-separated (a,b);
booleans 1/0, true/false, yes/no, on/off."""


def api_keys_from_file(path: str | None) -> list[str]:
    """The keys of an ``--api-key-file`` (one a line; blank lines and ``#`` comments skipped)."""
    if not path:
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """Defaults < YAML (``--config``) < ``SAE_SERVE_*`` variables < flags, validated as
    :class:`ServeConfig`. Raises :class:`ConfigError` (a ValueError) naming the flag,
    variable or YAML key at fault, or OSError for an unreadable file."""
    from server.config import ServeConfig, load_yaml

    base = load_yaml(args.config) if args.config else {}
    return resolve(ServeConfig, serve_specs(), args, file_values=base, file_name=args.config, environ=environ,
                   extra={"api_keys": api_keys_from_file(args.api_key_file)})


def hide_keys(config: Any, rewrite_title: bool = True) -> None:
    """Keep the keys out of what other processes can read once they are parsed.

    Removes ``SAE_SERVE_API_KEYS`` (and the client's ``SAE_SERVE_API_KEY``) from this
    process's environment, so that no child (Ray, its workers, vLLM) inherits them, and
    rewrites this process's title (``/proc/PID/cmdline``, what ``ps`` and Ray's job table
    show) with every key replaced by ``***``, which also clears the original environment
    block (``/proc/PID/environ``). The launcher redacts Ray's job entrypoint as well, in
    case the title cannot be changed.
    """
    from server.launcher import redact, scrub_key_environment

    secrets = [k.get_secret_value() for k in config.api_keys]
    if rewrite_title and secrets:
        # Before the environment is changed: setproctitle relocates the environment and
        # reuses (and clears) the kernel's original argv+environ block, so the keys also
        # leave /proc/PID/environ of this process. It refuses once unsetenv has run.
        try:
            import setproctitle  # installed with vLLM; optional here

            setproctitle.setproctitle(" ".join(redact(a, secrets) for a in sys.argv))
        except Exception:  # no setproctitle: Ray's job table is still redacted by the launcher
            pass
    scrub_key_environment()


def exposure_warnings(config: Any) -> list[str]:
    """What to tell a user who serves beyond this machine without keys."""
    if config.api_keys:
        return []
    out = []
    if config.exposed:
        out.append(f"sae-serve: WARNING: HTTP is bound to {config.host}, not 127.0.0.1, and no API key is set: "
                   "anyone who can reach this port can use the model. Set --api-key / SAE_SERVE_API_KEYS.")
    out.append(f"sae-serve: note: Ray 2.60's gRPC proxy listens on all interfaces (port {config.grpc_port}) and no "
               "API key is set; firewall that port or set --api-key / SAE_SERVE_API_KEYS.")
    if config.direct_ingress:
        out.append("sae-serve: note: with --direct-ingress each replica's gRPC server listens on all interfaces too "
                   "(ports from 40000) without an API key; firewall them or set --api-key / SAE_SERVE_API_KEYS.")
    return out


def print_direct_ingress(config: ServeConfig, stop: threading.Event, wait_s: float = 60.0) -> None:
    """One line per replica's own address (``--direct-ingress``), once Ray's controller lists
    them (a replica's servers start as it comes up); a warning if none shows within ``wait_s``.
    ``/health?detail=1`` lists the same addresses (``direct_ingress``)."""
    from server import launcher

    deadline = time.monotonic() + wait_s
    while not (addresses := launcher.direct_ingress(config)) and time.monotonic() < deadline:
        if stop.wait(1.0):
            return
    for a in addresses:
        where = f"HTTP on {a['address']}" if a["protocol"] == "http" else \
            f"gRPC{' over TLS' if a['tls'] else ''} on {a['address']}"
        print(f"sae-serve: direct ingress: a replica answers {where}", flush=True)
    if not addresses:
        print("sae-serve: WARNING: --direct-ingress: Ray lists no replica address (on a cluster, start its nodes "
              "with RAY_SERVE_ENABLE_DIRECT_INGRESS=1); the proxy's ports above still answer",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"sae-serve: error: bad configuration: {exc}", file=sys.stderr)
        return 2
    hide_keys(config, rewrite_title=argv is None)  # argv given: called in-process, not our command line

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # second signal: stop waiting for a graceful shutdown
        print(f"sae-serve: {signal.Signals(signum).name} received, shutting down", file=sys.stderr, flush=True)
        stop.set()

    def install_handlers() -> None:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    install_handlers()

    from server import launcher

    try:
        # Before Ray starts: a model that is not there or a dictionary that does not fit it
        # ends here with its reason, not as Ray's "Failed to update the deployments".
        info = launcher.check_model_and_dictionaries(config)
    except launcher.StartupError as exc:
        print(f"sae-serve: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if stop.is_set():  # a signal came during the checks: nothing was started
        print("sae-serve: stopped", file=sys.stderr, flush=True)
        return 0
    for line in exposure_warnings(config):
        print(line, file=sys.stderr, flush=True)
    if config.api_keys:
        print(f"sae-serve: API keys required ({len(config.api_keys)} configured); /health stays open; "
              "gRPC reflection is off", file=sys.stderr, flush=True)
        if not config.tls_enabled and config.exposed:
            print("sae-serve: WARNING: API keys travel in clear text without TLS; set --tls-cert/--tls-key",
                  file=sys.stderr, flush=True)
    engine = config.resolved_engine()
    if not engine.dictionaries:
        print("sae-serve: WARNING: no dictionary to serve (the default dictionary "
              "sae_runtime/data/default_dictionary does not exist yet); features and steering will be "
              "refused. Make one with `sae-train` or pass --dictionary DIR.", file=sys.stderr, flush=True)
    if info is not None and not info.has_chat_template:
        print(f"sae-serve: note: model {info.name} has no chat template: /v1/chat/completions and chat prompts "
              "will be refused (400); use /v1/completions or text prompts", file=sys.stderr, flush=True)
    served = f"{info.name} ({info.architecture}, {info.num_layers} layers)" if info is not None else engine.model
    print(f"sae-serve: starting {config.replicas if config.autoscaling is None else 'autoscaled'} replica(s) of "
          f"{served} with {len(engine.dictionaries)} dictionary(ies); "
          "this takes about a minute on CPU", file=sys.stderr, flush=True)
    try:
        # ray.init replaces SIGTERM's handler; the checks above already ran.
        launcher.start(config, after_ray_init=install_handlers, check=False)
        if not stop.is_set():
            scheme, grpc_tls = ("https", " over TLS") if config.tls_enabled else ("http", "")
            print(f"sae-serve: ready. HTTP (OpenAI-compatible) on {scheme}://{config.host}:{config.http_port}/v1  "
                  f"gRPC{grpc_tls} on {config.host}:{config.grpc_port} (sae_serve.v1.SAEService)", flush=True)
            if config.direct_ingress:
                print_direct_ingress(config, stop)
            while not stop.wait(1.0):
                pass
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"sae-serve: failed to start: {exc}", file=sys.stderr, flush=True)
        launcher.stop()
        return 1
    launcher.stop()
    print("sae-serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
