"""The websocket of one open conversation: thin, it parses, checks, calls and renders.

Client → server (JSON): {"type": "send", "content": "…", "client_message_id": "<uuid>"} (with
"image_urls": "<url> <url>" for a vision model), {"type": "stop"}, {"type": "continue"} (carry
on the last reply if it was cut short), {"type": "regenerate"} (a new version of the last
reply, or of "message_id"), {"type": "edit", "message_id": <pk>, "content": "…"} (a new version
of a message, and its reply), and {"type": "hello", "streaming": [<pk>, …], "last":
<pk>}, which the page sends on every (re)connect: the replies it shows as streaming, and the
newest message it has. Other keys (htmx's HEADERS, or a "model" or "parameters": the model is
the conversation's, set in the settings view) and other types are ignored.

Closing: every refusal closes with a code of the app's own (4000–4999: daphne's websocket
layer refuses the IANA codes such as 1003, and a refused close used to leak the consumer) and
a sentence, as a notice frame and as the close reason. A frame that is binary or not a JSON
object closes the socket with 4003, one over MAX_FRAME_BYTES with 4009 (that socket only). A
logout closes the sockets its session opened, and a password change or an account disabled or
deleted all the user's, with 4403, in every server process (conversations/signals.py); and
since a change made where no signal reaches (`manage.py shell`, another host on the in-memory
layer) would leave them open, a socket also re-checks its session before it acts on a frame
(at most every SESSION_CHECK_INTERVAL seconds) and closes with 4403 when it has ended.
Whatever way a socket ends, its cleanup runs (`__call__`'s finally): the sockets registry, its
groups and its background tasks never outlive it.

Cost bounds: a `hello` names at most MAX_HELLO_IDS replies (repeats count once) and is
answered at once and then at most once per HELLO_INTERVAL (the latest one wins), and a client
that stops reading is dropped once what waits for it passes QWENWEB_SOCKET_BACKLOG_BYTES
(qwenweb/daphne_guard.py).

Server → client: HTML fragments with hx-swap-oob (messages, the end of a reply, notices, the
whole active branch when it changed: conversations/replies/branches.py), and
for the streamed text itself lean frames `+<message pk>:<new text>` (`~<message pk>:<new text>`
for a thinking model's reasoning; the pk is left out, `+:<new text>`, when it is the same as
in the socket's previous frame of that kind) that static/qwenweb/chat.js appends as text: each
carries only the new text, so a reply costs about its own size on the wire (daphne has no
permessage-deflate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from importlib import import_module

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib import auth
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.crypto import constant_time_compare
from django.utils.translation import gettext as _
from django.utils.translation.trans_real import parse_accept_lang_header

from conversations import sockets
from conversations.db import db_async
from conversations.models import Conversation, Message
from conversations.replies import branches, events, generation, liveness, service
from qwenweb.daphne_guard import close_reason

logger = logging.getLogger(__name__)

# Close codes: the app's own range (4000-4999), the last three digits after HTTP's where one fits.
CLOSE_FORBIDDEN = 4403  # signed out, session ended, or not your chat: the page reloads
CLOSE_UNSUPPORTED = 4003  # a binary frame, or one that is not a JSON object
CLOSE_TOO_BIG = 4009  # a frame over MAX_FRAME_BYTES
# How long a socket waits for the running generation to answer a catch-up request before it
# concludes the generation is gone and falls back to what the database holds.
SNAPSHOT_TIMEOUT = 2.0
# Group membership expires in the channel layer (group_expiry, a day): re-join well before.
REJOIN_INTERVAL = 3600
MAX_FRAME_BYTES = 256 * 1024
MAX_CATCH_UP_MESSAGES = 100
# A hello names the replies a page shows as streaming: a page has one or two.
MAX_HELLO_IDS = 20
# A page sends one hello per (re)connect; more within this many seconds are answered once, at
# the end of it, with the latest one's arguments.
HELLO_INTERVAL = 1.0
# How long a socket trusts its session between checks (a password change, a deactivation or
# a deleted session closes it at the next frame after at most this long).
SESSION_CHECK_INTERVAL = 2.0
# A reply this socket shows as streaming and has heard nothing of for this long is looked up
# in the database: its end may have been announced while the channel layer was away.
QUIET_AFTER = liveness.HEARTBEAT_INTERVAL


class ConversationConsumer(AsyncWebsocketConsumer):
    conversation: Conversation

    async def __call__(self, scope, receive, send) -> None:
        # disconnect() runs only when the server reports the close; an error or a
        # cancellation (daphne cancels an application that outlives its socket) skips it.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._clean_up()

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        conversation = await _owned_conversation(user, conversation_id)
        if conversation is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.conversation = conversation
        self.language = self._language()
        # message pk -> characters of its text this socket has shown, or None while waiting
        # for the snapshot that tells where the reply stands.
        self.shown: dict[int, int | None] = {}
        self.shown_reasoning: dict[int, int] = {}  # the same for the model's thinking
        self.last_target: dict[str, int] = {}  # the message the last lean frame of a kind went to
        self.delivered: set[int] = set()  # messages this socket has put on the page
        self.versions: dict[int, object] = {}  # their places among their versions, if known
        self.snapshot_timeouts: dict[int, asyncio.Task] = {}
        self.heard: dict[int, float] = {}  # message pk -> when this socket last had word of it
        self.background: set[asyncio.Task] = set()
        self.hello_answered_at = float("-inf")
        self.hello_waiting: tuple[list[int], int | None] | None = None
        self.user_id = user.pk
        # The socket ends with the session that opened it (see session_ended): the session is
        # named by a hash, its key being a credential.
        self.session_key = getattr(self.scope.get("session"), "session_key", None)
        self.session = events.session_tag(self.session_key) if self.session_key else ""
        # The auth middleware checked the session just now.
        self.session_checked_at = asyncio.get_running_loop().time()
        self.group = events.group(conversation.id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.user_group = events.user_group(user.pk)
        await self.channel_layer.group_add(self.user_group, self.channel_name)
        await self.accept()
        sockets.add(conversation.id, self)
        self._spawn(self._keep_group_membership())
        self._spawn(self._check_quiet_replies())
        for message_id in await _streaming_message_ids(conversation):
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
        await self._clean_up()

    async def _clean_up(self) -> None:
        """Leave the registry, the groups and the background tasks; runs once, however the
        socket ended."""
        if getattr(self, "cleaned_up", False):
            return
        self.cleaned_up = True
        for task in list(getattr(self, "background", ())):
            task.cancel()
        if not hasattr(self, "conversation"):
            return  # refused at connect: it joined nothing
        sockets.discard(self.conversation.id, self)
        for name in ("group", "user_group"):
            if hasattr(self, name):
                try:
                    await self.channel_layer.group_discard(getattr(self, name), self.channel_name)
                except Exception:
                    # Redis away: the membership expires with the layer's group_expiry.
                    logger.warning("Leaving %s failed", getattr(self, name), exc_info=True)

    async def _refuse(self, code: int, sentence: str) -> None:
        """Close this socket with one of the app's codes, saying why."""
        await self._send_notice(sentence)
        await self.close(code=code, reason=close_reason(sentence))

    # -- client → server ----------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        # A bad frame closes this socket only; the user's other tabs carry on.
        with translation.override(self.language):
            if text_data is None:
                await self._refuse(
                    CLOSE_UNSUPPORTED, _("This connection takes text messages only.")
                )
                return
            if len(text_data) > MAX_FRAME_BYTES:
                await self._refuse(CLOSE_TOO_BIG, _("That message was too large to handle."))
                return
            try:
                data = json.loads(text_data)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                await self._refuse(CLOSE_UNSUPPORTED, _("This connection takes JSON objects only."))
                return
            kind = data.get("type")
            if kind not in ("send", "stop", "continue", "regenerate", "edit", "hello"):
                return
            if not await self._session_still_valid():
                await self._refuse(
                    CLOSE_FORBIDDEN, _("Your session has ended. Sign in again to go on.")
                )
                return
            # Sentences made while handling this frame (refusals, notices) speak the page's
            # language.
            if kind == "send":
                await self._send_message(data)
            elif kind == "stop":
                await self._stop()
            elif kind == "continue":
                await self._continue(data.get("message_id"))
            elif kind == "regenerate":
                await self._start(
                    service.areply_regenerate,
                    message_id=_message_id(data.get("message_id")),
                    client_message_id=_client_message_id(data),
                )
            elif kind == "edit":
                await self._start(
                    service.areply_edit,
                    message_id=_message_id(data.get("message_id")),
                    content=data.get("content"),
                    client_message_id=_client_message_id(data),
                )
            else:
                await self._hello_request(data.get("streaming"), data.get("last"))

    async def _session_still_valid(self) -> bool:
        """Whether the session that opened this socket still signs its user in: not logged
        out or deleted, the password unchanged, the account active. Checked against the
        session store and the user's row, so a change made anywhere counts (a signal reaches
        only its own process); trusted for SESSION_CHECK_INTERVAL after a check."""
        now = asyncio.get_running_loop().time()
        if now - self.session_checked_at < SESSION_CHECK_INTERVAL:
            return True
        try:
            valid = await _session_signs_in(self.session_key, self.user_id)
        except Exception:
            # The database is away: the frame's own work needs it too, and says so.
            logger.warning("Checking the session of a socket failed", exc_info=True)
            return True
        if valid:
            self.session_checked_at = now
        return valid

    async def _send_message(self, data: dict) -> None:
        client_message_id = _client_message_id(data)
        started = await self._start(
            service.areply_start,
            content=data.get("content"),
            client_message_id=client_message_id,
            image_urls=data.get("image_urls"),
        )
        if started:
            await self._send_fragment("ack", client_message_id=client_message_id)

    async def _start(self, use_case, **arguments) -> bool:
        """Start a reply (a send, a regenerate, an edit); a refusal becomes a notice."""
        try:
            await use_case(conversation=self.conversation, **arguments)
        except service.ReplyRefused as refusal:
            await self._send_notice(str(refusal))
            return False
        except Exception:
            # The socket stays open and the text stays where it was typed: the user can resend.
            logger.exception("Starting a reply in %s failed", self.conversation.id)
            await self._send_notice(
                _("Your message could not be sent because of a problem on this server. It is "
                  "still in the box below: try again in a moment.")
            )  # fmt: skip
            return False
        return True

    async def _continue(self, message_id: object) -> None:
        try:
            await service.areply_continue(
                conversation=self.conversation, message_id=_message_id(message_id)
            )
        except service.ReplyRefused as refusal:
            await self._send_notice(str(refusal))

    async def _stop(self) -> None:
        try:
            message_ids = await service.areply_stop(conversation=self.conversation)
        except service.StopUndelivered as undelivered:
            await self._send_notice(str(undelivered))
            return
        if message_ids:
            # A live generation stops within moments; one still "streaming" after that has
            # no process behind it, and must not keep the chat blocked.
            self._spawn(self._abandon_later(message_ids))

    async def _abandon_later(self, message_ids: list[int]) -> None:
        await asyncio.sleep(SNAPSHOT_TIMEOUT)
        for message_id in message_ids:
            await service.areply_abandon(conversation=self.conversation, message_id=message_id)

    async def _hello_request(self, streaming: object, last: object) -> None:
        """Answer a hello at once, or, within HELLO_INTERVAL of the last answer, once at the
        end of it (with the latest arguments): a page sends one per connect, and each answer
        may render many messages."""
        ids = list(dict.fromkeys(v for v in streaming if type(v) is int)) if isinstance(
            streaming, list
        ) else []  # fmt: skip
        request = (ids[:MAX_HELLO_IDS], last if type(last) is int else None)
        if self.hello_waiting is not None:
            self.hello_waiting = request
            return
        wait = self.hello_answered_at + HELLO_INTERVAL - asyncio.get_running_loop().time()
        if wait <= 0:
            self.hello_answered_at = asyncio.get_running_loop().time()
            await self._hello(*request)
            return
        self.hello_waiting = request
        self._spawn(self._hello_later(wait))

    async def _hello_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        request, self.hello_waiting = self.hello_waiting, None
        self.hello_answered_at = asyncio.get_running_loop().time()
        with translation.override(self.language):
            await self._hello(*request)

    async def _hello(self, streaming: list[int], last: int | None) -> None:
        """Bring a (re)connected page up to date: messages it never saw, and the state of the
        replies it shows as streaming."""
        if last is not None:
            missed = await _messages_after(self.conversation, last, exclude=self.delivered)
            if missed is None:
                # The page shows another branch than the active one (it changed while this
                # socket was away): show the active one.
                await self._show_branch()
                return
            # Announced to this socket while the query ran: already on the page.
            missed = [message for message in missed if message.pk not in self.delivered]
            if missed:
                await self._send_messages(missed, append=True)
                for message in missed:
                    if message.is_streaming:
                        await self._request_snapshot(message.pk, force=True)
        for value in streaming:
            if value not in self.shown:
                message = await _message(self.conversation, value)
                if message is not None and not message.is_streaming:
                    await self._send_messages([message])

    # -- group → client -----------------------------------------------------------------------

    # Events from a generation or a use case in this process come through deliver(), in order
    # (conversations/sockets.py); the channel layer brings those of other processes, and its
    # copies of this process's own are skipped.

    async def deliver(self, event: dict) -> None:
        handler = {
            events.Created.TYPE: self._created,
            events.Continued.TYPE: self._continued,
            events.Branched.TYPE: self._branched,
            events.ToolSteps.TYPE: self._tool_steps,
            events.Delta.TYPE: self._direct_delta,
            events.Finished.TYPE: self._finished,
        }[event["type"]]
        await handler(event)

    async def conversation_created(self, event: dict) -> None:
        if event.get("process") != sockets.PROCESS_ID:
            await self._created(event)

    async def conversation_continued(self, event: dict) -> None:
        if event.get("process") != sockets.PROCESS_ID:
            await self._continued(event)

    async def conversation_branched(self, event: dict) -> None:
        if event.get("process") != sockets.PROCESS_ID:
            await self._branched(event)

    async def conversation_tools(self, event: dict) -> None:
        if event.get("process") != sockets.PROCESS_ID:
            await self._tool_steps(event)

    async def _tool_steps(self, event: dict) -> None:
        """A reply calling tools: show its steps so far (above its text)."""
        if event["message_id"] not in self.delivered:
            return  # not on this page (the page shows it, steps and all, when it gets it)
        message = Message(pk=event["message_id"], tool_steps=event["steps"])
        await self._send_fragment("tools", message=message, oob=True)

    async def conversation_finished(self, event: dict) -> None:
        if event.get("process") != sockets.PROCESS_ID:
            await self._finished(event)

    async def _created(self, event: dict) -> None:
        messages = [
            Message.from_event(self.conversation, data)
            for data in event["messages"]
            if data["pk"] not in self.delivered
        ]
        # On the page first, then counted as shown: text handed over directly meanwhile is
        # dropped (and caught up from its offset) rather than sent before its element.
        await self._send_messages(messages, append=True)
        for message in messages:
            if message.is_streaming:
                self.shown.setdefault(message.pk, len(message.content))
                self.shown_reasoning.setdefault(message.pk, len(message.reasoning))
                await self._watch(message.pk)
        if event.get("title"):
            self.conversation.title = event["title"]
            await self._send_fragment("title", conversation=self.conversation)

    async def _continued(self, event: dict) -> None:
        """A cut-off reply is being carried on: show it streaming again, from its text."""
        message = await _message(self.conversation, event["message_id"])
        if message is None:
            return
        await self._send_messages([message])
        self.shown[message.pk] = len(message.content)
        self.shown_reasoning[message.pk] = len(message.reasoning)
        await self._watch(message.pk)

    async def _branched(self, event: dict) -> None:
        """Another branch is active (a regenerate, an edit, a version chosen): show it."""
        await self._show_branch()

    async def _show_branch(self) -> None:
        """Render the active branch in place of the page's messages, as a reload would, and
        follow the reply streaming on it."""
        page = await _branch_page(self.conversation)
        messages = page["chat_messages"]
        self.delivered = set()
        self._remember(messages)
        await self._send_fragment("branch", conversation=self.conversation, **page)
        for message in messages:
            if message.is_streaming:
                # The page now shows the saved text: deltas carry on from there (a gap
                # between the two is caught up as any other).
                self.shown[message.pk] = len(message.content)
                self.shown_reasoning[message.pk] = len(message.reasoning)
                await self._watch(message.pk)

    async def conversation_delta(self, event: dict) -> None:
        """A delta over the channel layer, from a generation in another process."""
        if event.get("process") == sockets.PROCESS_ID:
            return
        message_id = event["message_id"]
        if message_id not in self.shown:
            await self._request_snapshot(message_id)
        if self.shown[message_id] is None:
            return  # the snapshot on its way includes this text
        await self._send_delta(message_id, event["offset"], event["text"], event.get("part"))

    async def _direct_delta(self, event: dict) -> None:
        """A delta handed over by a generation running in this process, in its own task."""
        message_id = event["message_id"]
        if self.shown.get(message_id) is None:
            return  # not on this page yet, or a snapshot with this text is on its way
        await self._send_delta(
            message_id, event["offset"], event["text"], event.get("part"), direct=True
        )

    async def conversation_snapshot(self, event: dict) -> None:
        message_id = event["message_id"]
        timeout = self.snapshot_timeouts.pop(message_id, None)
        if timeout is not None:
            timeout.cancel()
        if self.shown.get(message_id, 0) is not None:
            return  # already in step (or finished meanwhile)
        message = await _message(self.conversation, message_id)
        if message is None:
            return
        message.content = event["text"]
        message.reasoning = event.get("reasoning", "")
        await self._send_messages([message])
        self.shown[message_id] = len(message.content)
        self.shown_reasoning[message_id] = len(message.reasoning)

    async def _finished(self, event: dict) -> None:
        message_id = event["message_id"]
        self.shown.pop(message_id, None)
        self.shown_reasoning.pop(message_id, None)
        if "message" in event:
            message = Message.from_event(self.conversation, event["message"])
        else:
            message = await _message(self.conversation, message_id)
        if message is not None:
            await self._send_messages([message])

    async def session_ended(self, event: dict) -> None:
        """The session that opened this socket was logged out, or all the user's sessions
        ended (a password change, the account disabled or deleted): close, as a new socket
        would be refused. 4403 makes the page reload, onto the login page."""
        if not event["session"] or event["session"] == self.session:
            with translation.override(self.language):
                await self._refuse(
                    CLOSE_FORBIDDEN, _("Your session has ended. Sign in again to go on.")
                )

    # -- helpers ------------------------------------------------------------------------------

    async def _send_delta(
        self, message_id: int, offset: int, text: str, part: str | None = "text", direct=False
    ) -> None:
        """Send only what this socket has not shown yet: no gap, no duplicate. The answer
        goes in `+<pk>:` frames, the model's thinking in `~<pk>:` frames."""
        self.heard[message_id] = asyncio.get_running_loop().time()
        thinking = part == "reasoning"
        counts = self.shown_reasoning if thinking else self.shown
        shown = counts.get(message_id) or 0
        end = offset + len(text)
        if end <= shown:
            return
        if offset > shown:
            # A frame went missing (a full channel drops messages): catch up from the source.
            if direct:  # not in the generation's task: it serves every socket
                self.shown[message_id] = None
                self._spawn(self._request_snapshot(message_id, force=True))
            else:
                await self._request_snapshot(message_id, force=True)
            return
        counts[message_id] = end
        marker = "~" if thinking else "+"
        # The pk only when it changes: most frames are `+:<text>`, a few bytes saved on
        # each of a reply's hundreds of frames.
        target = "" if self.last_target.get(marker) == message_id else str(message_id)
        self.last_target[marker] = message_id
        await self.send(text_data=f"{marker}{target}:{text[shown - offset :]}")

    async def _watch(self, message_id: int) -> None:
        """Ask a reply running in another process to send its text over the channel layer
        too (a generation hands it to the sockets of its own process directly)."""
        if generation.running(message_id) is None:
            await self._ask_generation(
                events.Watch(message_id=message_id, process=sockets.PROCESS_ID)
            )

    async def _request_snapshot(self, message_id: int, force: bool = False) -> None:
        if not force and message_id in self.shown:
            return
        self.shown[message_id] = None
        local = generation.running(message_id)
        if local is not None:
            snapshot = events.Snapshot(
                message_id=message_id, text=local.text, reasoning=local.reasoning
            )
            await self.conversation_snapshot(snapshot.as_message())
            return
        await self._ask_generation(
            events.Sync(
                message_id=message_id, reply_channel=self.channel_name, process=sockets.PROCESS_ID
            )
        )
        if message_id not in self.snapshot_timeouts:
            self.snapshot_timeouts[message_id] = self._spawn(self._snapshot_timeout(message_id))

    async def _ask_generation(self, request: events.Sync | events.Watch) -> None:
        """Send a request to the generation of a reply, wherever it runs. A channel layer
        that is away (Redis restarting) loses it but closes no socket: a lost catch-up request
        ends in its timeout (the saved text), and the next gap in the frames asks again."""
        try:
            await self.channel_layer.group_send(
                events.control_group(self.conversation.id), request.as_message()
            )
        except Exception:
            logger.warning("Asking reply %s for %s failed", request.message_id, request.TYPE,
                           exc_info=True)  # fmt: skip

    async def _snapshot_timeout(self, message_id: int) -> None:
        """No generation answered: it ended, or its process is gone. Show what was saved."""
        await asyncio.sleep(SNAPSHOT_TIMEOUT)
        self.snapshot_timeouts.pop(message_id, None)
        if self.shown.get(message_id, 0) is not None:
            return
        if await service.areply_abandon(conversation=self.conversation, message_id=message_id):
            return  # conversation.finished is on its way to every socket
        message = await _message(self.conversation, message_id)
        if message is not None:
            await self._send_messages([message])
            self.shown[message_id] = len(message.content)
            self.shown_reasoning[message_id] = len(message.reasoning)
            if not message.is_streaming:
                self.shown.pop(message_id, None)

    async def _keep_group_membership(self) -> None:
        while True:
            await asyncio.sleep(REJOIN_INTERVAL)
            await self.channel_layer.group_add(self.group, self.channel_name)
            await self.channel_layer.group_add(self.user_group, self.channel_name)

    async def _check_quiet_replies(self) -> None:
        """A reply shown streaming that has gone quiet (no text for QUIET_AFTER) is looked up:
        if it ended while its end could not reach this socket (Redis away, in a team), the
        page shows the end now. Costs nothing while text flows; a reply still streaming in
        the database is left to its generation, or to the sweep."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(QUIET_AFTER / 2)
            now = loop.time()
            for message_id in list(self.heard):
                if message_id not in self.shown:
                    del self.heard[message_id]
            for message_id in list(self.shown):
                if now - self.heard.setdefault(message_id, now) < QUIET_AFTER:
                    continue
                self.heard[message_id] = now
                message = await _message(self.conversation, message_id)
                # Unless its end arrived meanwhile (then it is no longer in `shown`).
                if message_id not in self.shown or (message and message.is_streaming):
                    continue
                del self.shown[message_id]  # ended, or deleted with its chat: stop asking
                self.shown_reasoning.pop(message_id, None)
                if message is not None:
                    await self._send_messages([message])

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def _remember(self, messages: list[Message]) -> None:
        """Note what is on the page, and carry each message's place among its versions over
        to a later rendering that does not know it (a reply's end comes from its generation,
        which does not)."""
        for message in messages:
            self.delivered.add(message.pk)
            if message.versions is not None:
                self.versions[message.pk] = message.versions
            elif message.pk in self.versions:
                message.versions = self.versions[message.pk]

    async def _send_messages(self, messages: list[Message], append: bool = False) -> None:
        self._remember(messages)
        await self._send_fragment(
            "messages", messages=messages, append=append, conversation=self.conversation
        )

    async def _send_notice(self, text: str) -> None:
        await self._send_fragment("notice", notice=text)

    async def _send_fragment(self, name: str, **context) -> None:
        with translation.override(self.language):
            html = render_to_string(f"conversations/partials/stream.html#{name}", context)
        await self.send(text_data=html.strip())


# db_async rather than the ORM's a… methods: see conversations/db.py.


@db_async
def _owned_conversation(user, conversation_id) -> Conversation | None:
    return (
        Conversation.objects.owned_by(user)
        .select_related("model")
        .filter(pk=conversation_id)
        .first()
    )


@db_async
def _session_signs_in(session_key: str | None, user_id) -> bool:
    """What a page request would find: the session still there and signing this user in, its
    password hash today's (or one made with a SECRET_KEY_FALLBACKS key), and the account
    active as its backend sees it. The checks of django.contrib.auth.get_user, without its
    writes: it would cycle the key of a session hashed with a fallback secret, and a key
    cycled here reaches no browser (the page's own session would be gone)."""
    if not session_key:
        return False
    data = import_module(settings.SESSION_ENGINE).SessionStore(session_key).load()
    backend_path = data.get(auth.BACKEND_SESSION_KEY)
    if str(data.get(auth.SESSION_KEY)) != str(user_id) or (
        backend_path not in settings.AUTHENTICATION_BACKENDS
    ):
        return False
    user = auth.load_backend(backend_path).get_user(user_id)
    stored = data.get(auth.HASH_SESSION_KEY) or ""
    if user is None or not stored:
        return False
    hashes = [user.get_session_auth_hash()] + [
        user._get_session_auth_hash(secret=secret) for secret in settings.SECRET_KEY_FALLBACKS
    ]
    return any(constant_time_compare(stored, value) for value in hashes)


@db_async
def _message(conversation: Conversation, pk: int) -> Message | None:
    message = conversation.messages.filter(pk=pk).prefetch_related("images").first()
    if message is not None:
        branches.with_versions([message], branches.load(conversation))
    return message


@db_async
def _messages_after(conversation: Conversation, pk: int, exclude: set[int]) -> list[Message] | None:
    """The active branch's messages after `pk`, the newest a page has; None when `pk` is not
    on the active branch (the page shows another one)."""
    conversation.refresh_from_db(fields=["current_message"])
    tree = branches.load(conversation)
    path = branches.active_path(conversation, tree)
    if pk and pk not in path and pk in tree:
        return None
    after = [p for p in path if p > pk and p not in exclude][:MAX_CATCH_UP_MESSAGES]
    messages = list(
        conversation.messages.filter(pk__in=after).prefetch_related("images").order_by("pk")
    )
    return branches.with_versions(messages, tree)


@db_async
def _branch_page(conversation: Conversation) -> dict:
    conversation.refresh_from_db(fields=["current_message"])
    return branches.page(conversation, size=MAX_CATCH_UP_MESSAGES)


def _message_id(value: object) -> int | None:
    """A message pk from a frame: a number, or its digits as text (htmx's ws-send sends a
    form's fields as text)."""
    if type(value) is int:
        return value
    return int(value) if isinstance(value, str) and value.isdecimal() and len(value) < 19 else None


def _client_message_id(data: dict) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(data.get("client_message_id")))
    except ValueError:
        return None


@db_async
def _streaming_message_ids(conversation: Conversation) -> list[int]:
    return list(
        conversation.messages.filter(status=Message.Status.STREAMING).values_list("pk", flat=True)
    )
