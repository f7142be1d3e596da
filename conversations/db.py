"""Running ORM code from async code."""

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections
from django.utils import translation

logger = logging.getLogger(__name__)


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


def again_if_disconnected(function):
    """`function`, which only reads, run once more on a new connection if the database had
    dropped this thread's (a restart, an outage: a kept connection that sat idle through it is
    found dead only when next used). Not for writes: one may have been applied."""

    def call():
        try:
            return function()
        except (OperationalError, InterfaceError):
            connection = connections[DEFAULT_DB_ALIAS]
            if connection.in_atomic_block or connection.is_usable():
                raise
            connection.close()
            return function()

    return call


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


# A trip runs its calls for about this long; the calls still waiting go in the next trip, once
# the loop has used the results of this one (or HOLD seconds have passed).
TRIP_TIME = 0.0025
TRIP_TIME_MAX = 0.04
HOLD = 0.02
# How long quiet(linger=True) waits after a burst's last caller (see there).
LINGER = 0.06
# At most this many calls of one runner go together (db_turn's `batch`).
BATCH_MAX = 50


@dataclass(eq=False)
class _Call:
    function: Callable[[], object]
    language: str | None
    future: asyncio.Future
    # Set by its caller once it has used the result (db_turn's body is over): until then the
    # thread takes no next trip.
    used: asyncio.Event = field(default_factory=asyncio.Event)
    # Run on the loop itself, not the thread (reads with the loop's reader: loop_reader).
    here: bool = False
    # (runner, item): with the calls of the same runner queued next to it, run at once
    # (db_turn's `batch`).
    batch: tuple[Callable[[list], list], object] | None = None


class _Trips:
    """The calls waiting for the one database thread of this event loop (SQLite), and the
    turns under way on any database."""

    def __init__(self) -> None:
        self.waiting: list[_Call] = []
        # The task taking the trips, while it runs (held: the loop keeps only weak references
        # to tasks; dropped at its end: it holds the loop, the weak key of this _Trips).
        self.task: asyncio.Task | None = None
        # db_turn's callers from their call to the end of their body (a send: until its
        # request is out), and whether there are none (quiet).
        self.turns = 0
        self.quiet = asyncio.Event()
        self.quiet.set()
        # Quiet for LINGER seconds since the last caller, and how many sends came since the
        # quiet before lasted that long (a burst's size): for quiet's `linger`.
        self.settled = asyncio.Event()
        self.settled.set()
        self.quiet_at = 0.0
        self.burst = 0

    def settle(self, quiet_at: float) -> None:
        if self.quiet.is_set() and self.quiet_at == quiet_at:
            self.settled.set()


_trips: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Trips] = weakref.WeakKeyDictionary()


def _run_each(calls: list[_Call], budget: float = TRIP_TIME) -> list[tuple[bool, object]]:
    """Run calls in turn until `budget` seconds have passed (at least one), each in its
    caller's language (the sentences of its refusals): (True, result) or (False, the exception
    it raised) for each call run, one call's failure being its own."""
    return _run_calls(calls, budget, _with_kept_connection)


def _run_here(calls: list[_Call]) -> list[tuple[bool, object]]:
    """_run_each's work on the loop itself: calls whose functions read with the loop's reader,
    for TRIP_TIME at most (the loop does nothing else meanwhile: each trip's callers then
    send their requests before the next reads)."""
    return _run_calls(calls, TRIP_TIME, lambda function: function())


def _run_calls(calls: list[_Call], budget: float, run) -> list[tuple[bool, object]]:
    began = time.monotonic()
    outcomes = []
    while len(outcomes) < len(calls):
        if outcomes and time.monotonic() - began >= budget:
            break
        call = calls[len(outcomes)]
        if call.batch is not None:
            batch = list(
                itertools.takewhile(
                    lambda other, runner=call.batch[0]: (
                        other.batch is not None and other.batch[0] is runner
                    ),
                    calls[len(outcomes) : len(outcomes) + BATCH_MAX],
                )
            )
            if len(batch) > 1:
                outcomes += _run_batch(call.batch[0], batch, run)
                continue
        outcomes.append(_run_one(call, run))
    return outcomes


def _run_one(call: _Call, run) -> tuple[bool, object]:
    if call.future.cancelled():
        # Its caller is gone (a socket closed, the server stopping) while it waited: as with
        # db_async, a call not yet begun is not run (read across threads: at worst a caller
        # cancelled this instant has its call run, and its result dropped).
        return False, None
    try:
        with translation.override(call.language):
            return True, run(call.function)
    except Exception as error:
        return False, error


def _run_batch(runner, calls: list[_Call], run) -> list[tuple[bool, object]]:
    """The calls of one runner queued together, run by it at once (its items, each with its
    caller's language); those it leaves (ELSEWHERE) and all if it fails run alone."""
    live = [call for call in calls if not call.future.cancelled()]
    try:
        done = run(lambda: runner([(call.batch[1], call.language) for call in live]))
    except Exception:
        logger.warning("Calls run together failed; each runs alone", exc_info=True)
        done = [ELSEWHERE] * len(live)
    outcome = dict(zip(live, done, strict=True))
    return [
        _run_one(call, run) if outcome.get(call, ELSEWHERE) is ELSEWHERE else outcome[call]
        for call in calls
    ]


async def _take_trips(trips: _Trips) -> None:
    budget = TRIP_TIME
    try:
        while trips.waiting:
            calls = [call for call in trips.waiting if not call.future.done()]
            trips.waiting = []
            if not calls:
                continue
            # A trip is the calls of one kind at the head of the queue: reads on the loop, or
            # calls for the thread.
            kind = next(
                (n for n, call in enumerate(calls) if call.here != calls[0].here), len(calls)
            )
            calls, later = calls[:kind], calls[kind:]
            trips.waiting[:0] = later
            try:
                if calls[0].here:
                    outcomes = _run_here(calls)
                else:
                    outcomes = await SyncToAsync(_run_each, thread_sensitive=True)(calls, budget)
                    budget = min(budget * 2, TRIP_TIME_MAX)
            except asyncio.CancelledError:  # the loop is shutting down
                for call in calls + trips.waiting:
                    call.future.cancel()
                trips.waiting = []  # none of them runs in a later trip
                raise
            except Exception as error:  # the trip itself failed
                outcomes = [(False, error)] * len(calls)
            except BaseException:
                # A call raised SystemExit or the like: its batch's callers must not wait for
                # ever (the trip's task ends; the next call starts another).
                for call in calls:
                    if not call.future.done():
                        call.future.set_exception(RuntimeError("the database thread's trip ended"))
                raise
            # The calls the trip had no time for go first in the next one.
            trips.waiting[:0] = calls[len(outcomes) :]
            answered = []
            for call, (ok, value) in zip(calls, outcomes, strict=False):
                if call.future.done():  # its caller was cancelled
                    continue
                if ok:
                    call.future.set_result(value)
                else:
                    call.future.set_exception(value)
                answered.append(call.used)
            if answered:
                # The callers use their results (a send starts its reply) before the thread
                # takes the next trip, not while it does: one after the other, the thread and
                # the loop do not take the interpreter's lock from each other. (The trips end
                # after that too: work that waits for them to end, such as announcing new
                # replies, waits for the last requests too.)
                waits = [asyncio.ensure_future(used.wait()) for used in answered]
                try:
                    await asyncio.wait(waits, timeout=HOLD)
                except asyncio.CancelledError:  # the loop is shutting down
                    for call in trips.waiting:
                        call.future.cancel()
                    trips.waiting = []  # none of them runs in a later trip
                    raise
                finally:
                    for wait in waits:
                        wait.cancel()
    finally:
        trips.task = None


# What db_turn's `here` returns for work it cannot do on the loop: `function` does it instead.
ELSEWHERE = object()


@dataclass(eq=False)
class _Reader:
    db: object = None  # the open connection (a DatabaseWrapper of its own)
    opening: asyncio.Future | None = None


_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Reader] = (
    weakref.WeakKeyDictionary()
)


def loop_reader():
    """This event loop's own read-only connection to the SQLite file, for reads made on the
    loop itself (a send's plan: service._launch): None on other databases, for an in-memory
    one (its shared cache locks tables where a file's WAL lets readers read), and until it
    is open (it opens in a thread, from the first call on).

    A send's reads on SQLite take a fraction of a millisecond. Made on the database thread,
    they cost a hand-off to the thread and one back (0.7 ms of a lone send's 5, the floor's
    whole intake being 2), and when many people send at once the thread and the loop take
    the interpreter's lock from each other at every statement: fifty plans took 190 ms on
    the thread where their work is 30 (bench/README.md, sixteenth pass). Made here, they run
    in turn with the loop's other work. Writes stay on the thread (SQLite has one writer,
    and the loop must never wait for the file's lock): this connection is query_only.

    The connection is a DatabaseWrapper not among `connections` (nothing else uses or
    closes it), whose sqlite3 connection is used directly (intake._cursor): Django's own
    cursors refuse to run on an event loop, rightly, for code that may wait."""
    if not _one_thread():
        return None
    loop = asyncio.get_running_loop()
    reader = _readers.get(loop)
    if reader is None:
        reader = _readers[loop] = _Reader()
    if reader.db is None and reader.opening is None:
        if connections[DEFAULT_DB_ALIAS].is_in_memory_db():
            reader.opening = loop.create_future()  # never: reads stay on the thread
            return None
        reader.opening = opening = loop.run_in_executor(None, _open_reader)

        def opened(_future) -> None:
            if opening.cancelled():
                reader.opening = None
            elif (error := opening.exception()) is not None:
                logger.warning("The event loop's SQLite reader did not open", exc_info=error)
            else:
                reader.db = opening.result()

        opening.add_done_callback(opened)
    return reader.db


def _open_reader():
    db = connections.create_connection(DEFAULT_DB_ALIAS)
    db.ensure_connection()
    db.connection.execute("PRAGMA query_only = ON")
    db.on_loop = True
    return db


def drop_loop_reader() -> None:
    """Close this loop's reader (a read on it failed: the file may have been replaced); the
    next call of loop_reader opens another."""
    reader = _readers.get(asyncio.get_running_loop())
    if reader is not None and reader.db is not None:
        db, reader.db, reader.opening = reader.db, None, None
        with contextlib.suppress(Exception):
            db.connection.close()


@contextlib.asynccontextmanager
async def db_turn(
    function,
    *,
    together: bool = True,
    counted: bool = True,
    sends: bool = False,
    here: Callable[[object], object] | None = None,
    batch: tuple[Callable[[list], list], object] | None = None,
):
    """`function()` on the database thread, like db_async, its result for the body; on
    SQLite, the calls that arrive while the thread is busy go together in its next trips
    (unless `together` is False: then it is db_async's call, for a view).

    When many people send at once, each send's trip to the one SQLite thread and back cost
    more than its statements: the thread hand-offs, and the thread and the event loop taking
    the interpreter's lock from each other at every statement while the loop started the
    replies already saved. So the thread runs the queued sends one after the other (each in
    its own transaction, as before) for a few milliseconds (TRIP_TIME), and waits while the
    loop uses their results (the bodies, HOLD seconds at most: a send's body starts its
    reply's request) before it takes the next ones: the first sends' requests go out while
    the rest are still queued, not after the last is saved (bench/README.md, eleventh pass).
    A lone call goes at once, as before.

    For callers outside any request (the websocket consumer): the trips run on the one
    thread asgiref gives code with no request around it. A view must use db_async, which
    finds its request's thread (a sync middleware may be holding it, waiting for the view).

    `counted`: the caller is on its way for quiet() (a send until its request is out); not
    for work that waits for quiet() itself (a send's writes after its request, which must
    not wait for each other).

    `here`: reads that may be made on the loop itself with its SQLite reader (loop_reader),
    given the reader; `function` runs on the thread instead where there is none, or if
    `here` returns ELSEWHERE. Either way the caller is counted as on its way.

    `batch`: (runner, item): when other calls with the same runner are queued next to this
    one, the thread runs them at once, runner([(item, caller's language), ...]) giving each
    its outcome, (True, result) or (False, exception), or ELSEWHERE: `function` then runs
    alone, as it does whenever the call has no company (a send's writes on PostgreSQL:
    service.reply_start_together).

    `sends`: `function` is a step of a send (its checks and reads before its request, its
    writes after, service._launch): then on PostgreSQL too it goes in the trips of one
    thread, not to the pool. Many sends each in a pool thread of their own, each taking the
    interpreter's lock from the loop and the others at every statement, cost more than their
    round trips one after the other (50 people sending at once, paired: p50 / p95 121 / 223
    -> 90 / 157 ms, 13 rounds of 16; bench/README.md, thirteenth pass). As on SQLite, a
    write waiting for a row lock holds up the sends queued behind it; what else locks the
    rows a send locks (its chat and its owner: other sends, regenerates, new chats, the
    admin's saves) holds them for one short transaction.
    """
    loop = asyncio.get_running_loop()
    trips = _trips.get(loop)
    if trips is None:
        trips = _trips[loop] = _Trips()
    if counted:
        if sends:  # a burst is of sends (not of the sockets' other reads)
            if not trips.turns and time.monotonic() - trips.quiet_at > LINGER:
                trips.burst = 0
            trips.burst += 1
        trips.turns += 1
        trips.quiet.clear()
        trips.settled.clear()
    try:
        if not (together and (_one_thread() or sends)):
            yield await db_async(function)()
            return
        if here is not None and (reader := loop_reader()) is not None:
            call = _queue(trips, lambda: here(reader), here=True)
            try:
                result = await call.future
            finally:
                if call.future.cancelled() or call.future.exception() is not None:
                    call.used.set()
            if result is not ELSEWHERE:
                try:
                    yield result
                finally:
                    call.used.set()
                return
            call.used.set()
        call = _queue(trips, function)
        call.batch = batch
        try:
            yield await call.future
        finally:
            call.used.set()
    finally:
        if counted:
            trips.turns -= 1
            if not trips.turns:
                trips.quiet_at = time.monotonic()
                trips.quiet.set()
                loop.call_later(LINGER, trips.settle, trips.quiet_at)


def _queue(trips: _Trips, function, here: bool = False) -> _Call:
    call = _Call(function, translation.get_language(), asyncio.get_running_loop().create_future())
    call.here = here
    trips.waiting.append(call)
    if trips.task is None or trips.task.done():  # done: cancelled before it began
        # A context of its own: the trips serve every caller, not the first one's.
        trips.task = asyncio.get_running_loop().create_task(
            _take_trips(trips), context=contextvars.Context()
        )
    return call


async def db_together(function):
    """db_turn's result, with nothing to do before the thread's next trip."""
    async with db_turn(function) as result:
        return result


async def quiet(at_most: float, linger: bool = False) -> None:
    """Return once no caller of db_turn is on its way (being saved, or using what it saved: a
    send until its request is out), or after `at_most` seconds. Work that can wait (a new
    reply's announcement, a socket's background check of its session, the writes of a send
    whose request is out) lets the sends waiting for the database go first: when many people
    send at once, it would hold up their requests (P1, bench/README.md), on the event loop
    and, on SQLite, on the one database thread.

    `linger`: after several sends came together (a burst), wait until no caller has been on
    its way for LINGER seconds (`at_most` still the limit): the processes of a team's server share
    the machine's CPUs, and the others may still be sending their share of the burst (a
    send's writes, and so its announcement, after a burst of 50 on two processes, paired:
    13 rounds of 16 better; bench/README.md, seventeenth pass). After a lone caller, at once."""
    trips = _trips.get(asyncio.get_running_loop())
    if trips is None:
        return
    if trips.quiet.is_set() and not (linger and trips.burst > 1):
        # Even so, after those the last caller's end woke: work that waited goes in the order
        # it began to wait, not behind that caller's own.
        await asyncio.sleep(0)
        return
    # Not wait_for: its task of its own would wake this a turn of the loop later than the
    # others waiting.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(at_most):
            await (trips.settled if linger and trips.burst > 1 else trips.quiet).wait()
