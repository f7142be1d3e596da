"""The websocket of one open conversation: thin, it parses, checks, calls and renders.

Client → server (JSON): {"type": "send", "content": "…", "client_message_id": "<uuid>"}
(with "image_urls" and "image_ids", the chat's uploads, for a vision model), {"type": "stop"},
{"type": "continue"} (carry on the last reply if it was cut short), {"type": "regenerate"} (a
new version of the last reply, or of "message_id"), {"type": "edit", "message_id": <pk>,
"content": "…"} (a new version of a message, and its reply), and {"type": "hello",
"streaming": [<pk>, …], "last": <pk>}, which the page sends on every (re)connect: the replies
it shows as streaming, and the newest message it has. Other keys (htmx's HEADERS, or a
"model" or "parameters": the model is the conversation's, set in the settings view) and other
types are ignored. The use cases are conversations/replies/service.py's; who may keep the
socket open is socket_auth.py's; what the page has been shown, and how it catches up, is
conversations/replies/follow.py's.

Closing: every refusal closes with a code of the app's own (4000–4999: daphne's websocket
layer refuses the IANA codes such as 1003, and a refused close used to leak the consumer) and
a sentence, as a notice frame and as the close reason. A frame that is binary or not a JSON
object closes the socket with 4003, one over MAX_FRAME_BYTES with 4009 (that socket only); a
session that ended closes every socket it opened with 4403, in every process. Whatever way a
socket ends, its cleanup runs (`__call__`'s finally): the sockets registry, its groups and its
background tasks never outlive it.

Cost bounds: a `hello` names at most follow.MAX_HELLO_IDS replies (repeats count once) and is
answered at once and then at most once per HELLO_INTERVAL (the latest one wins), and a client
that stops reading is dropped once what waits for it passes QWENWEB_SOCKET_BACKLOG_BYTES
(qwenweb/daphne_guard.py).

Server → client: HTML fragments with hx-swap-oob (messages, the end of a reply, notices, the
whole active branch when it changed: conversations/replies/branches.py), and for the streamed
text itself lean frames `+<message pk>:<new text>` (`~<message pk>:<new text>` for a thinking
model's reasoning; the pk is left out, `+:<new text>`, when it is the same as in the socket's
previous frame of that kind) that static/qwenweb/chat.js appends as text: each carries only
the new text, so a reply costs about its own size on the wire (daphne has no
permessage-deflate).
"""

from __future__ import annotations

import asyncio
import json
import logging

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation import gettext as _

from conversations import socket_auth, sockets
from conversations.models import Message
from conversations.replies import control, events, follow, generation, liveness, rules, service
from conversations.replies.follow import GAP
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
# A page sends one hello per (re)connect; more within this many seconds are answered once, at
# the end of it, with the latest one's arguments.
HELLO_INTERVAL = 1.0
# A reply this socket shows as streaming and has heard nothing of for this long is looked up
# in the database: its end may have been announced while the channel layer was away.
QUIET_AFTER = liveness.HEARTBEAT_INTERVAL
FRAME_TYPES = ("send", "stop", "continue", "regenerate", "edit", "hello")
STARTS = ("send", "regenerate", "edit")  # frames that start a reply (_start)


def _from_other_processes(handler: str):
    """A channel-layer handler that passes on what came from another process: this process's
    own events reached its sockets directly (deliver)."""

    async def handle(self, event: dict) -> None:
        if event.get("process") != sockets.PROCESS_ID:
            await getattr(self, handler)(event)

    return handle


class ConversationConsumer(AsyncWebsocketConsumer):
    async def __call__(self, scope, receive, send) -> None:
        # disconnect() runs only when the server reports the close; an error or a
        # cancellation (daphne cancels an application that outlives its socket) skips it.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._clean_up()

    async def dispatch(self, message) -> None:
        # Channels' dispatch first closes the old database connections of its shared sync
        # thread, a hop to that thread and back for every frame and every event. This
        # consumer reaches the database only through conversations/db.py, whose threads check
        # and keep their own connections, so that hop buys nothing here (bench/README.md).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            # An event of a newer release (a rolling restart runs both for a while): skipped,
            # not a reason to drop the socket.
            logger.info("No handler for %s: skipped", message.get("type"))
            return
        await handler(message)

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        conversation = await socket_auth.owned_conversation(user, conversation_id)
        if conversation is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.conversation = conversation
        self.language = socket_auth.language(self.scope)
        self.follow = follow.Follow()
        self.hellos = follow.HelloThrottle(HELLO_INTERVAL)
        self.snapshot_timeouts: dict[int, asyncio.Task] = {}
        self.background: set[asyncio.Task] = set()
        # The socket ends with the session that opened it (socket_auth.py, session_ended):
        # the session is named by a hash, its key being a credential.
        session_key = getattr(self.scope.get("session"), "session_key", None)
        self.session = events.session_tag(session_key) if session_key else ""
        self.session_check = socket_auth.SessionCheck(session_key, user.pk, self._now())
        self.joined = [events.group(conversation.id), events.user_group(user.pk)]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        sockets.add(conversation.id, self)
        self._spawn(self._keep_group_membership())
        self._spawn(self._check_quiet_replies())
        for message_id in await follow.streaming_ids(conversation):
            await self._request_snapshot(message_id)

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
        for group in getattr(self, "joined", ()):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:
                # Redis away: the membership expires with the layer's group_expiry.
                logger.warning("Leaving %s failed", group, exc_info=True)

    async def _refuse_ended_session(self) -> None:
        await self._refuse(CLOSE_FORBIDDEN, _("Your session has ended. Sign in again to go on."))

    async def _refuse(self, code: int, sentence: str) -> None:
        """Close this socket with one of the app's codes, saying why."""
        await self._send_notice(sentence)
        await self.close(code=code, reason=close_reason(sentence))

    # -- client → server ----------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        # A bad frame closes this socket only; the user's other tabs carry on. Sentences made
        # while handling a frame (refusals, notices) speak the page's language.
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
            if kind not in FRAME_TYPES:
                return
            if kind in STARTS:
                # Checked, when due, in the same trip to the database as the start (_start).
                valid = not self.session_check.ended
            else:
                valid = await self.session_check.still_valid(self._now())
            if not valid:
                await self._refuse_ended_session()
                return
            await getattr(self, f"_on_{kind}")(data)
            if self.session_check.due(now := self._now()):
                self._spawn(self.session_check.refresh(now))

    async def _on_send(self, data: dict) -> None:
        client_message_id = rules.clean_client_message_id(data.get("client_message_id"))
        started = await self._start(
            service.areply_start,
            content=data.get("content"),
            client_message_id=client_message_id,
            image_urls=data.get("image_urls"),
            image_ids=data.get("image_ids"),
        )
        if started:
            await self._send_fragment("ack", client_message_id=client_message_id)

    async def _on_regenerate(self, data: dict) -> None:
        await self._start(
            service.areply_regenerate,
            message_id=rules.clean_message_id(data.get("message_id")),
            client_message_id=rules.clean_client_message_id(data.get("client_message_id")),
        )

    async def _on_edit(self, data: dict) -> None:
        await self._start(
            service.areply_edit,
            message_id=rules.clean_message_id(data.get("message_id")),
            content=data.get("content"),
            client_message_id=rules.clean_client_message_id(data.get("client_message_id")),
        )

    async def _start(self, use_case, **arguments) -> bool:
        """Start a reply (a send, a regenerate, an edit); a refusal becomes a notice."""
        try:
            # Outside any request: the trip to the database thread may be shared.
            await use_case(
                conversation=self.conversation,
                together=True,
                guard=self.session_check.guard(self._now()),
                **arguments,
            )
        except socket_auth.SessionEnded:
            await self._refuse_ended_session()
            return False
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

    async def _on_continue(self, data: dict) -> None:
        message_id = rules.clean_message_id(data.get("message_id"))
        try:
            await service.areply_continue(conversation=self.conversation, message_id=message_id)
        except service.ReplyRefused as refusal:
            await self._send_notice(str(refusal))

    async def _on_stop(self, data: dict) -> None:
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

    async def _on_hello(self, data: dict) -> None:
        """Answer a hello at once, or once at the end of HELLO_INTERVAL (follow.HelloThrottle)."""
        request = follow.hello_request(data.get("streaming"), data.get("last"))
        wait = self.hellos.offer(request, self._now())
        if wait == 0:
            await self._hello(*request)
        elif wait is not None:
            self._spawn(self._hello_later(wait))

    async def _hello_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        with translation.override(self.language):
            await self._hello(*self.hellos.take(self._now()))

    async def _hello(self, streaming: list[int], last: int | None) -> None:
        """Bring a (re)connected page up to date: messages it never saw, and the state of the
        replies it shows as streaming."""
        if last is not None:
            missed = await follow.messages_after(self.conversation, last, self.follow.page())
            if missed is None:
                # The page shows another branch than the active one (it changed while this
                # socket was away): show the active one.
                await self._show_branch()
                return
            # Announced to this socket while the query ran: already on the page.
            missed = [message for message in missed if not self.follow.on_page(message.pk)]
            if missed:
                await self._send_messages(missed, append=True)
                for message in missed:
                    if message.is_streaming:
                        await self._request_snapshot(message.pk, force=True)
        for value in streaming:
            if not self.follow.follows(value):
                message = await follow.message(self.conversation, value)
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
            events.Titled.TYPE: self._titled,
            events.Finished.TYPE: self._finished,
        }[event["type"]]
        await handler(event)

    # The channel layer's copies (Channels calls conversation_<x> for type conversation.<x>).
    conversation_created = _from_other_processes("_created")
    conversation_continued = _from_other_processes("_continued")
    conversation_branched = _from_other_processes("_branched")
    conversation_tools = _from_other_processes("_tool_steps")
    conversation_finished = _from_other_processes("_finished")
    conversation_titled = _from_other_processes("_titled")

    async def _created(self, event: dict) -> None:
        messages = [
            Message.from_event(self.conversation, data)
            for data in event["messages"]
            if not self.follow.on_page(data["pk"])
        ]
        # On the page first, then followed: text handed over directly meanwhile is dropped
        # (and caught up from its offset) rather than sent before its element.
        await self._send_messages(messages, append=True)
        for message in messages:
            if message.is_streaming:
                self.follow.follow(message, unless_followed=True)
                await self._watch(message.pk)
        if event.get("title"):
            self.conversation.title = event["title"]
            await self._send_fragment("title", conversation=self.conversation)

    async def _titled(self, event: dict) -> None:
        self.conversation.title = event["title"]
        await self._send_fragment("title", conversation=self.conversation, sidebar=True)

    async def _continued(self, event: dict) -> None:
        """A cut-off reply is being carried on: show it streaming again, from its text."""
        message = await follow.message(self.conversation, event["message_id"])
        if message is None:
            return
        await self._send_messages([message])
        self.follow.follow(message)
        await self._watch(message.pk)

    async def _branched(self, event: dict) -> None:
        """Another branch is active (a regenerate, an edit, a version chosen): show it."""
        await self._show_branch()

    async def _show_branch(self) -> None:
        """Render the active branch in place of the page's messages, as a reload would, and
        follow the reply streaming on it."""
        page = await follow.branch_page(self.conversation)
        messages = page["chat_messages"]
        self.follow.clear_page()
        self.follow.put_on_page(messages)
        await self._send_fragment("branch", conversation=self.conversation, **page)
        for message in messages:
            if message.is_streaming:
                # The page now shows the saved text: deltas carry on from there (a gap
                # between the two is caught up as any other).
                self.follow.follow(message)
                await self._watch(message.pk)

    async def _tool_steps(self, event: dict) -> None:
        """A reply calling tools: show its steps so far (above its text)."""
        if not self.follow.on_page(event["message_id"]):
            return  # not on this page (the page shows it, steps and all, when it gets it)
        message = Message(pk=event["message_id"], tool_steps=event["steps"])
        await self._send_fragment("tools", message=message, oob=True)

    async def conversation_delta(self, event: dict) -> None:
        """A delta over the channel layer, from a generation in another process."""
        if event.get("process") == sockets.PROCESS_ID:
            return
        message_id = event["message_id"]
        if not self.follow.follows(message_id):
            await self._request_snapshot(message_id)
        if not self.follow.in_step(message_id):
            return  # the snapshot on its way includes this text
        await self._send_delta(event)

    async def _direct_delta(self, event: dict) -> None:
        """A delta handed over by a generation running in this process, in its own task."""
        if self.follow.in_step(event["message_id"]):  # else not on the page, or a snapshot
            await self._send_delta(event, direct=True)  # with this text is on its way

    async def _send_delta(self, event: dict, direct: bool = False) -> None:
        """Send only what this socket has not shown yet: no gap, no duplicate."""
        message_id = event["message_id"]
        frame = self.follow.delta(
            message_id, event["offset"], event["text"], event.get("part"), self._now()
        )
        if frame is GAP:
            # A frame went missing (a full channel drops messages): catch up from the source,
            # not in the generation's task when it came from there (it serves every socket).
            if direct:
                self._spawn(self._request_snapshot(message_id, force=True))
            else:
                await self._request_snapshot(message_id, force=True)
        elif frame is not None:
            await self.send(text_data=frame)
        if frame is not GAP and event.get("blocks") and self.follow.in_step(message_id):
            # "=<pk>:[[start, end, html], …]": these blocks of the text, formatted. The page
            # skips those it has (a snapshot's) and moves their text out of the tail.
            await self.send(
                text_data=f"={message_id}:{json.dumps(event['blocks'], ensure_ascii=False)}"
            )

    async def conversation_snapshot(self, event: dict) -> None:
        message_id = event["message_id"]
        timeout = self.snapshot_timeouts.pop(message_id, None)
        if timeout is not None:
            timeout.cancel()
        if not self.follow.awaiting(message_id):
            return  # already in step (or finished meanwhile)
        message = await follow.message(self.conversation, message_id)
        if message is None:
            return
        message.content = event["text"]
        message.reasoning = event.get("reasoning", "")
        await self._send_messages([message])
        self.follow.follow(message)

    async def _finished(self, event: dict) -> None:
        message_id = event["message_id"]
        shown = self.follow.shown(message_id)
        self.follow.end(message_id)
        if "message" in event:
            message = Message.from_event(self.conversation, event["message"])
        else:
            message = await follow.message(self.conversation, message_id)
        if message is None:
            return
        settled = event.get("settled")
        if settled and shown == len(message.content):
            # The page has the whole text, and the settled blocks formatted: it is sent the
            # rest of the reply's render only, and keeps what it shows (chat.js).
            message.kept = settled
        await self._send_messages([message])

    async def user_reply_done(self, event: dict) -> None:
        """A reply of the user's ended in another chat: mark that chat in this page's list."""
        if event["conversation_id"] == str(self.conversation.id):
            return
        await self._send_fragment(
            "reply-done", conversation_id=event["conversation_id"], title=event.get("title", "")
        )

    async def session_ended(self, event: dict) -> None:
        """The session that opened this socket was logged out, or all the user's sessions
        ended (a password change, the account disabled or deleted): close, as a new socket
        would be refused. 4403 makes the page reload, onto the login page."""
        if not event["session"] or event["session"] == self.session:
            with translation.override(self.language):
                await self._refuse_ended_session()

    # -- catching up --------------------------------------------------------------------------

    async def _watch(self, message_id: int) -> None:
        """Ask a reply running in another process to send its text over the channel layer
        too (a generation hands it to the sockets of its own process directly)."""
        if generation.running(message_id) is None:
            await self._ask_generation(
                events.Watch(message_id=message_id, process=sockets.PROCESS_ID)
            )

    async def _request_snapshot(self, message_id: int, force: bool = False) -> None:
        if not self.follow.await_snapshot(message_id, force=force):
            return
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
            await control.ask(self.conversation.id, request)
        except Exception:
            logger.warning("Asking reply %s for %s failed", request.message_id, request.TYPE,
                           exc_info=True)  # fmt: skip

    async def _snapshot_timeout(self, message_id: int) -> None:
        """No generation answered: it ended, or its process is gone. Show what was saved."""
        await asyncio.sleep(SNAPSHOT_TIMEOUT)
        self.snapshot_timeouts.pop(message_id, None)
        if not self.follow.awaiting(message_id):
            return
        if await service.areply_abandon(conversation=self.conversation, message_id=message_id):
            return  # conversation.finished is on its way to every socket
        message = await follow.message(self.conversation, message_id)
        if message is not None:
            await self._send_messages([message])
            self.follow.follow(message)
            if not message.is_streaming:
                self.follow.end(message_id)

    async def _check_quiet_replies(self) -> None:
        """A reply shown streaming that has gone quiet (no text for QUIET_AFTER) is looked up:
        if it ended while its end could not reach this socket (Redis away, in a team), the
        page shows the end now. Costs nothing while text flows; a reply still streaming in
        the database is left to its generation, or to the sweep."""
        while True:
            await asyncio.sleep(QUIET_AFTER / 2)
            for message_id in self.follow.quiet(self._now(), QUIET_AFTER):
                message = await follow.message(self.conversation, message_id)
                # Unless its end arrived meanwhile (then it is no longer followed).
                if not self.follow.follows(message_id) or (message and message.is_streaming):
                    continue
                self.follow.end(message_id)  # ended, or deleted with its chat: stop asking
                if message is not None:
                    await self._send_messages([message])

    async def _keep_group_membership(self) -> None:
        while True:
            await asyncio.sleep(REJOIN_INTERVAL)
            for group in self.joined:
                await self.channel_layer.group_add(group, self.channel_name)

    # -- helpers ------------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def _send_messages(self, messages: list[Message], append: bool = False) -> None:
        self.follow.put_on_page(messages)
        await self._send_fragment(
            "messages", messages=messages, append=append, conversation=self.conversation
        )

    async def _send_notice(self, text: str) -> None:
        await self._send_fragment("notice", notice=text)

    async def _send_fragment(self, name: str, **context) -> None:
        with translation.override(self.language):
            html = render_to_string(f"conversations/partials/stream.html#{name}", context)
        await self.send(text_data=html.strip())
