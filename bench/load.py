"""Load bench over real sockets: P1 (first-token latency the app adds) and P2 (concurrent
streaming replies that 1 and 2 daphne processes sustain). Issue #4.

    .venv/bin/python bench/load.py            # full run, about 5-6 minutes
    .venv/bin/python bench/load.py --quick    # smoke run, about 1.5 minutes
    .venv/bin/python bench/load.py --no-two   # skip the PostgreSQL + Redis case

Everything runs on 127.0.0.1 and is started and stopped by the script: the DashScope simulator
in its own process (bench/stamped_simulator.py: the project's simulator plus wall-clock stamps
of each request's arrival and each SSE chunk it sends; first token after 0.3 s, then one token
per chunk every 20 ms = 50 tokens/s), daphne (1 process on a temporary SQLite file with the
in-memory channel layer; 2 processes on a fresh PostgreSQL database on
postgres://root@127.0.0.1:5432 and Redis db 10, both removed at the end), and the clients:
websocket clients (python `websockets`) in this one asyncio process, logged in over HTTP.

Definitions (all times are time.time() on the one machine, client and simulator alike):

* intake  = client sends the `send` frame -> the request arrives at the simulator
* relay   = the simulator sends the first chunk -> the client receives the first `+` frame
* added   = intake + relay: what the app adds to the first token. Baseline in the same run: a
            bare httpx client streaming from the simulator directly at the same concurrency,
            measured the same way (send -> arrival, first chunk sent -> first chunk read).
* frame lag (P2) = for each `+` frame: receive time - the time the simulator sent the OLDEST
            token the frame carries (so it includes the app's designed coalescing, up to one
            QWENWEB_FRAME_INTERVAL = 40 ms). "newest" lag = the same for the newest token.
* delivered = the text joined from a reply's `+` frames equals the reply saved in the database
            and its final fragment says data-status="complete".
* first frame (P2) = client send -> first `+` frame (includes the 0.3 s first-token delay).
* completion lag (P2) = the last `+` frame's receive time - the time the simulator sent the
            reply's last token: how long after DashScope ends a reply the page has all of it.
* cpu ms/1k tok (P2) = CPU time of the daphne process(es) during the level per 1,000 tokens
            of the replies delivered.

A P2 level passes when every reply is delivered and the p95 frame lag is <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import html
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import free_port, logged_in_client  # noqa: E402

from dashscope_simulator import tokenize  # noqa: E402

PY = sys.executable
PG = os.environ.get("QWENWEB_BENCH_POSTGRES", "postgres://root@127.0.0.1:5432/test")
REDIS = os.environ.get("QWENWEB_BENCH_REDIS", "redis://127.0.0.1:6379/10")
API_KEY = "sk-bench-load"
PASSWORD = "bench-pass-7731"
FIRST_TOKEN_DELAY = 0.3
TOKEN_DELAY = 0.02
P1_TOKENS = 10
P2_TOKENS = 200
LAG_TARGET = 0.100
PROFILE_SECONDS, PROFILE_RATE = 5, 200
STAGGER = 1.0  # P2 sends are spread evenly over this many seconds
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILES = ROOT / "bench" / "profiles"
PYSPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


# -- small helpers ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# P1: how long after a burst of sends the CPU it costs is counted (before DashScope's first
# token at FIRST_TOKEN_DELAY: the work each send needs before its reply can show anything).
BURST_WINDOW = 0.12


def cpu_by_kind(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of the stack's processes by kind (daphne, PostgreSQL's, Redis, the
    simulator), and of the whole machine ("machine": busy, "jiffies": all)."""
    daphnes = {process.pid for process in stack.daphnes}
    found = dict.fromkeys(("daphne", "postgresql", "redis", "simulator"), 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        kind = (
            "daphne" if pid in daphnes
            else "simulator" if pid == stack.sim.pid
            else "postgresql" if name.startswith("postgres")
            else "redis" if name.startswith("redis")
            else None
        )  # fmt: skip
        if kind:
            found[kind] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    busy, total = machine_busy()
    found["machine"], found["jiffies"] = busy / CLK_TCK, total / CLK_TCK
    return found


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"


class CpuMeter:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.m0 = machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        wall = self.wall = time.monotonic() - self.t0
        self.percent = {
            name: 100 * (cpu_seconds(pid) - self.c0[name]) / wall for name, pid in self.pids.items()
        }
        busy, total = machine_busy()
        self.percent["machine"] = 100 * (busy - self.m0[0]) / max(1, total - self.m0[1])


# -- processes --------------------------------------------------------------------------------


@dataclass
class Stack:
    """The simulator, the app's daphne process(es) and their database, for one configuration."""

    name: str
    env: dict
    data_dir: Path
    sim: subprocess.Popen
    sim_url: str
    daphnes: list[subprocess.Popen] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    pg_database: str | None = None
    floor: bool = False  # bench/floor_relay.py instead of the app: no database, no login
    root: Path = ROOT  # the checkout the app runs from (bench/ab.py runs two)

    def manage(self, *args: str) -> str:
        result = subprocess.run([PY, "manage.py", *args], cwd=self.root, env=self.env,
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode:
            raise RuntimeError(f"manage.py {args[0]} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def db_messages(self, pks: list[int]) -> dict[int, tuple[str, str]]:
        """(content, status) of messages, read straight from the database (not through the app,
        so the check costs the server nothing); for the floor relay, what it streamed."""
        if self.floor:
            found = {}
            for url in self.urls:
                ids = ",".join(str(pk) for pk in pks)
                found |= httpx.get(f"{url}/texts", params={"ids": ids}, timeout=30).json()
            return {int(pk): tuple(value) for pk, value in found.items()}
        sql = "SELECT id, content, status FROM conversations_message WHERE id = ANY(%s)"
        if self.pg_database:
            import psycopg

            with psycopg.connect(pg_url(self.pg_database)) as conn:
                rows = conn.execute(sql, (pks,)).fetchall()
        else:
            with sqlite3.connect(self.data_dir / "db.sqlite3") as conn:
                marks = ",".join("?" * len(pks))
                rows = conn.execute(
                    f"SELECT id, content, status FROM conversations_message WHERE id IN ({marks})",
                    pks,
                ).fetchall()
        return {pk: (content, status) for pk, content, status in rows}


def pg_url(database: str) -> str:
    return PG.rsplit("/", 1)[0] + "/" + database


def start_simulator(log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [PY, str(ROOT / "bench" / "stamped_simulator.py"), "--port", str(port),
             "--api-key", API_KEY, "--first-token-delay", str(FIRST_TOKEN_DELAY),
             "--token-delay", str(TOKEN_DELAY)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/_simulator/state", process, log_path)
    scenarios = [
        {"match": "p1-", "times": -1, "tokens": P1_TOKENS},
        {"match": "p2-", "times": -1, "tokens": P2_TOKENS},
        {"match": "bare-", "times": -1, "tokens": P1_TOKENS},
    ]
    httpx.post(f"{url}/_simulator/scenarios", json=scenarios).raise_for_status()
    return process, url


def wait_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def start_daphne(stack: Stack, n: int) -> None:
    port = free_port()
    log_path = stack.data_dir / f"daphne-{n}.log"
    app, cwd = ("floor_relay:application", ROOT / "bench") if stack.floor else (
        "qwenweb.asgi:application", stack.root)  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app],
            cwd=cwd, env=stack.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", process, log_path)
    stack.daphnes.append(process)
    stack.urls.append(url)
    stack.logs.append(log_path)


def build_stack(name: str, processes: int, sim: subprocess.Popen, sim_url: str,
                root: Path = ROOT, extra_env: dict | None = None) -> Stack:  # fmt: skip
    data_dir = Path(tempfile.mkdtemp(prefix=f"qwenweb-load-{name}-"))
    env = {
        **os.environ,
        "QWENWEB_DATA_DIR": str(data_dir),
        "DASHSCOPE_API_KEY": API_KEY,
        "DASHSCOPE_BASE_URL": f"{sim_url}/api/v1",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECRET_KEY": "bench-load-" + uuid.uuid4().hex,
        "PYTHONUNBUFFERED": "1",
        # A few users stand for a crowd here: per-user limits high enough never to refuse
        # (still counted, so their query is part of the cost).
        "QWENWEB_MAX_CONCURRENT_REPLIES": "1000000",
        "QWENWEB_MESSAGES_PER_MINUTE": "1000000",
        **(extra_env or {}),
    }
    env.pop("DJANGO_DEBUG", None)
    stack = Stack(name=name, env=env, data_dir=data_dir, sim=sim, sim_url=sim_url, root=root)
    if processes == 1:
        env["DATABASE_URL"] = f"sqlite:///{data_dir / 'db.sqlite3'}"
        env.pop("REDIS_URL", None)
    else:
        import psycopg
        import redis

        stack.pg_database = f"qwenweb_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{stack.pg_database}"')
        env["DATABASE_URL"] = pg_url(stack.pg_database)
        env["REDIS_URL"] = REDIS
        redis.Redis.from_url(REDIS).flushdb()
    stack.manage("migrate", "-v0")
    for n in range(processes):
        start_daphne(stack, n)
    return stack


def build_floor_stack(name: str, processes: int, sim: subprocess.Popen, sim_url: str) -> Stack:
    """daphne serving bench/floor_relay.py: the same client code and frames, nothing else."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"qwenweb-load-{name}-"))
    env = {**os.environ, "FLOOR_BASE_URL": f"{sim_url}/api/v1", "FLOOR_API_KEY": API_KEY,
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    stack = Stack(name=name, env=env, data_dir=data_dir, sim=sim, sim_url=sim_url, floor=True)
    for n in range(processes):
        start_daphne(stack, n)
    return stack


def teardown(stack: Stack) -> None:
    for process in stack.daphnes:
        process.send_signal(signal.SIGTERM)
    for process in stack.daphnes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    if stack.pg_database:
        import psycopg
        import redis

        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{stack.pg_database}" WITH (FORCE)')
        redis.Redis.from_url(REDIS).flushdb()


def log_problems(stack: Stack) -> list[str]:
    """Warnings, errors and tracebacks in the daphne logs, counted by first line."""
    counts: dict[str, int] = {}
    for path in stack.logs:
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception", line):
                key = re.sub(r"\d+", "N", line.strip())[:160]
                counts[key] = counts.get(key, 0) + 1
    return [f"{n}x {line}" for line, n in sorted(counts.items(), key=lambda kv: -kv[1])]


# -- users, conversations, sockets ------------------------------------------------------------

# One person per conversation (P1's "10 people send at once"), each signed in: a session
# made here, as a sign-in makes it (the password hashed once for all of them; one sign-in
# through the login form, by `login`, checks that path and gives the first cookie).
SETUP_SCRIPT = """
import json
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client
from conversations.models import Conversation, ModelProfile, SystemPrompt
users, conversations = {users}, {conversations}
with transaction.atomic():
    password = make_password({password!r})
    owners = User.objects.bulk_create(
        User(username=f"bench{{i}}", password=password) for i in range(users)
    )
    model = ModelProfile.objects.default()
    prompt = SystemPrompt.objects.filter(is_default=True).first()
    made = Conversation.objects.bulk_create(
        Conversation(owner=owners[j % users], model=model, system_prompt=prompt)
        for j in range(conversations)
    )
cookies = []
for owner in owners[1:]:
    client = Client()
    client.force_login(owner)
    cookies.append(client.cookies["sessionid"].value)
print(json.dumps({{"conversations": [[str(c.id), j % users] for j, c in enumerate(made)],
                  "cookies": cookies}}))
"""


def login(url: str, username: str) -> str:
    with closing(logged_in_client(url, username, PASSWORD)) as client:
        return client.cookies["sessionid"]


@dataclass
class Reply:
    tag: str
    sent: float = 0.0
    pk: int | None = None
    frames: list[tuple[float, str]] = field(default_factory=list)
    status: str | None = None
    notice: str | None = None
    resyncs: int = 0  # catch-up fragments carrying text (the page got text as HTML)
    announced: float = 0.0  # when the reply's placeholder arrived (its announcement)
    page: str = ""  # the reply's text as the page shows it: catch-up HTML, then + frames
    done: asyncio.Event = field(default_factory=asyncio.Event)


# A streaming reply's body: how much of its text has settled into formatted blocks, and the
# rest (the tail), as text.
STREAMING_BODY = re.compile(
    r'data-role="assistant" data-status="streaming".*?message__body--streaming[^"]*"[^>]*'
    r' data-settled="(\d+)">.*?class="message__tail[^"]*">(.*?)</div>',
    re.S,
)
STATUS = re.compile(r'data-role="assistant" data-status="(complete|error|stopped|interrupted)"')


class Conn:
    def __init__(self, url: str, conversation: str, cookie: str) -> None:
        self.url, self.conversation, self.cookie = url, conversation, cookie
        self.current: Reply | None = None
        self.ws = None
        self.reader: asyncio.Task | None = None

    async def open(self) -> None:
        self.ws = await websockets.connect(
            self.url.replace("http://", "ws://") + f"/ws/c/{self.conversation}/",
            additional_headers={"Cookie": f"sessionid={self.cookie}"},
            origin=self.url, compression=None, max_queue=4096, open_timeout=60,
            ping_interval=None,
        )  # fmt: skip
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            now = time.time()
            reply = self.current
            if reply is None:
                continue
            if frame[0] == "+":
                pk, _, text = frame[1:].partition(":")
                reply.frames.append((now, text))
                reply.page += text
                if pk:  # `+:<text>` goes where the previous frame went
                    reply.pk = int(pk)
            elif (match := STATUS.search(frame)) is not None:
                reply.status = match.group(1)
                reply.done.set()
            elif (match := STREAMING_BODY.search(frame)) is not None:
                # A placeholder or catch-up fragment: the page shows its text, then appends
                # (the settled part's text is what the page had, or stand-ins if it had less).
                settled, tail = int(match.group(1)), html.unescape(match.group(2))
                reply.announced = reply.announced or now
                before = reply.page[:settled] if len(reply.page) >= settled else "\ufffc" * settled
                reply.page = before + tail
                reply.resyncs += bool(reply.page)
            elif 'role="alert"' in frame:
                reply.notice = re.sub(r"<[^>]+>", "", frame).strip()[:120]
                reply.done.set()

    async def send(self, tag: str, content: str) -> Reply:
        reply = self.current = Reply(tag=tag)
        payload = json.dumps({"type": "send", "content": content,
                              "client_message_id": str(uuid.uuid4())})  # fmt: skip
        reply.sent = time.time()
        await self.ws.send(payload)
        return reply

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()


class Clients:
    """Logged-in users and one socket per conversation, spread over the daphne processes."""

    def __init__(self, stack: Stack, users: int, conversations: int) -> None:
        self.stack = stack
        self.conns: list[Conn] = []
        if stack.floor:
            self.conversations = [[str(uuid.uuid4()), 0] for _ in range(conversations)]
            self.cookies = [""]
            return
        out = stack.manage("shell", "-c", SETUP_SCRIPT.format(
            users=users, conversations=conversations, password=PASSWORD))  # fmt: skip
        made = json.loads(out.strip().splitlines()[-1])
        self.conversations = made["conversations"]
        # Sessions live in the shared database: one per user serves every process.
        self.cookies = [login(stack.urls[0], "bench0"), *made["cookies"]]

    async def ensure(self, count: int) -> list[Conn]:
        """At least `count` open sockets (opened 20 at a time, not timed)."""
        while len(self.conns) < count:
            batch = []
            for j in range(len(self.conns), min(count, len(self.conns) + 20)):
                conversation, owner = self.conversations[j]
                url = self.stack.urls[j % len(self.stack.urls)]
                batch.append(Conn(url, conversation, self.cookies[owner]))
            await asyncio.gather(*(conn.open() for conn in batch))
            self.conns.extend(batch)
        return self.conns[:count]

    async def close(self) -> None:
        await asyncio.gather(*(conn.close() for conn in self.conns), return_exceptions=True)


async def sim_timings(sim_url: str, clear: bool = False) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.request("DELETE" if clear else "GET", f"{sim_url}/_bench/timings")
        return response.json()


# -- P1 ---------------------------------------------------------------------------------------


async def p1_app(clients: Clients, level: int, rounds: int, prefix: str) -> dict:
    conns = await clients.ensure(level)
    await sim_timings(clients.stack.sim_url, clear=True)
    replies: list[Reply] = []
    kinds = ("daphne", "postgresql", "redis", "simulator", "machine", "jiffies")
    window = dict.fromkeys(kinds, 0.0)
    for r in range(rounds):
        batch = [f"{prefix}-{level}-{r}-{i}" for i in range(level)]
        sends = [
            conn.send(tag, f"first token please [{tag}]")
            for conn, tag in zip(conns, batch, strict=True)
        ]
        before = cpu_by_kind(clients.stack)
        round_replies = await asyncio.gather(*sends)
        await asyncio.sleep(BURST_WINDOW)
        for kind, seconds in cpu_by_kind(clients.stack).items():
            window[kind] += seconds - before[kind]
        await asyncio.wait_for(asyncio.gather(*(x.done.wait() for x in round_replies)), 60)
        replies.extend(round_replies)
        await asyncio.sleep(0.1)
    timings = await sim_timings(clients.stack.sim_url)
    intake, relay, added, failed, reasons = [], [], [], 0, {}
    late = []  # (relay, announced after the first chunk by) of the replies whose relay > 20 ms
    for reply in replies:
        stamp = timings.get(reply.tag)
        if reply.status != "complete" or not reply.frames or not stamp or not stamp["chunks"]:
            failed += 1
            why = (
                (reply.notice or reply.status or "no end")
                if reply.status != "complete"
                else ("no + frame (text came as catch-up HTML)" if not reply.frames else "no stamp")
            )
            reasons[why] = reasons.get(why, 0) + 1
            continue
        intake.append(stamp["arrival"] - reply.sent)
        relay.append(reply.frames[0][0] - stamp["chunks"][0])
        added.append(intake[-1] + relay[-1])
        if relay[-1] > 0.02:
            late.append((relay[-1], reply.announced - stamp["chunks"][0]))
    return {
        "late": late,
        "intake": intake,
        "relay": relay,
        "added": added,
        "failed": failed,
        "n": len(replies),
        "reasons": reasons,
        # CPU ms a send in the BURST_WINDOW after each burst, by kind of process; the share
        # of the whole machine busy then.
        "window": {kind: 1000 * window[kind] / max(1, len(replies)) for kind in window
                   if kind not in ("machine", "jiffies")}
        | {"machine busy %": 100 * window["machine"] / max(1e-9, window["jiffies"])},
    }  # fmt: skip


async def p1_bare(sim_url: str, level: int, rounds: int) -> dict:
    """The floor: httpx straight to the simulator, the same request shape the app sends."""
    await sim_timings(sim_url, clear=True)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    samples: list[tuple[str, float, float]] = []
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(tag: str) -> None:
            body = {"model": "qwen-plus",
                    "input": {"messages": [{"role": "user", "content": f"bare [{tag}]"}]},
                    "parameters": {"incremental_output": True,
                               "result_format": "message"}}  # fmt: skip
            headers = {"Authorization": f"Bearer {API_KEY}", "X-DashScope-SSE": "enable"}
            sent = time.time()
            first = None
            async with client.stream("POST", f"{sim_url}/api/v1/services/aigc/text-generation/"
                                     "generation", json=body,
                                     headers=headers) as response:  # fmt: skip
                async for _chunk in response.aiter_raw():
                    if first is None:
                        first = time.time()
            samples.append((tag, sent, first))

        for r in range(rounds):
            await asyncio.gather(*(one(f"bare-{level}-{r}-{i}") for i in range(level)))
            await asyncio.sleep(0.1)
    timings = await sim_timings(sim_url)
    intake, relay, added = [], [], []
    for tag, sent, first in samples:
        stamp = timings[tag]
        intake.append(stamp["arrival"] - sent)
        relay.append(first - stamp["chunks"][0])
        added.append(intake[-1] + relay[-1])
    return {"intake": intake, "relay": relay, "added": added, "failed": 0, "n": len(samples)}


# -- P2 ---------------------------------------------------------------------------------------


def frame_lags(reply: Reply, content: str, chunks: list[float]) -> tuple[list[float], list[float]]:
    """(oldest-token lag, newest-token lag) of each `+` frame of a reply."""
    ends, total = [], 0
    for token in tokenize(content):
        total += len(token)
        ends.append(total)
    oldest, newest, offset = [], [], 0
    for received, text in reply.frames:
        end = offset + len(text)
        first = bisect.bisect_right(ends, offset)
        last = bisect.bisect_left(ends, end)
        if last < len(chunks) and text:
            oldest.append(received - chunks[first])
            newest.append(received - chunks[last])
        offset = end
    return oldest, newest


async def p2_level(clients: Clients, level: int, meter_pids: dict, profile: Path | None) -> dict:
    conns = await clients.ensure(level)
    stack = clients.stack
    await sim_timings(stack.sim_url, clear=True)
    run = f"p2-{level}-{uuid.uuid4().hex[:6]}"
    replies: list[Reply] = []
    profiler = None
    with CpuMeter(meter_pids) as meter:
        if profile is not None:
            profiler = subprocess.Popen(  # noqa: ASYNC220 (starts at once, waited for below)
                [PYSPY, "record", "--pid", str(stack.daphnes[0].pid),
                 "--duration", str(PROFILE_SECONDS), "--rate", str(PROFILE_RATE),
                 "--nonblocking", "--format", "raw", "-o", str(profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        started = time.monotonic()
        for i, conn in enumerate(conns):
            # Spread the sends evenly over STAGGER seconds: a steady crowd, not one burst.
            delay = started + STAGGER * i / level - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tag = f"{run}-{i}"
            replies.append(await conn.send(tag, f"tell me a long story [{tag}]"))
        # The simulator paces by sleeping between chunks: on a busy machine its streams run
        # slower than 50 tokens/s (300 streams took 13-20 s instead of 10 here). Lags are
        # measured from its own stamps, so a slow stream only needs a longer wait.
        deadline = 30 + 4 * P2_TOKENS * TOKEN_DELAY
        with_timeout = [asyncio.wait_for(r.done.wait(), deadline) for r in replies]
        results = await asyncio.gather(*with_timeout, return_exceptions=True)
    if profiler is not None:
        profiler.wait(timeout=60)
    timed_out = sum(isinstance(x, Exception) for x in results)
    timings = await sim_timings(stack.sim_url)
    saved = stack.db_messages([r.pk for r in replies if r.pk is not None])
    oldest, newest, first_frame, intake, completion = [], [], [], [], []
    lost, statuses, caught_up = 0, {}, 0
    resynced = sum(1 for r in replies if r.resyncs)
    for reply in replies:
        stamp = timings.get(reply.tag)
        key = reply.status or ("refused" if reply.notice else "no end")
        statuses[key] = statuses.get(key, 0) + 1
        content, status = saved.get(reply.pk, (None, None))
        joined = "".join(text for _t, text in reply.frames)
        if reply.status != "complete" or status != "complete" or content != joined:
            lost += 1
            if reply.status == "complete" and content == reply.page:
                caught_up += 1
            elif os.environ.get("BENCH_DEBUG") and content is not None:
                at = next(
                    (i for i, (a, b) in enumerate(zip(content, joined, strict=False)) if a != b),
                    min(len(content), len(joined)),
                )
                print(
                    f"    lost {reply.pk}: saved {len(content)} chars {status}, frames "
                    f"{len(reply.frames)} joined {len(joined)}, page {len(reply.page)}, "
                    f"first difference at {at}: saved {content[at : at + 30]!r} "
                    f"frames {joined[at : at + 30]!r}",
                    flush=True,
                )
            continue
        if stamp:
            intake.append(stamp["arrival"] - reply.sent)
            a, b = frame_lags(reply, content, stamp["chunks"])
            oldest += a
            newest += b
            last_token = len(tokenize(content)) - 1
            if 0 <= last_token < len(stamp["chunks"]):
                completion.append(reply.frames[-1][0] - stamp["chunks"][last_token])
        first_frame.append(reply.frames[0][0] - reply.sent)
    return {
        "level": level, "ok": level - lost, "lost": lost, "timed_out": timed_out,
        "statuses": statuses, "frames": len(oldest), "resynced": resynced, "caught_up": caught_up,
        "lag50": pct(oldest, 0.5), "lag95": pct(oldest, 0.95), "lag99": pct(oldest, 0.99),
        "new95": pct(newest, 0.95), "intake95": pct(intake, 0.95),
        "first50": pct(first_frame, 0.5), "first95": pct(first_frame, 0.95),
        "done50": pct(completion, 0.5), "done95": pct(completion, 0.95),
        "cpu": meter.percent,
        # CPU of the daphne processes per 1,000 tokens relayed (ms).
        "cpu_per_ktok": sum(v for k, v in meter.percent.items() if k.startswith("daphne"))
        / 100 * meter.wall * 1000 / max(1, (level - lost) * P2_TOKENS / 1000),
        "pass": lost == 0 and pct(oldest, 0.95) <= LAG_TARGET,
    }  # fmt: skip


# -- profile summary --------------------------------------------------------------------------


def summarize_profile(raw: Path, seconds: float, rate: int, top: int = 15) -> list[str]:
    """Top functions by own (self) samples, per thread kind, from py-spy's raw output, as a
    share of wall time (100% = one thread busy the whole recording; idle not sampled)."""
    groups: dict[str, dict[str, dict[str, int]]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r" \((.*/)?(site-packages/|lib/python3\.\d+/)?", " (", f)
                  for f in stack.split(";") if f.strip()]  # fmt: skip
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        if not frames:
            continue
        kind = (
            "worker threads (sync_to_async)"
            if "Thread._bootstrap" in frames[0]
            else ("event loop thread")
        )
        group = groups.setdefault(kind, {"own": {}, "total": {}, "n": {"": 0}})
        group["n"][""] += n
        group["own"][frames[-1]] = group["own"].get(frames[-1], 0) + n
        for name in set(frames):
            group["total"][name] = group["total"].get(name, 0) + n
    wall = seconds * rate
    lines = [f"py-spy record --nonblocking, {rate} Hz, {seconds:g} s; % of wall time"]
    skip = (
        "<module>",
        "run (",
        "run_forever",
        "_run_once",
        "_run (",
        "_bootstrap",
        "runpy",
        "entrypoint",
        "_worker (",
        "Handle._run",
        "thread_handler",
        "run_child",
        "func (",
        "mainLoop",
        "reactor",
        "run (",
    )
    for kind, group in sorted(groups.items()):
        lines.append(f"  {kind}: busy {100 * group['n'][''] / wall:.0f}%")
        lines.append("    self%  function")
        for name, n in sorted(group["own"].items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * n / wall:5.1f}  {name}")
        lines.append("    total% function (inclusive, frameworks' run loops left out)")
        shown = 0
        for name, n in sorted(group["total"].items(), key=lambda kv: -kv[1]):
            if any(s in name for s in skip):
                continue
            lines.append(f"    {100 * n / wall:5.1f}  {name}")
            shown += 1
            if shown >= top:
                break
    return lines


# -- orchestration ----------------------------------------------------------------------------


def window_lines(results: list[tuple[int, dict, dict]]) -> list[str]:
    lines = [
        f"CPU ms a send in the first {BURST_WINDOW * 1000:.0f} ms after a burst of sends (before "
        "the first token), by kind of process (counted in the kernel's 10 ms ticks: read it "
        "where a level's bursts add up to many); the machine's busy share:"
    ]
    for level, app, _bare in results:
        cpu = app["window"]
        lines.append(f"{level:>6} sends: " + ", ".join(
            f"{kind} {value:.2f}" if kind != "machine busy %" else f"machine busy {value:.0f}%"
            for kind, value in cpu.items() if value or kind == "daphne"))  # fmt: skip
    return lines


def p1_table(results: list[tuple[int, dict, dict]]) -> list[str]:
    rows = ["P1: first-token latency the app adds (ms; intake = send -> upstream request, "
            "relay = upstream first chunk -> first + frame)",
            f"{'sends':>6} {'n':>4} {'fail':>4} | {'intake p50':>10} {'p95':>7} | "
            f"{'relay p50':>9} {'p95':>7} | {'app added p50':>13} {'p95':>7} | "
            f"{'bare p50':>8} {'p95':>7} | {'app-bare p50':>12} {'p95':>7}"]  # fmt: skip
    for level, app, bare in results:
        rows.append(
            f"{level:>6} {app['n']:>4} {app['failed']:>4} | {ms(pct(app['intake'], 0.5)):>10} "
            f"{ms(pct(app['intake'], 0.95)):>7} | {ms(pct(app['relay'], 0.5)):>9} "
            f"{ms(pct(app['relay'], 0.95)):>7} | {ms(pct(app['added'], 0.5)):>13} "
            f"{ms(pct(app['added'], 0.95)):>7} | {ms(pct(bare['added'], 0.5)):>8} "
            f"{ms(pct(bare['added'], 0.95)):>7} | "
            f"{ms(pct(app['added'], 0.5) - pct(bare['added'], 0.5)):>12} "
            f"{ms(pct(app['added'], 0.95) - pct(bare['added'], 0.95)):>7}"
        )
        if app.get("reasons"):
            rows.append(f"       failed: {app['reasons']}")
        if late := app.get("late"):
            # A reply shows nothing before its announcement: a late one is a late first frame.
            after = [a for _relay, a in late if a > 0]
            rows.append(
                f"       relay > 20 ms: {len(late)}, {len(after)} of them announced after "
                f"the first chunk" + (f" (by p50 {ms(pct(after, 0.5))} ms)" if after else "")
            )
    return rows


def p2_table(name: str, results: list[dict]) -> list[str]:
    cpu_names = [k for k in results[0]["cpu"]] if results else []
    rows = [f"P2 {name}: {P2_TOKENS}-token replies at 50 tokens/s, sends spread over "
            f"{STAGGER:g} s; lag = receive - upstream send of the oldest token in the frame",
            f"{'conc':>5} {'ok':>4} {'lost':>4} {'frames':>7} | {'lag p50':>7} {'p95':>6} "
            f"{'p99':>6} {'newest p95':>10} | {'completion p50':>14} {'p95':>6} | "
            f"{'cpu ms/1k tok':>13} | {'intake p95':>10} {'1st frame p50':>13} "
            f"{'p95':>6} | "
            + " ".join(f"{c + ' cpu%':>12}" for c in cpu_names) + " | pass"]  # fmt: skip
    for r in results:
        rows.append(
            f"{r['level']:>5} {r['ok']:>4} {r['lost']:>4} {r['frames']:>7} | {ms(r['lag50']):>7} "
            f"{ms(r['lag95']):>6} {ms(r['lag99']):>6} {ms(r['new95']):>10} | "
            f"{ms(r['done50']):>14} {ms(r['done95']):>6} | {r['cpu_per_ktok']:>13.0f} | "
            f"{ms(r['intake95']):>10} {ms(r['first50']):>13} {ms(r['first95']):>6} | "
            + " ".join(f"{r['cpu'][c]:>12.0f}" for c in cpu_names)
            + f" | {'yes' if r['pass'] else 'NO'}"
        )
        odd = {k: v for k, v in r["statuses"].items() if k != "complete"}
        if odd or r["timed_out"] or r["resynced"]:
            rows.append(
                f"      not complete: {odd or 0}, timed out waiting: {r['timed_out']}, "
                f"replies given text in a catch-up fragment: {r['resynced']}; of "
                f"the {r['lost']} lost, complete on the page via catch-up: "
                f"{r['caught_up']}"
            )
    passing = [r["level"] for r in results if r["pass"]]
    rows.append(f"  highest level meeting the target (p95 lag <= {LAG_TARGET * 1000:.0f} ms, "
                f"all delivered): {max(passing) if passing else 'none'}")  # fmt: skip
    return rows


async def run_p1(
    stack: Stack, clients: Clients, levels: list[tuple[int, int]], profile_at: int | None = None
) -> list:
    # Warm up: the first reply of a process creates its DashScope client and connections.
    await p1_app(clients, 1, 2, "p1-warm")
    await p1_bare(stack.sim_url, 1, 2)
    results = []
    for level, rounds in levels:
        app = await p1_app(clients, level, rounds, "p1")
        bare = await p1_bare(stack.sim_url, level, rounds)
        results.append((level, app, bare))
        if app["reasons"]:
            print(f"  P1 {level} failures: {app['reasons']}", flush=True)
        print(f"  P1 {level:>3} sends: app added p50 {ms(pct(app['added'], .5))} ms, p95 "
              f"{ms(pct(app['added'], .95))} ms; bare p50 {ms(pct(bare['added'], .5))} ms",
              flush=True)  # fmt: skip
    if profile_at and PYSPY:
        # After the measured levels (py-spy's sampling would slow them): rounds of
        # `profile_at` sends under py-spy, to see where a send's time goes.
        PROFILES.mkdir(exist_ok=True)
        raw = PROFILES / f"p1-{stack.name}-{profile_at}.txt"
        seconds = PROFILE_SECONDS * 2
        profiler = subprocess.Popen(  # noqa: ASYNC220 (starts at once, waited for below)
            [PYSPY, "record", "--pid", str(stack.daphnes[0].pid), "--duration", str(seconds),
             "--rate", str(PROFILE_RATE), "--nonblocking", "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        began = time.monotonic()
        while time.monotonic() - began < seconds - 1:
            await p1_app(clients, profile_at, 1, f"p1-profile-{uuid.uuid4().hex[:6]}")
        _out, errors = await asyncio.to_thread(profiler.communicate)
        if not raw.exists():
            print(f"  P1 profile: py-spy failed: {errors.decode()[-500:]}", flush=True)
        else:
            print(f"  P1 profile, {profile_at} sends a round, daphne0 -> {raw}", flush=True)
            for line in summarize_profile(raw, seconds, PROFILE_RATE, top=25):
                print("  " + line, flush=True)
    return results


async def run_p2(stack: Stack, clients: Clients, levels: list[int], profile_at: int | None,
                 deadline: float) -> list[dict]:  # fmt: skip
    pids = {f"daphne{n}": p.pid for n, p in enumerate(stack.daphnes)}
    pids |= {"sim": stack.sim.pid, "client": os.getpid()}
    results, failures = [], 0
    for level in levels:
        if time.monotonic() > deadline:
            print(f"  P2 {level}: skipped (time budget)", flush=True)
            break
        result = await p2_level(clients, level, pids, None)
        results.append(result)
        print(f"  P2 {stack.name} {level:>3}: ok {result['ok']}, lost {result['lost']}, lag p95 "
              f"{ms(result['lag95'])} ms, completion lag p95 {ms(result['done95'])} ms, "
              f"{result['cpu_per_ktok']:.0f} ms CPU per 1k tokens, daphne cpu "
              f"{sum(v for k, v in result['cpu'].items() if k.startswith('daphne')):.0f}%, "
              f"machine {result['cpu']['machine']:.0f}%", flush=True)  # fmt: skip
        failures += not result["pass"]
        if failures >= 2 or result["lost"] > level // 2:
            break  # past the knee: more load only costs time
        await asyncio.sleep(1.0)
    if profile_at is not None and PYSPY:
        PROFILES.mkdir(exist_ok=True)
        raw = PROFILES / f"p2-{stack.name}-{profile_at}.txt"
        print(f"  profiling daphne0 at {profile_at} concurrent replies -> {raw}", flush=True)
        result = await p2_level(clients, profile_at, pids, raw)
        result["level"] = profile_at
        stack.profile_result = result
        stack.profile_lines = (
            summarize_profile(raw, PROFILE_SECONDS, PROFILE_RATE)
            if raw.exists()
            else ["py-spy failed"]
        )
    return results


async def run_soak(
    stack: Stack, clients: Clients, level: int, seconds: float, short: bool = False
) -> dict:
    """`level` concurrent replies, round after round, for `seconds`: replies lost, errors in
    the logs, and the processes' memory at start and end."""
    pids = {f"daphne{n}": p.pid for n, p in enumerate(stack.daphnes)}
    pids |= {"sim": stack.sim.pid, "client": os.getpid()}
    await clients.ensure(level)
    rss_start = [rss_mb(p.pid) for p in stack.daphnes]
    began, rounds = time.monotonic(), []
    while time.monotonic() - began < seconds:
        result = await p2_level(clients, level, pids, None)
        rounds.append(result)
        if short:  # chats of constant length: what memory does with history out of the way
            import psycopg

            with psycopg.connect(pg_url(stack.pg_database), autocommit=True) as db:
                db.execute("DELETE FROM conversations_message")
        print(f"  soak {time.monotonic() - began:5.0f} s: {level} replies, lost "
              f"{result['lost']}, statuses {result['statuses']}, lag p95 "
              f"{ms(result['lag95'])} ms, RSS {[round(rss_mb(p.pid)) for p in stack.daphnes]} MB",
              flush=True)  # fmt: skip
    return {
        "seconds": time.monotonic() - began,
        "replies": sum(r["level"] for r in rounds),
        "lost": sum(r["lost"] for r in rounds),
        "not complete": sum(n for r in rounds for k, n in r["statuses"].items() if k != "complete"),
        "lag95": max(r["lag95"] for r in rounds),
        "rss_start": rss_start,
        "rss_end": [rss_mb(p.pid) for p in stack.daphnes],
    }


async def run_stack(name: str, processes: int, sim, sim_url: str, p1_levels, p2_levels,
                    profile_at, deadline, floor: bool = False, soak=None,
                    p1_profile: int | None = None) -> dict:  # fmt: skip
    print(f"== {name}: starting {processes} daphne process(es)", flush=True)
    stack = (build_floor_stack if floor else build_stack)(name, processes, sim, sim_url)
    out = {"stack": stack}
    try:
        needed = max([*p2_levels, *(lvl for lvl, _ in p1_levels), profile_at or 0,
                      soak[0] if soak else 0, p1_profile or 0])  # fmt: skip
        clients = Clients(stack, users=needed, conversations=needed)
        try:
            if soak:
                out["soak"] = await run_soak(stack, clients, *soak)
            if p1_levels:
                out["p1"] = await run_p1(stack, clients, p1_levels, p1_profile)
            out["p2"] = await run_p2(stack, clients, p2_levels, profile_at, deadline)
        finally:
            await clients.close()
        await asyncio.sleep(0.5)
        out["problems"] = log_problems(stack)
    finally:
        teardown(stack)
        out["profile"] = getattr(stack, "profile_lines", None)
        out["profile_result"] = getattr(stack, "profile_result", None)
        out["logs"] = [str(p) for p in stack.logs]
    return out


def main() -> None:
    global P2_TOKENS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small levels: a smoke run")
    parser.add_argument("--no-two", action="store_true", help="skip the 2-process case")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the floor (bench/floor_relay.py)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument(
        "--profile-at",
        type=int,
        default=None,
        help="concurrency of the extra profiled 1-process level (default 100)",
    )
    parser.add_argument(
        "--profile-p1",
        type=int,
        default=None,
        help="after P1's levels, profile daphne0 (py-spy) over rounds of this many sends",
    )
    parser.add_argument(
        "--conn-max-age",
        default=None,
        help="DATABASE_CONN_MAX_AGE for daphne (default: the app's default, 0)",
    )
    parser.add_argument("--p1", help="P1 levels as sends:rounds, comma-separated (e.g. 1:20,50:3)")
    parser.add_argument("--p2-one", help="1-process levels, comma-separated")
    parser.add_argument("--p2-two", help="2-process levels, comma-separated")
    parser.add_argument(
        "--p2-tokens", type=int, default=P2_TOKENS, help=f"tokens per P2 reply ({P2_TOKENS})"
    )
    parser.add_argument(
        "--engine", choices=["aiohttp", "httpx"], default=None,
        help="DashScope client's HTTP engine in the app and the floor (default: the app's)",
    )  # fmt: skip
    parser.add_argument(
        "--soak-short", action="store_true",
        help="with --soak: empty the chats after every round (their history stays short)",
    )  # fmt: skip
    parser.add_argument(
        "--soak", metavar="N:SECONDS",
        help="only a soak: N concurrent replies on the 2-process stack, round after round",
    )  # fmt: skip
    args = parser.parse_args()
    P2_TOKENS = args.p2_tokens
    if args.engine:
        os.environ["DASHSCOPE_HTTP_ENGINE"] = os.environ["FLOOR_HTTP_ENGINE"] = args.engine
    if args.quick:
        p1_levels = [(1, 5), (10, 2)]
        p2_one, p2_two, profile_at, profile_two = [20, 50], [20, 50], None, None
    else:
        # Rounds enough for a p95 that one slow round does not set alone (10: 120 sends, 50:
        # 400; before, 50 and 150, whose p95 was the third-worst send, or one round of three).
        p1_levels = [(1, 30), (10, 12), (50, 8)]
        p2_one = [20, 50, 100, 200, 300, 400]
        p2_two = [20, 50, 100, 200, 300, 400, 500]
        profile_at, profile_two = 100, 100
    if args.profile_at is not None:
        profile_at = args.profile_at
    if args.no_profile:
        profile_at = profile_two = None
    if args.p1 is not None:
        p1_levels = [tuple(int(x) for x in lvl.split(":")) for lvl in args.p1.split(",") if lvl]
    if args.p2_one is not None:
        p2_one = [int(x) for x in args.p2_one.split(",") if x]
    if args.p2_two is not None:
        p2_two = [int(x) for x in args.p2_two.split(",") if x]
    if args.conn_max_age is not None:
        os.environ["DATABASE_CONN_MAX_AGE"] = args.conn_max_age
    begin = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="qwenweb-load-"))
    sim, sim_url = start_simulator(work / "simulator.log")
    outputs = {}
    if args.soak:
        level, seconds = (int(x) for x in args.soak.split(":"))
        try:
            soak_args = (level, seconds, args.soak_short)
            out = asyncio.run(run_stack("soak", 2, sim, sim_url, [], [], None,
                                        deadline=0, soak=soak_args))  # fmt: skip
        finally:
            sim.terminate()
            sim.wait(timeout=10)
        soak, problems = out["soak"], out.get("problems") or []
        print(f"\nsoak: {level} concurrent replies on 2 processes (PostgreSQL, Redis) for "
              f"{soak['seconds']:.0f} s: {soak['replies']} replies, lost {soak['lost']}, not "
              f"complete {soak['not complete']}, worst round's lag p95 {ms(soak['lag95'])} ms, "
              f"daphne log problems {len(problems)}, RSS start "
              f"{[round(x) for x in soak['rss_start']]} MB, end "
              f"{[round(x) for x in soak['rss_end']]} MB")  # fmt: skip
        for line in problems[:15]:
            print("  " + line)
        shutil.rmtree(out["stack"].data_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        return
    budget = 90 if args.quick else 200  # seconds of P2 per configuration, at most
    runs = [("1proc", 1, "1 process (SQLite, in-memory layer)", p2_one, profile_at, False)]
    if not args.no_two:
        runs.append(("2proc", 2, "2 processes (PostgreSQL, Redis)", p2_two, profile_two, False))
    if not args.no_floor:
        runs.append(("floor1", 1, "floor, 1 process (daphne + DashScope client only)", p2_one,
                     None, True))  # fmt: skip
        if not args.no_two:
            runs.append(("floor2", 2, "floor, 2 processes (daphne + DashScope client only)",
                         p2_two, None, True))  # fmt: skip
    try:
        for key, processes, title, p2_levels, profile, floor in runs:
            outputs[title] = asyncio.run(run_stack(
                key, processes, sim, sim_url, p1_levels, p2_levels, profile,
                deadline=time.monotonic() + budget, floor=floor,
                p1_profile=args.profile_p1))  # fmt: skip
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    lines = ["", f"qwenweb load bench ({'quick' if args.quick else 'full'}), "
             f"{os.cpu_count()} CPUs, simulator: first token {FIRST_TOKEN_DELAY * 1000:.0f} ms, "
             f"then 1 token / {TOKEN_DELAY * 1000:.0f} ms; "
             f"total {time.monotonic() - begin:.0f} s", ""]  # fmt: skip
    for name, out in outputs.items():
        lines.append(f"### {name}")
        if out.get("p1"):
            lines += p1_table(out["p1"]) + window_lines(out["p1"]) + [""]
        if out.get("p2"):
            lines += p2_table(name, out["p2"]) + [""]
        if out.get("profile"):
            r = out["profile_result"]
            lines.append(f"Profile of daphne0 during a {r['level']}-reply level "
                         f"(lag p95 {ms(r['lag95'])} ms, lost {r['lost']}):")  # fmt: skip
            lines += out["profile"] + [""]
        problems = out.get("problems") or []
        lines.append("daphne log problems: " + str(sum(int(p.split("x ", 1)[0]) for p in problems)))  # noqa: E501
        lines += [f"  {p}" for p in problems[:15]] + [""]
        if args.keep:
            lines.append(f"logs: {out['logs']}")
    print("\n".join(lines))
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out["stack"].data_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
