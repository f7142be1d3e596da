"""Faults survived: every DashScope, database or Redis failure a reply can meet ends in a saved
assistant message with a status and a sentence a person can act on (conversations/errors.py),
the user's message saved as typed, the partial text kept where some had arrived, no API key in
any frame or sentence, and as many upstream requests as the retry policy says (up to two
retries before the first delta, none after it; the simulator records every request).

The DashScope faults go through the real websocket path (WebsocketCommunicator, the real ASGI
application, the simulator on loopback); the database and Redis faults through two daphne
processes on PostgreSQL and Redis (marked `services`: skipped where those are absent, a
failure under CI).

Covered elsewhere, not repeated here:

- a stalled stream (no bytes) ends by the watchdog with a timeout sentence and the partial:
  tests/test_consumer.py::test_stalled_stream_ends_with_a_timeout_sentence_and_keeps_the_partial
- finish_reason "length" or none at all:
  tests/test_consumer.py::test_truncated_reply_is_shown_as_such
- InvalidApiKey (a 401 body), Arrearage, DataInspectionFailed on the output (mid-stream) and a
  429 that never clears:
  tests/test_consumer.py::test_dashscope_errors_become_sentences_on_the_message
- the exact backoff, its jitter, and Retry-After honoured and capped, per delay:
  tests/test_dashscope_client.py::test_throttled_admission_is_retried_until_it_succeeds and
  ::test_retry_after_header_is_honoured_and_capped (a recorded sleep, no waiting)
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from conversations.models import Message
from conversations.upstream import reset_clients
from dashscope_simulator import Scenario, ScenarioError, tokenize
from tests.conftest import APP_API_KEY
from tests.live_server import ROOT, free_port
from tests.postgres import PG, reachable
from tests.test_team_deployment import (
    Team,
    _login,
    team,  # noqa: F401 (a fixture)
)
from tests.ws_support import Transcript, open_chat, receive_until, send_frame

REPLY = "Faults survived: " + " ".join(f"word{i}" for i in range(40)) + "."
# What the user sees after five chunks (one token each) when a fault cuts the stream there.
PARTIAL = "".join(tokenize(REPLY)[:5])
ENDED = {"complete", "error", "stopped", "interrupted"}


def websocket_test(function):
    """A test through the websocket: asyncio, and a database its reply task can see."""
    return pytest.mark.asyncio(pytest.mark.django_db(transaction=True)(function))


@dataclass
class Outcome:
    reply: Message
    transcript: Transcript
    requests: int  # generation requests DashScope (the simulator) was sent
    seconds: float  # from the send to the end of the reply on the page

    @property
    def last_frame(self) -> str:
        return html.unescape(self.transcript.frames[-1])

    @property
    def streamed(self) -> str:
        return self.transcript.text.get(self.reply.pk, "")


async def run_reply(app_simulator, content: str, *scenarios: Scenario, secret=APP_API_KEY):
    """Send `content` through a socket and wait for the reply to end; check what every fault
    must leave behind: the user's message intact, and no API key anywhere."""
    for scenario in scenarios:
        app_simulator.add_scenario(scenario)
    _owner, conversation, ws = await open_chat()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await ws.send_to(text_data=send_frame(content))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: ENDED & set(t.status.values()), within=15)
    seconds = loop.time() - started
    await ws.disconnect()
    reply = await Message.objects.filter(conversation=conversation, role="assistant").aget()
    user_message = await Message.objects.filter(conversation=conversation, role="user").aget()
    assert user_message.content == content
    for text in (*transcript.frames, reply.content, reply.error_message, reply.error_code):
        assert secret not in text
    requests = [r for r in app_simulator.requests if r.path.endswith("/generation")]
    app_simulator.clear_scenarios()
    return Outcome(reply, transcript, len(requests), seconds)


def assert_error(outcome: Outcome, sentence: str, partial: str = "") -> None:
    """Status error, the sentence on the message and on the page, the partial text kept."""
    assert outcome.reply.status == "error"
    assert sentence in outcome.reply.error_message
    assert sentence in outcome.last_frame and 'role="alert"' in outcome.last_frame
    assert outcome.reply.content == partial
    assert outcome.streamed == partial


# -- 1. 429 before the stream: retried with backoff, jitter and Retry-After, at most twice ----


def throttled(times: int, retry_after: float | None = None) -> Scenario:
    error = ScenarioError(
        status=429,
        code="Throttling.RateQuota",
        message="Requests rate limit exceeded, please try again later.",
        retry_after=retry_after,
    )
    return Scenario(match="throttled", times=times, error=error)


@pytest.mark.parametrize("where", ["before_json", "first_event"])
@websocket_test
async def test_throttled_twice_then_the_reply_completes(app_simulator, where):
    scenario = throttled(2)
    scenario.error.where = where
    outcome = await run_reply(
        app_simulator, "throttled, then fine", scenario, Scenario(match="throttled", reply=REPLY)
    )
    assert (outcome.reply.status, outcome.reply.content, outcome.streamed) == (
        "complete", REPLY, REPLY,
    )  # fmt: skip
    assert outcome.requests == 3
    # Two backoffs: 0.5 s then 1 s, each plus up to a quarter of jitter.
    assert outcome.seconds >= 1.5


@websocket_test
async def test_throttled_three_times_ends_in_the_rate_limit_sentence(app_simulator):
    outcome = await run_reply(app_simulator, "throttled for good", throttled(-1))
    assert_error(outcome, "rate limiting this account")
    assert outcome.requests == 3  # the first try and two retries, no more


@websocket_test
async def test_retry_after_is_honoured(app_simulator):
    """Retry-After: 1 (the backoff alone would wait 0.5 to 0.625 s). The simulator keeps no
    request times, so the test watches its request list."""
    arrivals: list[float] = []

    async def watch() -> None:
        while True:
            count = len(app_simulator.requests)
            arrivals.extend([time.monotonic()] * (count - len(arrivals)))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        outcome = await run_reply(
            app_simulator, "throttled, wait a second", throttled(1, retry_after=1),
            Scenario(match="throttled", reply=REPLY),
        )  # fmt: skip
    finally:
        watcher.cancel()
    assert (outcome.reply.status, outcome.reply.content) == ("complete", REPLY)
    assert outcome.requests == 2
    assert arrivals[1] - arrivals[0] >= 0.95


# -- 2. an error inside an HTTP 200 stream after the first delta: no retry ------------------


@pytest.mark.parametrize(
    ("error", "sentence"),
    [
        (ScenarioError(status=429, code="Throttling.RateQuota", message="Requests rate limit "
         "exceeded.", where="mid_stream", after_chunks=5), "rate limiting this account"),
        (ScenarioError(status=500, code="InternalError", message="An internal error has "
         "occured, please try again later.", where="mid_stream", after_chunks=5),
         "internal error"),
    ],
    ids=["429", "error-event"],
)  # fmt: skip
@websocket_test
async def test_an_error_event_after_the_first_delta_keeps_the_partial_and_is_not_retried(
    app_simulator, error, sentence
):
    outcome = await run_reply(
        app_simulator, "midstream trouble", Scenario(match="midstream", reply=REPLY, error=error)
    )
    assert_error(outcome, sentence, partial=PARTIAL)
    assert outcome.requests == 1


# -- 3. 5xx before the stream: retried, then a sentence (or the reply, if it recovers) -------


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("recovers", [True, False], ids=["recovers", "persists"])
@websocket_test
async def test_server_errors_are_retried(app_simulator, status, recovers):
    code = "InternalError" if status == 500 else "ServiceUnavailable"
    failing = Scenario(
        match="server",
        times=1 if recovers else -1,
        error=ScenarioError(status=status, code=code, message="Service is busy."),
    )
    outcome = await run_reply(
        app_simulator, "server trouble", failing, Scenario(match="server", reply=REPLY)
    )
    if recovers:
        assert (outcome.reply.status, outcome.reply.content) == ("complete", REPLY)
        assert outcome.requests == 2
    else:
        assert_error(outcome, "DashScope had an internal error")
        assert outcome.requests == 3


# -- 4. the connection dropped mid-stream ----------------------------------------------------


@websocket_test
async def test_a_connection_dropped_mid_stream_keeps_the_partial_and_is_not_retried(
    app_simulator,
):
    outcome = await run_reply(
        app_simulator, "dropped midway", Scenario(match="dropped", reply=REPLY, drop_after_chunks=5)
    )
    assert_error(outcome, "connection to DashScope was lost", partial=PARTIAL)
    assert outcome.requests == 1
    assert outcome.reply.error_code == "TransportError"


def test_describe_error_tells_a_connection_never_made_from_one_lost():
    from conversations.dashscope import TransportError
    from conversations.errors import describe_error

    never_made = TransportError("Could not connect to DashScope: refused")
    never_made.__cause__ = httpx.ConnectError("refused")
    lost = TransportError("Connection to DashScope failed: peer closed connection")
    lost.__cause__ = httpx.RemoteProtocolError("peer closed connection")
    assert "Check this server's network access" in describe_error(never_made)[1]
    assert "was lost before the reply was finished" in describe_error(lost)[1]


# -- 6. HTTP 200 with a JSON error body, not a stream ----------------------------------------


@pytest.mark.parametrize(
    ("error", "times", "expected"),
    [
        # A retryable code under HTTP 200 is retried like its status would be, and recovers.
        (ScenarioError(status=429, code="Throttling.RateQuota", where="json_200"), 1,
         ("complete", None, 2)),
        (ScenarioError(status=400, code="InvalidParameter", message="Range of max_tokens "
         "should be [1, 8192].", where="json_200"), -1,
         ("error", "rejected the request: Range of max_tokens should be [1, 8192]", 1)),
    ],
    ids=["throttled-recovers", "bad-request"],
)  # fmt: skip
@websocket_test
async def test_http_200_with_a_json_error_body(app_simulator, error, times, expected):
    status, sentence, requests = expected
    outcome = await run_reply(
        app_simulator, "json instead of a stream",
        Scenario(match="json", times=times, error=error), Scenario(match="json", reply=REPLY),
    )  # fmt: skip
    assert outcome.requests == requests
    if status == "complete":
        assert (outcome.reply.status, outcome.reply.content) == ("complete", REPLY)
    else:
        assert_error(outcome, sentence)
        assert outcome.reply.error_code == error.code


# -- 7. the key, the account, the content -----------------------------------------------------


@websocket_test
async def test_a_wrong_api_key_is_refused_once_and_never_shown(app_simulator, settings):
    """The app configured with a key DashScope (the simulator) does not know: its own 401."""
    wrong = "sk-wrong-key-7d1e0b55aa"
    settings.DASHSCOPE_API_KEY = wrong
    reset_clients()
    outcome = await run_reply(app_simulator, "who am I", secret=wrong)
    assert_error(outcome, "DashScope rejected the API key")
    assert outcome.requests == 1
    assert outcome.reply.error_code == "InvalidApiKey"


@pytest.mark.parametrize(
    ("error", "sentence"),
    [
        (ScenarioError(status=400, code="PrepaidBillOverdue", message="The prepaid bill is "
         "overdue."), "in arrears or has no quota left"),
        (ScenarioError(status=429, code="Throttling.AllocationQuota", message="Free allocated "
         "quota exceeded."), "in arrears or has no quota left"),
        # Moderation of the input: refused before the stream (of the output, mid-stream: see
        # the module's docstring).
        (ScenarioError(status=400, code="DataInspectionFailed", message="Input data may "
         "contain inappropriate content."), "content safety check blocked"),
    ],
    ids=["overdue", "free-quota-used-up", "input-moderated"],
)  # fmt: skip
@websocket_test
async def test_account_and_moderation_refusals_are_not_retried(app_simulator, error, sentence):
    outcome = await run_reply(
        app_simulator, "refused outright", Scenario(match="refused", times=-1, error=error)
    )
    assert_error(outcome, sentence)
    assert outcome.requests == 1
    assert outcome.reply.error_code == error.code


# -- 9 and 10: the database and Redis, under two daphne processes ----------------------------

LONG_REPLY = " ".join(f"word{i}" for i in range(300))  # 6 s at 0.02 s a word


class Tab:
    """A page's websocket on one process, read in the background into a Transcript."""

    def __init__(self, base: str, path: str, cookie: str) -> None:
        self.base, self.path, self.cookie = base, path, cookie
        self.page = Transcript()

    async def open(self) -> Tab:
        import websockets

        url = self.base.replace("http://", "ws://") + "/ws" + self.path
        self.socket = await websockets.connect(
            url, additional_headers={"Cookie": self.cookie}, origin=self.base
        )
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for frame in self.socket:
            self.page.feed(frame)

    async def send(self, **frame) -> None:
        await self.socket.send(json.dumps(frame))

    async def close(self) -> None:
        self.reader.cancel()
        await self.socket.close()

    def check_open(self) -> None:
        if self.reader.done():
            closed = self.reader.exception() if not self.reader.cancelled() else None
            raise AssertionError(f"the server closed the tab on {self.base}: {closed!r}")

    def words(self) -> int:
        return max((text.count("word") for text in self.page.text.values()), default=0)

    def newest_reply(self) -> int:
        return max(self.page.status, default=0)

    def complete(self, pk: int) -> bool:
        return self.page.status.get(pk) == "complete"

    def final(self, pk: int) -> str:
        """The message as the page shows it last: its latest full render."""
        renders = [f for f in self.page.frames if f'<article id="message-{pk}"' in f]
        return html.unescape(renders[-1]) if renders else ""

    def statuses(self, pk: int) -> list[str]:
        """Every status the page showed the message in, in order."""
        pattern = re.compile(rf'<article id="message-{pk}"[^>]*data-status="(\w+)"')
        return [m.group(1) for frame in self.page.frames for m in pattern.finditer(frame)]


async def until(predicate, what: str, tabs: tuple[Tab, ...], within: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        for tab in tabs:
            tab.check_open()
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def reply_on_two_tabs(
    urls: tuple[str, str], path: str, cookie: str, content: str, *, words_on_a: int = 30
) -> tuple[Tab, Tab]:
    """A chat open in a tab on process A and one on B; `content` sent from A, its reply
    streaming on both (`words_on_a` words on A, 30 on B)."""
    tabs = tab_a, tab_b = (
        await Tab(urls[0], path, cookie).open(),
        await Tab(urls[1], path, cookie).open(),
    )
    await tab_a.send(**sent(content))
    await until(lambda: tab_a.words() >= words_on_a and tab_b.words() >= 30, "the reply", tabs)
    return tabs


def sent(content: str) -> dict:
    return {"type": "send", "content": content, "client_message_id": str(uuid.uuid4())}


def open_team_chat(url: str) -> tuple[httpx.Client, str, str]:
    """tess logged in on `url`, a new chat of hers, and the cookie for its sockets."""
    client = _login(url)
    path = new_team_chat(client, url)
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    return client, path, cookie


def new_team_chat(client: httpx.Client, url: str) -> str:
    """The path of a new chat made by `client` (signed in on `url`)."""
    response = client.post(
        "/c/new/", data={"csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": f"{url}/"},
    )  # fmt: skip
    return response.headers["Location"]


@pytest.mark.services
def test_the_database_unavailable_mid_reply_is_survived(team, app_simulator):  # noqa: F811
    """PostgreSQL refuses the app for ~3 s mid-reply (its backends terminated, new connections
    not allowed): the checkpoints meanwhile fail, the reply goes on, and once the database is
    back it is saved complete and whole, every tab ends showing it, and both processes serve
    new replies.

    The team's processes take a reply silent for 3 s (QWENWEB_REPLY_STALE_AFTER) as dead, so
    the sweep may mark this one `interrupted` when the database is back, before its next
    checkpoint: the pages show it so for a moment, and that checkpoint takes it back (the
    reply's own fencing token: tests/test_liveness.py)."""
    import psycopg

    app_simulator.add_scenario(Scenario(match="outage", reply=LONG_REPLY, token_delay=0.02))
    url_a, url_b = team
    client, path, cookie = open_team_chat(url_a)

    def allow_connections(allowed: bool) -> None:
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(
                f'ALTER DATABASE "{team.database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'
            )
            if not allowed:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    [team.database],
                )

    async def scenario() -> tuple[Tab, Tab, int]:
        tabs = tab_a, tab_b = await reply_on_two_tabs(
            (url_a, url_b), path, cookie, "outage ahead", words_on_a=60
        )
        try:
            await asyncio.to_thread(allow_connections, False)
            await asyncio.sleep(3)
        finally:
            await asyncio.to_thread(allow_connections, True)
        pk = tab_a.newest_reply()
        await until(lambda: tab_a.complete(pk) and tab_b.complete(pk), "its end", tabs, 30)
        # Both processes go on: a reply sent through each completes on both tabs.
        for tab in tabs:
            last = tab.newest_reply()
            await tab.send(**sent("and after the outage"))
            await until(lambda: min(t.newest_reply() for t in tabs) > last, "a reply", tabs)  # noqa: B023
            new = tab_a.newest_reply()
            await until(lambda: tab_a.complete(new) and tab_b.complete(new), "its end", tabs)  # noqa: B023
        for tab in tabs:
            await tab.close()
        return tab_a, tab_b, pk

    tab_a, tab_b, pk = asyncio.run(scenario())
    for tab in (tab_a, tab_b):
        assert LONG_REPLY in tab.final(pk), "every tab ends showing the whole reply"
        assert tab.statuses(pk)[-1] == "complete"
    messages = client.get(path + "export.json").json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"), ("assistant", "complete"),
    ] * 3  # fmt: skip
    assert (messages[0]["content"], messages[1]["content"]) == ("outage ahead", LONG_REPLY)
    assert all(m["content"] for m in messages)
    for url in team:
        assert httpx.get(f"{url}/healthz").json()["database"] == "ok"


class RedisServer:
    """A redis-server of the test's own, on a free port: stopped and started again at will."""

    def __init__(self, log_path) -> None:
        self.port, self.log_path, self.process = free_port(), log_path, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--bind", "127.0.0.1"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while not reachable(self.url, self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.log_path.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate this redis-server (by its pid: only the one this test started)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis_team(app_simulator, tmp_path):
    """Two daphne processes on a fresh PostgreSQL database and a redis-server of their own (as
    the team fixture sets them up), and that redis-server."""
    problems = []
    if not reachable(PG, 5432):
        problems.append(f"PostgreSQL not reachable ({PG})")
    if shutil.which("redis-server") is None:
        problems.append("redis-server is not installed")
    if problems:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Redis restart test: {'; '.join(problems)}")
        pytest.skip("; ".join(problems))
    import psycopg

    redis = RedisServer(tmp_path / "redis.log")
    redis.start()
    database = f"qwenweb_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    env = {
        **os.environ,
        "DATABASE_URL": PG.rsplit("/", 1)[0] + "/" + database,
        "REDIS_URL": redis.url,
        "DJANGO_SECRET_KEY": "faults-test-" + uuid.uuid4().hex,
        "QWENWEB_DATA_DIR": str(tmp_path),
        "DASHSCOPE_API_KEY": APP_API_KEY,
        "DASHSCOPE_BASE_URL": app_simulator.native_base_url,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        # A third of it is how long a socket waits on a quiet reply before looking it up.
        "QWENWEB_REPLY_STALE_AFTER": "3",
    }
    processes = None
    try:
        run = {"cwd": ROOT, "env": env, "check": True, "capture_output": True}
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], **run)
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c",
             "from django.contrib.auth.models import User; "
             "User.objects.create_user('tess', password='tess-pw-1')"],
            **run,
        )  # fmt: skip
        processes = Team(env, tmp_path)
        yield processes, redis
    finally:
        for process in processes.processes if processes is not None else ():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        redis.stop()
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.mark.services
def test_redis_restarted_mid_reply_is_survived(own_redis_team, app_simulator):
    """The channel layer's Redis stops mid-reply and is back a second later. The reply goes
    on and is saved whole; the tab on A, the generation's process, gets every frame directly;
    the tab on B, whose frames come through Redis, stays open, sees the gap the restart left
    and catches up from the generation, and ends showing the whole reply, with no reconnect
    (channels_redis resubscribes on its own once Redis is back). A's one subscription to the
    replies' requests (control.py), made before the restart, still hears them after it: Stop
    pressed on B stops the next reply A runs."""
    (url_a, url_b), redis = own_redis_team
    app_simulator.add_scenario(Scenario(match="redis", reply=LONG_REPLY, token_delay=0.02))
    client, path, cookie = open_team_chat(url_a)

    async def scenario() -> tuple[Tab, Tab, int]:
        tabs = tab_a, tab_b = await reply_on_two_tabs(
            (url_a, url_b), path, cookie, "redis restarts", words_on_a=60
        )
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(1)
        await asyncio.to_thread(redis.start)
        pk = tab_a.newest_reply()
        await until(lambda: tab_a.complete(pk) and tab_b.complete(pk), "its end", tabs, 30)

        await tab_a.send(**sent("redis is back"))
        await until(lambda: tab_b.newest_reply() > pk and tab_b.words() >= 20, "the next", tabs)
        following = tab_b.newest_reply()
        await tab_b.send(type="stop")
        await until(
            lambda: tab_a.page.status.get(following) == "stopped"
            and tab_b.page.status.get(following) == "stopped",
            "the next reply stopped from B", tabs,
        )  # fmt: skip
        for tab in tabs:
            await tab.close()
        return tab_a, tab_b, pk

    tab_a, tab_b, pk = asyncio.run(scenario())
    assert tab_a.page.text[pk] == LONG_REPLY  # streamed whole: no frame of A's went missing
    for tab in (tab_a, tab_b):
        assert LONG_REPLY in tab.final(pk), "every tab ends showing the whole reply"
        assert set(tab.statuses(pk)) == {"streaming", "complete"}
    messages = client.get(path + "export.json").json()["messages"]
    assert [(m["role"], m["status"], m["content"]) for m in messages[:2]] == [
        ("user", "complete", "redis restarts"), ("assistant", "complete", LONG_REPLY),
    ]  # fmt: skip
    assert [(m["role"], m["status"]) for m in messages[2:]] == [
        ("user", "complete"), ("assistant", "stopped"),
    ]  # fmt: skip
    assert httpx.get(f"{url_b}/healthz").json()["channel_layer"] == "ok"


@pytest.mark.services
def test_a_reply_that_ends_while_redis_is_away_ends_on_every_tab(own_redis_team, app_simulator):
    """Redis stays away until the reply is over. Stop pressed on B, the other process, cannot
    reach the reply: B says so and stays open, and the reply goes on. Its end cannot reach B
    either: B, hearing nothing more of the reply, looks it up and shows its end, all before
    Redis is back."""
    (url_a, url_b), redis = own_redis_team
    app_simulator.add_scenario(Scenario(match="away", reply=LONG_REPLY, token_delay=0.02))
    client, path, cookie = open_team_chat(url_a)

    async def scenario() -> tuple[Tab, Tab, int]:
        tabs = tab_a, tab_b = await reply_on_two_tabs(
            (url_a, url_b), path, cookie, "redis goes away"
        )
        pk = tab_a.newest_reply()
        await asyncio.to_thread(redis.stop)
        try:
            await tab_b.send(type="stop")
            await until(
                lambda: any("did not reach the reply" in f for f in tab_b.page.frames),
                "B's notice", tabs,
            )  # fmt: skip
            await until(lambda: tab_a.complete(pk), "the end on A", tabs, 30)
            await until(lambda: tab_b.complete(pk), "the end on B, Redis still away", tabs, 10)
        finally:
            await asyncio.to_thread(redis.start)
        for tab in tabs:
            await tab.close()
        return tab_a, tab_b, pk

    tab_a, tab_b, pk = asyncio.run(scenario())
    for tab in (tab_a, tab_b):
        assert LONG_REPLY in tab.final(pk), "every tab ends showing the whole reply"
    messages = client.get(path + "export.json").json()["messages"]
    assert [(m["status"], m["content"]) for m in messages] == [
        ("complete", "redis goes away"), ("complete", LONG_REPLY),
    ]  # fmt: skip
