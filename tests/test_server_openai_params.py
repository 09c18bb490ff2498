"""vLLM's sampling parameters through the running server with the official openai SDK,
together with sae-serve's steering and features.

The requests are vLLM's own OpenAI models (``server/openai_models.py``) and become
``SamplingParams`` through vLLM's ``to_sampling_params``: every parameter here must have its
effect, not merely be accepted.
"""

from __future__ import annotations

import json

import pytest

from tests.server_fixtures import DICTIONARY_ID

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
STEER = {"edits": [{"dictionary": DICTIONARY_ID, "feature": 3, "mode": "add", "value": 40.0, "unit": "raw"}]}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sae_runtime.default_model import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model(progress=False))


@pytest.fixture
def client(live_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _city(text: str) -> str:
    value = json.loads(text)
    assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 20, value
    return value["city"]


def test_json_schema_with_top_k_min_p_logit_bias_steering_and_features(client, tokenizer):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                           response_format=fmt)
    assert _city(plain.choices[0].message.content) == "Paris"  # the schema, without bias or steering

    # Every token that spells "Paris" banned: the same greedy request must name another city.
    ban = {str(t): -100 for word in ("Paris", " Paris", "Par", "P") for t in _ids(tokenizer, word)[:1]}
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, seed=7, response_format=fmt,
        logit_bias=ban,
        extra_body={"top_k": 5, "min_p": 0.05, "steering": STEER, "compare": True,
                    "features": {"dictionaries": [DICTIONARY_ID], "top_k": 2}})
    steered = r.choices[0].message.content
    unsteered = r.model_extra["unsteered"]["choices"][0]["message"]["content"]
    assert "Paris" not in _city(unsteered)  # logit_bias applied (and the output still fits the schema)
    _city(steered)  # steered output fits the schema too
    assert steered != unsteered  # the edit changed the completion under the same greedy settings
    feats = r.choices[0].model_extra["features"]
    assert len(feats) == r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert all(len(f["features"][0]["indices"]) == 2 for f in feats)


def test_ignore_eos_with_top_k_min_p_logit_bias_steering_and_features(client, tokenizer):
    # Greedy, this short answer ends well before 40 tokens; ignore_eos runs to max_tokens exactly.
    messages = [{"role": "user", "content": "Say OK."}]
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    assert short.usage.completion_tokens < 40 and short.choices[0].finish_reason == "stop"
    first = _ids(tokenizer, short.choices[0].message.content)[0]  # the greedy answer's first token
    first_text = tokenizer.decode([first])
    assert short.choices[0].message.content.startswith(first_text)

    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, seed=3, logit_bias={str(first): -100},
        extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.05, "steering": STEER, "compare": True,
                    "features": {"dictionaries": [DICTIONARY_ID], "top_k": 1}})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    unsteered = r.model_extra["unsteered"]
    assert unsteered["usage"]["completion_tokens"] == 40
    assert not unsteered["choices"][0]["message"]["content"].startswith(first_text)  # banned by logit_bias
    assert r.choices[0].message.content != unsteered["choices"][0]["message"]["content"]
    assert len(r.choices[0].model_extra["features"]) == r.usage.prompt_tokens + 40 - 1

    # Streaming: the same parameters, exactly max_tokens tokens.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "top_k": 5, "steering": STEER}))
    assert chunks[-1].usage.completion_tokens == 12


def test_repetition_penalty_changes_a_repetitive_completion(client):
    prompt = "one two one two one two one two one two"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    penalised = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"repetition_penalty": 2.0})
    text, penalised_text = base.choices[0].text, penalised.choices[0].text
    assert text.count("two") >= 4  # greedy repeats itself
    assert penalised_text != text
    assert penalised_text.count("two") < text.count("two")


def test_stop_token_ids_end_the_completion(client, tokenizer):
    prompt = "The capital of France is"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    generated = _ids(tokenizer, base.choices[0].text)
    stop_id = generated[2]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [stop_id], "steering": {"edits": []}})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3  # the stop token is generated, its text is not returned
    assert r.choices[0].text == tokenizer.decode(generated[:2])


def test_prompt_batch_with_echo_and_n(client, tokenizer):
    prompts = ["The capital of France is", "One, two, three,"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
               for p in prompts]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, echo=True)
    echoed = {p: prompt + single for p, (prompt, single) in enumerate(zip(prompts, singles, strict=True))}
    assert {c.index: c.text for c in r.choices} == echoed
    assert r.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    # n choices per prompt, indexed prompt * n + i as in vLLM (vLLM refuses n > 1 when greedy)
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, seed=1, echo=True, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.text.startswith(prompts[c.index // 2]) for c in r.choices)

    # A batch of token-id prompts, streamed with steering and features.
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    texts: dict[int, str] = {}
    feats: dict[int, int] = {}
    for chunk in client.completions.create(
        model=MODEL,
        prompt=ids,
        max_tokens=4,
        temperature=0,
        stream=True,
        extra_body={"steering": STEER, "features": {"dictionaries": [DICTIONARY_ID], "top_k": 1, "scope": "generated"}},
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            feats[c.index] = feats.get(c.index, 0) + len((c.model_extra or {}).get("features") or [])
    assert sorted(texts) == [0, 1] and all(texts.values())
    assert feats == {0: 3, 1: 3}  # every generated token but the last


def test_refused_vllm_fields_are_named(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, echo=True, logprobs=1)
    assert err.value.status_code == 400 and "echo" in str(err.value) and "prompt logprobs" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=2, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert "tools" in str(err.value)
