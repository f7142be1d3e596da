"""The DashScope client over aiohttp (conversations/dashscope/transport.py), against the
simulator on a real loopback port: the same errors and sentences as over httpx, Stop closes
the upstream connection, and no cap on how many replies stream at once."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from dataclasses import replace

import pytest

from conversations.dashscope import (
    ChatMessage,
    ChatRequest,
    DashScopeClient,
    DashScopeConfig,
    DashScopeError,
    DashScopeTimeoutError,
    TextDelta,
    TransportError,
)
from conversations.errors import describe_error
from dashscope_simulator import Scenario
from tests.dashscope_fixtures import *  # noqa: F403
from tests.dashscope_fixtures import SIMULATOR_API_KEY, RecordingSleep

ENGINES = ["aiohttp", "httpx"]


def ask(text: str = "Tell me something nice") -> ChatRequest:
    return ChatRequest(model="qwen-plus", messages=[ChatMessage("user", text)])


async def failure(
    config: DashScopeConfig, engine: str, scenario: Scenario | None, simulator=None
) -> tuple[int, DashScopeError]:
    """(deltas received, the error) of one stream that fails."""
    if scenario is not None:
        simulator.add_scenario(scenario)
    deltas = 0
    async with DashScopeClient(config, engine=engine, sleep=RecordingSleep()) as client:
        with pytest.raises(DashScopeError) as caught:
            async for event in client.stream_chat(ask()):
                deltas += isinstance(event, TextDelta)
    return deltas, caught.value


def refused_config() -> DashScopeConfig:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return DashScopeConfig.from_values(
        api_key=SIMULATOR_API_KEY, base_url=f"http://127.0.0.1:{port}/api/v1"
    )


@pytest.mark.asyncio
async def test_a_refused_connection_reads_the_same_over_either_engine():
    config = refused_config()
    seen = {engine: await failure(config, engine, None) for engine in ENGINES}

    for _deltas, error in seen.values():
        assert isinstance(error, TransportError) and error.retryable
        assert str(error).startswith("Could not connect to DashScope")
    sentences = {engine: describe_error(error) for engine, (_, error) in seen.items()}
    assert sentences["aiohttp"] == sentences["httpx"]
    assert "connection to DashScope failed" in sentences["aiohttp"][1]


@pytest.mark.asyncio
async def test_a_connection_cut_mid_reply_reads_the_same_over_either_engine(
    simulator, dashscope_config
):
    cut = {"reply": "One two three four five.", "drop_after_chunks": 2}
    seen = {
        engine: await failure(dashscope_config, engine, Scenario(**cut), simulator)
        for engine in ENGINES
    }

    for deltas, error in seen.values():
        assert deltas == 2
        assert isinstance(error, TransportError)
        assert str(error).startswith("Connection to DashScope failed")
    sentences = {engine: describe_error(error) for engine, (_, error) in seen.items()}
    assert sentences["aiohttp"] == sentences["httpx"]
    assert "lost before the reply was finished" in sentences["aiohttp"][1]


@pytest.mark.asyncio
async def test_a_stall_mid_reply_reads_the_same_over_either_engine(simulator, dashscope_config):
    config = replace(dashscope_config, stall_timeout=0.3)
    stall = {"reply": "One two three.", "stall_after_chunks": 1, "stall_seconds": 5}
    seen = {
        engine: await failure(config, engine, Scenario(**stall), simulator) for engine in ENGINES
    }

    for deltas, error in seen.values():
        assert deltas == 1
        assert isinstance(error, DashScopeTimeoutError)
        assert error.message == "DashScope sent nothing for 0.3 s; the stream stalled."
    sentences = {engine: describe_error(error) for engine, (_, error) in seen.items()}
    assert sentences["aiohttp"] == sentences["httpx"]


@pytest.mark.asyncio
@pytest.mark.parametrize("engine", ENGINES)
async def test_a_caller_learns_when_its_request_has_gone_out(simulator, dashscope_config, engine):
    """request_sent is set once the request is written, long before the first token: the app
    waits for it before rendering its announcement, so the request is not held up."""
    from conversations.dashscope.transport import request_sent

    simulator.add_scenario(Scenario(tokens=3, first_token_delay=2))
    sent, first_delta = asyncio.Event(), asyncio.Event()

    async def reply() -> None:
        async for event in client.stream_chat(ask()):
            first_delta.set() if isinstance(event, TextDelta) else None

    async with DashScopeClient(dashscope_config, engine=engine) as client:
        token = request_sent.set(sent)
        task = asyncio.create_task(reply())
        request_sent.reset(token)
        await asyncio.wait_for(sent.wait(), timeout=1.5)
        assert not first_delta.is_set()
        for _ in range(100):
            if simulator.requests:
                break
            await asyncio.sleep(0.01)
        assert len(simulator.requests) == 1, "it has reached DashScope"
        await asyncio.wait_for(task, timeout=10)
        assert first_delta.is_set()


@pytest.mark.asyncio
async def test_stop_closes_the_upstream_connection_at_once(simulator, dashscope_config):
    simulator.add_scenario(Scenario(tokens=400, token_delay=0.01))
    first_delta = asyncio.Event()

    async def reply() -> None:
        async for event in client.stream_chat(ask()):
            if isinstance(event, TextDelta):
                first_delta.set()

    async with DashScopeClient(dashscope_config, engine="aiohttp") as client:
        task = asyncio.create_task(reply())
        await asyncio.wait_for(first_delta.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Asked without yielding to the event loop: the socket is already closed.
        assert simulator.wait_for_outcome(timeout=3) == "disconnected"


@pytest.mark.asyncio
async def test_more_than_a_hundred_replies_stream_at_once(simulator, dashscope_config):
    streams = 120
    simulator.add_scenario(Scenario(tokens=3, times=streams))
    started = 0
    all_started = asyncio.Event()

    async def reply(client: DashScopeClient) -> str:
        nonlocal started
        text = ""
        async for event in client.stream_chat(ask()):
            if isinstance(event, TextDelta):
                if not text:
                    started += 1
                    if started == streams:
                        all_started.set()
                    # Hold the connection open until every reply has begun: with a cap of
                    # 100 connections the 101st would never begin.
                    await all_started.wait()
                text += event.text
        return text

    async with DashScopeClient(dashscope_config, engine="aiohttp") as client:
        texts = await asyncio.wait_for(
            asyncio.gather(*(reply(client) for _ in range(streams))), timeout=30
        )

    assert len(texts) == streams and all(texts)
    assert [simulator.wait_for_outcome(r.request_id) for r in simulator.requests] == [
        "completed"
    ] * streams


def test_a_client_left_open_logs_nothing_when_its_loop_ends(simulator, dashscope_config, caplog):
    async def reply_and_leave_open() -> None:
        # The process-wide client is never closed (daphne has no lifespan).
        client = DashScopeClient(dashscope_config, engine="aiohttp")
        simulator.add_scenario(Scenario(reply="Hi."))
        assert [e async for e in client.stream_chat(ask()) if isinstance(e, TextDelta)]

    with caplog.at_level(logging.DEBUG):
        asyncio.run(reply_and_leave_open())
        gc.collect()

    assert "Unclosed" not in caplog.text
