"""A local DashScope look-alike: the peer for the client's tests and the offline demo's backend.

It imports nothing from the app or from ``conversations.dashscope`` (the protocol client); it
speaks the wire protocol on its own. The app imports it only for the offline demo, lazily.
Everything is in ``server``; run it with ``python -m dashscope_simulator --port 8765``.
"""

from .server import (
    KNOWN_MODELS,
    LOOP_FOREVER_TRIGGER,
    MAX_OUTPUT_TOKENS,
    MAX_THINKING_BUDGET,
    MISSING_TOOL_NAME,
    MISSING_TOOL_TRIGGER,
    UNSAFE_SOURCES_TRIGGER,
    RecordedRequest,
    Scenario,
    ScenarioError,
    Simulator,
    SimulatorServer,
    compose_json_reply,
    compose_reasoning,
    compose_reply,
    compose_search_results,
    compose_tool_answer,
    find_location,
    is_known_model,
    is_vision_model,
    main,
    plan_tool_calls,
    tokenize,
)

__all__ = [
    "KNOWN_MODELS",
    "LOOP_FOREVER_TRIGGER",
    "MAX_OUTPUT_TOKENS",
    "MAX_THINKING_BUDGET",
    "MISSING_TOOL_NAME",
    "MISSING_TOOL_TRIGGER",
    "UNSAFE_SOURCES_TRIGGER",
    "RecordedRequest",
    "Scenario",
    "ScenarioError",
    "Simulator",
    "SimulatorServer",
    "compose_json_reply",
    "compose_reasoning",
    "compose_reply",
    "compose_search_results",
    "compose_tool_answer",
    "find_location",
    "is_known_model",
    "is_vision_model",
    "main",
    "plan_tool_calls",
    "tokenize",
]
