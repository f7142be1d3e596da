"""Function calling in a reply (conversations/replies/generation.py, prompt.py, tools.py): the
docs' loop over the real socket, against the simulator, in both protocols.

The simulator calls get_current_time for a question about the time and get_current_weather
for one about the weather, streaming the arguments in pieces; "loop forever" calls a tool on
every round (dashscope_simulator/server.py's docstring).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from conversations.models import Message, ModelProfile
from tests.ws_support import (
    Transcript,
    assistant_reply,
    open_chat,
    receive_until,
    send_frame,
    wait_for_status,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def failing_weather(location: str) -> str:
    raise RuntimeError(f"the weather service for {location} is down")


def slow_weather(location: str) -> str:
    time.sleep(3)
    return f"{location}: sunny (slowly)"


def turns(request) -> list[dict]:
    body = request.body
    return body["input"]["messages"] if "input" in body else body["messages"]


async def ask(question: str, *, protocol: str = "native", within: float = 15):
    """alice asks on qwen-plus (tools on) in `protocol`; returns the socket, its transcript,
    the finished reply and the conversation."""
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(protocol=protocol)
    _owner, conversation, ws = await open_chat()
    await ws.send_to(text_data=send_frame(question))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "streaming" in t.status.values())
    reply = await assistant_reply(conversation)
    reply = await wait_for_status(reply.pk, {"complete", "error", "stopped"}, within=within)
    await receive_until(ws, transcript, lambda t: t.status.get(reply.pk) == reply.status)
    return ws, transcript, reply, conversation


async def test_what_time_is_it_calls_the_time_tool_and_answers_with_its_result(app_simulator):
    ws, transcript, reply, conversation = await ask("What time is it in Tokyo?")
    assert reply.status == "complete" and reply.finish_reason == "stop"
    [step] = reply.tool_steps
    [call] = step["calls"]
    assert call["function"]["name"] == "get_current_time"
    [result] = step["results"]
    assert result["tool_call_id"] == call["id"] and re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", result["content"]
    )
    assert result["content"] in reply.content, "the result reached the model"
    # Two requests: the question, then the question with the call and its result.
    first, second = app_simulator.requests
    assert [t["function"]["name"] for t in first.body["parameters"]["tools"]] == [
        "get_current_time", "get_current_weather",
    ]  # fmt: skip
    assert turns(second)[-2:] == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result["content"], "tool_call_id": call["id"]},
    ]
    # The page showed the step while the reply ran, and shows it after, folded.
    assert any(
        'data-tool-call="get_current_time"' in f and "running" in f for f in transcript.frames
    )
    final = [f for f in transcript.frames if f'id="message-{reply.pk}"' in f][-1]
    assert 'data-tool-call="get_current_time"' in final and result["content"] in final
    assert reply.input_tokens and reply.output_tokens  # both rounds counted
    await ws.disconnect()


@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_two_calls_in_one_turn_with_arguments_in_pieces(app_simulator, protocol):
    ws, _transcript, reply, _conversation = await ask(
        "What time is it and what is the weather in Tokyo?", protocol=protocol
    )
    assert reply.status == "complete"
    [step] = reply.tool_steps
    names = [call["function"]["name"] for call in step["calls"]]
    assert names == ["get_current_time", "get_current_weather"]
    assert json.loads(step["calls"][1]["function"]["arguments"]) == {"location": "Tokyo"}
    weather = step["results"][1]["content"]
    assert "example data" in weather and "Tokyo is rainy today" in weather
    assert weather in reply.content
    assert len(app_simulator.requests) == 2
    await ws.disconnect()


async def test_a_tool_that_raises_becomes_a_result_the_model_answers(app_simulator, settings):
    settings.QWENWEB_WEATHER_PROVIDER = "tests.test_tool_calls.failing_weather"
    ws, _transcript, reply, _conversation = await ask("What is the weather in Hangzhou?")
    assert reply.status == "complete"
    [result] = reply.tool_steps[0]["results"]
    assert result["content"] == "Error: RuntimeError: the weather service for Hangzhou is down"
    assert result["content"] in reply.content
    await ws.disconnect()


async def test_five_rounds_of_calls_at_most_then_a_sentence(app_simulator):
    ws, transcript, reply, _conversation = await ask("Please loop forever on the time")
    assert reply.status == "error" and reply.error_code == "ToolRoundsExceeded"
    assert "after 5 rounds" in reply.error_message
    assert len(reply.tool_steps) == 5 and all(s["results"] for s in reply.tool_steps)
    assert len(app_simulator.requests) == 6, "five rounds answered, the sixth ask refused"
    final = [f for f in transcript.frames if f'id="message-{reply.pk}"' in f][-1]
    assert "after 5 rounds" in final and 'data-action="regenerate"' in final
    await ws.disconnect()


async def test_stop_in_the_middle_of_a_tool_call(app_simulator, settings):
    settings.QWENWEB_WEATHER_PROVIDER = "tests.test_tool_calls.slow_weather"
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(protocol="native")
    _owner, conversation, ws = await open_chat()
    await ws.send_to(text_data=send_frame("What is the weather in Hangzhou?"))
    transcript = Transcript()
    await receive_until(
        ws,
        transcript,
        lambda t: any("running" in f and "data-tool-call" in f for f in t.frames[-1:]),
    )
    started = time.monotonic()
    await ws.send_to(text_data='{"type": "stop"}')
    await receive_until(ws, transcript, lambda t: "stopped" in t.status.values())
    assert time.monotonic() - started < 2, "Stop does not wait for the tool"
    reply = await wait_for_status((await assistant_reply(conversation)).pk, {"stopped"})
    [step] = reply.tool_steps
    assert step["calls"] and not step["results"], "the call is kept; it had no result"
    assert len(app_simulator.requests) == 1
    # The next turn leaves the unanswered call out (a call without its result is refused).
    await asyncio.sleep(0.1)
    await ws.send_to(text_data=send_frame("never mind, hello"))
    await receive_until(ws, transcript, lambda t: list(t.status.values()).count("complete") >= 1)
    assert not any(t["role"] == "tool" for t in turns(app_simulator.requests[-1]))
    await ws.disconnect()


async def test_later_turns_send_the_tool_steps_back_as_the_docs_show(app_simulator):
    ws, transcript, reply, conversation = await ask("What time is it?")
    [step] = reply.tool_steps
    await ws.send_to(text_data=send_frame("thanks, and hello"))
    await receive_until(ws, transcript, lambda t: list(t.status.values()).count("complete") >= 2)
    sent = [t for t in turns(app_simulator.requests[-1]) if t["role"] != "system"]
    assert sent == [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": step["calls"]},
        {"role": "tool", "content": step["results"][0]["content"],
         "tool_call_id": step["calls"][0]["id"]},
        {"role": "assistant", "content": reply.content},
        {"role": "user", "content": "thanks, and hello"},
    ]  # fmt: skip
    await ws.disconnect()
    # Reload and export show the steps.
    page, exported = await sync_to_async(_page_and_export)(conversation)
    assert 'data-tool-call="get_current_time"' in page
    assert exported["messages"][1]["tool_steps"] == reply.tool_steps


def _page_and_export(conversation) -> tuple[str, dict]:
    client = Client()
    client.force_login(conversation.owner)
    page = client.get(f"/c/{conversation.id}/").content.decode()
    return page, client.get(f"/c/{conversation.id}/export.json").json()


async def test_a_model_without_tools_is_offered_none(app_simulator):
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(tools=False)
    ws, _transcript, reply, _conversation = await ask("What time is it?")
    assert reply.tool_steps == [] and reply.status == "complete"
    [request] = app_simulator.requests
    assert "tools" not in request.body["parameters"]
    await ws.disconnect()
    assert await Message.objects.filter(role="tool").acount() == 0
