"""A forgiving server-sent-events reader for DashScope streams.

httpx-sse's line decoder splits the byte stream into lines; the frame assembly is our own because
DashScope needs more than the SSE spec gives:

* ``:HTTP_STATUS/429`` comment lines carry the logical status of the frame (the spec drops
  comments);
* ``data:`` with or without a space after the colon;
* older gateways omit the blank line between frames, so a frame whose data is already a complete
  JSON document is closed as soon as the next field line arrives, and a joined payload that is not
  valid JSON is decoded line by line.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from httpx_sse._decoders import SSELineDecoder

DONE: Final = "[DONE]"
_STATUS_COMMENT = re.compile(r"^:\s*HTTP_STATUS/(\d{3})")


@dataclass
class RawData:
    """A data payload that is not JSON (kept so error frames can still show it)."""

    text: str


@dataclass
class SSEFrame:
    """One event: its ``event`` name, logical ``status`` and decoded data payloads."""

    event: str = ""
    id: str | None = None
    status: int | None = None
    data_lines: list[str] = field(default_factory=list)
    _parsed: Any = field(default=None, repr=False)
    _complete: bool = field(default=False, repr=False)

    @property
    def has_content(self) -> bool:
        return bool(self.data_lines or self.event or self.status is not None or self.id)

    def add_data(self, value: str) -> None:
        self.data_lines.append(value)
        joined = "\n".join(self.data_lines).strip()
        if joined == DONE:
            self._parsed, self._complete = DONE, True
            return
        try:
            self._parsed, self._complete = json.loads(joined), True
        except ValueError:
            self._parsed, self._complete = None, False

    @property
    def data_complete(self) -> bool:
        """True when the data so far is a whole JSON document (or ``[DONE]``)."""
        return self._complete

    def payloads(self) -> list[Any]:
        """Decoded payloads: JSON values, ``DONE``, or ``RawData`` for undecodable lines."""
        if not self.data_lines:
            return []
        if self._complete:
            return [self._parsed]
        payloads: list[Any] = []
        for line in self.data_lines:
            text = line.strip()
            if not text:
                continue
            if text == DONE:
                payloads.append(DONE)
                continue
            try:
                payloads.append(json.loads(text))
            except ValueError:
                payloads.append(RawData(text))
        return payloads


class SSEFrameParser:
    """Turns lines into frames; feed it lines, then call ``flush`` at end of stream."""

    def __init__(self) -> None:
        self._frame = SSEFrame()

    def feed(self, line: str) -> list[SSEFrame]:
        line = line.rstrip("\r\n")
        if not line:
            return self._take()
        if line.startswith(":"):
            match = _STATUS_COMMENT.match(line)
            if match is None:
                return []  # keep-alive or other comment
            ready = self._take_if_complete()
            self._frame.status = int(match.group(1))
            return ready
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        ready = self._take_if_complete()
        if name == "data":
            self._frame.add_data(value)
        elif name == "event":
            self._frame.event = value.strip()
        elif name == "id":
            self._frame.id = value.strip()
        elif name == "status" and value.strip().isdigit():
            self._frame.status = int(value.strip())
        # Other fields (retry, unknown) are ignored, as the SSE spec says.
        return ready

    def flush(self) -> list[SSEFrame]:
        return self._take()

    def _take(self) -> list[SSEFrame]:
        frame, self._frame = self._frame, SSEFrame()
        return [frame] if frame.has_content else []

    def _take_if_complete(self) -> list[SSEFrame]:
        # A new field after a complete JSON payload means the blank separator line was omitted.
        if self._frame.data_lines and self._frame.data_complete:
            return self._take()
        return []


def parse_frames(text: str) -> list[SSEFrame]:
    """Parse a whole SSE body (used for error bodies read in one go)."""
    parser = SSEFrameParser()
    frames: list[SSEFrame] = []
    for line in _split_lines(text):
        frames.extend(parser.feed(line))
    frames.extend(parser.flush())
    return frames


async def aiter_frames(response: httpx.Response) -> AsyncIterator[SSEFrame]:
    """Yield frames from a streaming response as soon as each one is complete."""
    decoder = SSELineDecoder()
    parser = SSEFrameParser()
    async for text in response.aiter_text():
        for line in decoder.decode(text):
            for frame in parser.feed(line):
                yield frame
    for line in decoder.flush():
        for frame in parser.feed(line):
            yield frame
    for frame in parser.flush():
        yield frame


def _split_lines(text: str) -> Iterable[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
