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
  sae-index --explainer http://127.0.0.1:8000/v1     # then label with an OpenAI-compatible chat endpoint
  sae-index --label-only --explainer https://api.example.com/v1 --explainer-model m \
            --explainer-features 3 17 42              # relabel some features of an existing index
  sae-index --ray-address auto --ray-workers 4       # shards over engine actors on a Ray cluster

labels: every feature gets a deterministic label from its peak and promoted tokens. With
--explainer URL, the endpoint labels each feature from the max-activating examples stored
in the index (peak tokens marked) and the same endpoint scores the label: it is asked
whether held-out examples and random non-firing windows match it (yes/no), label_score =
balanced accuracy (0.5 = chance). Stored as label_source "explainer:<model>"; features
already labelled by that explainer are skipped, so an interrupted run continues; a feature
whose requests fail keeps its label and is reported. The API key: --explainer-api-key,
SAE_INDEX_EXPLAINER_API_KEY or OPENAI_API_KEY.

ray: --ray-address starts --ray-workers engine actors (default one per node, each
reserving --ray-cpus-per-worker CPUs) that run the shards through their own engine; their
partial statistics merge exactly, so the index equals a one-engine build of the same
corpus. Every node needs the model, the dictionary and sae-serve installed.

precedence: flags > environment variables (SAE_INDEX_<OPTION>) > --config file > defaults.
Environment values: none/null clears an optional setting; lists are comma-separated (a,b);
booleans 1/0, true/false, yes/no, on/off.

output: feature_index.sqlite (format: sae_runtime/feature_index/schema.py), which sae-serve
opens when it sits in the dictionary's folder. An interrupted run keeps its partial results
in <out>.work and continues from them when run again with the same settings.
"""

OPTIONS = {"max_tokens": Option(none_words=("none", "null", "all"), metavar="INT|all"),
           "data": Option(metavar="PATH"), "out": Option(aliases=("-o",), metavar="FILE"),
           "dictionary": Option(metavar="DIR"), "explainer": Option(metavar="URL"),
           "explainer_features": Option(metavar="FEATURE"), "ray_address": Option(metavar="ADDR|auto")}


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
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))  # secrets as ******
        return 0
    from .build import build, check_inputs, relabel

    try:
        if cfg.label_only:
            report = relabel(cfg)
            print(f"sae-index: {report.source} labelled {len(report.labelled)} features of {cfg.out_path()} "
                  f"({len(report.skipped)} already were, {len(report.failed)} failed)")
            return 1 if report.failed and not report.labelled else 0
        check_inputs(cfg)
        out = build(cfg)
    except (ValueError, OSError) as exc:  # IndexBuildError, RegistryError, DataError, ExplainerError
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
