"""A reply's liveness: its heartbeat, when it counts as dead, and the one place it becomes
`interrupted` (mark_interrupted), so it blocks no one.

A reply being written saves itself at least every HEARTBEAT_INTERVAL (a third of
QWENWEB_REPLY_STALE_AFTER). When its process is killed, the reply stays `streaming` in the
database with the text of its last checkpoint. Every server process sweeps such replies once a
heartbeat interval, and at start-up: they become `interrupted`, keep that text, every open
socket is told, and the user can press Continue.

At start-up a process with no Redis (the only process there is) also takes every reply last
saved before it started: no other process can be writing it. With Redis, other processes may
be, so only replies silent for QWENWEB_REPLY_STALE_AFTER go.

The same check runs where a dead reply would be in the way: a send, Continue, Regenerate, an
edit, and a socket's catch-up that no generation answers (abandon_after: a shorter wait, since
there the reply has been asked and did not answer). A page load writes nothing: it shows such a
reply as interrupted (show_dead_as_interrupted), and its socket's catch-up marks it.
Daphne has no start-up hook for applications, so the first request a process serves (a load
balancer's health check, within seconds) starts its sweeper.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import weakref
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from conversations.db import db_async
from conversations.models import Message

logger = logging.getLogger(__name__)

STARTED_AT = timezone.now()
_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = (
    weakref.WeakKeyDictionary()
)


# A streaming reply saves at least this often, even when no text arrives: its updated_at is
# the heartbeat by which a reply whose process died is recognised.
HEARTBEAT_INTERVAL = Message.STALE_AFTER / 3
# A generation answers a catch-up or stop request within moments, and a new reply's
# placeholder is saved moments before its generation starts listening: a reply still
# "streaming" that no generation answered for this long, and not saved for as long, has no
# process behind it.
ABANDON_AFTER_SECONDS = 3


def interval() -> float:
    return HEARTBEAT_INTERVAL


def stale_cutoff() -> datetime:
    """A streaming reply last saved before this has lost its process."""
    return timezone.now() - timedelta(seconds=Message.STALE_AFTER)


def show_dead_as_interrupted(messages: list[Message]) -> list[Message]:
    """Replies among `messages` (read for a page) still streaming but dead, shown as what
    they are about to become: `interrupted`. Nothing is written (a page load writes nothing):
    the page's socket, asking after them, or the sweep, marks them."""
    cutoff = stale_cutoff()
    for message in messages:
        if message.is_streaming and message.updated_at < cutoff:
            message.status = Message.Status.INTERRUPTED
    return messages


def mark_interrupted(messages: QuerySet, *, saved_before: datetime | None = None) -> list[int]:
    """Mark the replies among `messages` that are still streaming but last saved before
    `saved_before` (default: stale_cutoff()) `interrupted`, keeping their last checkpoint of
    text; returns their pks, so open sockets can be told. The only place a reply becomes
    interrupted."""
    saved_before = saved_before or stale_cutoff()
    dead = messages.filter(status=Message.Status.STREAMING, updated_at__lt=saved_before)
    stale = list(dead.values_list("pk", flat=True))
    if stale:  # usually not: read, don't write
        # Still stale when written: a checkpoint saved meanwhile keeps its reply alive.
        now = timezone.now()
        dead.filter(pk__in=stale).update(
            status=Message.Status.INTERRUPTED, completed_at=now, updated_at=now
        )
    return stale


def sweep(*, at_start: bool = False) -> list[tuple[str, int]]:
    """Mark dead replies interrupted; returns (conversation id, message pk) of each."""
    saved_before = STARTED_AT if at_start and not settings.REDIS_URL else None
    marked = mark_interrupted(Message.objects.all(), saved_before=saved_before)
    if not marked:
        return []
    rows = Message.objects.filter(pk__in=marked).values_list("conversation_id", "pk")
    return [(str(conversation_id), pk) for conversation_id, pk in rows]


async def sweep_and_announce(*, at_start: bool = False) -> int:
    from conversations.replies.service import announce_finished

    marked = await db_async(sweep)(at_start=at_start)
    for conversation_id, message_id in marked:
        logger.warning("Reply %s lost its process: marked interrupted", message_id)
        await announce_finished(conversation_id, message_id)
    return len(marked)


async def _run() -> None:
    at_start = True
    while True:
        try:
            await sweep_and_announce(at_start=at_start)
            at_start = False
        except Exception:
            logger.warning("Sweeping interrupted replies failed", exc_info=True)
        # Jitter, so several processes started together do not sweep in step.
        await asyncio.sleep(interval() * random.uniform(0.8, 1.0))


def ensure_running() -> None:
    """Start this process's sweeper on the running event loop, once."""
    loop = asyncio.get_running_loop()
    task = _sweepers.get(loop)
    if task is None or task.done():
        # A fresh context: the sweeper outlives the request that started it.
        _sweepers[loop] = loop.create_task(_run(), name="sweep", context=contextvars.Context())


class StartSweeper:
    """ASGI middleware: the first request on an event loop starts the sweeper."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            ensure_running()
        return await self.app(scope, receive, send)
