"""Requests, stream events and results exchanged with the DashScope client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass
class ChatMessage:
    """One turn of the conversation.

    ``images`` are http(s) or ``data:`` URLs and need a multimodal model. ``partial`` marks an
    assistant turn that the model should continue (prefix continuation).

    Function calling: an assistant turn that called tools carries them in ``tool_calls``, each
    ``{"id", "type": "function", "function": {"name", "arguments": "<json string>"}}`` (its
    ``content`` may be ""), and each result goes back as a ``tool`` turn whose ``content`` is
    the result and whose ``tool_call_id`` is the call's id.
    """

    role: Role
    content: str
    images: list[str] = field(default_factory=list)
    partial: bool = False
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_call_id: str = ""


@dataclass
class ChatRequest:
    """A chat generation request.

    ``parameters`` (temperature, top_p, max_tokens, enable_thinking, seed, ...) are passed through
    unchanged: inside ``parameters`` in native mode, at the top level in compatible mode. So do
    ``tools``, ``tool_choice`` and ``parallel_tool_calls``.
    """

    model: str
    messages: list[ChatMessage]
    endpoint: Literal["text", "multimodal"] = "text"
    protocol: Literal["native", "compatible"] = "native"
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDelta:
    """New answer text."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """New reasoning ("thinking") text."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a tool call; ``arguments`` fragments with the same index concatenate."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class SearchResults:
    """The web sources DashScope's search used (``enable_search`` with
    ``search_options.enable_source``), yielded once, when the first chunk that carries them
    arrives.

    Each result is ``{"index": int | None, "title": str, "url": str, "site_name": str}``,
    cleaned by ``sanitize.clean_search_results``: plain text (for the page to escape), ``url``
    an http(s) URL or "" (never ``javascript:``), no icon, at most 20 results.
    """

    results: list[dict[str, Any]]


@dataclass(frozen=True)
class Usage:
    """Token counts for the whole request (final figures).

    ``reasoning_tokens`` are the thinking part of ``output_tokens`` (DashScope counts them
    in it): native ``usage.output_tokens_details.reasoning_tokens``, compatible
    ``usage.completion_tokens_details.reasoning_tokens``; 0 when not reported.
    """

    input_tokens: int
    output_tokens: int
    total_tokens: int
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Finish:
    """Always the last event of a stream.

    ``reason`` is "stop", "length" or "tool_calls"; ``None`` means the stream ended cleanly
    without a finish reason, i.e. the reply is truncated.
    """

    reason: str | None
    request_id: str | None


StreamEvent = TextDelta | ReasoningDelta | ToolCallDelta | SearchResults | Usage | Finish


@dataclass
class Completion:
    """Result of a non-streaming call.

    ``partial_response`` is True when DashScope cut a slow non-streaming call short and returned
    what it had (``x-dashscope-partialresponse: true``); continue it with a ``partial`` turn.
    ``tool_calls`` are the calls the model made (finish reason "tool_calls"), shaped like
    ``ChatMessage.tool_calls``. ``search_results`` are the web sources, shaped like
    ``SearchResults.results`` ([] when none came back).
    """

    text: str
    reasoning: str
    finish_reason: str | None
    usage: Usage | None
    request_id: str | None
    partial_response: bool
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    search_results: list[dict[str, Any]] = field(default_factory=list)
