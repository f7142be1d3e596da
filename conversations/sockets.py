"""The conversation sockets open in this process, and the short way to them.

A conversation's events (a reply announced, its text, its end) go straight to the sockets
open on the conversation in this process, in order, which is where nearly every reader is (a
tab's send goes over its own socket, so the reply runs in that tab's process), and over the
channel layer to the other processes. A reply's text takes the layer only once a socket in
another process has asked for it (a catch-up request, or the announcement of a reply that
its process does not run); every delta carries its offset, so a socket that missed frames
while that request was on its way sees the gap and catches up. Per frame this saves the
layer's queueing and dispatch (in-memory) or a round trip through Redis (bench/README.md).
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from typing import Protocol

from autobahn.exception import Disconnected
from channels.layers import InMemoryChannelLayer, get_channel_layer

from conversations.replies import events

logger = logging.getLogger(__name__)

# Tells this process's requests from other processes' on the control group.
PROCESS_ID = uuid.uuid4().hex


class Reader(Protocol):
    async def deliver(self, event: dict) -> None: ...


_open: defaultdict[str, set[Reader]] = defaultdict(set)


async def broadcast(conversation_id, event: dict, *, remote: bool = True) -> None:
    """Hand `event` to this process's sockets on the conversation, then (unless `remote` is
    False) to the other processes' over the channel layer; sockets skip a layer event that
    came from their own process, having had it already. An in-memory layer reaches no other
    process: nothing goes over it (every socket of its group would only skip the copy)."""
    event["process"] = PROCESS_ID
    for socket in open_on(conversation_id):
        try:
            await socket.deliver(event)
        except Disconnected:
            # A tab going away, not a failure: its close frame is in, so daphne's websocket
            # (autobahn) sends no more, but its connection is not gone yet, so its consumer
            # has not been told to disconnect. It gets nothing further; its consumer's
            # disconnect() then finds it gone from here.
            discard(conversation_id, socket)
            logger.debug("A socket on %s closed while a frame was on its way", conversation_id)
        except Exception:
            logger.warning("A socket on %s failed", conversation_id, exc_info=True)
    if remote and not isinstance(layer := get_channel_layer(), InMemoryChannelLayer):
        await layer.group_send(events.group(conversation_id), event)


def add(conversation_id, socket: Reader) -> None:
    _open[str(conversation_id)].add(socket)


def discard(conversation_id, socket: Reader) -> None:
    key = str(conversation_id)
    sockets = _open.get(key)
    if sockets is not None:
        sockets.discard(socket)
        if not sockets:
            del _open[key]


def open_on(conversation_id) -> list[Reader]:
    return list(_open.get(str(conversation_id), ()))


def count() -> int:
    """Sockets open in this process (the health check shows it to staff)."""
    return sum(len(sockets) for sockets in _open.values())
