"""Pytest fixtures for talking to the DashScope simulator over real loopback HTTP.

Import them into a conftest (or a test module) with
``from tests.dashscope_fixtures import *  # noqa: F403``.

* ``simulator_server`` (session): one fast ``SimulatorServer`` for the whole run.
* ``simulator`` (function): the same server, with scenarios, requests and counters reset.
* ``dashscope_config`` / ``dashscope_client``: a config and client pointed at it, whose backoff
  sleeps are recorded by ``recorded_sleep`` instead of slept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from conversations.dashscope import DashScopeClient, DashScopeConfig
from dashscope_simulator import SimulatorServer

__all__ = [
    "SIMULATOR_API_KEY",
    "RecordingSleep",
    "dashscope_client",
    "dashscope_config",
    "recorded_sleep",
    "simulator",
    "simulator_server",
]

SIMULATOR_API_KEY = "sk-simulator-0123456789abcdef"


class RecordingSleep:
    """A stand-in for ``asyncio.sleep`` that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(
        api_key=SIMULATOR_API_KEY, first_token_delay=0.01, token_delay=0.001
    ) as server:
        yield server


@pytest.fixture
def simulator(simulator_server: SimulatorServer) -> Iterator[SimulatorServer]:
    simulator_server.reset()
    yield simulator_server
    simulator_server.reset()


@pytest.fixture
def recorded_sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def dashscope_config(simulator: SimulatorServer) -> DashScopeConfig:
    return DashScopeConfig.from_values(
        api_key=SIMULATOR_API_KEY,
        base_url=simulator.native_base_url,
        connect_timeout=2.0,
        stall_timeout=5.0,
    )


@pytest_asyncio.fixture
async def dashscope_client(
    dashscope_config: DashScopeConfig, recorded_sleep: RecordingSleep
) -> AsyncIterator[DashScopeClient]:
    client = DashScopeClient(dashscope_config, sleep=recorded_sleep)
    yield client
    await client.aclose()
