"""The database thread from async code (conversations/db.py): calls that queue for SQLite's
one thread while it is busy go together in its next trips, each with its own outcome and
language, and each trip's callers use their results before the thread takes the next."""

import asyncio
import threading
import types

import pytest
from django.utils import translation
from django.utils.translation import gettext as _

from conversations import db

pytestmark = pytest.mark.asyncio


@pytest.fixture
def trips(monkeypatch):
    """The calls of each trip to the database thread, as lists of their results."""
    seen: list[list] = []
    run_each = db._run_each

    def counted(calls, *budget):
        outcomes = run_each(calls, *budget)
        seen.append([value for _ok, value in outcomes])
        return outcomes

    monkeypatch.setattr(db, "_run_each", counted)
    monkeypatch.setattr(db, "_one_thread", lambda: True)  # SQLite's way, whatever the database
    return seen


def one_call_a_trip(monkeypatch, hold: float) -> None:
    monkeypatch.setattr(db, "TRIP_TIME", 0)
    monkeypatch.setattr(db, "TRIP_TIME_MAX", 0)
    monkeypatch.setattr(db, "HOLD", hold)


async def use_when(done: asyncio.Event, result: str) -> None:
    """A caller that keeps using its result (the thread waits for it) until `done` is set."""
    async with db.db_turn(lambda: result):
        await done.wait()


async def test_calls_queued_behind_a_busy_thread_go_in_one_trip_in_order(trips):
    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5) and "first"))
    await asyncio.sleep(0.05)  # the thread is in the first call
    queued = [asyncio.ensure_future(db.db_together(lambda n=n: n)) for n in range(5)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "first"
    assert await asyncio.gather(*queued) == [0, 1, 2, 3, 4]
    assert trips == [["first"], [0, 1, 2, 3, 4]], "one trip for the five that waited"


async def test_a_lone_call_goes_at_once_and_runs_on_the_database_thread(trips):
    loop_thread = threading.get_ident()
    assert await db.db_together(threading.get_ident) != loop_thread
    assert await db.db_together(lambda: 2 + 2) == 4
    assert len(trips) == 2


async def test_each_call_has_its_own_outcome(trips):
    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)

    def fails():
        raise ValueError("this one only")

    queued = [
        asyncio.ensure_future(db.db_together(function))
        for function in (lambda: 1, fails, lambda: 3)
    ]
    await asyncio.sleep(0.05)
    release.set()
    await first
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "this one only"
    assert len(trips) == 2


async def test_a_caller_cancelled_while_it_waits_has_its_call_not_run(trips):
    """A socket that closes while its send waits for the thread (daphne cancels it) saves
    nothing: no message and no reply left streaming with no generation behind it."""
    ran = []
    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(db.db_together(lambda: ran.append("gone")))
    kept = asyncio.ensure_future(db.db_together(lambda: ran.append("kept") or "read"))
    await asyncio.sleep(0.05)
    gone.cancel()
    release.set()
    await first
    assert await kept == "read"
    assert gone.cancelled()
    assert ran == ["kept"]
    # The thread takes new calls afterwards.
    assert await db.db_together(lambda: "again") == "again"


async def test_calls_of_a_cancelled_trip_never_run_and_the_next_call_goes(trips):
    """The loop shutting down cancels the task taking the trips: its waiting callers are
    cancelled with it, none of their calls runs later, and a new call starts a new trip."""
    ran = []
    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(db.db_together(lambda: ran.append("waiting")))
    await asyncio.sleep(0.05)
    db._trips[asyncio.get_running_loop()].task.cancel()
    await asyncio.sleep(0.05)
    release.set()
    results = await asyncio.gather(first, waiting, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert await db.db_together(lambda: ran.append("next") or "next") == "next"
    assert ran == ["next"]


async def test_each_call_speaks_its_callers_language(trips):
    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)
    with translation.override("zh-hans"):
        chinese = asyncio.ensure_future(db.db_together(lambda: _("English")))
    with translation.override("en"):
        english = asyncio.ensure_future(db.db_together(lambda: _("Simplified Chinese")))
    await asyncio.sleep(0.05)
    release.set()
    await first
    assert await chinese == "英语"
    assert await english == "Simplified Chinese"
    assert len(trips) == 2, "both in one trip, each in its own language"


async def test_a_trip_runs_for_its_time_and_the_next_waits_for_its_callers(trips, monkeypatch):
    """The thread runs queued calls for TRIP_TIME, then waits while their callers use their
    results (db_turn's body: a send starts its reply) before it takes the next ones; the
    calls it had no time for go first in the next trip, in order."""
    monkeypatch.setattr(db, "TRIP_TIME", 0.01)
    monkeypatch.setattr(db, "TRIP_TIME_MAX", 0.01)
    monkeypatch.setattr(db, "HOLD", 5)
    clock = [0.0]  # the trips' clock: each call takes 6 ms of it, whatever the machine does
    monkeypatch.setattr(db, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    log = []  # appended from the thread and the loop: list.append is atomic

    def call(n):
        def run():
            log.append(("run", n))
            clock[0] += 0.006
            return n

        return run

    async def caller(n):
        async with db.db_turn(call(n)) as result:
            log.append(("body", n))
            await asyncio.sleep(0.03)
            log.append(("used", n))
            return result

    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5) and "first"))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(caller(n)) for n in range(6)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "first"
    assert await asyncio.gather(*queued) == list(range(6))
    assert trips == [["first"], [0, 1], [2, 3], [4, 5]], "0.006 s a call: two a trip"
    for later, earlier in ((2, 0), (2, 1), (4, 2), (4, 3)):
        assert log.index(("run", later)) > log.index(("used", earlier)), log


async def test_a_caller_slow_to_use_its_result_holds_the_thread_no_longer_than_hold(
    trips, monkeypatch
):
    one_call_a_trip(monkeypatch, hold=0.1)
    slow_done = asyncio.Event()
    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)
    holder = asyncio.ensure_future(use_when(slow_done, "slow"))
    after = asyncio.ensure_future(db.db_together(lambda: "after"))
    await asyncio.sleep(0.05)
    began = asyncio.get_running_loop().time()
    release.set()
    await first
    assert await asyncio.wait_for(after, 2) == "after"
    assert asyncio.get_running_loop().time() - began < 1
    assert not holder.done()
    slow_done.set()
    await holder


async def test_quiet_waits_until_the_last_callers_have_used_their_results(trips, monkeypatch):
    """What waits for the sends on their way (a new reply's announcement, a socket's check of
    its session) waits for the last trip's callers too: for the requests of the last sends to
    go out first."""
    monkeypatch.setattr(db, "HOLD", 5)
    await asyncio.wait_for(db.quiet(5), 0.5)  # none on the way: at once
    used = asyncio.Event()
    task = asyncio.ensure_future(use_when(used, "saved"))
    await asyncio.sleep(0.05)  # the call has run; its caller is in its body
    waiting = asyncio.ensure_future(db.quiet(5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    used.set()
    await task
    await asyncio.wait_for(waiting, 1)


@pytest.mark.parametrize("sqlite", [True, False], ids=["one thread", "a pool"])
async def test_quiet_waits_for_the_callers_on_either_database_at_most_its_timeout(
    monkeypatch, sqlite
):
    """On PostgreSQL too (each call in a pool thread), and never longer than asked."""
    monkeypatch.setattr(db, "_one_thread", lambda: sqlite)
    used = asyncio.Event()
    task = asyncio.ensure_future(use_when(used, "saved"))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await db.quiet(0.1)
    assert 0.09 <= loop.time() - began < 1 and not task.done()
    ended = asyncio.ensure_future(db.quiet(5))
    used.set()
    await task
    await asyncio.wait_for(ended, 1)
    with pytest.raises(ZeroDivisionError):
        async with db.db_turn(lambda: 1 / 0):
            pass
    await asyncio.wait_for(db.quiet(5), 0.5)  # a call that raised is on its way no longer


async def test_work_that_waits_for_quiet_is_not_on_the_way_and_goes_in_its_order(trips):
    """A send's writes after its request (counted=False) do not hold up quiet(): they wait
    for it themselves, and go in the order they began to wait, the last caller's own after
    those its end woke."""
    used = asyncio.Event()
    async with db.db_turn(lambda: "written", counted=False) as result:
        assert result == "written"
        await asyncio.wait_for(db.quiet(5), 0.5)  # nobody on the way
    order = []

    async def send(name: str, done: asyncio.Event) -> None:
        async with db.db_turn(lambda: name):
            await done.wait()
        await db.quiet(5)
        order.append(name)

    last = asyncio.Event()
    sends = [asyncio.ensure_future(send("first", used)), asyncio.ensure_future(send("last", last))]
    await asyncio.sleep(0.05)
    used.set()
    await asyncio.sleep(0.05)
    assert order == []  # the last send is still on its way
    last.set()
    await asyncio.gather(*sends)
    assert order == ["first", "last"]


async def test_calls_waiting_when_the_trips_are_cancelled_between_trips_never_run(
    trips, monkeypatch
):
    """The loop shutting down while the thread waits for a trip's callers: the calls still
    waiting are cancelled too, and none of them runs later."""
    one_call_a_trip(monkeypatch, hold=5)
    ran = []
    used = asyncio.Event()
    release = threading.Event()
    blocker = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)
    first = asyncio.ensure_future(use_when(used, "first"))
    waiting = asyncio.ensure_future(db.db_together(lambda: ran.append("waiting")))
    await asyncio.sleep(0.05)
    release.set()
    await blocker
    await asyncio.sleep(0.05)  # the thread ran "first" alone; the trips wait for its body
    task = db._trips[asyncio.get_running_loop()].task
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    results = await asyncio.gather(asyncio.wait_for(waiting, 2), return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError), results
    used.set()
    await first
    assert await db.db_together(lambda: ran.append("next") or "next") == "next"
    assert ran == ["next"]


async def test_a_sends_calls_share_the_trips_on_postgresql_too(trips, monkeypatch):
    """On PostgreSQL (each call in a pool thread), the steps of a send (`sends`) go in the
    one thread's trips, queued together behind a busy trip as on SQLite; other calls still go
    to the pool."""
    monkeypatch.setattr(db, "_one_thread", lambda: False)
    release = threading.Event()

    async def read(call):
        async with db.db_turn(call, sends=True) as got:
            return got

    first = asyncio.ensure_future(read(lambda: release.wait(5) and threading.get_ident()))
    await asyncio.sleep(0.05)  # the thread is in the first call
    queued = [asyncio.ensure_future(read(lambda n=n: (n, threading.get_ident()))) for n in range(3)]
    await asyncio.sleep(0.05)
    release.set()
    thread = await first
    results = await asyncio.gather(*queued)
    assert [n for n, _ in results] == [0, 1, 2]
    assert {ident for _, ident in results} == {thread}
    assert trips[-1] == results, "the three in one trip"
    async with db.db_turn(threading.get_ident) as pooled:
        assert pooled != thread
