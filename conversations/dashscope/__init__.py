"""DashScope (Alibaba Cloud Model Studio / Qwen) chat client: the protocol and nothing else.

The local simulator (tests, offline demo) is a package of its own, ``dashscope_simulator``.

This package imports nothing from Django: the app builds a ``DashScopeConfig`` from its settings
and hands it to ``DashScopeClient``.
"""

from .client import DashScopeClient
from .config import REGION_NATIVE_BASE_URLS, DashScopeConfig, compatible_base_from_native
from .errors import (
    AuthError,
    BadRequestError,
    BillingError,
    DashScopeError,
    DashScopeTimeoutError,
    ModeratedError,
    ServerError,
    ThrottledError,
    TransportError,
    classify,
)
from .tools import ToolCallAccumulator
from .types import (
    ChatMessage,
    ChatRequest,
    Completion,
    Finish,
    ReasoningDelta,
    Role,
    SearchResults,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "REGION_NATIVE_BASE_URLS",
    "AuthError",
    "BadRequestError",
    "BillingError",
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "DashScopeClient",
    "DashScopeConfig",
    "DashScopeError",
    "DashScopeTimeoutError",
    "Finish",
    "ModeratedError",
    "ReasoningDelta",
    "Role",
    "SearchResults",
    "ServerError",
    "StreamEvent",
    "TextDelta",
    "ThrottledError",
    "ToolCallAccumulator",
    "ToolCallDelta",
    "TransportError",
    "Usage",
    "classify",
    "compatible_base_from_native",
]
