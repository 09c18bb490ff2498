"""Stream a chat completion with the ``openai`` SDK and print each token's top SAE features.

    python clients/examples/streaming_features.py [DICTIONARY_ID]

With ``features`` in ``extra_body`` every streamed chunk carries, in its choice's extra
field ``features``, the features of the tokens the model has read so far (the first
chunk: the whole prompt; then one token per chunk, lagging the text by one token).
"""

import sys

import httpx
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
dictionary = sys.argv[1] if len(sys.argv) > 1 else httpx.get("http://127.0.0.1:8000/v1/dictionaries").json()["data"][0]["id"]

stream = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=20,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"features": {"dictionaries": [dictionary], "top_k": 3, "scope": "generated"}},
)
for chunk in stream:
    if chunk.usage:
        print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} generated tokens]")
    for choice in chunk.choices:
        for tok in (choice.model_extra or {}).get("features") or []:
            first = tok["features"][0]
            feats = ", ".join(f"#{i}={v:.1f}" for i, v in zip(first["indices"], first["values"], strict=True))
            print(f"\n    {tok['token']!r:>12}: {feats}", end="")
        print(choice.delta.content or "", end="", flush=True)
