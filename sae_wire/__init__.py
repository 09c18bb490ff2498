"""sae-serve's wire contract: what both ends of a connection agree on, in one place.

- ``protos/sae_serve/v1/sae_serve.proto`` (the source) and its generated stubs here,
  ``sae_serve_pb2`` / ``sae_serve_pb2_grpc`` (regenerate with ``python -m sae_wire.generate``);
- :mod:`sae_wire.models`: the request and response models HTTP serialises and gRPC converts;
- :mod:`sae_wire.convert`: the one two-way converter between those models and the messages,
  used by the server (``server/grpc_service.py``) and the Python client (``clients/``).

Importing it needs pydantic, protobuf and grpcio only, never torch, vLLM, ``server`` or
``sae_runtime`` (``tests/test_wire.py`` checks), so the client installs without them:
``pip install sae-serve``. This package imports nothing itself, so the
generator runs even when the stubs are missing.
"""
