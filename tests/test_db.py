"""The database thread from async code (conversations/db.py): calls that queue for SQLite's
one thread while it is busy go in one trip, each with its own outcome and language."""

import asyncio
import threading

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

    def counted(calls):
        outcomes = run_each(calls)
        seen.append([value for _ok, value in outcomes])
        return outcomes

    monkeypatch.setattr(db, "_run_each", counted)
    monkeypatch.setattr(db, "_one_thread", lambda: True)  # SQLite's way, whatever the database
    return seen


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
