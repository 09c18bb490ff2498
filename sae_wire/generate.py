"""Regenerate the Python gRPC stubs in this folder from ``protos/`` (``--check``: verify).

The stubs are committed, so installing the package needs no code generation and the
server and clients import them as ``sae_wire.sae_serve_pb2`` / ``sae_wire.sae_serve_pb2_grpc``.
``grpc_tools`` writes absolute imports and module names that follow the proto package
(``sae_serve.v1.sae_serve_pb2``); there is no ``sae_serve`` Python package here, so both
are rewritten to this package.
The descriptor keeps its proto path (``sae_serve/v1/sae_serve.proto``), which is what
server reflection advertises.

    python -m sae_wire.generate          # rewrite the stubs
    python -m sae_wire.generate --check  # exit 1 if they differ from protos/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROTO_ROOT = REPO / "protos"
PROTO = "sae_serve/v1/sae_serve.proto"
OUTPUTS = ("sae_serve_pb2.py", "sae_serve_pb2.pyi", "sae_serve_pb2_grpc.py")


def generate() -> dict[str, str]:
    """Run protoc and return {file name: text} of the stubs (nothing written here)."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")  # well-known types
    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO,
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO_ROOT / PROTO}")
        gen = Path(out) / "sae_serve" / "v1"
        files = {name: (gen / name).read_text() for name in OUTPUTS}
    files["sae_serve_pb2_grpc.py"] = files["sae_serve_pb2_grpc.py"].replace(
        "from sae_serve.v1 import sae_serve_pb2", "from sae_wire import sae_serve_pb2")
    # Message classes record the module they live in; Ray pickles requests between the
    # proxy and the replicas, and unpickling imports that module, so it must be the real one.
    files["sae_serve_pb2.py"] = files["sae_serve_pb2.py"].replace(
        "'sae_serve.v1.sae_serve_pb2'", "'sae_wire.sae_serve_pb2'")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the stubs are current")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = HERE / name
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"stale gRPC stubs: {', '.join(stale)}; run python -m sae_wire.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
