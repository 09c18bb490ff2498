"""``sae-serve``: start the sae-serve server (Ray Serve: OpenAI-compatible HTTP + gRPC).

With no arguments it serves the embedded default model (SmolLM2-135M-Instruct) with the
default dictionary (``sae_runtime/data/default_dictionary``) when that exists, otherwise
with no dictionary (a warning says so; pass ``--dictionary DIR``), on 127.0.0.1: HTTP on
port 8000, gRPC on 50051. Settings come from ``--config FILE.yaml`` (see
:mod:`server.config`) and are overridden by flags. Ctrl-C or SIGTERM shuts down the
replicas (and their vLLM processes) and Ray.

Before Ray starts, the model is resolved and every dictionary is checked against it; a
problem (model not found, a dictionary trained on another model, a hook point beyond the
model's layers, a d_in that is not its hidden size) ends the command with one line
``sae-serve: error: REASON`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from pydantic import ValidationError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--model", help="checkpoint directory, or a hub id ORG/NAME already in the local Hugging Face "
                   "cache (nothing is downloaded); default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dictionary", action="append", dest="dictionaries", metavar="DIR",
                   help="dictionary directory to serve (repeatable); default: the default dictionary if present")
    p.add_argument("--dictionary-id", action="append", dest="dictionary_ids", metavar="ID",
                   help="client-facing id for the matching --dictionary (repeatable, same order)")
    p.add_argument("--no-default-dictionary", action="store_true", help="serve no dictionary unless given")
    p.add_argument("--dtype", help="model dtype (float32 on CPU: bfloat16 gives garbage there)")
    p.add_argument("--eager", dest="enforce_eager", action="store_true", default=None,
                   help="run vLLM in eager mode (starts faster, decodes slower); default: compiled")
    p.add_argument("--max-model-len", type=int, help="context length in tokens")
    p.add_argument("--max-num-seqs", type=int, help="sequences per engine step")
    p.add_argument("--kv-cache-gib", type=float, help="KV-cache memory per replica, GiB (default 1)")
    p.add_argument("--replicas", type=int, help="number of replicas (each its own engine)")
    p.add_argument("--min-replicas", type=int, help="enable autoscaling with this lower bound")
    p.add_argument("--max-replicas", type=int, help="enable autoscaling with this upper bound")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    p.add_argument("--max-request-bytes", type=int,
                   help="largest accepted HTTP body / gRPC message (default 4 MiB; over it: 413 / RESOURCE_EXHAUSTED)")
    p.add_argument("--max-edits", type=int, help="steering edits per request (default 256)")
    p.add_argument("--max-vectors", type=int, help="raw steering vectors per request (default 32)")
    p.add_argument("--max-top-k", type=int, help="largest features.top_k (default 256)")
    p.add_argument("--max-feature-ids", type=int, help="most features.feature_ids per request (default 1024)")
    p.add_argument("--max-response-feature-values", type=int,
                   help="most feature values one response may carry: tokens x (top_k + feature ids) x dictionaries "
                        "x choices, checked before generation (default 2,000,000; over it: 400)")
    p.add_argument("--max-concurrent-streams", type=int,
                   help="streaming requests open at once per replica (default 32; more get 429 / RESOURCE_EXHAUSTED)")
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="accept this API key (repeatable; also SAE_SERVE_API_KEYS=k1,k2 or --api-key-file). "
                   "With keys, every route and RPC but plain /health and gRPC Health/Check needs "
                   "'Authorization: Bearer KEY' (Ray's /-/* routes included; gRPC reflection is off)")
    p.add_argument("--api-key-file", metavar="FILE", help="file with one API key per line (keeps keys out of your "
                   "shell history; sae-serve also hides --api-key values from `ps` and Ray once started)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain): serve HTTPS and gRPC over TLS "
                   "(with --tls-key); keys are bearer tokens, so use TLS beyond this machine")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--ray-num-cpus", type=int, help="CPUs Ray may schedule (default: this machine's)")
    p.add_argument("--ray-address", help="join this running Ray cluster (head HOST:PORT, or 'auto') instead of "
                   "starting one; see the README's multi-node section")
    p.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"],
                   help="Ray Serve proxies (HTTP + gRPC ports) on every node (default) or the head only")
    p.add_argument("--max-replicas-per-node", type=int, help="at most this many replicas on one node (1 = spread)")
    p.add_argument("--cpu-threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for the engine, e.g. 0-1")
    return p


def api_keys_from(args: argparse.Namespace) -> list[str]:
    """Keys from --api-key, --api-key-file and SAE_SERVE_API_KEYS (all of them; none = no auth)."""
    from server.config import API_KEYS_ENV

    keys = list(args.api_keys or [])
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


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
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    """YAML (if any) merged with the flags that were given, validated as :class:`ServeConfig`."""
    from server.config import ServeConfig, load_yaml, merge

    base = load_yaml(args.config) if args.config else {}
    engine = {k: getattr(args, k) for k in ("model", "dictionaries", "dictionary_ids", "dtype", "enforce_eager",
                                             "max_model_len", "max_num_seqs", "kv_cache_gib")
              if getattr(args, k) is not None}
    top = {k: getattr(args, k) for k in ("replicas", "host", "http_port", "grpc_port", "max_request_bytes",
                                          "ray_num_cpus", "cpu_threads_bind", "max_edits", "max_vectors",
                                          "max_top_k", "max_feature_ids", "max_response_feature_values",
                                          "max_concurrent_streams", "ray_address",
                                          "proxy_location", "max_replicas_per_node", "tls_cert", "tls_key")
           if getattr(args, k) is not None}
    keys = api_keys_from(args)
    if keys:
        top["api_keys"] = keys
    if args.no_default_dictionary:
        top["use_default_dictionary"] = False
    if args.min_replicas is not None or args.max_replicas is not None:
        top["autoscaling"] = {k: v for k, v in (("min_replicas", args.min_replicas),
                                                ("max_replicas", args.max_replicas)) if v is not None}
    overrides: dict[str, Any] = dict(top)
    if engine:
        overrides["engine"] = engine
    return ServeConfig.model_validate(merge(base, overrides))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"sae-serve: bad configuration: {exc}", file=sys.stderr)
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
