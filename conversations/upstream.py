"""The process's way to DashScope: configuration, the shared client, and the offline demo.

With no DASHSCOPE_API_KEY the app talks to the project's own simulator, started once per
process on a loopback port, through exactly the same client code as the real service.
"""

import asyncio
import logging
import secrets
import threading
import weakref

from django.conf import settings

from conversations.dashscope import DashScopeClient, DashScopeConfig

logger = logging.getLogger(__name__)

# Both random per run and known only to this process: the demo simulator listens on a
# loopback port every local process can reach, and with a known key or open control
# endpoints any of them could read what people typed or put words into their chats.
DEMO_API_KEY = "sk-demo-" + secrets.token_urlsafe(24)
DEMO_CONTROL_TOKEN = secrets.token_urlsafe(32)

_simulator = None
_simulator_lock = threading.Lock()
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DashScopeClient]" = (
    weakref.WeakKeyDictionary()
)


def demo_mode() -> bool:
    """True when replies come from the simulator because no API key is configured."""
    return not settings.DASHSCOPE_API_KEY


def _demo_simulator():
    global _simulator
    with _simulator_lock:
        if _simulator is None:
            from dashscope_simulator import SimulatorServer

            _simulator = SimulatorServer(
                api_key=DEMO_API_KEY, control_token=DEMO_CONTROL_TOKEN
            ).start()
            logger.info(
                "No DASHSCOPE_API_KEY: offline demo, replies simulated at %s", _simulator.url
            )
        return _simulator


def get_config() -> DashScopeConfig:
    if demo_mode():
        simulator = _demo_simulator()
        return DashScopeConfig.from_values(
            api_key=DEMO_API_KEY,
            base_url=simulator.native_base_url,
            compatible_base_url=simulator.compatible_base_url,
            stall_timeout=settings.DASHSCOPE_STALL_TIMEOUT,
        )
    return DashScopeConfig.from_values(
        api_key=settings.DASHSCOPE_API_KEY,
        region=settings.DASHSCOPE_REGION,
        base_url=settings.DASHSCOPE_BASE_URL or None,
        compatible_base_url=settings.DASHSCOPE_COMPATIBLE_BASE_URL or None,
        stall_timeout=settings.DASHSCOPE_STALL_TIMEOUT,
    )


def get_client() -> DashScopeClient:
    """The client shared by every reply running on this event loop (one per process).

    Its HTTP engine (settings.DASHSCOPE_HTTP_ENGINE) is chosen here and nowhere else.
    """
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = DashScopeClient(get_config(), engine=settings.DASHSCOPE_HTTP_ENGINE)
        _clients[loop] = client
    return client


def reset_clients() -> None:
    """Forget cached clients (tests that change the DashScope settings call this)."""
    _clients.clear()
