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


async def _batched(runner, item, language="en"):
    """A call whose function, alone, says so, and which `runner` may run with others."""
    with translation.override(language):
        async with db.db_turn(lambda: f"alone {item}", batch=(runner, item)) as got:
            return got


async def test_calls_of_one_runner_queued_together_run_at_once(trips):
    """db_turn's `batch` (a send's writes on PostgreSQL): calls of one runner queued next to
    each other go to it at once, each item with its caller's language; those it leaves
    (ELSEWHERE) run alone in their place, as does a call with no company, and calls of
    other kinds keep their places in the queue."""
    given = []

    def runner(items):
        given.append(items)
        return [
            db.ELSEWHERE if item == "b" else (True, f"together {item} {language}")
            for item, language in items
        ]

    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5) and "first"))
    await asyncio.sleep(0.05)  # the thread is busy: the next calls queue
    batched = [
        asyncio.ensure_future(_batched(runner, item, language))
        for item, language in (("a", "en"), ("b", "zh-hans"), ("c", "zh-hans"))
    ]
    plain = asyncio.ensure_future(db.db_together(lambda: "plain"))
    after = asyncio.ensure_future(_batched(runner, "d"))
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "first"
    assert await asyncio.gather(*batched) == ["together a en", "alone b", "together c zh-hans"]
    assert await plain == "plain" and await after == "alone d"
    assert given == [[("a", "en"), ("b", "zh-hans"), ("c", "zh-hans")]]
    assert trips[-1] == ["together a en", "alone b", "together c zh-hans", "plain", "alone d"]
    assert await _batched(runner, "e") == "alone e" and len(given) == 1


async def test_a_runner_that_fails_has_each_call_run_alone_and_skips_the_cancelled(trips):
    given = []

    def runner(items):
        given.append([item for item, _language in items])
        raise RuntimeError("the batch broke")

    release = threading.Event()
    first = asyncio.ensure_future(db.db_together(lambda: release.wait(5)))
    await asyncio.sleep(0.05)
    calls = [asyncio.ensure_future(_batched(runner, item)) for item in "abc"]
    await asyncio.sleep(0.05)
    calls[1].cancel()  # its socket closed while it waited
    release.set()
    await first
    assert await calls[0] == "alone a" and await calls[2] == "alone c"
    assert calls[1].cancelled()
    assert given == [["a", "c"]]


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


async def test_quiet_lingers_after_a_burst_of_sends_not_after_a_lone_one(trips, monkeypatch):
    """quiet(linger=True) (a send's writes): after several sends came together, it returns
    once none has been on its way for LINGER (the server's other processes may still be
    sending theirs), its waiters in the order they came, and `at_most` still bounds it;
    after a lone send, at once."""
    monkeypatch.setattr(db, "LINGER", 0.2)
    loop = asyncio.get_running_loop()

    async def send():
        async with db.db_turn(lambda: "planned", sends=True):
            await asyncio.sleep(0.01)  # its request going out

    await send()
    began = loop.time()
    await db.quiet(5, linger=True)
    assert loop.time() - began < 0.1, "a lone send's writes go at once"

    await asyncio.sleep(0.25)  # quiet for longer than LINGER: a new burst
    await asyncio.gather(send(), send(), send())
    ended = loop.time()
    woke = []

    async def writes(name, at_most=5):
        await db.quiet(at_most, linger=True)
        woke.append((name, loop.time() - ended))

    await asyncio.gather(*(writes(name) for name in "abc"), writes("bounded", 0.05))
    assert [name for name, _ in woke] == ["bounded", "a", "b", "c"]
    assert woke[0][1] < 0.15 and all(0.18 < at < 1 for _, at in woke[1:]), woke
    began = loop.time()
    await db.quiet(5)  # without linger: the sends are out
    assert loop.time() - began < 0.1


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


async def test_reads_made_on_the_loop_go_in_trips_of_their_own_in_the_queues_order(
    trips, monkeypatch
):
    """With the loop's SQLite reader (`here`), a send's reads run on the event loop itself,
    in trips of their own taken in the queue's order with the thread's; what `here` cannot do
    (ELSEWHERE) its `function` does on the thread; its refusal reaches its caller."""
    reader = object()
    monkeypatch.setattr(db, "loop_reader", lambda: reader)
    loop_thread = threading.get_ident()
    release = threading.Event()
    ran: list[tuple[str, bool]] = []

    def here(name):
        def read(given):
            assert given is reader
            ran.append((name, threading.get_ident() == loop_thread))
            return name

        return read

    def thread(name):
        return lambda: ran.append((name, threading.get_ident() == loop_thread)) or name

    async def turn(function, here=None):
        async with db.db_turn(function, here=here) as got:
            return got

    busy = asyncio.ensure_future(db.db_together(lambda: release.wait(5) and "busy"))
    await asyncio.sleep(0.05)  # the thread is in its trip
    queued = [
        asyncio.ensure_future(turn(thread("unused"), here("a"))),
        asyncio.ensure_future(turn(thread("unused"), here("b"))),
        asyncio.ensure_future(turn(thread("c"))),
        asyncio.ensure_future(turn(thread("d"), lambda _reader: db.ELSEWHERE)),
        asyncio.ensure_future(turn(thread("unused"), here("e"))),
    ]
    await asyncio.sleep(0.05)
    assert not ran, "queued behind the busy trip"
    release.set()
    assert await busy == "busy"
    assert await asyncio.gather(*queued) == ["a", "b", "c", "d", "e"]
    # d's reads, in the loop's second trip, went to the thread after it.
    assert ran == [("a", True), ("b", True), ("c", False), ("e", True), ("d", False)]
    assert trips == [["busy"], ["c"], ["d"]], "the thread's trips: the reads on the loop are not"

    def refused(_reader):
        raise ValueError(_("refused"))

    with pytest.raises(ValueError, match="refused"):
        await turn(thread("unused"), refused)
    assert ("unused", False) not in ran and ("unused", True) not in ran


async def test_a_caller_of_reads_on_the_loop_is_on_its_way_until_it_has_used_them(monkeypatch):
    monkeypatch.setattr(db, "_one_thread", lambda: True)
    monkeypatch.setattr(db, "loop_reader", lambda: "reader")
    used = asyncio.Event()

    async def send():
        async with db.db_turn(lambda: "thread", here=lambda reader: reader) as got:
            assert got == "reader"
            await used.wait()  # its request going out

    sending = asyncio.ensure_future(send())
    await asyncio.sleep(0.02)
    waiting = asyncio.ensure_future(db.quiet(5))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    used.set()
    await sending
    await asyncio.wait_for(waiting, 1)


async def test_the_loops_reader_is_for_a_sqlite_file_only(monkeypatch):
    monkeypatch.setattr(db, "_one_thread", lambda: False)
    assert db.loop_reader() is None, "PostgreSQL: the reads go to the database"
    monkeypatch.setattr(db, "_one_thread", lambda: True)
    from django.db import connections

    monkeypatch.setattr(connections["default"], "is_in_memory_db", lambda: True)
    assert db.loop_reader() is None
    await asyncio.sleep(0.05)
    assert db.loop_reader() is None, "an in-memory database's shared cache locks tables"


@pytest.mark.django_db(transaction=True)
async def test_a_plan_read_on_the_loop_with_its_reader_is_the_threads_plan(monkeypatch):
    """The loop's reader is a connection of its own, read-only, used on the loop itself: the
    plan it reads (service.reply_plan) is the one the database thread reads, and it writes
    nothing. (The tests' database is in memory, which the app reads on the thread: this test
    opens a reader on it all the same.)"""
    import uuid

    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model
    from django.db import DatabaseError, connections

    from conversations.replies import service

    def make_chat():
        owner = get_user_model().objects.create_user("ivy", password="pw")
        chat = service.conversation_create(owner=owner)
        started = service.reply_start(
            conversation=chat, content="hi", client_message_id=uuid.uuid4()
        )
        started.assistant_message.status = "complete"
        started.assistant_message.content = "hello"
        started.assistant_message.save()
        return service.Conversation.objects.get(pk=chat.pk)

    chat = await sync_to_async(make_chat)()
    monkeypatch.setattr(connections["default"], "is_in_memory_db", lambda: False)
    assert db.loop_reader() is None, "it opens in a thread"
    for _attempt in range(100):
        await asyncio.sleep(0.01)
        if (reader := db.loop_reader()) is not None:
            break
    assert reader is not None and reader is not connections["default"]
    sent = uuid.uuid4()
    here = service.reply_plan(
        conversation=chat, content="and now?", client_message_id=sent, db=reader
    )
    there = await sync_to_async(service.reply_plan)(
        conversation=chat, content="and now?", client_message_id=sent
    )
    assert here.request == there.request
    assert [m.content for m in here.request.messages][-3:] == ["hi", "hello", "and now?"]
    with pytest.raises(DatabaseError), reader.wrap_database_errors:
        reader.connection.execute("DELETE FROM conversations_message")
    assert await sync_to_async(service.Message.objects.count)() == 2
    db.drop_loop_reader()
    assert reader.connection is None or not _usable(reader.connection)


def _usable(raw) -> bool:
    try:
        raw.execute("SELECT 1")
    except Exception:
        return False
    return True
