"""Steered chat with the official ``openai`` SDK, side by side with the unsteered answer.

    sae-serve &                                   # HTTP on 127.0.0.1:8000
    python clients/examples/steered_chat.py [DICTIONARY_ID] [FEATURE] [VALUE] [UNIT]

``steering`` and ``compare`` are sae-serve's extra request fields, sent with ``extra_body``;
the unsteered completion comes back under the response's extra field ``unsteered``.
UNIT is ``max`` (multiples of the feature's indexed max activation, the default here),
``raw`` (activation units) or ``residual_norm`` (a fraction of the stream's norm). The
defaults, ``add`` 1 in ``max`` units, are the measured start (README.md, "Which strength to
start with"; raise towards 2 while the text reads well); FEATURE defaults to 501 of the
default dictionary (islands).
"""

import sys

import httpx
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
dictionary = sys.argv[1] if len(sys.argv) > 1 else httpx.get("http://127.0.0.1:8000/v1/dictionaries").json()["data"][0]["id"]
feature = int(sys.argv[2]) if len(sys.argv) > 2 else 501
value = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
unit = sys.argv[4] if len(sys.argv) > 4 else "max"

response = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "Tell me about your favourite city."}],
    max_tokens=40,
    temperature=0,
    extra_body={
        "steering": {"edits": [{"dictionary": dictionary, "feature": feature, "mode": "add", "value": value,
                                "unit": unit}]},
        "compare": True,
    },
)
print(f"steered ({dictionary} #{feature} += {value} {unit}):\n  {response.choices[0].message.content}")
extra = response.model_extra or {}  # sae-serve's extra fields; None when there are none
if "unsteered" not in extra:
    sys.exit("the response has no 'unsteered' field: is the server sae-serve, and was compare sent?")
print(f"unsteered:\n  {extra['unsteered']['choices'][0]['message']['content']}")
