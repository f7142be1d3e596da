"""Helpers for websocket tests against the real ASGI application (origin, session auth and all)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from conversations.models import Conversation, Message, ModelProfile
from conversations.replies.service import conversation_create

ARTICLE = re.compile(r'<article id="message-(\d+)"[^>]*data-role="(\w+)" data-status="(\w+)"', re.S)
# A streaming reply's body: its settled blocks (formatted; their length in characters of the
# text) and the rest of its text (the tail).
STREAMING_BODY = re.compile(
    r'<div id="message-(\d+)-body" class="message__body message__body--streaming[^"]*"[^>]*'
    r' data-settled="(\d+)"><div class="message__settled">(.*?)</div>'
    r'<div id="message-\d+-tail" class="message__tail[^"]*">(.*?)</div>',
    re.S,
)


def _login_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@sync_to_async
def make_user(username: str):
    return get_user_model().objects.create_user(username, password="pw-" + username)


@sync_to_async
def make_conversation(user, model_name: str = "qwen-plus") -> Conversation:
    return conversation_create(owner=user, model=ModelProfile.objects.get(name=model_name))


async def connect(
    user, conversation, *, origin: str = "http://localhost", session=True, language=None
):
    from qwenweb.asgi import application

    headers = [(b"host", b"localhost")]
    if language:
        headers.append((b"accept-language", language.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if user is not None and session:
        cookie = await sync_to_async(_login_cookie)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    communicator = WebsocketCommunicator(application, f"/ws/c/{conversation.id}/", headers=headers)
    connected, code = await communicator.connect(timeout=5)
    return communicator, connected, code


@dataclass
class Transcript:
    """What one socket received, and the reply text a browser would show from it."""

    frames: list[str] = field(default_factory=list)
    text: dict[int, str] = field(default_factory=dict)
    status: dict[int, str] = field(default_factory=dict)  # assistant messages only
    reasoning: dict[int, str] = field(default_factory=dict)
    last_pk: dict[str, int] = field(default_factory=dict)
    # "=" frames: each reply's settled blocks as [start, end, html], as they came.
    blocks: dict[int, list] = field(default_factory=dict)

    def feed(self, frame: str) -> None:
        self.frames.append(frame)
        if frame[:1] == "=":
            pk, _, blocks = frame[1:].partition(":")
            self.blocks.setdefault(int(pk), []).extend(json.loads(blocks))
            return
        if frame[:1] in ("+", "~"):
            # `+<pk>:<text>`, or `+:<text>` for the same message as the previous `+` frame.
            marker = frame[0]
            pk, _, text = frame[1:].partition(":")
            pk = int(pk) if pk else self.last_pk[marker]
            self.last_pk[marker] = pk
            target = self.text if marker == "+" else self.reasoning
            target[pk] = target.get(pk, "") + text
            return
        for pk, role, status in ARTICLE.findall(frame):
            if role == "assistant":
                self.status[int(pk)] = status
        for pk, settled, _html, tail in STREAMING_BODY.findall(frame):
            # A full render of a streaming message replaces what the page showed: the
            # settled part's text is the text had so far (or stand-ins, if it had less).
            import html

            pk, settled = int(pk), int(settled)
            before = self.text.get(pk, "")
            before = before[:settled] if len(before) >= settled else "\ufffc" * settled
            self.text[pk] = before + html.unescape(tail)


async def receive_until(communicator, transcript: Transcript, predicate, within: float = 10.0):
    async def loop():
        while not predicate(transcript):
            transcript.feed(await communicator.receive_from(timeout=within))

    await asyncio.wait_for(loop(), within)
    return transcript


def send_frame(content: str, client_message_id: uuid.UUID | None = None) -> str:
    return json.dumps(
        {
            "type": "send",
            "content": content,
            "client_message_id": str(client_message_id or uuid.uuid4()),
            "HEADERS": {"HX-Request": "true"},
        }
    )


async def assistant_reply(conversation) -> Message:
    return await Message.objects.filter(conversation=conversation, role="assistant").alast()


async def wait_for_status(message_pk: int, statuses: set[str], within: float = 10.0) -> Message:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        message = await Message.objects.aget(pk=message_pk)
        if message.status in statuses:
            return message
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"message {message_pk} still {message.status}")
        await asyncio.sleep(0.02)


async def open_chat(model_name: str = "qwen-plus", **connect_options):
    """alice, a new conversation of hers, and a socket open on it."""
    owner = await make_user("alice")
    conversation = await make_conversation(owner, model_name=model_name)
    ws, connected, _code = await connect(owner, conversation, **connect_options)
    assert connected
    return owner, conversation, ws
