"""``sae-train``: train a sparse dictionary on a model's residual stream.

Every option of ``TrainConfig`` is a flag (``--batch-size 4096``) and a key of the optional
``--config`` file (YAML or JSON, ``batch_size: 4096``); flags win over the file. With no
arguments it trains the default: the embedded model at ``layers.12``, TopK (k=64), 8x width,
on the built-in corpus, into ``sae_out/layers.12``. Running the same command again after an
interruption resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import types
import typing
from typing import Any

from .config import TrainConfig, load_config_file

EPILOG = """examples:
  sae-train                                   # defaults: layers.12, topk k=64, 8x, built-in corpus
  sae-train --hook-point layers.15 --architecture batchtopk --expansion-factor 16 -o out/l15
  sae-train --data my_texts/ corpus.jsonl --text-field body --max-tokens 5000000
  sae-train --config train.yaml --lr 5e-4      # flags override the file
  sae-train --model path/to/checkpoint --hook-point embeddings -o out/emb   # any decoder-only HF model

output: a dictionary directory (cfg.json, sae_weights.safetensors, sparsity.safetensors)
that sae-serve and SAELens load as is, plus metrics.json and training_command.txt.
"""


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "all", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-train", description=(__doc__ or "").split("\n\n")[0].split(": ", 1)[-1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    parser.add_argument("-o", "--out", help="output directory (default: sae_out/<hook point>)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")
    group = parser.add_argument_group("training options (defaults in brackets)")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description + ' ' if field.description else ''}[{default}]"
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        optional = origin in (typing.Union, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else ann
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(base), help=help_text)
        elif typing.get_origin(base) is list:
            group.add_argument(flag, nargs="+", metavar="PATH", help=help_text)
        else:
            kind = base if base in (int, float, str) else str
            group.add_argument(flag, type=_none_or(kind) if optional else kind,
                               metavar=kind.__name__.upper(), help=help_text)
    return parser


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, str, argparse.Namespace]:
    """Parse flags (+ config file) into a validated config and the output directory."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    out = values.pop("out", None)
    for name in TrainConfig.model_fields:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    cfg = TrainConfig.model_validate(values)
    out = getattr(args, "out", None) or out or f"sae_out/{cfg.hook_point}"
    return cfg, out, args


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    try:
        cfg, out, args = resolve(argv)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"sae-train: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        print(json.dumps({"out": out, **cfg.model_dump()}, indent=2))
        return 0
    from .train import check_model, run

    try:
        check_model(cfg)
    except (ValueError, OSError) as exc:
        print(f"sae-train: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    metrics = run(cfg, out, command=shlex.join(["sae-train", *argv]))
    e = metrics["eval"]
    print(f"sae-train: wrote {out}: fvu {e['fvu']:.4f}, l0 {e['l0']:.1f}, "
          f"dead {e['dead_frac']:.1%} (of {e['eval_tokens']} held-out tokens), "
          f"CE recovered {e.get('ce_loss_recovered', float('nan')):.4f}, KL {e.get('kl_div', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
