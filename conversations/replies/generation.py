"""One reply being written: stream from DashScope, coalesce, publish, checkpoint, finish.

A Generation runs as its own asyncio task, not inside a websocket consumer, so a closed tab or
a reload does not stop it. It publishes to the conversation's group (every socket, any
process), hears stop and catch-up requests through its process's one subscription
(control.py), checkpoints the partial text to the database, and saves the result once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import itertools
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from conversations import sockets
from conversations.dashscope import (
    ChatRequest,
    DashScopeClient,
    DashScopeError,
    Finish,
    ReasoningDelta,
    SearchResults,
    TextDelta,
    ToolCallAccumulator,
    Usage,
)
from conversations.dashscope.transport import request_sent
from conversations.db import db_async, quiet
from conversations.errors import ToolRoundsExceeded, describe_error
from conversations.models import Message
from conversations.rendering import may_settle, render_settled
from conversations.replies import (
    control,
    costs,
    events,
    intake,
    liveness,
    prompt,
    titles,
    tools,
)

logger = logging.getLogger(__name__)

FINISH_ATTEMPTS = 4
# How long the announcement of a new reply waits for its request to go out (it usually takes
# a fraction of a millisecond over a kept connection; a new one to DashScope can take longer).
REQUEST_HEAD_START = 0.05
# How long a new reply's announcement waits, at most, while other sends are on their way to
# the database and out (db.quiet): their requests go out first. Under a steady flood of sends
# there is always one, and every announcement (and the ack its socket then gets) waits this.
# Long enough for fifty sends at once to be out on this 2-CPU machine (130-250 ms), short of
# DashScope's first token (a reply publishes nothing before its announcement); at 0.1 s the
# announcements of the first sends held up the last ones' requests (bench/README.md).
ANNOUNCE_DEFER = 0.25
# Rounds of tool calls one reply may make; a model still asking after them is stopped.
MAX_TOOL_ROUNDS = 5

# Strong references to the replies running in this process: asyncio keeps only weak ones, and
# an unreferenced task can vanish mid-reply.
_running: dict[int, Generation] = {}


def running(message_id: int) -> Generation | None:
    return _running.get(message_id)


def running_count() -> int:
    return len(_running)


@dataclass
class Generation:
    conversation_id: str
    request: ChatRequest
    client: DashScopeClient
    # The reply's pk. None while it is not written yet (a send's request goes out before its
    # messages are written, service.reply_plan): the generation then uses nothing that comes
    # back until adopt() gives it the reply, and ends unheard if abandon() comes instead.
    message_id: int | None = None
    # The reply's fencing token (Message.writer): saves change the message only while it is
    # this generation's; None (a test's own message) writes whatever it holds.
    writer: uuid.UUID | None = None
    frame_interval: float = field(default_factory=lambda: settings.QWENWEB_FRAME_INTERVAL)
    checkpoint_interval: float = field(default_factory=lambda: settings.QWENWEB_CHECKPOINT_INTERVAL)

    text: str = ""
    reasoning: str = ""
    # Characters of `text` already published. Each frame carries its offset in the reply,
    # which is the sequence number sockets use to drop repeats and notice gaps.
    published: int = 0
    reasoning_published: int = 0
    # Characters of `text` whose Markdown blocks have settled and gone out rendered, once for
    # every socket (rendering.settled_blocks): the pages show them formatted while the rest
    # streams as text.
    settled: int = 0
    # A continued reply adds to what it had used and cost before (conversations/replies/costs.py).
    earlier_input_tokens: int = 0
    earlier_output_tokens: int = 0
    earlier_reasoning_tokens: int = 0
    earlier_cost: Decimal | None = None
    earlier_cost_currency: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    request_id: str | None = None
    # Tokens of the finished rounds of a reply that called tools (each round is a request).
    spent_input: int = 0
    spent_output: int = 0
    spent_reasoning: int = 0
    tool_steps: list = field(default_factory=list)
    # The web pages the reply's search drew on (SearchResults from the client), cleaned.
    sources: list = field(default_factory=list)
    stop_requested: bool = False
    created_at: datetime.datetime | None = None  # the reply's, for the page's timestamp
    owner_id: int | None = None  # whose sockets on other chats hear that it ended
    title: str = ""  # the chat's, for their list
    # The chat's first reply: once it is complete, the title model may title the chat.
    retitle: bool = False
    # Continue gave the reply to a newer generation (this one was taken for dead): stop, and
    # save and announce nothing more.
    superseded: bool = False
    task: asyncio.Task | None = None

    @property
    def json_mode(self) -> bool:
        """A reply in JSON mode is shown as text while it streams, as formatted JSON after."""
        return "response_format" in self.request.parameters

    def __post_init__(self) -> None:
        self._sent = asyncio.Event()  # its (first) request has gone out
        self._announced = asyncio.Event()  # every socket has been told of it
        self._dirty = asyncio.Event()
        self._done = False
        self._whole = False  # the model has finished (its Finish came): the text is all here
        self._last_checkpoint = time.monotonic()
        self._checkpointed = 0
        self._checkpoint_task: asyncio.Task | None = None
        self._publish_failures = 0
        # Set while the publisher waits out the frame interval; woken early when the
        # upstream ends, so the reply's last frame goes at once.
        self._waker: asyncio.Future | None = None
        self.layer = get_channel_layer()
        # A socket in another process reads this reply: deltas go over the channel layer too.
        self.remote_readers = False
        # Set once the reply is written (its announcement as the result), for a generation
        # started before (message_id None); cancelled if it never will be.
        self._saved: asyncio.Future | None = None
        if self.message_id is None:
            self._saved = asyncio.get_running_loop().create_future()

    def adopt(self, *, message_id: int, announce: Callable[[], Awaitable[None]], **fields) -> bool:
        """The reply this generation's request was sent for is written: go on as its writer
        (`fields`: created_at, owner_id, title, retitle, as given to a new Generation). False
        if the generation has ended meanwhile (cancelled: the server stopping): the reply
        needs another."""
        if self.task is None or self.task.done() or self._saved.done():
            return False
        self.message_id = message_id
        for name, value in fields.items():
            setattr(self, name, value)
        _running[message_id] = self
        self._saved.set_result(announce)
        return True

    def abandon(self) -> None:
        """The reply this generation's request was sent for will not be written (refused, or
        the write failed): drop the request, save and announce nothing. Once adopted, nothing."""
        if self._saved is not None and not self._saved.done():
            self._saved.cancel()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, announce: Callable[[], Awaitable[None]] | None = None) -> asyncio.Task:
        """Start the reply in its own task; returns once every socket has been told of it."""
        await self.launch(announce)
        await self.announced()
        return self.task

    async def launch(self, announce: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start the reply in its own task; returns once its upstream request has gone out
        (or REQUEST_HEAD_START has passed, or the reply has ended).

        The upstream request goes out first: DashScope takes hundreds of milliseconds to the
        first token, and announcing the messages and rendering them on every socket fit in
        that wait instead of delaying the request (P1 in bench/README.md). Nothing is
        published before the announcement, so every socket knows the message before text for
        it arrives, and the process hears the control group before it (control.py), so a
        Stop sent the moment the reply appears reaches the generation.
        """
        if self._saved is None:
            _running[self.message_id] = self
        # A fresh context: the reply outlives the request or socket that started it, and must
        # not inherit its per-request state (asgiref's executor for that request quits with it).
        self.task = asyncio.create_task(
            self.run(announce),
            name=f"generation-{self.message_id or 'unsaved'}",
            context=contextvars.Context(),
        )
        self.task.add_done_callback(self._forget)
        sent = asyncio.ensure_future(self._sent.wait())
        try:
            await asyncio.wait(
                {self.task, sent}, timeout=REQUEST_HEAD_START, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            sent.cancel()

    async def announced(self) -> None:
        """Return once every socket has been told of the reply (or the reply has ended)."""
        announced = asyncio.ensure_future(self._announced.wait())
        try:
            await asyncio.wait({self.task, announced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            announced.cancel()

    def _forget(self, _task: asyncio.Task) -> None:
        if _running.get(self.message_id) is self:  # not a newer generation of the reply
            del _running[self.message_id]

    async def run(self, announce: Callable[[], Awaitable[None]] | None = None) -> None:
        sent = self._sent
        token = request_sent.set(sent)  # the upstream task's context is a copy of this one
        try:
            self._upstream = asyncio.create_task(self._consume())
        finally:
            request_sent.reset(token)
        self._upstream.add_done_callback(self._upstream_ended)
        if self._saved is not None:
            try:
                announce = await asyncio.shield(self._saved)
            except BaseException:
                self._upstream.cancel()
                await asyncio.gather(self._upstream, return_exceptions=True)
                if self._saved.cancelled():  # abandoned: the request goes unanswered
                    return
                raise
        if self.stop_requested:
            self._upstream.cancel()
        publisher = None
        status, error = Message.Status.ERROR, None
        try:
            try:
                # Let the request go out before the work below (P1, bench/README.md): the
                # announcement renders on this loop, and would hold up the request's writes.
                wrote = asyncio.ensure_future(sent.wait())
                await asyncio.wait(
                    {wrote, self._upstream},
                    timeout=REQUEST_HEAD_START,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                wrote.cancel()
                # Other sends on their way to the database and out: their requests go out
                # before this announcement is rendered (it has hundreds of milliseconds before
                # the first token; P1, bench/README.md).
                await quiet(ANNOUNCE_DEFER)
                await control.listening(self.layer)
                if announce is not None:
                    await announce()
            except Exception:
                # The reply goes on: sockets that missed the announcement catch up from the
                # database when they reconnect or load the page.
                logger.warning("Announcing reply %s failed", self.message_id, exc_info=True)
            finally:
                self._announced.set()
            publisher = asyncio.create_task(self._publish_loop())
            await asyncio.wait({self._upstream})
            if self._upstream.cancelled():
                # Stopped, unless the model had finished it already (the request was still
                # being closed): the page shows it whole, and so it is saved.
                status = Message.Status.COMPLETE if self._whole else Message.Status.STOPPED
            elif (exc := self._upstream.exception()) is not None:
                error = exc
                if not isinstance(exc, DashScopeError | ToolRoundsExceeded):
                    logger.error("Reply %s failed", self.message_id, exc_info=exc)
            else:
                status = Message.Status.COMPLETE
        finally:
            self._upstream.cancel()
            self._done = True
            self._dirty.set()
            self._wake()
            for outcome in await asyncio.gather(
                publisher or asyncio.sleep(0),
                self._checkpoint_task or asyncio.sleep(0),
                return_exceptions=True,
            ):
                if isinstance(outcome, Exception):
                    logger.error("Reply %s: publisher failed", self.message_id, exc_info=outcome)
        await self._finish(status, error)

    async def _finish(self, status: str, error: BaseException | None) -> None:
        """Save the result once, and tell every socket. A database that is briefly away gets
        a few more tries: the text is only in memory now."""
        if self.superseded:
            logger.warning("Reply %s was continued by another generation", self.message_id)
            return
        saved = SAVED  # unless the database never answered: tell the sockets anyway
        fields = {
            "content": self.text,
            "reasoning": self.reasoning,
            "status": str(status),
            "finish_reason": self.finish_reason or "",
            "request_id": self.request_id or "",
            "completed_at": timezone.now(),
        }
        self._count_round()
        spend = None
        if self.spent_input or self.spent_output:
            fields["input_tokens"] = self.earlier_input_tokens + self.spent_input
            fields["output_tokens"] = self.earlier_output_tokens + self.spent_output
            fields["reasoning_tokens"] = self.earlier_reasoning_tokens + self.spent_reasoning
            # Priced when saved, at the prices of that moment (finish_reply).
            spend = costs.Spend(
                model=self.request.model,
                input_tokens=self.spent_input,
                output_tokens=self.spent_output,
                reasoning_tokens=self.spent_reasoning,
                earlier_tokens=self.earlier_input_tokens + self.earlier_output_tokens,
                earlier_cost=self.earlier_cost,
                earlier_currency=self.earlier_cost_currency,
            )
        if self.tool_steps:
            fields["tool_steps"] = self.tool_steps
        if self.sources:
            fields["sources"] = self.sources
        if error is not None:
            fields["error_code"], fields["error_message"] = describe_error(error)
            fields["request_id"] = getattr(error, "request_id", None) or fields["request_id"]
        for attempt in range(FINISH_ATTEMPTS):
            try:
                async with _finishing():
                    saved, fields = await finish_reply(self.message_id, self.writer, spend, fields)
                break
            except Exception:
                logger.warning(
                    "Saving reply %s failed (attempt %s)", self.message_id, attempt + 1,
                    exc_info=True,
                )  # fmt: skip
                await asyncio.sleep(2**attempt)
        if not saved:
            logger.warning("Reply %s was continued by another generation", self.message_id)
            return
        message = {
            "pk": self.message_id,
            "role": "assistant",
            "model": self.request.model,
            "images": [],
            "tool_steps": [],
            "sources": [],
            "json_mode": self.json_mode,
            "rating": None,
            **{name: "" for name in ("error_code", "error_message")},
            # A continued reply that reported no usage this time keeps what it had.
            "input_tokens": self.earlier_input_tokens or None,
            "output_tokens": self.earlier_output_tokens or None,
            "reasoning_tokens": self.earlier_reasoning_tokens or None,
            "cost": self.earlier_cost,
            "cost_currency": self.earlier_cost_currency,
            **fields,
        }
        if message["cost"] is not None:
            message["cost"] = str(message["cost"])  # events carry plain values (msgpack)
        message = {name: message[name] for name in ("pk", "images", *Message.EVENT_FIELDS)}
        if self.created_at is not None:
            message["created_at"] = self.created_at.isoformat()
        try:
            event = events.Finished(
                message_id=self.message_id, message=message, settled=self.settled or None
            )
            async with _finishing():
                await sockets.broadcast(self.conversation_id, event.as_message())
        except Exception:
            # Sockets that miss this still see the end: they catch up from the database.
            logger.warning("Announcing the end of reply %s failed", self.message_id, exc_info=True)
        if self.retitle and status == Message.Status.COMPLETE:
            asked = [m.content for m in self.request.messages if m.role == "user"]
            titles.start(
                conversation_id=self.conversation_id,
                message=asked[-1] if asked else "",
                reply=self.text,
                first_line_title=self.title,
            )
        if self.owner_id is not None:
            done = events.ReplyDone(conversation_id=self.conversation_id, title=self.title)
            with contextlib.suppress(Exception):  # a mark in a list: nothing is lost without it
                await self.layer.group_send(events.user_group(self.owner_id), done.as_message())

    def stop(self) -> None:
        """Close the upstream request; the partial text is kept with status `stopped`."""
        self.stop_requested = True
        upstream = getattr(self, "_upstream", None)
        if upstream is not None and not upstream.done():
            upstream.cancel()

    # -- the three loops ----------------------------------------------------------------------

    async def _consume(self) -> None:
        """Stream the reply. While the model asks for tools (function calling: finish reason
        "tool_calls"), run each call, and ask again with the calls and their results appended,
        as the DashScope docs do: at most MAX_TOOL_ROUNDS rounds of calls. The text of every
        round is the reply's; each round's calls and results are a step (tool_steps)."""
        request = self.request
        for round_number in itertools.count():
            calls = ToolCallAccumulator()
            start = len(self.text)
            async for event in self.client.stream_chat(request):
                if calls.add(event):
                    continue
                if isinstance(event, TextDelta):
                    self.text += event.text
                    self._dirty.set()
                elif isinstance(event, ReasoningDelta):
                    self.reasoning += event.text
                    self._dirty.set()
                elif isinstance(event, Usage):
                    self.usage = event
                elif isinstance(event, Finish):
                    self.finish_reason = event.reason
                    self.request_id = event.request_id
                    if event.reason != "tool_calls":
                        # The text is whole: its last frame goes now, not once the request
                        # has been closed and this task has ended (a few turns of the loop,
                        # each longer the busier it is).
                        self._whole = True
                        self._wake()
                elif isinstance(event, SearchResults):
                    self._add_sources(event.results)
            if self.finish_reason != "tool_calls" or not calls:
                return
            if round_number >= MAX_TOOL_ROUNDS:
                raise ToolRoundsExceeded(MAX_TOOL_ROUNDS)
            if self._saved is not None:
                await asyncio.shield(self._saved)  # the steps show on the written reply
            self._count_round()
            step = {"end": len(self.text), "calls": calls.calls, "results": []}
            self.tool_steps.append(step)
            await self._publish_steps()
            for call in step["calls"]:
                result = await tools.run(call)
                name = call["function"]["name"]
                step["results"].append(
                    {"tool_call_id": call["id"], "name": name, "content": result}
                )
            await self._publish_steps()
            request = dataclasses.replace(
                request, messages=[*request.messages, *prompt.step_turns(self.text[start:], step)]
            )
            self.finish_reason = None

    def _add_sources(self, results: list[dict]) -> None:
        """Keep the web sources a search drew on (each round of a reply may search): each
        page once, in the order first cited."""
        known = {source["url"] for source in self.sources if source.get("url")}
        for result in results:
            if not result.get("url") or result["url"] not in known:
                self.sources.append(result)
                known.add(result.get("url"))

    def _count_round(self) -> None:
        """Add a finished round's tokens to what the reply has spent (each round is a request
        of its own, billed as such)."""
        if self.usage is not None:
            self.spent_input += self.usage.input_tokens
            self.spent_output += self.usage.output_tokens
            self.spent_reasoning += self.usage.reasoning_tokens
            self.usage = None

    async def _publish_steps(self) -> None:
        """Show the tool steps so far on every page (a step appears when the model asks, and
        again with its results)."""
        event = events.ToolSteps(message_id=self.message_id, steps=self.tool_steps)
        try:
            await sockets.broadcast(self.conversation_id, event.as_message())
        except Exception:
            # Pages that miss it see the steps with the next checkpoint's render, or the end.
            logger.warning("Publishing the tool steps of %s failed", self.message_id, exc_info=True)

    def _upstream_ended(self, _task: asyncio.Task) -> None:
        self._done = True
        self._dirty.set()
        self._wake()

    def _wake(self) -> None:
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def _nap(self, seconds: float) -> None:
        """Wait `seconds`, or less if the upstream ends meanwhile (as asyncio.sleep does it,
        with a way to be woken early). Not at all once the text is whole: what is left of it
        goes at once."""
        if self._done or self._whole:
            return
        loop = asyncio.get_running_loop()
        self._waker = waker = loop.create_future()
        handle = loop.call_later(seconds, _resolve, waker)
        try:
            await waker
        finally:
            handle.cancel()
            self._waker = None

    async def _publish_loop(self) -> None:
        """The first delta goes out at once; later ones are coalesced into one frame per
        interval, each carrying only the text since the previous frame. The last frame goes
        as soon as the upstream ends."""
        while True:
            if not self._dirty.is_set():
                # Wake up now and then even without text, so a long silence upstream still
                # refreshes the heartbeat that tells other processes this reply is alive.
                # (Only when nothing is pending: a timeout per frame costs CPU at scale.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(liveness.HEARTBEAT_INTERVAL):
                        await self._dirty.wait()
            self._dirty.clear()
            done = self._done  # read before publishing: text may still arrive meanwhile
            try:
                await self._publish_pending()
            except Exception:
                # A lost frame is not lost text: sockets see the gap in the offsets and
                # catch up from the generation. Logged once per outage, not once a frame.
                if not self._publish_failures:
                    logger.warning("Publishing reply %s failed", self.message_id, exc_info=True)
                self._publish_failures += 1
            else:
                if self._publish_failures:
                    logger.warning(
                        "Publishing reply %s works again after %s failed frames",
                        self.message_id, self._publish_failures,
                    )  # fmt: skip
                    self._publish_failures = 0
            if done:
                return
            since = time.monotonic() - self._last_checkpoint
            checkpoint_running = self._checkpoint_task and not self._checkpoint_task.done()
            progressed = self._checkpointed != len(self.text) + len(self.reasoning)
            if (
                not checkpoint_running
                and since >= self.checkpoint_interval
                and (progressed or since >= liveness.HEARTBEAT_INTERVAL)
            ):
                # In its own task: a slow database must not hold up the frames.
                self._checkpoint_task = asyncio.create_task(self._checkpoint())
            await self._nap(self.frame_interval)

    async def _publish_pending(self) -> None:
        """Publish what arrived since the last frame: the model's thinking (for models that
        think aloud), then the answer, each with its offset."""
        for part, text, published in (
            ("reasoning", self.reasoning, self.reasoning_published),
            ("text", self.text, self.published),
        ):
            if published >= len(text):
                continue
            if part == "text":
                self.published = len(text)
            else:
                self.reasoning_published = len(text)
            # events.Delta(...).as_message(), built directly: dataclasses.asdict copies
            # deeply, and this runs for every frame of every reply.
            event = {
                "type": events.Delta.TYPE,
                "message_id": self.message_id,
                "part": part,
                "offset": published,
                "text": text[published:],
            }
            settles = part == "text" and not self.json_mode
            if (
                settles
                and may_settle(text, self.settled, event["text"])
                and (blocks := render_settled(text, self.settled))
            ):
                event["blocks"] = [list(block) for block in blocks]
                self.settled = blocks[-1][1]
            await sockets.broadcast(self.conversation_id, event, remote=self.remote_readers)

    async def _checkpoint(self) -> None:
        """Save the partial text (and so refresh updated_at, the reply's heartbeat)."""
        self._last_checkpoint = time.monotonic()
        self._checkpointed = len(self.text) + len(self.reasoning)
        try:
            extra = {"tool_steps": self.tool_steps} if self.tool_steps else {}
            if self.sources:
                extra["sources"] = self.sources
            saved = await save_reply(
                self.message_id, self.writer, content=self.text, reasoning=self.reasoning, **extra
            )
        except Exception:
            # A missed checkpoint costs at most one interval of text if this process dies;
            # the reply itself goes on and is saved whole at the end.
            logger.warning("Checkpoint of reply %s failed", self.message_id, exc_info=True)
            return
        if saved == RESUMED:
            # A sweep took this reply for dead while its checkpoints failed (the database was
            # away longer than QWENWEB_REPLY_STALE_AFTER): the pages show it streaming again.
            logger.warning("Reply %s was marked interrupted while alive: resumed", self.message_id)
            with contextlib.suppress(Exception):
                await sockets.broadcast(
                    self.conversation_id,
                    events.Continued(message_id=self.message_id).as_message(),
                )
        elif not saved:
            self.superseded = True
            self.stop()

    async def on_request(self, message: dict) -> None:
        """A request to this reply, from a socket or a use case in any process (control.py)."""
        kind = message.get("type")
        if kind in (events.Sync.TYPE, events.Watch.TYPE):
            # Requests from before sockets.py carry no process: assume another one.
            self.remote_readers |= message.get("process") != sockets.PROCESS_ID
        if kind == events.Stop.TYPE:
            self.stop()
        elif kind == events.Retire.TYPE and message.get("writer") != str(self.writer):
            # Continue gave this reply to a newer generation: this one is done.
            self.superseded = True
            self.stop()
        elif kind == events.Sync.TYPE:
            snapshot = events.Snapshot(
                message_id=self.message_id, text=self.text, reasoning=self.reasoning
            )
            await self.layer.send(message["reply_channel"], snapshot.as_message())


SAVED, RESUMED = "saved", "resumed"

_finish_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _finishing() -> asyncio.Lock:
    """Replies ending at once save and render their ends one at a time, between the frames of
    the others still streaming."""
    loop = asyncio.get_running_loop()
    lock = _finish_locks.get(loop)
    if lock is None:
        lock = _finish_locks[loop] = asyncio.Lock()
    return lock


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@db_async
def finish_reply(
    message_id: int, writer: uuid.UUID | None, spend: costs.Spend | None, fields: dict
) -> tuple[str, dict]:
    """Save a reply's end (save_reply), with its cost at its model's prices now when it
    reported usage (`spend`), in the same trip to the database thread. Returns what
    save_reply does, and the fields written."""
    if spend is not None:
        fields = {**fields, **costs.reply_cost(spend)}
    return _save_reply(message_id, writer, final=True, **fields), fields


def _save_reply(message_id: int, writer: uuid.UUID | None, *, final: bool = False, **fields) -> str:
    """Save a reply's text, or its end (`final`), if the reply is still this generation's
    (see conversations/db.py for where it runs). One UPDATE as a rule; returns SAVED, RESUMED
    (a checkpoint of a reply a sweep had marked interrupted: streaming again) or "" (the
    reply is another generation's now, or gone: nothing was written)."""
    now = timezone.now()
    written = {**fields, "updated_at": now}
    if final:
        return SAVED if intake.update_reply(message_id, writer, written) else ""
    if intake.update_reply(message_id, writer, written, Message.Status.STREAMING.value):
        return SAVED
    mine = Message.objects.filter(pk=message_id)
    if writer is not None:
        mine = mine.filter(writer=writer)
    resumed = mine.filter(status=Message.Status.INTERRUPTED).update(
        status=Message.Status.STREAMING, completed_at=None, updated_at=now, **fields
    )
    return RESUMED if resumed else ""


save_reply = db_async(_save_reply)
