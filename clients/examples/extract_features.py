"""Per-token features of a text over HTTP (``POST /v1/features/extract``) and over gRPC.

    python clients/examples/extract_features.py "The Eiffel Tower is in Paris" [DICTIONARY_ID]
"""

import sys

import httpx

from clients.cli import print_tokens
from clients.grpc_client import SAEClient
from sae_wire.models import ExtractResponse

text = sys.argv[1] if len(sys.argv) > 1 else "The Eiffel Tower is in Paris"
http = httpx.Client(base_url="http://127.0.0.1:8000", timeout=120)
dictionary = sys.argv[2] if len(sys.argv) > 2 else http.get("/v1/dictionaries").json()["data"][0]["id"]
features = {"dictionaries": [dictionary], "top_k": 4}

print("HTTP:")
print_tokens(ExtractResponse.model_validate(
    http.post("/v1/features/extract", json={"text": text, "features": features}).json()).tokens)
print("gRPC:")
with SAEClient("127.0.0.1:50051") as client:
    print_tokens(client.extract(text, features=features).tokens)
