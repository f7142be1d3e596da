"""Function calling on the wire: joining a stream's tool-call fragments into whole calls."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .types import StreamEvent, ToolCallDelta


class ToolCallAccumulator:
    """Collects a stream's ``ToolCallDelta`` fragments into complete tool calls.

    Fragments with the same ``index`` belong to one call: their ``arguments`` concatenate in
    order, and the call's id and name are the first non-empty ones seen (later fragments
    usually repeat them as "" or leave them out). ``calls`` gives the calls in index order,
    shaped like ``ChatMessage.tool_calls``, ready to send back with the assistant turn::

        calls = ToolCallAccumulator()
        async for event in client.stream_chat(request):
            calls.add(event)  # anything that is not a ToolCallDelta is ignored
        if calls: ...  # the model asked for tools: run them, answer with tool turns

    A call whose fragments never named an id or a function keeps ``""`` there.
    """

    def __init__(self, events: Iterable[StreamEvent] = ()) -> None:
        self._ids: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._arguments: dict[int, list[str]] = {}
        for event in events:
            self.add(event)

    def add(self, event: StreamEvent) -> bool:
        """Take one event; True if it was a tool-call fragment."""
        if not isinstance(event, ToolCallDelta):
            return False
        index = event.index
        self._arguments.setdefault(index, []).append(event.arguments)
        if event.id and not self._ids.get(index):
            self._ids[index] = event.id
        if event.name and not self._names.get(index):
            self._names[index] = event.name
        return True

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The calls so far, by index: ``{"id", "type": "function", "function": {...}}``."""
        return [
            {
                "id": self._ids.get(index, ""),
                "type": "function",
                "function": {
                    "name": self._names.get(index, ""),
                    "arguments": "".join(self._arguments[index]),
                },
            }
            for index in sorted(self._arguments)
        ]

    def __bool__(self) -> bool:
        return bool(self._arguments)

    def __len__(self) -> int:
        return len(self._arguments)
