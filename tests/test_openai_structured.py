"""Structured output, tool calls, penalties and n > 1 through `serve-edge`, with the official client.

The tiny pair (Q = tiny B, P = tiny A: they disagree often, so P decides many tokens) behind two
servers, the default hybrid policy and the exact one; the real default pair in the real-model tier.
Every JSON answer must parse and validate against its schema, whoever wrote which token.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from handoff.edge.cloud_harness import ServerThread

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "bird"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4},
                                      "wild": {"type": "boolean"}}, "required": ["kind", "legs", "wild"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                                                 "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"enum": ["yes", "no"]}]},
                                      "note": {"type": "string", "maxLength": 6}}, "required": ["answer"], "additionalProperties": False},
]  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                       "required": ["zone"], "additionalProperties": False},
    },
}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["hybrid", "exact"])
def served(request, tiny_gguf_a, tiny_gguf_b):
    """(client, model id) of serve-edge on the tiny pair under one policy."""
    edge = {"policy": "exact", "draft_tokens": 3} if request.param == "exact" else {}
    with ServerThread(tiny_gguf_b, tiny_gguf_a, edge=edge) as s:
        with openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            yield c, s.api.model_id, request.param


def test_json_schema_answers_always_parse_and_validate(served) -> None:
    """25 sampled answers per policy (50 in all): 5 schemas x 5 seeds, each valid, P deciding tokens too."""
    client, model, policy = served
    sources = set()
    for i, schema in enumerate(SCHEMAS):
        for seed in range(5):
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Reply in JSON."}], max_tokens=160,
                temperature=1.0, seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
            )  # fmt: skip
            choice = r.choices[0]
            assert choice.finish_reason == "stop", (policy, i, seed, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)
            sources |= set(r.model_extra["handoff"]["sources"])
    assert "edge" in sources and sources & {"cloud", "corrected"}, sources


def test_a_tool_call_round_trip_plain_and_streamed(served) -> None:
    client, model, _ = served
    tools = [WEATHER, TIME]
    r = client.chat.completions.create(model=model, messages=ASK, tools=tools, tool_choice="required",
                                       max_tokens=120, temperature=0)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        fn = {t["function"]["name"]: t["function"] for t in tools}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
        assert call.id.startswith("call_") and call.type == "function"

    # Streamed: the same calls, as deltas (an id and a name, then the arguments).
    stream = client.chat.completions.create(model=model, messages=ASK, tools=tools, tool_choice="required",
                                            max_tokens=120, temperature=0, stream=True)  # fmt: skip
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ]

    # The tool's result goes back in; the final answer is text (plain, then streamed).
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [c.model_dump() for c in choice.message.tool_calls],
        },
        *(
            {"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'}
            for c in choice.message.tool_calls
        ),
    ]
    final = client.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none",
                                           max_tokens=12, temperature=0)  # fmt: skip
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    bare = client.chat.completions.create(model=model, messages=ASK, max_tokens=1, temperature=0)
    assert (
        final.usage.prompt_tokens > bare.usage.prompt_tokens + 10
    )  # the call and its result are in the prompt
    streamed = client.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none",
                                              max_tokens=12, temperature=0, stream=True)  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == final.choices[0].message.content

    # A named function: exactly one call of it; auto: calls or text, whichever the model starts.
    named = client.chat.completions.create(model=model, messages=ASK, tools=tools, max_tokens=120, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})  # fmt: skip
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    auto = client.chat.completions.create(
        model=model, messages=ASK, tools=tools, max_tokens=60, temperature=0
    )
    message = auto.choices[0].message
    assert message.tool_calls or message.content


def test_penalties_logit_bias_and_n(served) -> None:
    client, model, _ = served
    base = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    plain = client.chat.completions.create(**base, max_tokens=30).choices[0].message.content
    favourite = 65  # "b": a single-byte token of the tiny vocabulary
    forced = client.chat.completions.create(**base, max_tokens=8, logit_bias={str(favourite): 100})
    assert forced.choices[0].message.content == "b" * 8
    # A milder bias makes "b" likely; the penalties then price its repeats out.
    biased = {**base, "max_tokens": 30, "logit_bias": {str(favourite): 8}}
    unpenalised = client.chat.completions.create(**biased).choices[0].message.content
    penalised = client.chat.completions.create(**biased, frequency_penalty=2.0, presence_penalty=0.5)
    content = penalised.choices[0].message.content
    assert unpenalised.count("b") > content.count("b") >= 1 and content != plain

    # n = 2: independent seeded generations, one response; streamed, chunks say which choice.
    sampled = {**base, "temperature": 1.0, "seed": 11, "max_tokens": 10}
    two = client.chat.completions.create(**sampled, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == sum(h["by_source_total"] for h in _by_source(two))
    again = client.chat.completions.create(**sampled, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    stream = client.chat.completions.create(
        **sampled, n=2, stream=True, stream_options={"include_usage": True}
    )
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in two.choices]
    assert usage.completion_tokens == two.usage.completion_tokens


def _by_source(response) -> list[dict]:
    """Per choice: its token count from the `handoff` extension (a list when n > 1)."""
    return [{"by_source_total": sum(h["by_source"].values())} for h in response.model_extra["handoff"]]
