"""``sae-train``: train a sparse dictionary on a model's residual stream.

Every option of ``TrainConfig`` is a flag (``--batch-size 4096``), an environment variable
(``SAE_TRAIN_BATCH_SIZE=4096``) and a key of the optional ``--config`` file (YAML or JSON,
``batch_size: 4096``), generated from the model (:mod:`sae_runtime.config_cli`); flags win
over variables, variables over the file. With no
arguments it trains the default: the embedded model at ``layers.12``, TopK (k=64), 8x width,
on the built-in corpus, into ``sae_out/layers.12``. Running the same command again after an
interruption resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from ..config_cli import FieldSpec, Option, add_options, field_specs
from ..config_cli import resolve as resolve_config
from .config import ENV_PREFIX, TrainConfig, load_config_file

EPILOG = """examples:
  sae-train                                   # defaults: layers.12, topk k=64, 8x, built-in corpus
  sae-train --hook-point layers.15 --architecture batchtopk --expansion-factor 16 -o out/l15
  sae-train --data my_texts/ corpus.jsonl --text-field body --max-tokens 5000000
  sae-train --data general                     # the general English corpus (sae-corpus; built on first use)
  sae-train --config train.yaml --lr 5e-4      # flags override the file
  sae-train --model path/to/checkpoint --hook-point embeddings -o out/emb   # any decoder-only HF model
  SAE_TRAIN_THREADS=2 sae-train                # any option as SAE_TRAIN_<OPTION>

precedence: flags > environment variables (SAE_TRAIN_<OPTION>) > --config file > defaults.
Environment values: none/null clears an optional setting; lists are comma-separated (a,b);
booleans 1/0, true/false, yes/no, on/off.

output: a dictionary directory (cfg.json, sae_weights.safetensors, sparsity.safetensors)
that sae-serve and SAELens load as is, plus metrics.json and training_command.txt.
"""


# sae-train's flags are --field-name as generated, with one exception: an optional count
# also takes 'all' for "no limit" (--max-tokens all).
OPTIONS = {"max_tokens": Option(none_words=("none", "null", "all"), metavar="INT|all"),
           "data": Option(metavar="PATH")}


def train_specs() -> list[FieldSpec]:
    return field_specs(TrainConfig, ENV_PREFIX, OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-train", description=(__doc__ or "").split("\n\n")[0].split(": ", 1)[-1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML or JSON file of options (environment variables and flags override it)")
    parser.add_argument("-o", "--out", help="output directory (default: sae_out/<hook point>)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")
    add_options(parser.add_argument_group("training options"), train_specs())
    return parser


def resolve(argv: list[str] | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[TrainConfig, str, argparse.Namespace]:
    """Flags > ``SAE_TRAIN_*`` variables > config file > defaults, validated as
    :class:`TrainConfig`, and the output directory. Raises ConfigError naming the flag,
    variable or file key at fault."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    out = values.pop("out", None)
    cfg = resolve_config(TrainConfig, train_specs(), args, file_values=values,
                         file_name=getattr(args, "config", None), environ=environ)
    out = getattr(args, "out", None) or out or f"sae_out/{cfg.hook_point}"
    return cfg, out, args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, out, args = resolve(argv)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"sae-train: error: invalid configuration: {exc}", file=sys.stderr)
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
