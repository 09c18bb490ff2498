"""``sae-client``: talk to a sae-serve server over gRPC from the shell.

    sae-client dictionaries
    sae-client extract "The Eiffel Tower is in Paris" -d layers.12/topk-4608 -k 3
    sae-client generate "Tell me a story" --max-tokens 40 -d layers.12/topk-4608
    sae-client steer "Tell me a story" -e layers.12/topk-4608:123:clamp:4 --unit max --compare
    sae-client feature layers.12/topk-4608 123

Tokens are printed one per line with their strongest features as ``#id=value``.
A server started with API keys needs ``--api-key KEY`` (or ``SAE_SERVE_API_KEY=KEY``);
one serving TLS needs ``--tls`` (``--tls-ca ca.pem`` for a self-signed certificate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import grpc

from clients.grpc_client import DEFAULT_TARGET, SAEClient
from sae_wire.models import TokenFeaturesOut

API_KEY_ENV = "SAE_SERVE_API_KEY"


def format_token(t: TokenFeaturesOut, width: int = 14) -> str:
    """``  12 ' Paris'       [layers.6/topk-512] #301=4.12 #77=2.50``"""
    shown = repr(t.token)
    if len(shown) > width:
        shown = shown[: width - 1] + "…"
    parts = []
    for d in t.features:
        if d.indices is not None:
            feats = " ".join(f"#{i}={v:.2f}" for i, v in zip(d.indices, d.values, strict=True))
        else:
            feats = " ".join(f"{v:.2f}" for v in d.values)
        if d.feature_values is not None:  # top-k and feature ids asked together
            feats += " | " + " ".join(f"{v:.2f}" for v in d.feature_values)
        parts.append(f"[{d.dictionary}] {feats}")
    mark = " " if t.is_prompt else "*"
    return f"{t.position:4d}{mark}{shown:<{width}} " + "  ".join(parts)


def print_tokens(tokens: Iterable[TokenFeaturesOut], out: Any = None) -> None:
    out = out if out is not None else sys.stdout  # read at call time: sys.stdout may be replaced
    for t in tokens:
        print(format_token(t), file=out)


def parse_edit(text: str) -> dict[str, Any]:
    """``DICT:FEATURE:MODE[:VALUE]`` (the dictionary id may itself contain ':'-free slashes)."""
    parts = text.rsplit(":", 3)
    if len(parts) < 3:
        raise argparse.ArgumentTypeError(f"edit {text!r}: expected DICTIONARY:FEATURE:MODE[:VALUE]")
    if len(parts) == 3:
        dictionary, feature, mode = parts
        value = None
    else:
        dictionary, feature, mode, value = parts
    try:
        edit: dict[str, Any] = {"dictionary": dictionary, "feature": int(feature), "mode": mode}
        if value is not None:
            edit["value"] = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"edit {text!r}: feature must be an integer, value a number") from None
    return edit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sae-client",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"server gRPC address (default {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    p.add_argument("--json", action="store_true", help="print JSON instead of the readable form")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"API key of a server started with keys (default: ${API_KEY_ENV}; prefer the variable, "
        "a flag shows in `ps`)",
    )
    p.add_argument("--tls", action="store_true", help="connect over TLS (a server started with --tls-cert)")
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM certificate(s) to trust for TLS (implies --tls), e.g. the "
        "server's self-signed certificate; default: the system's roots",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def prompt_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("prompt", help="the prompt text")
        sp.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")

    def feature_args(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument(
            "-d",
            "--dictionary",
            action="append",
            dest="dictionaries",
            required=required,
            help="dictionary id to read features from (repeatable)",
        )
        sp.add_argument("-k", "--top-k", type=int, default=5, help="features per token (default 5)")

    def sampling_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-tokens", type=int, default=32)
        sp.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
        sp.add_argument("--seed", type=int)

    sub.add_parser("dictionaries", help="list the served dictionaries")
    ex = sub.add_parser("extract", help="features of every token of a prompt")
    prompt_args(ex)
    feature_args(ex, required=True)
    ex.add_argument(
        "--feature-id",
        type=int,
        action="append",
        dest="feature_ids",
        help="return these features' values instead of the top-k (repeatable)",
    )
    gen = sub.add_parser("generate", help="stream a completion, optionally with features")
    prompt_args(gen)
    sampling_args(gen)
    feature_args(gen, required=False)
    st = sub.add_parser("steer", help="stream a steered completion")
    prompt_args(st)
    sampling_args(st)
    feature_args(st, required=False)
    st.add_argument(
        "-e",
        "--edit",
        type=parse_edit,
        action="append",
        required=True,
        help="DICTIONARY:FEATURE:MODE[:VALUE], MODE in add|clamp|scale|ablate|project_cap|orthogonal (repeatable)",
    )
    st.add_argument(
        "--unit",
        choices=("raw", "max", "residual_norm"),
        default=None,
        help="unit of every edit's value (default: the server's, 'max' where the dictionary has a feature index)",
    )
    st.add_argument("--compare", action="store_true", help="also print the unsteered completion")
    fe = sub.add_parser("feature", help="what one feature promotes and suppresses")
    fe.add_argument("dictionary")
    fe.add_argument("feature", type=int)
    fe.add_argument("--top-n", type=int, default=10)
    return p


def _prompt_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.chat:
        return {"messages": [{"role": "user", "content": args.prompt}]}
    return {"text": args.prompt}


def _stream(client: SAEClient, args: argparse.Namespace, steering: dict | None, label: str | None = None) -> None:
    features = (
        {"dictionaries": args.dictionaries, "top_k": args.top_k, "scope": "generated"} if args.dictionaries else None
    )
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    if label:
        print(f"--- {label}")
    feats: list[TokenFeaturesOut] = []
    for chunk in client.generate(**_prompt_kwargs(args), sampling=sampling, features=features, steering=steering):
        if args.json:
            print(chunk.model_dump_json())
            continue
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        feats += chunk.features
        if chunk.usage is not None:
            print(
                f"\n[{chunk.finish_reason}; {chunk.usage.prompt_tokens} prompt + "
                f"{chunk.usage.completion_tokens} generated tokens]"
            )
    if feats and not args.json:
        print("features of the generated tokens (read by the model):")
        print_tokens(feats)


def run(args: argparse.Namespace) -> int:
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    with SAEClient(args.target, timeout_s=args.timeout, api_key=api_key, tls=args.tls, tls_ca=args.tls_ca) as client:
        if args.command == "dictionaries":
            dicts = client.list_dictionaries()
            if args.json:
                print(json.dumps([d.model_dump() for d in dicts], indent=2))
            for d in [] if args.json else dicts:
                k = f" k={d.k}" if d.k else ""
                print(f"{d.id}  {d.hook_point}  {d.architecture} d_sae={d.d_sae}{k}  (model {d.model})")
            if not dicts and not args.json:
                print("(no dictionaries served)")
        elif args.command == "extract":
            features: dict[str, Any] = {"dictionaries": args.dictionaries}
            if args.feature_ids:
                features["feature_ids"] = args.feature_ids
            else:
                features["top_k"] = args.top_k
            resp = client.extract(**_prompt_kwargs(args), features=features)
            if args.json:
                print(resp.model_dump_json(indent=2))
            else:
                print_tokens(resp.tokens)
        elif args.command == "generate":
            _stream(client, args, None)
        elif args.command == "steer":
            edits = [{**e, "unit": args.unit} if args.unit else e for e in args.edit]
            steering = {"edits": edits}
            _stream(client, args, steering, "steered" if args.compare else None)
            if args.compare:
                _stream(client, args, None, "unsteered")
        elif args.command == "feature":
            info = client.get_feature(args.dictionary, args.feature, args.top_n)
            if args.json:
                print(info.model_dump_json(indent=2))
            else:
                density = "" if info.density is None else f", density {info.density:.2e}"
                print(
                    f"{info.dictionary} #{info.feature} at {info.hook_point}: decoder norm "
                    f"{info.decoder_norm:.3f}{density}"
                )
                print("promotes:   " + "  ".join(f"{t.token!r} {t.score:+.2f}" for t in info.top_promoted))
                print("suppresses: " + "  ".join(f"{t.token!r} {t.score:+.2f}" for t in info.top_suppressed))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except grpc.RpcError as exc:
        print(f"sae-client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # --tls-ca not readable
        print(f"sae-client: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic validation of the request, before sending
        print(f"sae-client: invalid request: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
