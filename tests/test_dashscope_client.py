"""The DashScope client against the simulator on a real loopback port (no mocked HTTP)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from dataclasses import replace

import httpx
import pytest

from conversations.dashscope import (
    AuthError,
    BadRequestError,
    BillingError,
    ChatMessage,
    ChatRequest,
    DashScopeClient,
    DashScopeConfig,
    DashScopeError,
    DashScopeTimeoutError,
    Finish,
    ModeratedError,
    ReasoningDelta,
    SearchResults,
    ServerError,
    StreamEvent,
    TextDelta,
    ThrottledError,
    ToolCallAccumulator,
    ToolCallDelta,
    TransportError,
    Usage,
    classify,
    compatible_base_from_native,
)
from conversations.dashscope import client as client_module
from conversations.dashscope.sanitize import (
    OutputCleaner,
    _longest_key_prefix_at_end,
    clean_search_results,
)
from conversations.dashscope.sse import parse_frames
from conversations.errors import describe_error
from dashscope_simulator import (
    MAX_THINKING_BUDGET,
    Scenario,
    ScenarioError,
    compose_search_results,
    tokenize,
)
from tests.dashscope_fixtures import *  # noqa: F403
from tests.dashscope_fixtures import SIMULATOR_API_KEY, RecordingSleep

REPLY = "Hello, **world**!\n\n- one\n- two\n\nDone."


def outcomes(simulator) -> list[str | None]:
    """Each request's outcome, once the simulator's thread has recorded it: the client can
    have its last byte before the server has finished its bookkeeping."""
    return [simulator.wait_for_outcome(r.request_id) for r in simulator.requests]


def ask(text: str = "Tell me something nice", **kwargs: object) -> ChatRequest:
    return ChatRequest(model="qwen-plus", messages=[ChatMessage("user", text)], **kwargs)  # type: ignore[arg-type]


async def collect(client: DashScopeClient, request: ChatRequest) -> list[StreamEvent]:
    return [event async for event in client.stream_chat(request)]


async def collect_until_error(
    client: DashScopeClient, request: ChatRequest
) -> tuple[list[StreamEvent], DashScopeError]:
    events: list[StreamEvent] = []
    with pytest.raises(DashScopeError) as caught:
        async for event in client.stream_chat(request):
            events.append(event)
    return events, caught.value


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def reasoning_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ReasoningDelta))


def client_for(
    config: DashScopeConfig, sleep: RecordingSleep, **changes: object
) -> DashScopeClient:
    return DashScopeClient(replace(config, **changes), sleep=sleep)  # type: ignore[arg-type]


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_native_stream_yields_deltas_then_usage_then_finish(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply=REPLY))

    events = await collect(dashscope_client, ask())

    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 5
    assert text_of(events) == REPLY
    usage, finish = events[-2], events[-1]
    assert isinstance(usage, Usage) and usage.output_tokens == len(deltas)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert finish == Finish("stop", simulator.requests[-1].request_id)


@pytest.mark.asyncio
async def test_native_request_carries_sse_header_and_parameters(simulator, dashscope_client):
    request = ChatRequest(
        model="qwen-plus",
        messages=[
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Write a haiku"),
            ChatMessage("assistant", "Autumn moon", partial=True),
        ],
        parameters={"temperature": 0.3, "seed": 7},
    )

    await collect(dashscope_client, request)

    seen = simulator.requests[-1]
    assert seen.path == "/api/v1/services/aigc/text-generation/generation"
    assert seen.headers["x-dashscope-sse"] == "enable"
    assert seen.headers["accept"] == "text/event-stream"
    assert "authorization" not in seen.headers and seen.authorized
    assert seen.body["parameters"] == {
        "result_format": "message",
        "incremental_output": True,
        "temperature": 0.3,
        "seed": 7,
    }
    assert seen.body["input"]["messages"][-1] == {
        "role": "assistant",
        "content": "Autumn moon",
        "partial": True,
    }


@pytest.mark.asyncio
async def test_multimodal_stream_joins_list_content(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply=REPLY, tokens_per_chunk=2))
    request = ChatRequest(
        model="qwen3-vl-plus",
        endpoint="multimodal",
        messages=[
            ChatMessage("system", "You describe pictures."),
            ChatMessage("user", "What is in this picture?", images=["https://example.com/a.png"]),
        ],
    )

    events = await collect(dashscope_client, request)

    assert text_of(events) == REPLY
    assert events[-1].reason == "stop"
    seen = simulator.requests[-1]
    assert seen.path.endswith("/multimodal-generation/generation")
    assert seen.body["input"]["messages"] == [
        {"role": "system", "content": [{"text": "You describe pictures."}]},
        {
            "role": "user",
            "content": [
                {"image": "https://example.com/a.png"},
                {"text": "What is in this picture?"},
            ],
        },
    ]


@pytest.mark.asyncio
async def test_images_on_the_text_endpoint_are_refused_before_sending(simulator, dashscope_client):
    request = ChatRequest(
        model="qwen-plus", messages=[ChatMessage("user", "look", images=["https://x/y.png"])]
    )
    with pytest.raises(ValueError, match="multimodal"):
        await collect(dashscope_client, request)
    assert simulator.requests == []


@pytest.mark.asyncio
async def test_compatible_stream_reports_usage_finish_and_done(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply=REPLY))
    request = ChatRequest(
        model="qwen3-vl-plus",
        protocol="compatible",
        messages=[ChatMessage("user", "Describe", images=["https://example.com/a.png"])],
        parameters={"enable_thinking": False, "temperature": 0.5},
    )

    events = await collect(dashscope_client, request)

    assert text_of(events) == REPLY
    assert isinstance(events[-2], Usage) and events[-2].output_tokens > 0
    seen = simulator.requests[-1]
    assert events[-1] == Finish("stop", seen.request_id)
    assert seen.path == "/compatible-mode/v1/chat/completions"
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["enable_thinking"] is False and seen.body["temperature"] == 0.5
    assert seen.body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "Describe"},
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_reasoning_arrives_before_the_answer(simulator, dashscope_client, protocol):
    simulator.add_scenario(Scenario(reasoning="Let me think about it.", reply="Answer: 42."))

    events = await collect(dashscope_client, ask(protocol=protocol))

    assert reasoning_of(events) == "Let me think about it."
    assert text_of(events) == "Answer: 42."
    kinds = [type(e) for e in events if isinstance(e, TextDelta | ReasoningDelta)]
    assert kinds.index(TextDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_usage_counts_the_reasoning_tokens_apart(simulator, dashscope_client, protocol):
    """Reasoning tokens are part of output_tokens; usage also reports them apart, in both
    protocols, streamed or not."""
    simulator.add_scenario(Scenario(reasoning="one two three", reply="Four five.", times=2))

    events = await collect(dashscope_client, ask(protocol=protocol))
    completion = await dashscope_client.chat(ask(protocol=protocol))

    [usage] = [e for e in events if isinstance(e, Usage)]
    assert (usage.output_tokens, usage.reasoning_tokens) == (5, 3)
    assert completion.usage is not None and completion.usage.reasoning_tokens == 3


@pytest.mark.asyncio
async def test_usage_without_thinking_has_no_reasoning_tokens(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply="Plain."))
    [usage] = [e for e in await collect(dashscope_client, ask()) if isinstance(e, Usage)]
    assert usage.reasoning_tokens == 0


@pytest.mark.asyncio
async def test_thinking_mode_streams_reasoning(simulator, dashscope_client):
    events = await collect(dashscope_client, ask(parameters={"enable_thinking": True}))
    assert "I should answer briefly" in reasoning_of(events)
    assert text_of(events)


@pytest.mark.asyncio
async def test_non_incremental_stream_is_turned_into_deltas(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply=REPLY))

    events = await collect(dashscope_client, ask(parameters={"incremental_output": False}))

    assert simulator.requests[-1].body["parameters"]["incremental_output"] is False
    assert text_of(events) == REPLY
    assert events[-1].reason == "stop"


@pytest.mark.asyncio
@pytest.mark.parametrize("tokens_per_chunk", [1, 3])
async def test_frames_without_blank_lines_are_still_parsed(
    simulator, dashscope_client, tokens_per_chunk
):
    simulator.add_scenario(
        Scenario(reply=REPLY, framing="no_blank_lines", tokens_per_chunk=tokens_per_chunk)
    )

    events = await collect(dashscope_client, ask())

    assert text_of(events) == REPLY
    assert events[-1].reason == "stop"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_finish_reason_length_is_reported(simulator, dashscope_client, protocol):
    simulator.add_scenario(Scenario(reply=REPLY, finish_reason="length"))
    events = await collect(dashscope_client, ask(protocol=protocol))
    assert text_of(events) == REPLY
    assert events[-1].reason == "length"


@pytest.mark.asyncio
async def test_max_tokens_truncates_with_length(simulator, dashscope_client):
    events = await collect(dashscope_client, ask(parameters={"max_tokens": 5}))
    assert len([e for e in events if isinstance(e, TextDelta)]) == 5
    assert events[-1].reason == "length"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_stream_ending_without_finish_reason_is_truncated(
    simulator, dashscope_client, protocol
):
    simulator.add_scenario(Scenario(reply=REPLY, finish_reason="none"))

    events = await collect(dashscope_client, ask(protocol=protocol))

    assert text_of(events) == REPLY
    assert events[-1] == Finish(None, simulator.requests[-1].request_id)


# -- non-streaming -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_chat_returns_a_whole_completion(simulator, dashscope_client, protocol):
    simulator.add_scenario(Scenario(reply=REPLY))

    completion = await dashscope_client.chat(ask(protocol=protocol))

    seen = simulator.requests[-1]
    assert completion.text == REPLY
    assert completion.finish_reason == "stop"
    assert completion.request_id == seen.request_id
    assert completion.usage is not None and completion.usage.output_tokens > 0
    assert completion.partial_response is False
    assert "x-dashscope-sse" not in seen.headers
    if protocol == "compatible":
        assert seen.body["stream"] is False


@pytest.mark.asyncio
async def test_chat_joins_multimodal_content(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply=REPLY))
    request = ChatRequest(
        model="qwen-vl-max",
        endpoint="multimodal",
        messages=[ChatMessage("user", "What is it?", images=["data:image/png;base64,AAAA"])],
    )
    completion = await dashscope_client.chat(request)
    assert completion.text == REPLY


@pytest.mark.asyncio
async def test_chat_flags_a_partial_response(simulator, dashscope_client):
    simulator.add_scenario(Scenario(reply=REPLY, framing="partial_response"))

    completion = await dashscope_client.chat(ask())

    assert completion.partial_response is True
    assert completion.finish_reason is None
    assert REPLY.startswith(completion.text) and completion.text != REPLY


@pytest.mark.asyncio
async def test_chat_error_is_typed(simulator, dashscope_client):
    simulator.add_scenario(
        Scenario(error=ScenarioError(status=400, code="Arrearage", message="Access denied."))
    )
    with pytest.raises(BillingError) as caught:
        await dashscope_client.chat(ask())
    assert caught.value.request_id == simulator.requests[-1].request_id


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
                "properties": {"location": {"type": "string", "description": "A city."}},
                "required": ["location"],
            },
        },
    },
]
TIME_CALL = {
    "id": "call_time_1",
    "type": "function",
    "function": {"name": "get_current_time", "arguments": "{}"},
}
WEATHER_CALL = {
    "id": "call_weather_1",
    "type": "function",
    "function": {"name": "get_current_weather", "arguments": '{"location": "Tokyo"}'},
}


def after_tools(protocol: str) -> ChatRequest:
    """The request that hands two tool results back to the model."""
    return ChatRequest(
        model="qwen-plus",
        protocol=protocol,  # type: ignore[arg-type]
        messages=[
            ChatMessage("user", "What time is it and what is the weather in Tokyo?"),
            ChatMessage("assistant", "", tool_calls=[TIME_CALL, WEATHER_CALL]),
            ChatMessage("tool", "2026-05-01 18:00:00 Asia/Tokyo", tool_call_id="call_time_1"),
            ChatMessage("tool", "Tokyo is rainy today", tool_call_id="call_weather_1"),
        ],
        parameters={"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": True},
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_tool_turns_and_tools_are_sent_where_each_protocol_wants_them(
    simulator, dashscope_client, protocol
):
    await collect(dashscope_client, after_tools(protocol))

    body = simulator.requests[-1].body
    messages = body["input"]["messages"] if protocol == "native" else body["messages"]
    assert messages == [
        {"role": "user", "content": "What time is it and what is the weather in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [TIME_CALL, WEATHER_CALL]},
        {
            "role": "tool",
            "content": "2026-05-01 18:00:00 Asia/Tokyo",
            "tool_call_id": "call_time_1",
        },
        {"role": "tool", "content": "Tokyo is rainy today", "tool_call_id": "call_weather_1"},
    ]
    options = body["parameters"] if protocol == "native" else body
    assert options["tools"] == TOOLS
    assert options["tool_choice"] == "auto"
    assert options["parallel_tool_calls"] is True
    if protocol == "native":
        assert "tools" not in body
    else:
        assert "parameters" not in body


def named_calls(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_a_streamed_two_call_round_trip(simulator, dashscope_client, protocol):
    question = ChatMessage("user", "What time is it and what is the weather in Tokyo?")
    request = ChatRequest(
        model="qwen-plus",
        protocol=protocol,
        messages=[question],
        parameters={"tools": TOOLS, "parallel_tool_calls": True},
    )

    events = await collect(dashscope_client, request)

    fragments = [e for e in events if isinstance(e, ToolCallDelta)]
    # The arguments arrive in pieces: "{", "}" and '{"locati', 'on": "To', 'kyo"}'.
    assert [len([f for f in fragments if f.index == index]) for index in (0, 1)] == [2, 3]
    calls = ToolCallAccumulator(events).calls
    assert named_calls(calls) == [
        ("get_current_time", {}),
        ("get_current_weather", {"location": "Tokyo"}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert text_of(events) == ""
    assert events[-1].reason == "tool_calls"

    results = [
        ChatMessage("tool", "2026-05-01 18:00:00 Asia/Tokyo", tool_call_id=calls[0]["id"]),
        ChatMessage("tool", "Tokyo is rainy today", tool_call_id=calls[1]["id"]),
    ]
    assistant = ChatMessage("assistant", "", tool_calls=calls)
    answer = await collect(
        dashscope_client, replace(request, messages=[question, assistant, *results])
    )

    assert "**get_current_time**: 2026-05-01 18:00:00 Asia/Tokyo" in text_of(answer)
    assert "**get_current_weather**: Tokyo is rainy today" in text_of(answer)
    assert answer[-1].reason == "stop"
    assert not [e for e in answer if isinstance(e, ToolCallDelta)]


@pytest.mark.asyncio
async def test_a_non_incremental_stream_yields_each_argument_once(simulator, dashscope_client):
    request = ask(
        "What time is it and what is the weather in Tokyo?",
        parameters={"tools": TOOLS, "parallel_tool_calls": True, "incremental_output": False},
    )

    events = await collect(dashscope_client, request)

    assert named_calls(ToolCallAccumulator(events).calls) == [
        ("get_current_time", {}),
        ("get_current_weather", {"location": "Tokyo"}),
    ]
    assert events[-1].reason == "tool_calls"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_chat_returns_the_tool_calls(simulator, dashscope_client, protocol):
    request = ask("杭州天气怎么样？", protocol=protocol, parameters={"tools": TOOLS})

    completion = await dashscope_client.chat(request)

    assert completion.finish_reason == "tool_calls"
    assert completion.text == ""
    assert named_calls(completion.tool_calls) == [("get_current_weather", {"location": "杭州"})]
    assert completion.tool_calls[0]["id"].startswith("call_")
    plain = await dashscope_client.chat(ask("Hello"))
    assert plain.tool_calls == []


def test_tool_call_fragments_join_by_index():
    calls = ToolCallAccumulator(
        [
            ToolCallDelta(0, "call_a", "get_current_time", ""),
            TextDelta("not a tool call"),
            ToolCallDelta(1, "call_b", "get_current_weather", '{"loca'),
            ToolCallDelta(0, None, None, "{}"),
            ToolCallDelta(1, "", None, 'tion": '),
            ToolCallDelta(1, "call_later", "other_name", '"Tokyo"}'),
        ]
    )

    assert len(calls) == 2
    assert calls.calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_current_time", "arguments": "{}"},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": '{"location": "Tokyo"}'},
        },
    ]
    assert not ToolCallAccumulator()
    assert ToolCallAccumulator().add(Finish("stop", None)) is False


# -- errors ------------------------------------------------------------------------------------

ERROR_SHAPES = [
    # protocol, where, status, code, expected class, expected status
    ("native", "before_json", 400, "InvalidParameter", BadRequestError, 400),
    ("native", "before_sse", 400, "DataInspectionFailed", ModeratedError, 400),
    ("native", "first_event", 429, "Throttling.AllocationQuota", ThrottledError, 429),
    ("native", "json_200", 400, "Arrearage", BillingError, None),
    ("compatible", "before_json", 401, "invalid_api_key", AuthError, 401),
    ("compatible", "before_sse", 400, "data_inspection_failed", ModeratedError, 400),
    ("compatible", "first_event", 429, "Throttling.RateQuota", ThrottledError, 429),
    ("compatible", "json_200", 403, "AccessDenied", AuthError, None),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("protocol", "where", "status", "code", "error_class", "seen_status"), ERROR_SHAPES
)
async def test_every_error_shape_maps_to_its_class(
    simulator,
    dashscope_config,
    recorded_sleep,
    protocol,
    where,
    status,
    code,
    error_class,
    seen_status,
):
    simulator.add_scenario(
        Scenario(error=ScenarioError(status=status, code=code, message="Nope.", where=where))
    )
    async with client_for(dashscope_config, recorded_sleep, max_retries=0) as client:
        events, error = await collect_until_error(client, ask(protocol=protocol))

    assert events == []
    assert type(error) is error_class
    assert error.code == code
    assert error.status == seen_status
    assert error.message == "Nope."
    assert error.request_id == simulator.requests[-1].request_id


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_mid_stream_error_keeps_the_deltas_and_is_not_retried(
    simulator, dashscope_client, recorded_sleep, protocol
):
    simulator.add_scenario(
        Scenario(
            reply=REPLY,
            error=ScenarioError(
                status=500,
                code="InternalError",
                message="Oops.",
                where="mid_stream",
                after_chunks=3,
            ),
        )
    )

    events, error = await collect_until_error(dashscope_client, ask(protocol=protocol))

    assert text_of(events) == "".join(tokenize(REPLY)[:3])
    assert isinstance(error, ServerError) and error.retryable
    assert error.code == "InternalError"
    assert error.request_id == simulator.requests[-1].request_id
    assert len(simulator.requests) == 1
    assert recorded_sleep.delays == []


@pytest.mark.asyncio
async def test_output_moderation_mid_stream_is_moderated_error(simulator, dashscope_client):
    simulator.add_scenario(
        Scenario(
            error=ScenarioError(
                status=400,
                code="DataInspectionFailed",
                message="Output data may contain inappropriate content.",
                where="mid_stream",
                after_chunks=2,
            )
        )
    )
    events, error = await collect_until_error(dashscope_client, ask())
    assert len(events) == 2
    assert isinstance(error, ModeratedError) and error.status == 400


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("protocol", "code"), [("native", "InvalidApiKey"), ("compatible", "invalid_api_key")]
)
async def test_wrong_key_is_auth_error_and_never_shown(
    simulator, dashscope_config, recorded_sleep, protocol, code
):
    wrong_key = "sk-wrong-secret-key-987654321"
    async with client_for(dashscope_config, recorded_sleep, api_key=wrong_key) as client:
        with pytest.raises(AuthError) as caught:
            await collect(client, ask(protocol=protocol))

    error = caught.value
    assert error.status == 401 and error.code == code and not error.retryable
    assert error.request_id == simulator.requests[-1].request_id
    assert len(simulator.requests) == 1
    for text in (str(error), repr(error), error.message, repr(client), repr(dashscope_config)):
        assert wrong_key not in text and SIMULATOR_API_KEY not in text


@pytest.mark.asyncio
async def test_api_key_echoed_by_the_server_is_redacted(simulator, dashscope_client):
    simulator.add_scenario(
        Scenario(
            error=ScenarioError(
                status=401, code="InvalidApiKey", message=f"Bad key {SIMULATOR_API_KEY}."
            )
        )
    )
    with pytest.raises(AuthError) as caught:
        await collect(dashscope_client, ask())
    assert SIMULATOR_API_KEY not in str(caught.value)
    assert "Bad key sk-***." in str(caught.value)


def _leaks(key: str, *things: object) -> list[str]:
    return [repr(thing) for thing in things if key in repr(thing) or key in str(thing)]


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_key_echoed_into_request_ids_errors_and_reply_never_comes_out(
    simulator, dashscope_client, dashscope_config, recorded_sleep, protocol
):
    """An upstream that echoes the Authorization header into the request id (body and
    x-request-id), the error's code and message and the reply: the key comes out of no event,
    no error and no completion; the echo itself does, redacted."""
    simulator.add_scenario(Scenario(match="talk", times=2, echo_authorization=True))
    simulator.add_scenario(
        Scenario(match="fail", echo_authorization=True, reply="one two three four",
                 error=ScenarioError(status=400, code="InvalidParameter", where="mid_stream",
                                     after_chunks=2))
    )  # fmt: skip
    simulator.add_scenario(
        Scenario(match="refuse", echo_authorization=True,
                 error=ScenarioError(status=400, code="InvalidParameter"))
    )  # fmt: skip
    simulator.add_scenario(Scenario(match="drop", echo_authorization=True, drop_after_chunks=1))

    events = await collect(dashscope_client, ask("talk", protocol=protocol))
    completion = await dashscope_client.chat(ask("talk", protocol=protocol))
    streamed, mid_stream = await collect_until_error(
        dashscope_client, ask("fail", protocol=protocol)
    )
    with pytest.raises(BadRequestError) as refused:
        await collect(dashscope_client, ask("refuse", protocol=protocol))
    # A cut connection: its error's request id can only come from the x-request-id header.
    async with client_for(dashscope_config, recorded_sleep, max_retries=0) as client:
        dropped, cut = await collect_until_error(client, ask("drop", protocol=protocol))

    errors = [mid_stream, refused.value, cut]
    assert isinstance(cut, TransportError)
    everything = [*events, completion, *streamed, *dropped]
    for error in errors:
        everything += [error, error.code, error.message, error.request_id]
    assert _leaks(SIMULATOR_API_KEY, *everything) == []
    # The echoes did come back, with the key taken out.
    assert "Bearer sk-***" in text_of(events) and "Bearer sk-***" in completion.text
    assert isinstance(events[-1], Finish) and "sk-***" in (events[-1].request_id or "")
    assert "sk-***" in (completion.request_id or "")
    for error in errors:
        assert "sk-***" in (error.request_id or ""), repr(error)
    for error in errors[:2]:
        assert "sk-***" in (error.code or "") and "sk-***" in error.message, repr(error)


@pytest.mark.asyncio
async def test_metadata_loses_anything_shaped_like_a_key_but_the_reply_keeps_examples(
    simulator, dashscope_client
):
    """Request ids, codes, messages and finish reasons lose every `sk-…`, not only ours (a
    proxy may echo another key); the reply keeps the `sk-…` examples a model writes, and loses
    only the configured key."""
    other = "sk-someone-elses-key-42"
    example = "sk-xxxxxxxxxxxx"
    simulator.add_scenario(
        Scenario(
            match="explain",
            reply=f"A key looks like {example}; yours is {SIMULATOR_API_KEY}.",
            finish_reason=f"stop:{other}",
        )
    )
    simulator.add_scenario(
        Scenario(match="fail", error=ScenarioError(
            status=400, code=f"InvalidParameter.{other}", message=f"Key {other} is not allowed."))
    )  # fmt: skip

    events = await collect(dashscope_client, ask("explain"))
    with pytest.raises(DashScopeError) as caught:
        await collect(dashscope_client, ask("fail"))

    assert text_of(events) == f"A key looks like {example}; yours is sk-***."
    assert events[-1] == Finish("stop:sk-***", simulator.requests[0].request_id)
    error = caught.value
    assert error.code == "InvalidParameter.sk-***"
    assert error.message == "Key sk-*** is not allowed."


def test_a_key_split_over_two_chunks_is_still_redacted():
    """The reply cleaner holds back a chunk's end that could be the start of the key."""
    key = SIMULATOR_API_KEY
    cleaner = OutputCleaner(key)
    pieces = ["Your key: ", key[:5], key[5:12], key[12:] + " and ", "s", "k-x"]
    out = [cleaner.feed(piece) for piece in pieces] + [cleaner.flush()]
    assert "".join(out) == "Your key: sk-*** and sk-x"
    assert all(key[:5] not in piece for piece in out[:3])


def test_what_is_held_back_is_the_longest_end_that_could_begin_the_key():
    """Against the plain definition, over random texts and keys of a small alphabet (keys
    with repeated characters: "sks-ss" begins again inside itself)."""
    rng = random.Random(7)
    for _ in range(3000):
        key = "".join(rng.choice("sk-") for _ in range(rng.randint(1, 8)))
        text = "".join(rng.choice("sk-x") for _ in range(rng.randint(0, 12)))
        expected = next(
            (n for n in range(min(len(key) - 1, len(text)), 0, -1) if text.endswith(key[:n])),
            0,
        )
        assert _longest_key_prefix_at_end(text, key) == expected, (text, key)


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_control_characters_from_the_upstream_are_stripped(
    simulator, dashscope_client, protocol
):
    """NUL and the other invisible C0 controls never come out of the client (PostgreSQL
    refuses NUL in text: the reply's checkpoints and final save would fail); tab, newline and
    carriage return are text and stay."""
    simulator.add_scenario(
        Scenario(
            reply="a\x00b\tc\r\nd\x1be\x7f",
            reasoning="think\x00ing",
            finish_reason="stop\x00",
            times=2,
        )
    )
    simulator.add_scenario(
        Scenario(match="fail", error=ScenarioError(status=400, code="Invalid\x00Parameter",
                                                   message="bad\x00 input"))
    )  # fmt: skip
    parameters = {"enable_thinking": True}
    events = await collect(dashscope_client, ask(protocol=protocol, parameters=parameters))
    completion = await dashscope_client.chat(ask(protocol=protocol))
    with pytest.raises(BadRequestError) as caught:
        await collect(dashscope_client, ask("fail", protocol=protocol))

    assert text_of(events) == completion.text == "ab\tc\r\nde\x7f"
    assert reasoning_of(events) == "thinking"
    assert events[-1].reason == completion.finish_reason == "stop"
    assert (caught.value.code, caught.value.message) == ("InvalidParameter", "bad input")


# -- the chat's parameters: JSON mode, web sources, stop texts, thinking budget, ranges -------

SEARCH = {"enable_search": True, "search_options": {"enable_source": True}}


def sources_of(events: list[StreamEvent]) -> list[SearchResults]:
    return [e for e in events if isinstance(e, SearchResults)]


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_json_mode_without_the_word_json_is_refused_with_a_sentence(
    simulator, dashscope_client, recorded_sleep, protocol
):
    request = ask(
        "List three fruits.",
        protocol=protocol,
        parameters={"response_format": {"type": "json_object"}},
    )

    with pytest.raises(BadRequestError) as caught:
        await collect(dashscope_client, request)

    assert caught.value.status == 400
    assert caught.value.message == (
        "'messages' must contain the word 'json' in some form, to use 'response_format' of "
        "type 'json_object'."
    )
    assert len(simulator.requests) == 1 and recorded_sleep.delays == [], "never retried"
    _, sentence = describe_error(caught.value)
    assert sentence.startswith(
        "DashScope rejected the request: 'messages' must contain the word 'json'"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_a_json_mode_reply_parses_as_json(dashscope_client, protocol):
    request = ask(
        "Name three fruits as JSON",
        protocol=protocol,
        parameters={"response_format": {"type": "json_object"}},
    )

    events = await collect(dashscope_client, request)
    completion = await dashscope_client.chat(request)

    assert len([e for e in events if isinstance(e, TextDelta)]) > 5, "streamed in pieces"
    streamed = json.loads(text_of(events))
    assert streamed == json.loads(completion.text)
    assert streamed["topic"] == "Name three fruits as JSON"
    assert events[-1].reason == "stop"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_web_sources_are_yielded_once_before_the_text(dashscope_client, protocol):
    question = "What is new in Python?"

    events = await collect(dashscope_client, ask(question, protocol=protocol, parameters=SEARCH))

    (sources,) = sources_of(events)
    assert events.index(sources) < next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    expected = [
        {key: result[key] for key in ("index", "title", "url", "site_name")}
        for result in compose_search_results(question)
    ]
    assert sources.results == expected, "no icon, nothing else"
    assert all(r["url"].startswith("https://") for r in sources.results)
    assert text_of(events), "the answer still comes"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_unsafe_sources_are_cleaned(dashscope_client, protocol):
    request = ask("Search, and show unsafe sources", protocol=protocol, parameters=SEARCH)

    (sources,) = sources_of(await collect(dashscope_client, request))
    completion = await dashscope_client.chat(request)

    safe, hostile = sources.results
    assert safe["url"].startswith("https://")
    assert hostile == {
        "index": 2,
        "title": "Example <script>alert(1)</script>",  # plain text: the page escapes it
        "url": "",  # javascript: is never a link
        "site_name": "Evil Site",  # the control character is gone
    }
    assert completion.search_results == sources.results


@pytest.mark.asyncio
async def test_no_sources_without_enable_source(dashscope_client):
    events = await collect(dashscope_client, ask(parameters={"enable_search": True}))
    completion = await dashscope_client.chat(ask(parameters={"enable_search": True}))
    assert sources_of(events) == [] and completion.search_results == []


def test_search_results_are_cleaned_and_capped():
    key = SIMULATOR_API_KEY
    raw = [
        {"index": True, "title": " A\n\ttitle\x00 ", "url": " https://example.com/a ", "icon": "x"},
        {"title": "t" * 500, "url": "https://example.com/" + "p" * 3000},
        {"title": "data", "url": "data:text/html,<script>alert(1)</script>"},
        {"title": "spaces", "url": "https://exa mple.com/"},
        {"title": "no host", "url": "https:///path"},
        {"title": "", "url": "javascript:alert(1)"},
        {"title": f"leak {key}", "url": f"https://example.com/?k={key}", "site_name": 5},
        "not a result",
        *({"index": i, "title": f"r{i}", "url": f"http://example.org/{i}"} for i in range(30)),
    ]

    results = clean_search_results(raw, key)

    assert len(results) == 20
    assert results[0] == {
        "index": None, "title": "A title", "url": "https://example.com/a", "site_name": "",
    }  # fmt: skip
    assert len(results[1]["title"]) == 300 and results[1]["url"] == ""
    assert [r["url"] for r in results[2:5]] == ["", "", ""]
    assert results[5] == {"index": None, "title": "leak sk-***", "url": "", "site_name": ""}
    assert results[6] == {"index": 0, "title": "r0", "url": "http://example.org/0", "site_name": ""}
    assert clean_search_results({"not": "a list"}, key) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_the_reply_stops_before_a_stop_text(simulator, dashscope_client, protocol):
    simulator.add_scenario(Scenario(reply="First line.\nUser: and more", times=2))
    request = ask(protocol=protocol, parameters={"stop": ["\nUser:"]})

    events = await collect(dashscope_client, request)
    completion = await dashscope_client.chat(request)

    assert text_of(events) == completion.text == "First line."
    assert events[-1].reason == completion.finish_reason == "stop"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_the_thinking_budget_caps_the_reasoning(simulator, dashscope_client, protocol):
    simulator.add_scenario(Scenario(reasoning="one two three four five six", reply="Done."))
    parameters = {"enable_thinking": True, "thinking_budget": 3}

    events = await collect(dashscope_client, ask(protocol=protocol, parameters=parameters))

    assert reasoning_of(events) == "one two three "
    assert text_of(events) == "Done."


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 2.0}, "Temperature should be in [0.0, 2.0)"),
        ({"top_p": 0}, "Range of top_p should be (0.0, 1.0]"),
        ({"top_k": -1}, "Parameter top_k be greater than or equal to 0"),
        ({"presence_penalty": -2.5}, "Presence_penalty should be in [-2.0, 2.0]"),
        ({"repetition_penalty": 0}, "Repetition_penalty should be greater than 0.0"),
        ({"max_tokens": 0}, "Range of max_tokens should be [1, 32768]"),
        ({"max_tokens": 40_000}, "Range of max_tokens should be [1, 32768]"),
        ({"seed": -1}, "Range of seed should be [0, 9223372036854775807]"),
        (
            {"enable_thinking": True, "thinking_budget": 0},
            "The thinking_budget parameter must be a positive integer and not greater than "
            f"{MAX_THINKING_BUDGET}",
        ),
    ],
)
async def test_an_out_of_range_parameter_is_a_bad_request_with_a_sentence(
    simulator, dashscope_client, recorded_sleep, protocol, parameters, message
):
    with pytest.raises(BadRequestError) as caught:
        await collect(dashscope_client, ask(protocol=protocol, parameters=parameters))

    error = caught.value
    assert (error.status, error.message, error.retryable) == (400, message, False)
    assert error.code == ("InvalidParameter" if protocol == "native" else "invalid_parameter_error")
    assert len(simulator.requests) == 1 and recorded_sleep.delays == []
    code, sentence = describe_error(error)
    assert code == error.code
    assert sentence == (
        f"DashScope rejected the request: {message}. An administrator may need to fix the "
        "model's settings."
    )


# -- retries -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_throttled_admission_is_retried_until_it_succeeds(
    simulator, dashscope_client, recorded_sleep
):
    simulator.add_scenario(
        Scenario(
            times=2,
            error=ScenarioError(
                status=429,
                code="Throttling.AllocationQuota",
                message="Slow down.",
                where="first_event",
            ),
        )
    )
    simulator.add_scenario(Scenario(reply=REPLY))

    events = await collect(dashscope_client, ask())

    assert text_of(events) == REPLY
    assert len(simulator.requests) == 3
    assert outcomes(simulator) == ["error", "error", "completed"]
    first, second = recorded_sleep.delays
    assert 0.5 <= first <= 0.625
    assert 1.0 <= second <= 1.25


@pytest.mark.asyncio
@pytest.mark.parametrize(("retry_after", "expected"), [(3, 3.0), (0.25, 0.25), (30, 8.0)])
async def test_retry_after_header_is_honoured_and_capped(
    simulator, dashscope_client, recorded_sleep, retry_after, expected
):
    simulator.add_scenario(
        Scenario(error=ScenarioError(status=429, code="Throttling", retry_after=retry_after))
    )

    events = await collect(dashscope_client, ask())

    assert events[-1].reason == "stop"
    assert recorded_sleep.delays == [expected]


@pytest.mark.asyncio
async def test_gives_up_after_max_retries(simulator, dashscope_client, recorded_sleep):
    simulator.add_scenario(Scenario(times=-1, error=ScenarioError(status=429, code="Throttling")))

    with pytest.raises(ThrottledError) as caught:
        await collect(dashscope_client, ask())

    assert caught.value.status == 429
    assert len(simulator.requests) == 3
    assert len(recorded_sleep.delays) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "error_class"),
    [
        (ScenarioError(status=400, code="InvalidParameter", message="Bad."), BadRequestError),
        (
            ScenarioError(
                status=429,
                code="Throttling.AllocationQuota",
                message="Free allocated quota exceeded.",
            ),
            BillingError,
        ),
        (ScenarioError(status=400, code="DataInspectionFailed", message="No."), ModeratedError),
    ],
)
async def test_non_retryable_errors_are_raised_at_once(
    simulator, dashscope_client, recorded_sleep, error, error_class
):
    simulator.add_scenario(Scenario(times=-1, error=error))
    with pytest.raises(error_class):
        await collect(dashscope_client, ask())
    assert len(simulator.requests) == 1
    assert recorded_sleep.delays == []


@pytest.mark.asyncio
async def test_chat_is_retried_like_stream_admission(simulator, dashscope_client, recorded_sleep):
    simulator.add_scenario(
        Scenario(times=2, error=ScenarioError(status=503, code="ServiceUnavailable"))
    )
    completion = await dashscope_client.chat(ask())
    assert completion.finish_reason == "stop"
    assert len(simulator.requests) == 3 and len(recorded_sleep.delays) == 2


@pytest.mark.asyncio
async def test_a_native_stream_is_finished_at_its_last_event_not_at_its_end(
    simulator, dashscope_client
):
    """A native stream's last event carries the finish reason: the reply is whole then, and
    Finish (with the usage before it) comes at once, while the body is still read to its end
    (which a proxy may hold open), so that the connection is kept."""
    simulator.add_scenario(Scenario(reply=REPLY, hold_open_seconds=0.6))
    loop = asyncio.get_running_loop()
    began = loop.time()
    seen = []
    async for event in dashscope_client.stream_chat(ask()):
        seen.append((loop.time() - began, event))
    ended = loop.time() - began
    events = [event for _at, event in seen]
    assert text_of(events) == REPLY
    assert isinstance(events[-2], Usage) and events[-2].output_tokens > 0
    assert isinstance(events[-1], Finish) and events[-1].reason == "stop"
    assert seen[-1][0] < 0.4 < 0.6 <= ended
    assert outcomes(simulator) == ["completed"]


@pytest.mark.asyncio
async def test_a_stream_held_open_after_its_last_event_costs_only_the_connection(
    simulator, dashscope_client, monkeypatch
):
    """Past FINISHED_BODY_WAIT the rest of the body is given up: the stream ends, without an
    error, its events as they were; the connection is closed."""
    monkeypatch.setattr(client_module, "FINISHED_BODY_WAIT", 0.3)
    simulator.add_scenario(Scenario(reply=REPLY, hold_open_seconds=5))
    loop = asyncio.get_running_loop()
    began = loop.time()
    events = await collect(dashscope_client, ask())
    assert loop.time() - began < 2
    assert text_of(events) == REPLY
    assert [type(e) for e in events[-2:]] == [Usage, Finish]
    assert outcomes(simulator) == ["disconnected"]


# -- transport failures ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stalled_stream_times_out_after_deltas(simulator, dashscope_config, recorded_sleep):
    simulator.add_scenario(Scenario(reply=REPLY, stall_after_chunks=2, stall_seconds=10))

    async with client_for(dashscope_config, recorded_sleep, stall_timeout=0.5) as client:
        events, error = await collect_until_error(client, ask())

    assert len(events) == 2
    assert isinstance(error, DashScopeTimeoutError)
    assert error.request_id == simulator.requests[-1].request_id
    assert len(simulator.requests) == 1 and recorded_sleep.delays == []
    assert simulator.wait_for_outcome() == "disconnected"


@pytest.mark.asyncio
async def test_stall_before_the_first_delta_is_retried(simulator, dashscope_config, recorded_sleep):
    simulator.add_scenario(Scenario(stall_after_chunks=0, stall_seconds=10))
    simulator.add_scenario(Scenario(reply=REPLY))

    async with client_for(dashscope_config, recorded_sleep, stall_timeout=0.5) as client:
        events = await collect(client, ask())

    assert text_of(events) == REPLY
    assert len(simulator.requests) == 2 and len(recorded_sleep.delays) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_connection_dropped_mid_stream_is_transport_error(
    simulator, dashscope_client, recorded_sleep, protocol
):
    simulator.add_scenario(Scenario(reply=REPLY, drop_after_chunks=3))

    events, error = await collect_until_error(dashscope_client, ask(protocol=protocol))

    assert len([e for e in events if isinstance(e, TextDelta)]) == 3
    assert not any(isinstance(e, Finish) for e in events)
    assert isinstance(error, TransportError)
    assert len(simulator.requests) == 1 and recorded_sleep.delays == []
    assert outcomes(simulator)[-1] == "dropped"


@pytest.mark.asyncio
async def test_connection_dropped_before_any_delta_is_retried(
    simulator, dashscope_client, recorded_sleep
):
    simulator.add_scenario(Scenario(drop_after_chunks=0))
    simulator.add_scenario(Scenario(reply=REPLY))

    events = await collect(dashscope_client, ask())

    assert text_of(events) == REPLY
    assert outcomes(simulator) == ["dropped", "completed"]


@pytest.mark.asyncio
async def test_connection_refused_is_transport_error(recorded_sleep):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = DashScopeConfig.from_values(
        api_key=SIMULATOR_API_KEY, base_url=f"http://127.0.0.1:{port}/api/v1"
    )
    async with DashScopeClient(config, sleep=recorded_sleep) as client:
        with pytest.raises(TransportError) as caught:
            await collect(client, ask())
    assert caught.value.retryable
    assert len(recorded_sleep.delays) == 2
    assert SIMULATOR_API_KEY not in str(caught.value)


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_closing_the_stream_early_disconnects_upstream(simulator, dashscope_client):
    simulator.add_scenario(Scenario(tokens=400, token_delay=0.01))

    stream = dashscope_client.stream_chat(ask())
    received = [await anext(stream) for _ in range(3)]
    await stream.aclose()

    assert all(isinstance(e, TextDelta) for e in received)
    assert simulator.wait_for_outcome(timeout=3) == "disconnected"
    assert simulator.simulator.disconnected_streams == 1


@pytest.mark.asyncio
async def test_cancelling_the_task_disconnects_upstream(simulator, dashscope_client):
    simulator.add_scenario(Scenario(tokens=400, token_delay=0.01))
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for event in dashscope_client.stream_chat(ask()):
            if isinstance(event, TextDelta):
                first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert simulator.wait_for_outcome(timeout=3) == "disconnected"


@pytest.mark.asyncio
async def test_shared_http_client_is_left_open(simulator, dashscope_config):
    async with httpx.AsyncClient() as http:
        client = DashScopeClient(dashscope_config, http=http)
        simulator.add_scenario(Scenario(reply="Hi."))
        events = await collect(client, ask())
        await client.aclose()
        assert text_of(events) == "Hi."
        assert not http.is_closed


# -- configuration and classification ---------------------------------------------------------


def test_region_picks_the_public_host():
    intl = DashScopeConfig.from_values(api_key="sk-x")
    cn = DashScopeConfig.from_values(api_key="sk-x", region="cn")
    assert intl.native_base_url == "https://dashscope-intl.aliyuncs.com/api/v1"
    assert intl.compatible_base_url == "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
    assert cn.native_base_url == "https://dashscope.aliyuncs.com/api/v1"
    assert cn.compatible_base_url == "https://dashscope.aliyuncs.com/compatible-mode/v1"


def test_unknown_region_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown DashScope region 'mars'.*cn, intl"):
        DashScopeConfig.from_values(api_key="sk-x", region="mars")


def test_base_url_overrides_region_and_derives_compatible_url():
    config = DashScopeConfig.from_values(
        api_key="sk-x", region="cn", base_url="http://127.0.0.1:9000/api/v1/", stall_timeout=3
    )
    assert config.native_base_url == "http://127.0.0.1:9000/api/v1"
    assert config.compatible_base_url == "http://127.0.0.1:9000/compatible-mode/v1"
    assert config.stall_timeout == 3


def test_explicit_compatible_url_wins():
    config = DashScopeConfig.from_values(
        api_key="sk-x", compatible_base_url="https://proxy.example/compatible-mode/v1"
    )
    assert config.native_base_url == "https://dashscope-intl.aliyuncs.com/api/v1"
    assert config.compatible_base_url == "https://proxy.example/compatible-mode/v1"


def test_compatible_base_needs_a_native_base():
    assert compatible_base_from_native("https://h/x/api/v1") == "https://h/x/compatible-mode/v1"
    with pytest.raises(ValueError, match="must end with '/api/v1'"):
        compatible_base_from_native("https://h/v1")


def test_config_hides_the_key_and_rejects_an_empty_one():
    assert "sk-secret" not in repr(DashScopeConfig.from_values(api_key="sk-secret"))
    with pytest.raises(ValueError, match="API key is empty"):
        DashScopeConfig.from_values(api_key="")


def test_config_takes_a_key_from_a_secret_file_and_refuses_a_mangled_one():
    # A secret file's trailing newline is not part of the key.
    assert DashScopeConfig.from_values(api_key="sk-secret\n").api_key == "sk-secret"
    with pytest.raises(ValueError, match="spaces or control characters") as refused:
        DashScopeConfig.from_values(api_key="sk-sec ret")
    assert "sk-sec" not in str(refused.value)


@pytest.mark.parametrize(
    ("status", "code", "message", "error_class", "retryable"),
    [
        (401, "InvalidApiKey", "Invalid API-key provided.", AuthError, False),
        (403, "AccessDenied.Unpurchased", "No.", AuthError, False),
        (403, "Model.AccessDenied", "No.", AuthError, False),
        (429, "Throttling.RateQuota", "Slow down.", ThrottledError, True),
        (429, "limit_burst_rate", "Slow down.", ThrottledError, True),
        (429, "Throttling.AllocationQuota", "Free allocated quota exceeded.", BillingError, False),
        (429, "PrepaidBillOverdue", "Pay.", BillingError, False),
        (403, "AllocationQuota.FreeTierOnly", "Free tier only.", BillingError, False),
        (400, "Arrearage", "Access denied, account not in good standing.", BillingError, False),
        (400, "DataInspectionFailed", "Bad content.", ModeratedError, False),
        (400, "FaqRuleBlocked", "Blocked.", ModeratedError, False),
        (400, "InvalidParameter", "url error, check url!", BadRequestError, False),
        (404, "model_not_found", "Model not exist.", BadRequestError, False),
        (413, "BadRequest.TooLarge", "Too large.", BadRequestError, False),
        (
            400,
            "InternalError.Algo.InvalidParameter",
            "Range of input length",
            BadRequestError,
            False,
        ),
        (500, "InternalError.Algo", "list index out of range", ServerError, False),
        (500, "InternalError", "Oops.", ServerError, True),
        (503, "ModelUnavailable", "Busy.", ServerError, True),
        (500, "RequestTimeOut", "Timed out.", DashScopeTimeoutError, True),
        (504, None, "Gateway timeout.", DashScopeTimeoutError, True),
        (502, None, "Bad gateway.", ServerError, True),
        (429, "SomethingNew", "?", ThrottledError, True),
        (None, None, "?", DashScopeError, False),
    ],
)
def test_classify_uses_code_first_then_status(status, code, message, error_class, retryable):
    error = classify(status, code, message, "req-1")
    assert type(error) is error_class
    assert error.retryable is retryable
    assert (error.status, error.code, error.message, error.request_id) == (
        status,
        code,
        message,
        "req-1",
    )


def test_sse_parser_tolerates_dashscope_quirks():
    raw = (
        'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"a":1}\n'
        'id:2\nevent:error\n:HTTP_STATUS/429\ndata: {"code":"Throttling"}\n\n'
        ": keep-alive\n"
        'data: {"b":\ndata: 2}\n\n'
        'data:{"c":3}\ndata:{"d":4}\n\n'
        "data: [DONE]\n\n"
    )
    frames = parse_frames(raw)
    assert [(f.event, f.status, f.payloads()) for f in frames] == [
        ("result", 200, [{"a": 1}]),
        ("error", 429, [{"code": "Throttling"}]),
        ("", None, [{"b": 2}]),
        ("", None, [{"c": 3}]),
        ("", None, [{"d": 4}]),
        ("", None, ["[DONE]"]),
    ]


# -- the model list ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_list_models_reads_every_page_of_the_native_list(simulator, dashscope_client):
    many = [f"sim-model-{n:03}" for n in range(230)]
    simulator.listed_models = many
    assert await dashscope_client.list_models() == many
    pages = [r for r in simulator.requests if r.path == "/api/v1/models"]
    assert [dict(p.split("=") for p in r.query.split("&"))["page_no"] for r in pages] == [
        "1", "2", "3",
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_list_models_of_the_simulator(simulator, dashscope_client):
    names = await dashscope_client.list_models()
    assert "qwen-plus" in names and "qwen3-vl-plus" in names


@pytest.mark.asyncio
async def test_list_models_with_a_wrong_key_raises_an_auth_error(simulator, dashscope_config):
    async with DashScopeClient(replace(dashscope_config, api_key="sk-wrong")) as client:
        with pytest.raises(AuthError) as raised:
            await client.list_models()
    assert raised.value.status == 401 and "sk-wrong" not in str(raised.value)


@pytest.mark.asyncio
async def test_list_models_when_dashscope_cannot_be_reached(dashscope_config, recorded_sleep):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = replace(
        dashscope_config,
        native_base_url=f"http://127.0.0.1:{port}/api/v1",
        max_retries=1,
    )
    async with DashScopeClient(config, sleep=recorded_sleep) as client:
        with pytest.raises(TransportError):
            await client.list_models()
    assert len(recorded_sleep.delays) == 1  # retried once, like any request
