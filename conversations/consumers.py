"""The websocket of one open conversation: thin, it parses, checks, calls and renders.

Client → server (JSON): {"type": "send", "content": "…", "client_message_id": "<uuid>"},
{"type": "stop"}, {"type": "hello", "streaming": [<message pk>, …]}; other keys (htmx's
HEADERS) are ignored.

Server → client: HTML fragments with hx-swap-oob (messages, the end of a reply, notices), and
for the streamed text itself lean frames `+<message pk>:<new text>` that static/qwenweb/chat.js
appends as text: each carries only the new text, so a reply costs about its own size on the
wire (daphne has no permessage-deflate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation.trans_real import parse_accept_lang_header

from conversations import chat, events, generation
from conversations.models import Conversation, Message

logger = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
# How long a reconnecting socket waits for the running generation to answer a catch-up request
# before it falls back to what the database holds.
SNAPSHOT_TIMEOUT = 2.0
MAX_FRAME_BYTES = 256 * 1024


class ConversationConsumer(AsyncWebsocketConsumer):
    conversation: Conversation

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        conversation = (
            await Conversation.objects.owned_by(user)
            .select_related("model")
            .filter(pk=conversation_id)
            .afirst()
        )
        if conversation is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.conversation = conversation
        self.language = self._language()
        # message pk -> characters of its text this socket has shown, or None while waiting
        # for the snapshot that tells where the reply stands.
        self.shown: dict[int, int | None] = {}
        self.pending: dict[int, list[dict]] = {}
        self.background: set[asyncio.Task] = set()
        self.group = events.group(conversation.id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        streaming = await self._streaming_message_ids()
        for message_id in streaming:
            await self._request_snapshot(message_id)

    def _language(self) -> str | None:
        """The page's language, as LocaleMiddleware picked it: cookie, then Accept-Language."""
        candidates = [self.scope.get("cookies", {}).get(settings.LANGUAGE_COOKIE_NAME, "")]
        headers = dict(self.scope.get("headers", []))
        accept = headers.get(b"accept-language", b"").decode("latin-1")
        candidates += [code for code, _q in parse_accept_lang_header(accept) if code != "*"]
        for code in candidates:
            try:
                return translation.get_supported_language_variant(code)
            except LookupError:
                continue
        return None

    async def disconnect(self, code: int) -> None:
        for task in list(getattr(self, "background", ())):
            task.cancel()
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    # -- client → server ----------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        if text_data is None or len(text_data) > MAX_FRAME_BYTES:
            await self.close(code=1009)
            return
        try:
            data = json.loads(text_data)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            await self.close(code=1003)
            return
        kind = data.get("type")
        if kind == "send":
            await self._send_message(data)
        elif kind == "stop":
            await self._stop()
        elif kind == "hello":
            await self._hello(data.get("streaming"))

    async def _send_message(self, data: dict) -> None:
        try:
            client_message_id = uuid.UUID(str(data.get("client_message_id")))
        except ValueError:
            client_message_id = None
        try:
            await chat.areply_start(
                conversation=self.conversation,
                content=data.get("content"),
                client_message_id=client_message_id,
            )
        except chat.ReplyRefused as refusal:
            await self._send_notice(str(refusal))
            return
        await self._send_fragment("ack", client_message_id=client_message_id)

    async def _stop(self) -> None:
        await chat.areply_stop(conversation=self.conversation)

    async def _hello(self, streaming: object) -> None:
        """The page lists the replies it shows as streaming; bring each up to date."""
        if not isinstance(streaming, list):
            return
        for value in streaming[:20]:
            if isinstance(value, int) and value not in self.shown:
                message = await self._message(value)
                if message is not None and not message.is_streaming:
                    await self._send_messages([message])

    # -- group → client -----------------------------------------------------------------------

    async def conversation_created(self, event: dict) -> None:
        messages = [m for m in [await self._message(pk) for pk in event["message_ids"]] if m]
        for message in messages:
            if message.is_streaming:
                self.shown[message.pk] = len(message.content)
        await self._send_messages(messages, append=True)

    async def conversation_delta(self, event: dict) -> None:
        message_id = event["message_id"]
        if message_id not in self.shown:
            await self._request_snapshot(message_id)
        shown = self.shown[message_id]
        if shown is None:
            self.pending.setdefault(message_id, []).append(event)
            return
        await self._send_delta(message_id, event["offset"], event["text"])

    async def conversation_snapshot(self, event: dict) -> None:
        message_id = event["message_id"]
        if self.shown.get(message_id, 0) is not None:
            return  # already in step (or finished meanwhile)
        message = await self._message(message_id)
        if message is None:
            return
        message.content = event["text"]
        await self._send_messages([message])
        self.shown[message_id] = len(event["text"])
        for pending in self.pending.pop(message_id, []):
            await self._send_delta(message_id, pending["offset"], pending["text"])

    async def conversation_finished(self, event: dict) -> None:
        message_id = event["message_id"]
        self.shown.pop(message_id, None)
        self.pending.pop(message_id, None)
        message = await self._message(message_id)
        if message is not None:
            await self._send_messages([message])

    async def generation_stop(self, event: dict) -> None:
        """Control messages are for the generation; a socket has nothing to do with them."""

    generation_sync = generation_stop

    # -- helpers ------------------------------------------------------------------------------

    async def _send_delta(self, message_id: int, offset: int, text: str) -> None:
        """Send only what this socket has not shown yet: no gap, no duplicate."""
        shown = self.shown[message_id] or 0
        end = offset + len(text)
        if end <= shown:
            return
        if offset > shown:
            # A frame went missing (a full channel drops messages): catch up from the source.
            self.shown[message_id] = None
            await self._request_snapshot(message_id, force=True)
            return
        self.shown[message_id] = end
        await self.send(text_data=f"+{message_id}:{text[shown - offset :]}")

    async def _request_snapshot(self, message_id: int, force: bool = False) -> None:
        if not force and message_id in self.shown:
            return
        self.shown[message_id] = None
        local = generation.running(message_id)
        if local is not None:
            await self.conversation_snapshot(
                {"message_id": message_id, "seq": local.seq, "text": local.text}
            )
            return
        await self.channel_layer.group_send(
            events.control_group(self.conversation.id),
            {
                "type": "generation.sync",
                "message_id": message_id,
                "reply_channel": self.channel_name,
            },
        )
        task = asyncio.create_task(self._snapshot_timeout(message_id))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _snapshot_timeout(self, message_id: int) -> None:
        """No generation answered: it ended or its process is gone. Show what was saved."""
        await asyncio.sleep(SNAPSHOT_TIMEOUT)
        if message_id in self.shown and self.shown[message_id] is None:
            message = await self._message(message_id)
            if message is not None:
                await self._send_messages([message])
                self.shown[message_id] = len(message.content)
                if not message.is_streaming:
                    self.shown.pop(message_id, None)
            self.pending.pop(message_id, None)

    async def _message(self, pk: int) -> Message | None:
        return (
            await Message.objects.filter(conversation=self.conversation, pk=pk)
            .prefetch_related("images")
            .afirst()
        )

    async def _streaming_message_ids(self) -> list[int]:
        return [
            pk
            async for pk in Message.objects.filter(
                conversation=self.conversation, status=Message.Status.STREAMING
            ).values_list("pk", flat=True)
        ]

    async def _send_messages(self, messages: list[Message], append: bool = False) -> None:
        await self._send_fragment(
            "messages", messages=messages, append=append, conversation=self.conversation
        )

    async def _send_notice(self, text: str) -> None:
        await self._send_fragment("notice", notice=text)

    async def _send_fragment(self, name: str, **context) -> None:
        with translation.override(self.language):
            html = render_to_string(f"conversations/partials/stream.html#{name}", context)
        await self.send(text_data=html.strip())
