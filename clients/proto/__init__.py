"""Generated gRPC stubs for ``protos/sae_serve/v1/sae_serve.proto`` (see generate.py).

Import ``clients.proto.sae_serve_pb2`` / ``sae_serve_pb2_grpc`` directly; this package
imports nothing itself so that the generator runs even when the stubs are missing.
"""
