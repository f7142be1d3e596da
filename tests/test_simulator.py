"""The DashScope simulator on the wire: framing, validation, replies and its control API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dashscope_simulator import (
    MISSING_TOOL_NAME,
    Scenario,
    SimulatorServer,
    compose_reply,
    compose_search_results,
    find_location,
    plan_tool_calls,
    tokenize,
)
from tests.dashscope_fixtures import *  # noqa: F403
from tests.dashscope_fixtures import SIMULATOR_API_KEY

TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
COMPAT_PATH = "/compatible-mode/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {SIMULATOR_API_KEY}"}
SSE = {**AUTH, "X-DashScope-SSE": "enable"}


def native_body(text: str = "Hello", model: str = "qwen-plus", **parameters: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": text}]},
        "parameters": {"result_format": "message", **parameters},
    }


def post(server: SimulatorServer, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=10)


def data_payloads(raw: str) -> list[dict[str, Any]]:
    payloads = []
    for line in raw.splitlines():
        if line.startswith("data:"):
            value = line[5:].strip()
            if value != "[DONE]":
                payloads.append(json.loads(value))
    return payloads


# -- native wire format ------------------------------------------------------------------------


def test_native_stream_uses_dashscope_framing(simulator):
    simulator.add_scenario(Scenario(reply="Hi there, friend."))

    response = post(simulator, TEXT_PATH, native_body(incremental_output=True), SSE)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[0].split("\n")[:3] == ["id:1", "event:result", ":HTTP_STATUS/200"]
    assert frames[0].split("\n")[3].startswith('data:{"output"')
    assert "[DONE]" not in response.text
    payloads = data_payloads(response.text)
    contents = [p["output"]["choices"][0]["message"]["content"] for p in payloads]
    assert contents == ["Hi ", "there, ", "friend.", ""]
    reasons = [p["output"]["choices"][0]["finish_reason"] for p in payloads]
    assert reasons == ["null", "null", "null", "stop"]
    assert [p["usage"]["output_tokens"] for p in payloads] == [1, 2, 3, 3]
    request_id = response.headers["x-request-id"]
    assert {p["request_id"] for p in payloads} == {request_id}


def test_native_stream_honours_incremental_output_false(simulator):
    simulator.add_scenario(Scenario(reply="One two three."))

    response = post(simulator, TEXT_PATH, native_body(incremental_output=False), SSE)

    contents = [
        p["output"]["choices"][0]["message"]["content"] for p in data_payloads(response.text)
    ]
    assert contents == ["One ", "One two ", "One two three.", "One two three."]


def test_native_multimodal_content_is_a_list(simulator):
    simulator.add_scenario(Scenario(reply="A dog.", tokens=None))
    body = {
        "model": "qwen3-vl-plus",
        "input": {
            "messages": [
                {"role": "user", "content": [{"image": "https://x/dog.png"}, {"text": "What?"}]}
            ]
        },
        "parameters": {"incremental_output": True},
    }

    response = post(simulator, MULTIMODAL_PATH, body, SSE)

    contents = [
        p["output"]["choices"][0]["message"]["content"] for p in data_payloads(response.text)
    ]
    assert contents == [[{"text": "A "}], [{"text": "dog."}], []]


def test_frames_without_blank_lines(simulator):
    simulator.add_scenario(Scenario(reply="a b", framing="no_blank_lines"))
    response = post(simulator, TEXT_PATH, native_body(incremental_output=True), SSE)
    assert "\n\n" not in response.text
    assert response.text.count("event:result") == 3


def test_native_without_sse_header_returns_one_json_body(simulator):
    simulator.add_scenario(Scenario(reply="Whole answer."))

    response = post(simulator, TEXT_PATH, native_body(), AUTH)

    payload = response.json()
    assert payload["output"]["choices"][0] == {
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": "Whole answer."},
    }
    assert payload["usage"]["output_tokens"] == 2
    assert payload["request_id"] == response.headers["x-request-id"]


def test_partial_response_is_flagged_in_a_header(simulator):
    simulator.add_scenario(Scenario(reply="one two three four", framing="partial_response"))
    response = post(simulator, TEXT_PATH, native_body(), AUTH)
    assert response.headers["x-dashscope-partialresponse"] == "true"
    assert response.json()["output"]["choices"][0]["message"]["content"] == "one two "


def test_thinking_streams_reasoning_content_first(simulator):
    simulator.add_scenario(Scenario(reasoning="Hmm ok", reply="Yes."))
    body = native_body(enable_thinking=True, incremental_output=True)

    payloads = data_payloads(post(simulator, TEXT_PATH, body, SSE).text)

    messages = [p["output"]["choices"][0]["message"] for p in payloads]
    assert [(m["reasoning_content"], m["content"]) for m in messages] == [
        ("Hmm ", ""),
        ("ok", ""),
        ("", "Yes."),
        ("", ""),
    ]


def test_a_thinking_stream_counts_its_reasoning_tokens_in_every_chunk(simulator):
    """Native usage is cumulative in every chunk; reasoning is part of output_tokens and is
    also counted apart (usage.output_tokens_details.reasoning_tokens)."""
    simulator.add_scenario(Scenario(reasoning="Hmm ok", reply="Yes."))
    body = native_body(enable_thinking=True, incremental_output=True)

    payloads = data_payloads(post(simulator, TEXT_PATH, body, SSE).text)

    assert [p["usage"]["output_tokens"] for p in payloads] == [1, 2, 3, 3]
    assert [p["usage"]["output_tokens_details"]["reasoning_tokens"] for p in payloads] == [
        1, 2, 2, 2,
    ]  # fmt: skip


def test_a_reply_without_thinking_reports_no_reasoning_tokens(simulator):
    simulator.add_scenario(Scenario(reply="Yes."))
    payloads = data_payloads(post(simulator, TEXT_PATH, native_body(), SSE).text)
    assert all("output_tokens_details" not in p["usage"] for p in payloads)


# -- compatible wire format --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_compatible_usage_counts_reasoning_tokens(simulator, stream):
    simulator.add_scenario(Scenario(reasoning="Let me see", reply="Yes, that."))
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "x"}],
        "stream": stream,
        # (Thinking without streaming is refused for qwen-plus; the scenario's reasoning is
        # written either way.)
        **({"enable_thinking": True, "stream_options": {"include_usage": True}} if stream else {}),
    }
    response = post(simulator, COMPAT_PATH, body, AUTH)
    usage = data_payloads(response.text)[-1]["usage"] if stream else response.json()["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_compatible_stream_ends_with_usage_and_done(simulator):
    simulator.add_scenario(Scenario(reply="Hi you."))
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    response = post(simulator, COMPAT_PATH, body, AUTH)

    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = data_payloads(response.text)
    assert payloads[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert [p["choices"][0]["delta"]["content"] for p in payloads[1:3]] == ["Hi ", "you."]
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert payloads[1]["choices"][0]["finish_reason"] is None
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["completion_tokens"] == 2
    assert payloads[-1]["id"] == "chatcmpl-" + response.headers["x-request-id"]


def test_compatible_stream_without_include_usage_has_no_usage_chunk(simulator):
    simulator.add_scenario(Scenario(reply="Hi."))
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "x"}], "stream": True}
    payloads = data_payloads(post(simulator, COMPAT_PATH, body, AUTH).text)
    assert all(p["choices"] for p in payloads)
    assert all(p["usage"] is None for p in payloads)


def test_compatible_non_stream_returns_chat_completion(simulator):
    simulator.add_scenario(Scenario(reply="Done."))
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "x"}]}
    payload = post(simulator, COMPAT_PATH, body, AUTH).json()
    assert payload["object"] == "chat.completion"
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": "Done."}
    assert payload["usage"]["completion_tokens"] == 1


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            TEXT_PATH,
            {
                "model": "qwen-plus",
                "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
            },
            400,
            "input content must be a string.",
        ),
        (TEXT_PATH, native_body(model="qwen3-vl-plus"), 400, "url error, check url!"),
        (TEXT_PATH, native_body(model="qvq-max"), 400, "url error, check url!"),
        (MULTIMODAL_PATH, native_body(model="qwen-plus"), 400, "url error, check url!"),
        (TEXT_PATH, native_body(model="gpt-4o"), 400, "Model not exist."),
        (
            TEXT_PATH,
            {
                "model": "qwen-plus",
                "input": {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                    ]
                },
            },
            400,
            "the role in last message",
        ),
        (
            TEXT_PATH,
            native_body(enable_thinking=True, incremental_output=False),
            400,
            'incremental_output parameter must be "true"',
        ),
        (TEXT_PATH, {"model": "qwen-plus", "messages": []}, 400, 'Either "prompt" or "messages"'),
    ],
)
def test_native_validation_matches_the_real_service(simulator, path, body, status, message):
    response = post(simulator, path, body, SSE)
    assert response.status_code == status
    payload = response.json()
    assert message in payload["message"]
    assert payload["request_id"] == response.headers["x-request-id"]


def test_stream_only_models_refuse_non_streaming_calls(simulator):
    response = post(simulator, TEXT_PATH, native_body(model="qwq-plus"), AUTH)
    assert response.status_code == 400
    assert "only support stream mode" in response.json()["message"]


def test_partial_assistant_turn_may_come_last(simulator):
    body = {
        "model": "qwen-plus",
        "input": {
            "messages": [
                {"role": "user", "content": "Write a poem"},
                {"role": "assistant", "content": "Roses are", "partial": True},
            ]
        },
        "parameters": {"incremental_output": True},
    }
    assert post(simulator, TEXT_PATH, body, SSE).status_code == 200


def test_any_sim_model_and_omni_models_are_accepted(simulator):
    assert post(simulator, TEXT_PATH, native_body(model="sim-echo"), AUTH).status_code == 200
    body = native_body(model="qwen3.5-plus")
    body["input"]["messages"][0]["content"] = [{"text": "hi"}]
    assert post(simulator, MULTIMODAL_PATH, body, AUTH).status_code == 200


def test_wrong_key_is_rejected_in_both_dialects(simulator):
    wrong = {"Authorization": "Bearer sk-nope"}
    native = post(simulator, TEXT_PATH, native_body(), wrong)
    assert native.status_code == 401
    assert native.json()["code"] == "InvalidApiKey"
    compat = post(
        simulator,
        COMPAT_PATH,
        {"model": "qwen-plus", "messages": [{"role": "user", "content": "x"}]},
        wrong,
    )
    assert compat.status_code == 401
    assert compat.json()["error"]["code"] == "invalid_api_key"
    assert compat.json()["request_id"] == compat.headers["x-request-id"]
    assert [r.authorized for r in simulator.requests] == [False, False]


def test_unknown_model_in_compatible_mode_is_404(simulator):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    response = post(simulator, COMPAT_PATH, body, AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# -- replies -----------------------------------------------------------------------------------


def test_default_reply_is_deterministic_markdown_quoting_the_user(simulator):
    first = post(simulator, TEXT_PATH, native_body("How do I bake bread?"), AUTH).json()
    again = post(simulator, TEXT_PATH, native_body("How do I bake bread?"), AUTH).json()
    other = post(simulator, TEXT_PATH, native_body("What is a monad?"), AUTH).json()

    reply = first["output"]["choices"][0]["message"]["content"]
    assert reply == again["output"]["choices"][0]["message"]["content"]
    assert reply != other["output"]["choices"][0]["message"]["content"]
    assert '"How do I bake bread?"' in reply
    assert reply.startswith(("**", "### "))
    assert "\n- " in reply
    assert 60 <= first["usage"]["output_tokens"] <= 120


def test_reply_lengths_vary_within_the_default_range():
    lengths = {
        len(tokenize(compose_reply(model="qwen-plus", last_user=f"question {i}", turn=1)))
        for i in range(30)
    }
    assert len(lengths) > 5
    assert min(lengths) >= 60 and max(lengths) <= 120


def test_some_replies_include_a_code_block():
    replies = [compose_reply(model="qwen-plus", last_user=f"q{i}", turn=1) for i in range(30)]
    with_code = [r for r in replies if "```" in r]
    assert 0 < len(with_code) < len(replies)
    assert all(r.count("```") == 2 for r in with_code)


def test_tokens_concatenate_back_to_the_text():
    text = "  Leading space\n\n- item one\n- item two\n\n```python\nx = 1\n```\n"
    assert "".join(tokenize(text)) == text


def test_tokens_scenario_generates_exactly_that_many(simulator):
    simulator.add_scenario(Scenario(tokens=17, tokens_per_chunk=4))
    payloads = data_payloads(
        post(simulator, TEXT_PATH, native_body(incremental_output=True), SSE).text
    )
    assert len(payloads) == 5 + 1  # ceil(17 / 4) chunks and the finish chunk
    assert payloads[-1]["usage"]["output_tokens"] == 17


def test_scenario_match_and_times(simulator):
    simulator.add_scenario(Scenario(match="banana", reply="Special.", times=2))

    def reply_to(text: str) -> str:
        body = post(simulator, TEXT_PATH, native_body(text), AUTH).json()
        return body["output"]["choices"][0]["message"]["content"]

    assert reply_to("apple") != "Special."
    assert reply_to("a banana split") == "Special."
    assert reply_to("banana again") == "Special."
    assert reply_to("banana thrice") != "Special."


# -- function calling --------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_time",
            "description": "Useful when you want to know the current time.",
            "parameters": {},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Useful when you want to look up the weather in a given city.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    },
]
BOTH = "What time is it and what is the weather in Tokyo?"


def tool_request(
    protocol: str,
    messages: list[dict[str, Any]],
    *,
    stream: bool = True,
    tools: Any = TOOLS,
    **options: Any,
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(path, body, headers) of a request offering ``tools``."""
    if protocol == "native":
        parameters = {"result_format": "message", "incremental_output": True, **options}
        if tools is not None:
            parameters["tools"] = tools
        body = {"model": "qwen-plus", "input": {"messages": messages}, "parameters": parameters}
        return TEXT_PATH, body, SSE if stream else AUTH
    body = {"model": "qwen-plus", "messages": messages, "stream": stream, **options}
    if tools is not None:
        body["tools"] = tools
    return COMPAT_PATH, body, AUTH


def ask_with_tools(
    simulator, protocol: str, messages: list[dict[str, Any]], **kwargs: Any
) -> httpx.Response:
    return post(simulator, *tool_request(protocol, messages, **kwargs))


def choices_of(response: httpx.Response, protocol: str, stream: bool) -> list[dict[str, Any]]:
    """Each chunk's (or the one body's) first choice, its message or delta under "message"."""
    payloads = data_payloads(response.text) if stream else [response.json()]
    choices = []
    for payload in payloads:
        found = payload["output"]["choices"] if protocol == "native" else payload["choices"]
        if found:
            choice = found[0]
            choices.append(
                {"message": choice.get("message") or choice.get("delta") or {}, **choice}
            )
    return choices


def fragments_of(choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for c in choices for f in c["message"].get("tool_calls") or []]


def join_fragments(fragments: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call, joined by index the way a client must."""
    calls: dict[int, list[str]] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment["index"], ["", "", ""])
        call[0] = call[0] or fragment.get("id") or ""
        call[1] = call[1] or fragment["function"].get("name") or ""
        call[2] += fragment["function"].get("arguments") or ""
    return [tuple(calls[i]) for i in sorted(calls)]  # type: ignore[misc]


def assistant_turn(calls: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in calls
        ],
    }


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_a_question_about_time_and_weather_streams_two_tool_calls(simulator, protocol):
    response = ask_with_tools(
        simulator, protocol, [{"role": "user", "content": BOTH}], parallel_tool_calls=True
    )

    assert response.status_code == 200
    choices = choices_of(response, protocol, stream=True)
    fragments = fragments_of(choices)
    calls = join_fragments(fragments)
    assert [(name, json.loads(arguments)) for _, name, arguments in calls] == [
        ("get_current_time", {}),
        ("get_current_weather", {"location": "Tokyo"}),
    ]
    assert all(call_id.startswith("call_") for call_id, _, _ in calls)
    assert len({call_id for call_id, _, _ in calls}) == 2
    for index in (0, 1):
        pieces = [f for f in fragments if f["index"] == index]
        assert len(pieces) >= 2  # the arguments arrive split
        assert pieces[0]["id"] and pieces[0]["function"]["name"]
        assert all(not p.get("id") and "name" not in p["function"] for p in pieces[1:])
    null = "null" if protocol == "native" else None
    assert [c["finish_reason"] for c in choices] == [null] * (len(choices) - 1) + ["tool_calls"]
    assert all(not c["message"].get("content") for c in choices)


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_a_non_streaming_tool_call_comes_whole(simulator, protocol):
    response = ask_with_tools(
        simulator, protocol, [{"role": "user", "content": "北京天气怎么样？"}], stream=False
    )

    (choice,) = choices_of(response, protocol, stream=False)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == ""
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["index"] == 0 and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_current_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "北京"}


def test_a_non_incremental_native_stream_repeats_the_calls_so_far(simulator):
    response = ask_with_tools(
        simulator,
        "native",
        [{"role": "user", "content": BOTH}],
        parallel_tool_calls=True,
        incremental_output=False,
    )

    snapshots = [c["message"]["tool_calls"] for c in choices_of(response, "native", True)]
    arguments = [[call["function"]["arguments"] for call in calls] for calls in snapshots]
    assert arguments[0] == ["{"] and arguments[1] == ["{}"]
    assert arguments[-1] == ["{}", '{"location": "Tokyo"}']
    assert all(call["id"] and call["function"]["name"] for calls in snapshots for call in calls)


def test_without_parallel_tool_calls_the_calls_come_one_per_turn(simulator):
    history: list[dict[str, Any]] = [{"role": "user", "content": BOTH}]
    names = []
    for _ in range(3):
        response = ask_with_tools(simulator, "compatible", history, stream=False)
        message = response.json()["choices"][0]["message"]
        if not message.get("tool_calls"):
            break
        (call,) = message["tool_calls"]
        names.append(call["function"]["name"])
        history.append(assistant_turn([(call["id"], names[-1], call["function"]["arguments"])]))
        history.append({"role": "tool", "content": f"{names[-1]} ok", "tool_call_id": call["id"]})

    assert names == ["get_current_time", "get_current_weather"]
    assert "get_current_time ok" in message["content"]
    assert "get_current_weather ok" in message["content"]


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize("stream", [True, False])
def test_tool_results_are_quoted_in_the_answer(simulator, protocol, stream):
    calls = [
        ("call_t", "get_current_time", "{}"),
        ("call_w", "get_current_weather", '{"location": "Tokyo"}'),
    ]
    history = [
        {"role": "user", "content": BOTH},
        assistant_turn(calls),
        {"role": "tool", "content": "2026-05-01 18:00:00 Asia/Tokyo", "tool_call_id": "call_t"},
        {"role": "tool", "content": "Tokyo is rainy today", "tool_call_id": "call_w"},
    ]

    response = ask_with_tools(simulator, protocol, history, stream=stream)

    choices = choices_of(response, protocol, stream)
    answer = "".join(c["message"].get("content") or "" for c in choices)
    assert "**get_current_time**: 2026-05-01 18:00:00 Asia/Tokyo" in answer
    assert "**get_current_weather**: Tokyo is rainy today" in answer
    assert choices[-1]["finish_reason"] == "stop"
    assert not fragments_of(choices)


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize(
    ("tool_turn", "message"),
    [
        ({"role": "tool", "content": "12:00"}, 'must have a "tool_call_id"'),
        ({"role": "tool", "content": "12:00", "tool_call_id": ""}, 'must have a "tool_call_id"'),
        (
            {"role": "tool", "content": "12:00", "tool_call_id": "call_other"},
            'tool_call_id "call_other"',
        ),
    ],
)
def test_a_tool_turn_must_answer_an_earlier_call(simulator, protocol, tool_turn, message):
    history = [
        {"role": "user", "content": "What time is it?"},
        assistant_turn([("call_t", "get_current_time", "{}")]),
        tool_turn,
    ]

    response = ask_with_tools(simulator, protocol, history)

    assert response.status_code == 400
    payload = response.json()
    assert payload["request_id"] == response.headers["x-request-id"]
    if protocol == "native":
        assert payload["code"] == "InvalidParameter"
        assert message in payload["message"]
    else:
        assert payload["error"]["code"] == "invalid_parameter_error"
        assert payload["error"]["type"] == "invalid_request_error"
        assert message in payload["error"]["message"]
    assert simulator.wait_for_outcome() == "error"


def test_a_tool_result_before_its_call_is_refused(simulator):
    history = [
        {"role": "user", "content": "What time is it?"},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_t"},
        assistant_turn([("call_t", "get_current_time", "{}")]),
        {"role": "user", "content": "And now?"},
    ]
    assert ask_with_tools(simulator, "native", history).status_code == 400


@pytest.mark.parametrize("tools", [{"name": "x"}, [{"type": "function"}], ["get_current_time"]])
def test_malformed_tools_are_refused(simulator, tools):
    response = ask_with_tools(simulator, "native", [{"role": "user", "content": "Hi"}], tools=tools)
    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParameter"


def test_loop_forever_calls_a_tool_after_every_result(simulator):
    history: list[dict[str, Any]] = [{"role": "user", "content": "What time is it? loop forever"}]
    ids = []
    for round_number in range(6):
        response = ask_with_tools(simulator, "native", history, stream=False)
        choice = response.json()["output"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls", round_number
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_current_time"
        ids.append(call["id"])
        history.append(assistant_turn([(call["id"], "get_current_time", "{}")]))
        history.append({"role": "tool", "content": "12:00", "tool_call_id": call["id"]})

    assert len(set(ids)) == 6


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_call_a_missing_tool_names_a_tool_nobody_offered(simulator, protocol):
    response = ask_with_tools(
        simulator, protocol, [{"role": "user", "content": "Please call a missing tool"}]
    )

    calls = join_fragments(fragments_of(choices_of(response, protocol, stream=True)))
    assert [name for _, name, _ in calls] == [MISSING_TOOL_NAME]
    assert MISSING_TOOL_NAME not in json.dumps(TOOLS)
    assert json.loads(calls[0][2]) == {}


def test_no_tools_offered_means_a_text_answer(simulator):
    response = ask_with_tools(
        simulator, "native", [{"role": "user", "content": BOTH}], tools=None, stream=False
    )
    choice = response.json()["output"]["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert BOTH in choice["message"]["content"]


def test_tool_choice_none_and_a_forced_tool(simulator):
    question = [{"role": "user", "content": BOTH}]
    none = ask_with_tools(simulator, "compatible", question, stream=False, tool_choice="none")
    assert none.json()["choices"][0]["finish_reason"] == "stop"

    forced = {"type": "function", "function": {"name": "get_current_weather"}}
    response = ask_with_tools(simulator, "compatible", question, stream=False, tool_choice=forced)
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_current_weather"


def test_tool_calls_are_deterministic(simulator):
    def calls() -> list[tuple[str, str, str]]:
        response = ask_with_tools(simulator, "native", [{"role": "user", "content": BOTH}])
        return join_fragments(fragments_of(choices_of(response, "native", stream=True)))

    assert calls() == calls()


@pytest.mark.parametrize(
    ("question", "location"),
    [
        ("What is the weather in Hangzhou?", "Hangzhou"),
        ("weather for tomorrow in New York, please", "New York"),
        ("what's the weather like in hangzhou", "Hangzhou"),
        ("In Paris, what is the weather?", "Paris"),
        ("杭州今天天气怎么样", "杭州"),
        ("今天上海的天气", "上海"),
        ("What is the weather like?", None),
    ],
)
def test_find_location(question, location):
    assert find_location(question) == location


def test_only_offered_tools_are_called():
    offered = ["get_current_weather"]
    assert plan_tool_calls(BOTH, offered, parallel=True) == [
        ("get_current_weather", {"location": "Tokyo"})
    ]
    assert plan_tool_calls("What is the weather like?", offered) == []
    assert plan_tool_calls("Tell me a joke", ["get_current_time"], tool_choice="required") == [
        ("get_current_time", {})
    ]


# -- request parameters ------------------------------------------------------------------------


def ask_with(
    simulator, protocol: str, text: str, *, stream: bool = True, **options: Any
) -> httpx.Response:
    """A one-question request carrying ``options`` where the protocol puts parameters."""
    messages = [{"role": "user", "content": text}]
    return post(simulator, *tool_request(protocol, messages, stream=stream, tools=None, **options))


def reply_of(response: httpx.Response, protocol: str, stream: bool = True) -> str:
    return "".join(
        c["message"].get("content") or "" for c in choices_of(response, protocol, stream)
    )


def error_message(response: httpx.Response, protocol: str) -> str:
    payload = response.json()
    if protocol == "native":
        assert payload["code"] == "InvalidParameter"
        return payload["message"]
    assert payload["error"]["code"] == "invalid_parameter_error"
    assert payload["error"]["type"] == "invalid_request_error"
    return payload["error"]["message"]


SEARCH = {"enable_search": True, "search_options": {"enable_source": True}}


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", 2, "Temperature should be in [0.0, 2.0)"),
        ("temperature", -0.1, "Temperature should be in [0.0, 2.0)"),
        ("temperature", "warm", "'temperature' must be Float"),
        ("top_p", 0, "Range of top_p should be (0.0, 1.0]"),
        ("top_p", 1.01, "Range of top_p should be (0.0, 1.0]"),
        ("top_k", -1, "Parameter top_k be greater than or equal to 0"),
        ("presence_penalty", 2.5, "Presence_penalty should be in [-2.0, 2.0]"),
        ("repetition_penalty", 0, "Repetition_penalty should be greater than 0.0"),
        ("max_tokens", 0, "Range of max_tokens should be [1, 32768]"),
        ("max_tokens", 32_769, "Range of max_tokens should be [1, 32768]"),
        ("seed", -1, "Range of seed should be [0, 9223372036854775807]"),
        ("thinking_budget", 0, "The thinking_budget parameter must be a positive integer"),
        ("stop", ["END", 7], 'The "stop" parameter must be of type "str", "list[str]"'),
    ],
)
def test_out_of_range_parameters_are_refused_in_upstreams_words(
    simulator, protocol, name, value, message
):
    response = ask_with(simulator, protocol, "Hello", **{name: value})

    assert response.status_code == 400
    assert error_message(response, protocol).startswith(message)
    assert simulator.requests[-1].outcome == "error"


def test_parameters_at_the_edges_of_their_ranges_are_accepted(simulator):
    edges = {"temperature": 0, "top_p": 1, "top_k": 0, "presence_penalty": -2,
             "repetition_penalty": 0.01, "max_tokens": 32_768, "seed": 2**63 - 1,
             "stop": [[1, 2], [3]]}  # fmt: skip
    for protocol in ("native", "compatible"):
        assert ask_with(simulator, protocol, "Hello", **edges).status_code == 200


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_json_mode_needs_the_word_json_in_some_message(simulator, protocol):
    json_object = {"response_format": {"type": "json_object"}}

    refused = ask_with(simulator, protocol, "List three fruits.", **json_object)

    assert refused.status_code == 400
    assert error_message(refused, protocol) == (
        "'messages' must contain the word 'json' in some form, to use 'response_format' of "
        "type 'json_object'."
    )
    accepted = ask_with(simulator, protocol, "List three fruits as Json.", **json_object)
    assert accepted.status_code == 200


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_json_mode_reply_is_a_json_object_streamed_in_pieces(simulator, protocol, stream):
    response = ask_with(
        simulator,
        protocol,
        "Name three fruits, as JSON.",
        stream=stream,
        response_format={"type": "json_object"},
    )

    reply = json.loads(reply_of(response, protocol, stream))
    assert set(reply) == {"topic", "answer", "points", "confidence"}
    assert reply["topic"] == "Name three fruits, as JSON"
    if stream:
        assert (
            sum(1 for c in choices_of(response, protocol, True) if c["message"].get("content")) > 5
        )


def test_json_mode_with_thinking_is_refused(simulator):
    response = ask_with(
        simulator,
        "native",
        "Answer in json",
        response_format={"type": "json_object"},
        enable_thinking=True,
    )
    assert response.status_code == 400
    assert "not supported when enable_thinking is true" in error_message(response, "native")


def test_an_unknown_response_format_is_refused(simulator):
    response = ask_with(simulator, "native", "json", response_format={"type": "yaml"})
    assert response.status_code == 400
    assert "Unknown format of response_format" in error_message(response, "native")
    assert ask_with(simulator, "native", "x", response_format={"type": "text"}).status_code == 200


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize("stream", [True, False])
def test_the_reply_stops_before_the_first_stop_text(simulator, protocol, stream):
    simulator.add_scenario(Scenario(reply="Apples are red. HALT Pears are green. END Plums."))

    response = ask_with(simulator, protocol, "Fruit?", stream=stream, stop=["END", "HALT"])

    assert reply_of(response, protocol, stream) == "Apples are red. "
    assert choices_of(response, protocol, stream)[-1]["finish_reason"] == "stop"


def test_a_single_stop_string_cuts_the_composed_reply(simulator):
    whole = reply_of(ask_with(simulator, "native", "Tell me about tea"), "native")
    assert "You asked" in whole

    response = ask_with(simulator, "native", "Tell me about tea", stop="You asked")

    assert reply_of(response, "native") == whole[: whole.index("You asked")]


def test_max_tokens_still_wins_over_a_later_stop_text(simulator):
    simulator.add_scenario(Scenario(reply="one two three four five STOP six"))
    response = ask_with(simulator, "native", "Count", stop="STOP", max_tokens=2)
    assert reply_of(response, "native") == "one two "
    assert choices_of(response, "native", True)[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_thinking_budget_caps_the_reasoning(simulator, protocol):
    unbounded = ask_with(simulator, protocol, "Why is the sky blue?", enable_thinking=True)
    capped = ask_with(
        simulator, protocol, "Why is the sky blue?", enable_thinking=True, thinking_budget=5
    )

    def reasoning(response: httpx.Response) -> str:
        return "".join(
            c["message"].get("reasoning_content") or ""
            for c in choices_of(response, protocol, True)
        )

    assert len(tokenize(reasoning(unbounded))) > 5
    assert reasoning(capped) == "".join(tokenize(reasoning(unbounded))[:5])
    assert reply_of(capped, protocol) == reply_of(unbounded, protocol), "the answer still comes"


def test_a_seed_picks_a_reply_deterministically(simulator):
    def reply(**seed: Any) -> str:
        return reply_of(ask_with(simulator, "native", "Plan a picnic", **seed), "native")

    unseeded, seven, eight = reply(), reply(seed=7), reply(seed=8)
    assert reply(seed=7) == seven and reply() == unseeded
    assert len({unseeded, seven, eight}) == 3
    assert unseeded == compose_reply(model="qwen-plus", last_user="Plan a picnic", turn=1)


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_sources_come_with_the_first_chunk_only(simulator, protocol):
    response = ask_with(simulator, protocol, "What is new in Python?", **SEARCH)

    payloads = data_payloads(response.text)
    holders = [p["output"] if protocol == "native" else p for p in payloads]
    assert "search_info" in holders[0]
    assert not any("search_info" in h for h in holders[1:])
    results = holders[0]["search_info"]["search_results"]
    assert results == compose_search_results("What is new in Python?")
    assert 2 <= len(results) <= 3
    assert [r["index"] for r in results] == list(range(1, len(results) + 1))
    for result in results:
        assert set(result) == {"index", "title", "url", "site_name", "icon"}
        assert result["url"].startswith("https://") and ".example." in result["url"]
        assert "What is new in Python" in result["title"]


@pytest.mark.parametrize("protocol", ["native", "compatible"])
def test_sources_come_in_the_body_without_streaming(simulator, protocol):
    response = ask_with(simulator, protocol, "What is new in Python?", stream=False, **SEARCH)
    payload = response.json()
    holder = payload["output"] if protocol == "native" else payload
    assert holder["search_info"]["search_results"] == compose_search_results(
        "What is new in Python?"
    )


def test_no_sources_without_enable_source(simulator):
    for options in ({"enable_search": True}, {"search_options": {"enable_source": True}}, {}):
        response = ask_with(simulator, "native", "What is new in Python?", **options)
        assert "search_info" not in response.text, options


def test_the_unsafe_sources_trigger_sends_a_hostile_source(simulator):
    response = ask_with(simulator, "native", "Show me unsafe sources", **SEARCH)

    first = data_payloads(response.text)[0]["output"]["search_info"]["search_results"]
    assert first[0]["url"].startswith("https://")
    assert first[1]["title"] == "Example <script>alert(1)</script>"
    assert first[1]["url"] == "javascript:alert(1)"
    assert "\x07" in first[1]["site_name"]


def test_search_results_are_deterministic_per_question():
    assert compose_search_results("a") == compose_search_results("a")
    assert compose_search_results("a") != compose_search_results("b")
    counts = {len(compose_search_results(f"question {i}")) for i in range(20)}
    assert counts == {2, 3}


# -- control API, records and the runner -------------------------------------------------------


def test_scenarios_can_be_steered_over_http(simulator):
    control = simulator.url + "/_simulator/scenarios"
    added = httpx.post(
        control, json=[{"reply": "From HTTP.", "times": -1}, {"error": {"status": 429}}]
    )
    assert added.status_code == 201 and added.json()["added"] == 2
    listed = httpx.get(control).json()["scenarios"]
    assert (
        listed[0]["reply"] == "From HTTP." and listed[1]["error"]["code"] == "Throttling.RateQuota"
    )

    response = post(simulator, TEXT_PATH, native_body(), AUTH)
    assert response.json()["output"]["choices"][0]["message"]["content"] == "From HTTP."

    assert httpx.delete(control).status_code == 200
    assert simulator.simulator.scenarios == []


def test_bad_scenarios_are_rejected_over_http(simulator):
    control = simulator.url + "/_simulator/scenarios"
    assert httpx.post(control, json={"replay": "typo"}).status_code == 400
    assert httpx.post(control, json={"error": {"where": "nowhere"}}).status_code == 400
    assert simulator.simulator.scenarios == []


def test_requests_are_recorded_without_the_key(simulator):
    post(simulator, TEXT_PATH, native_body("Remember me"), SSE)
    recorded = httpx.get(simulator.url + "/_simulator/requests").json()["requests"]

    assert len(recorded) == 1
    entry = recorded[0]
    assert entry["method"] == "POST" and entry["path"] == TEXT_PATH
    assert entry["authorized"] is True
    assert entry["body"]["input"]["messages"][0]["content"] == "Remember me"
    assert entry["outcome"] == "completed"
    assert SIMULATOR_API_KEY not in json.dumps(recorded)
    assert "authorization" not in entry["headers"]

    assert httpx.delete(simulator.url + "/_simulator/requests").status_code == 200
    assert simulator.requests == []


def test_state_reports_stream_counters(simulator):
    post(simulator, TEXT_PATH, native_body(), SSE)
    state = httpx.get(simulator.url + "/_simulator/state").json()
    assert state["completed_streams"] == 1 and state["disconnected_streams"] == 0
    reset = httpx.delete(simulator.url + "/_simulator/state").json()
    assert reset["completed_streams"] == 0 and reset["requests"] == 0


def test_models_are_listed_in_both_dialects(simulator):
    native = httpx.get(simulator.native_base_url + "/models?model=qwen-max", headers=AUTH).json()
    assert [m["model"] for m in native["output"]["models"]] == ["qwen-max"]
    compat = httpx.get(simulator.compatible_base_url + "/models", headers=AUTH).json()
    assert "qwen3-vl-plus" in [m["id"] for m in compat["data"]]
    assert httpx.get(simulator.compatible_base_url + "/models").status_code == 401


def test_server_starts_on_a_free_port_and_stops_cleanly():
    with SimulatorServer(first_token_delay=0, token_delay=0) as server:
        assert server.native_base_url == f"http://127.0.0.1:{server.port}/api/v1"
        assert server.compatible_base_url == f"http://127.0.0.1:{server.port}/compatible-mode/v1"
        response = post(server, TEXT_PATH, native_body(), {"Authorization": "Bearer anything"})
        assert response.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/api/v1/models", timeout=1)


def test_command_line_runs_the_simulator_in_the_foreground():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable,
        "-m",
        "dashscope_simulator",
        "--port",
        str(port),
        "--api-key",
        "sk-cli",
        "--first-token-delay",
        "0",
    ]
    with subprocess.Popen(
        command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    response = httpx.get(
                        f"http://127.0.0.1:{port}/compatible-mode/v1/models",
                        headers={"Authorization": "Bearer sk-cli"},
                        timeout=1,
                    )
                    break
                except httpx.ConnectError:
                    assert process.poll() is None, process.stderr.read().decode()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert response.status_code == 200
        finally:
            process.terminate()
            stdout, _ = process.communicate(timeout=10)
    assert f"http://127.0.0.1:{port}/compatible-mode/v1" in stdout.decode()


CONTROL_ROUTES = [
    ("POST", "/_simulator/scenarios"),
    ("GET", "/_simulator/scenarios"),
    ("DELETE", "/_simulator/scenarios"),
    ("GET", "/_simulator/requests"),
    ("DELETE", "/_simulator/requests"),
    ("GET", "/_simulator/state"),
    ("DELETE", "/_simulator/state"),
]


def control(server: SimulatorServer, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = {"reply": "Injected.", "times": -1} if method == "POST" else None
    return httpx.request(method, server.url + path, json=body, headers=headers)


def test_control_needs_the_token_when_one_is_set():
    """With a control token, every /_simulator/ route answers 401 without it and 403 with
    another (the simulator's key included), and changes nothing; with it, they work. The
    model endpoints still take the API key, not the token."""
    token = "control-token-5c1e9a"
    with SimulatorServer(
        api_key=SIMULATOR_API_KEY, control_token=token, first_token_delay=0, token_delay=0
    ) as server:
        post(server, TEXT_PATH, native_body("Private words"), AUTH)
        for method, path in CONTROL_ROUTES:
            assert control(server, method, path, None).status_code == 401, (method, path)
            for wrong in ("wrong-token", SIMULATOR_API_KEY, token + "x", token[:-1]):
                assert control(server, method, path, wrong).status_code == 403, (method, path)
        assert server.simulator.scenarios == [] and len(server.requests) == 1

        assert control(server, "POST", "/_simulator/scenarios", token).status_code == 201
        recorded = control(server, "GET", "/_simulator/requests", token).json()["requests"]
        assert recorded[0]["body"]["input"]["messages"][0]["content"] == "Private words"
        reply = post(server, TEXT_PATH, native_body(), AUTH).json()
        assert reply["output"]["choices"][0]["message"]["content"] == "Injected."
        token_as_key = {"Authorization": f"Bearer {token}"}
        assert post(server, TEXT_PATH, native_body(), token_as_key).status_code == 401


def test_the_record_keeps_only_the_newest_requests():
    """A long-running simulator (the offline demo) keeps the newest requests, not all."""
    with SimulatorServer(
        api_key=SIMULATOR_API_KEY, max_recorded=3, first_token_delay=0, token_delay=0
    ) as server:
        for number in range(5):
            post(server, TEXT_PATH, native_body(f"message {number}"), AUTH)
        texts = [r.body["input"]["messages"][0]["content"] for r in server.requests]
        assert texts == ["message 2", "message 3", "message 4"]
        assert httpx.get(server.url + "/_simulator/state").json()["requests"] == 3
    assert SimulatorServer().simulator.max_recorded == 200
