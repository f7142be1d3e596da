"""What travels on the channel layer, in one place: group names and every event, as types.

Group names use ASCII letters, digits, '-', '_' and '.'. An event is a frozen dataclass whose
TYPE is its channel-layer type (Channels dispatches `conversation.delta` to a consumer's
`conversation_delta`); `as_message()` gives the plain dict the layer carries (the Redis layer
packs it with msgpack). Fields left at None are not sent.

To sockets (the conversation's group, or one socket's channel): Created, Continued,
Branched, ToolSteps, Delta, Titled, Finished, Snapshot; to the user's group: SessionEnded,
ReplyDone.
To a running generation (CONTROL_GROUP, heard by every process: control.py): Stop, Sync, Watch,
Retire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import ClassVar


def group(conversation_id) -> str:
    """Every socket open on the conversation listens here for messages, deltas and endings."""
    return f"conv-{conversation_id}"


# Every process listens here for stop and catch-up requests to the replies it runs (control.py).
CONTROL_GROUP = "replies.control"


def control_group(conversation_id) -> str:
    """Where the running generation of a conversation listened for stop and catch-up requests
    before CONTROL_GROUP (control.py): requests still go here too, for the processes of an
    earlier version during a rolling restart."""
    return f"conv-{conversation_id}.control"


def user_group(user_id) -> str:
    """Every socket of the user, in any process, listens here for the end of its session
    (SessionEnded: a logout, a password change, the account disabled or deleted)."""
    return f"user-{user_id}"


def session_tag(session_key: str) -> str:
    """Names a session in events without carrying its key, a credential, over the channel
    layer (Redis)."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Event:
    TYPE: ClassVar[str]

    def as_message(self) -> dict:
        """The event as a plain dict, with copies of its lists and dicts (its fields hold plain
        data: text, numbers, lists and dicts of them), so that what a sender goes on changing
        does not change the event. (dataclasses.asdict copies as well, in 60 µs for a new
        reply's announcement, against 9 here.)"""
        message = {"type": self.TYPE}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                message[field.name] = _copy(value)
        return message


def _copy(value):
    kind = type(value)
    if kind is dict:
        return {key: _copy(item) for key, item in value.items()}
    if kind is list or kind is tuple:
        return kind(_copy(item) for item in value)
    return value


# -- to sockets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Created(Event):
    """A user message and its reply's placeholder were saved (`messages`: Message.as_event)."""

    TYPE = "conversation.created"
    messages: list
    title: str = ""  # the conversation's new title, when this message gave it one


@dataclass(frozen=True)
class Continued(Event):
    """A cut-off reply is being carried on (or written again): show it streaming."""

    TYPE = "conversation.continued"
    message_id: int


@dataclass(frozen=True)
class Branched(Event):
    """The active branch changed (a regenerate, an edit, another version chosen): show it
    afresh. `message_id` is the reply that began streaming with it, if one did."""

    TYPE = "conversation.branched"
    message_id: int | None = None


@dataclass(frozen=True)
class ToolSteps(Event):
    """A reply's tool steps so far (Message.tool_steps): a round of calls, then its results."""

    TYPE = "conversation.tools"
    message_id: int
    steps: list


@dataclass(frozen=True)
class Delta(Event):
    """New text of a streaming reply, from character `offset` of its `part`."""

    TYPE = "conversation.delta"
    message_id: int
    part: str  # "text" or "reasoning"
    offset: int
    text: str
    # Blocks of the text that settled with this delta, rendered: [start, end, html] each
    # (rendering.render_settled). Pages show them formatted, and the rest as text.
    blocks: list | None = None


@dataclass(frozen=True)
class Titled(Event):
    """The chat was given a title (by the title model, after its first reply)."""

    TYPE = "conversation.titled"
    title: str


@dataclass(frozen=True)
class Finished(Event):
    """A reply ended; `message` (Message.as_event) spares each socket a database read."""

    TYPE = "conversation.finished"
    message_id: int
    message: dict | None = None
    # How much of the text had settled into blocks the pages were sent formatted: a page
    # that has them all is sent only the rest (rendering.settled_blocks).
    settled: int | None = None


@dataclass(frozen=True)
class Snapshot(Event):
    """A running reply's text so far, to one socket that asked (Sync)."""

    TYPE = "conversation.snapshot"
    message_id: int
    text: str
    reasoning: str = ""


@dataclass(frozen=True)
class SessionEnded(Event):
    """Close the sockets of this session (session_tag), or all the user's ("")."""

    TYPE = "session.ended"
    session: str


@dataclass(frozen=True)
class ReplyDone(Event):
    """A reply of the user's ended: their sockets on other chats mark this one in the list."""

    TYPE = "user.reply_done"
    conversation_id: str
    title: str = ""


# -- to a running generation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stop(Event):
    TYPE = "generation.stop"
    message_id: int


@dataclass(frozen=True)
class Sync(Event):
    """Send a Snapshot to `reply_channel`; `process` names the asking socket's process."""

    TYPE = "generation.sync"
    message_id: int
    reply_channel: str
    process: str


@dataclass(frozen=True)
class Watch(Event):
    """A socket in `process` shows this reply: send its deltas over the layer too."""

    TYPE = "generation.watch"
    message_id: int
    process: str


@dataclass(frozen=True)
class Retire(Event):
    """Continue gave the reply to the generation holding `writer`: any other one stops."""

    TYPE = "generation.retire"
    message_id: int
    writer: str
