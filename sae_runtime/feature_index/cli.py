"""``sae-index``: build the feature index of a dictionary through the serving engine.

Every option of ``IndexConfig`` is a flag (``--top-n 16``), an environment variable
(``SAE_INDEX_TOP_N=16``) and a key of the optional ``--config`` file (YAML or JSON),
generated from the model (:mod:`sae_runtime.config_cli`); flags win over variables,
variables over the file. With no arguments it indexes the default dictionary on the
built-in corpus and writes ``feature_index.sqlite`` into the dictionary's folder. Running
the same command again after an interruption continues from the last completed shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from ..config_cli import FieldSpec, Option, add_options, field_specs
from ..config_cli import resolve as resolve_config
from ..training.config import load_config_file
from .config import ENV_PREFIX, IndexConfig

EPILOG = """examples:
  sae-index                                          # the default dictionary, built-in corpus
  sae-index --dictionary sae_out/layers.12 --max-tokens 1000000
  sae-index --dictionary d/ --data my_texts/ corpus.jsonl --text-field body --out d/index.sqlite
  sae-index --dictionary d/ --overwrite              # rebuild an existing index
  SAE_INDEX_TOP_N=32 sae-index                       # any option as SAE_INDEX_<OPTION>

precedence: flags > environment variables (SAE_INDEX_<OPTION>) > --config file > defaults.
Environment values: none/null clears an optional setting; lists are comma-separated (a,b);
booleans 1/0, true/false, yes/no, on/off.

output: feature_index.sqlite (format: sae_runtime/feature_index/schema.py), which sae-serve
opens when it sits in the dictionary's folder. An interrupted run keeps its partial results
in <out>.work and continues from them when run again with the same settings.
"""

OPTIONS = {"max_tokens": Option(none_words=("none", "null", "all"), metavar="INT|all"),
           "data": Option(metavar="PATH"), "out": Option(aliases=("-o",), metavar="FILE"),
           "dictionary": Option(metavar="DIR")}


def index_specs() -> list[FieldSpec]:
    return field_specs(IndexConfig, ENV_PREFIX, OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-index", description=(__doc__ or "").split("\n\n")[0].split(": ", 1)[-1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML or JSON file of options (environment variables and flags override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")
    add_options(parser.add_argument_group("index options"), index_specs())
    return parser


def resolve(argv: list[str] | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[IndexConfig, argparse.Namespace]:
    """Flags > ``SAE_INDEX_*`` variables > config file > defaults, validated as
    :class:`IndexConfig`. Raises ConfigError naming the flag, variable or file key at fault."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    cfg = resolve_config(IndexConfig, index_specs(), args, file_values=values,
                         file_name=getattr(args, "config", None), environ=environ)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = resolve(argv)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"sae-index: error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.model_dump(), indent=2))
        return 0
    from .build import build, check_inputs

    try:
        check_inputs(cfg)
        out = build(cfg)
    except (ValueError, OSError) as exc:  # IndexBuildError, RegistryError, DataError are ValueErrors
        print(f"sae-index: error: {exc}", file=sys.stderr)
        return 2
    from .store import FeatureIndex

    idx = FeatureIndex(out)
    scored = idx.meta["tokens_scored"]
    print(f"sae-index: wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {idx.d_sae} features over "
          f"{scored} scored tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
