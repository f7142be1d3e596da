"""Running ORM code from async code."""

import asyncio
import contextvars
import weakref
from functools import cache

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import connections
from django.utils import translation


@cache
def _one_thread() -> bool:
    # SQLite has one writer at a time: threads contending for its lock sleep in its busy
    # handler (1, 2, 5, 10… ms), which costs more than queueing on one thread.
    return settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")


def _with_kept_connection(function, *args, **kwargs):
    """Call `function`, reusing this thread's connection unless an error left it broken.

    These threads are few and long-lived (one on SQLite, the default executor's on
    PostgreSQL), so their connections are kept whatever DATABASE_CONN_MAX_AGE says: opening
    one per call (a PostgreSQL backend; an SQLite handle and its WAL pragmas) cost more than
    the queries (bench/README.md). A connection that failed is checked, and replaced if the
    database went away and came back.
    """
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            if connection.is_usable():
                connection.errors_occurred = False
            else:
                connection.close()
    return function(*args, **kwargs)


def db_async(function):
    """Wrap a synchronous ORM function for async callers.

    On PostgreSQL it runs in a pool thread, not asgiref's default thread-sensitive mode where
    every database call of the process queues on one thread: sends, checkpoints and catch-up
    reads of many replies would wait on each other. On SQLite it queues on one thread, as its
    writes do anyway.
    """

    def call(*args, **kwargs):
        run = SyncToAsync(_with_kept_connection, thread_sensitive=_one_thread())
        return run(function, *args, **kwargs)

    return call


class _Trips:
    """The calls waiting for the one database thread of this event loop (SQLite)."""

    def __init__(self) -> None:
        self.waiting: list[tuple] = []
        # The task taking the trips, while it runs (held: the loop keeps only weak references
        # to tasks; dropped at its end: it holds the loop, the weak key of this _Trips).
        self.task: asyncio.Task | None = None


_trips: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Trips] = weakref.WeakKeyDictionary()


def _run_each(calls: list[tuple]) -> list[tuple[bool, object]]:
    """Run each call in its caller's language (the sentences of its refusals): (True, result)
    or (False, the exception it raised), one call's failure being its own."""
    outcomes = []
    for function, language, future in calls:
        if future.cancelled():
            # Its caller is gone (a socket closed, the server stopping) while it waited: as
            # with db_async, a call not yet begun is not run (read across threads: at worst a
            # caller cancelled this instant has its call run, and its result dropped).
            outcomes.append((False, None))
            continue
        try:
            with translation.override(language):
                outcomes.append((True, _with_kept_connection(function)))
        except Exception as error:
            outcomes.append((False, error))
    return outcomes


async def _take_trips(trips: _Trips) -> None:
    try:
        while trips.waiting:
            calls = [call for call in trips.waiting if not call[2].done()]
            trips.waiting = []
            if not calls:
                continue
            try:
                outcomes = await SyncToAsync(_run_each, thread_sensitive=True)(calls)
            except asyncio.CancelledError:  # the loop is shutting down
                for *_, future in calls + trips.waiting:
                    future.cancel()
                trips.waiting = []  # none of them runs in a later trip
                raise
            except Exception as error:  # the trip itself failed
                outcomes = [(False, error)] * len(calls)
            except BaseException:
                # A call raised SystemExit or the like: its batch's callers must not wait for
                # ever (the trip's task ends; the next call starts another).
                for *_, future in calls:
                    if not future.done():
                        future.set_exception(RuntimeError("the database thread's trip ended"))
                raise
            for (_function, _language, future), (ok, value) in zip(calls, outcomes, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
    finally:
        trips.task = None


async def db_together(function):
    """`function()` on the database thread, like db_async; on SQLite, the calls that arrive
    while the thread is busy go together in its next trip.

    When many people send at once, each send's trip to the one SQLite thread and back cost
    more than its statements: the thread hand-offs, and the thread and the event loop taking
    the interpreter's lock from each other at every statement while the loop started the
    replies already saved. In one trip the thread runs the queued sends one after the other
    (each in its own transaction, as before), and the loop then starts them all
    (bench/README.md, eighth pass). A lone call goes at once, as before.

    For callers outside any request (the websocket consumer): the trips run on the one
    thread asgiref gives code with no request around it. A view must use db_async, which
    finds its request's thread (a sync middleware may be holding it, waiting for the view).
    """
    if not _one_thread():
        return await db_async(function)()
    loop = asyncio.get_running_loop()
    trips = _trips.get(loop)
    if trips is None:
        trips = _trips[loop] = _Trips()
    future = loop.create_future()
    trips.waiting.append((function, translation.get_language(), future))
    if trips.task is None or trips.task.done():  # done: cancelled before it began
        # A context of its own: the trips serve every caller, not the first one's.
        trips.task = loop.create_task(_take_trips(trips), context=contextvars.Context())
    return await future
