"""P6: start time, idle memory, and memory per idle open websocket of one daphne process.

Starts real daphne processes (`python -m daphne qwenweb.asgi:application`) on a temp SQLite
database, with an API key set and an unreachable DashScope base so no demo simulator starts,
and measures:

* start time: from process spawn until /healthz answers 200 (median of several starts),
  beside baselines from the same run: `python -c "import django"`, importing the app without
  serving (`import qwenweb.asgi`), and a bare daphne serving a trivial ASGI app; plus one
  start with no bytecode cache at all (an upper bound for a first start after install);
* idle RSS (VmRSS) after a login and a few page loads;
* RSS growth per idle authenticated websocket, at 200 and 1,000 open sockets (each on one of
  the user's conversations, opened from this one asyncio process), beside the same figure for
  the bare daphne + trivial ASGI app (what daphne/Twisted cost per socket), and whether every
  socket is still open and answering pings afterwards.

    .venv/bin/python bench/memory.py [--sockets 200,1000] [--starts 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import free_port, logged_in_client, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PASSWORD = "bench-pass-5521"
TARGETS = {"socket_kb": 100, "idle_mb": 150, "start_s": 3.0}

TRIVIAL_APP = '''
async def app(scope, receive, send):
    """Answers any HTTP request with 200, accepts any websocket and keeps it open."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    elif scope["type"] == "websocket":
        while True:
            event = await receive()
            if event["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
            elif event["type"] == "websocket.disconnect":
                return
'''


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settled_rss_kb(pid: int, seconds: float = 2.0) -> int:
    """RSS once the process has gone quiet (the last of a few readings)."""
    time.sleep(seconds)
    return rss_kb(pid)


class Daphne:
    """One daphne process, started and timed until /healthz (or /) answers 200."""

    def __init__(self, app: str, env: dict, cwd: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as out:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), app],
                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = started + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited: {log.read_text()[-2000:]}")
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError("daphne did not answer /healthz within 60 s")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        self.start_seconds = time.perf_counter() - started

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def time_command(args: list[str], env: dict, cwd: Path, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, env=env, cwd=cwd, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def prepare(data_dir: Path, n_conversations: int) -> dict:
    env = {
        **os.environ,
        "QWENWEB_DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'db.sqlite3'}",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DASHSCOPE_API_KEY": "sk-x",
        "DASHSCOPE_BASE_URL": "http://127.0.0.1:9/api/v1",
        "QWENWEB_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("REDIS_URL", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    script = (
        "from django.contrib.auth.models import User\n"
        "from conversations.models import Conversation, ModelProfile\n"
        f"user = User.objects.create_user('bench', password={PASSWORD!r})\n"
        "model = ModelProfile.objects.default()\n"
        "Conversation.objects.bulk_create([Conversation(owner=user, model=model, "
        f"title=f'Chat {{i}}') for i in range({n_conversations})], batch_size=1000)\n"
    )
    subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", script], cwd=ROOT, env=env, check=True,
        capture_output=True,
    )  # fmt: skip
    return env


def login(url: str) -> tuple[httpx.Client, str]:
    client = logged_in_client(url, "bench", PASSWORD)
    return client, client.cookies["sessionid"]


async def open_sockets(url: str, paths: list[str], cookie: str | None, concurrency: int = 25):
    """Open one idle websocket per path; returns the connections (raises if any fails)."""
    from websockets.asyncio.client import connect

    ws_base = url.replace("http://", "ws://")
    gate = asyncio.Semaphore(concurrency)

    async def one(path: str):
        async with gate:
            return await connect(
                ws_base + path,
                origin=url,
                additional_headers={"Cookie": f"sessionid={cookie}"} if cookie else None,
                compression=None,
                proxy=None,
                ping_interval=None,  # idle: no client keepalive traffic
                open_timeout=60,
            )

    return await asyncio.gather(*(one(path) for path in paths))


async def still_open(connections) -> int:
    """How many sockets are open and answer a ping within 10 s."""

    async def check(ws) -> bool:
        try:
            waiter = await ws.ping()
            await asyncio.wait_for(waiter, timeout=10)
            return True
        except Exception:
            return False

    return sum(await asyncio.gather(*(check(ws) for ws in connections)))


async def socket_growth(
    pid: int, url: str, paths: list[str], steps: list[int], cookie: str | None
) -> dict:
    """RSS per socket at each step (cumulative: sockets stay open from one step to the next)."""
    results = {"before_kb": settled_rss_kb(pid)}
    connections = []
    for n in steps:
        started = time.perf_counter()
        connections += await open_sockets(url, paths[len(connections) : n], cookie)
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(3)  # let the connects' threads and tasks settle
        after = rss_kb(pid)
        results[n] = {
            "rss_kb": after,
            "per_socket_kb": (after - results["before_kb"]) / n,
            "open_seconds": open_seconds,
        }
    results["alive"] = await still_open(connections)
    results["open"] = len(connections)
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    await asyncio.sleep(2)
    results["after_close_kb"] = rss_kb(pid)
    # Open and close them all once more: RSS that keeps growing would be a leak; RSS that
    # stays at the first cycle's high-water mark is the allocator keeping its arenas.
    connections = await open_sockets(url, paths[: steps[-1]], cookie)
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    await asyncio.sleep(2)
    results["after_second_cycle_kb"] = rss_kb(pid)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sockets", default="200,1000", help="cumulative steps, e.g. 200,1000")
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    steps = sorted(int(n) for n in args.sockets.split(","))
    data_dir = Path(tempfile.mkdtemp(prefix="qwenweb-bench-memory-"))
    started = []
    try:
        run(args, steps, data_dir, started)
    except BaseException:
        log = data_dir / "daphne.log"
        if log.exists():
            print(f"daphne log (tail):\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for daphne in started:
            daphne.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def run(args, steps: list[int], data_dir: Path, started: list) -> None:
    env = prepare(data_dir, max(steps))
    trivial_dir = data_dir / "trivial"
    trivial_dir.mkdir()
    (trivial_dir / "trivial_app.py").write_text(TRIVIAL_APP)
    trivial_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    log = data_dir / "daphne.log"

    def start(app: str, app_env: dict, cwd: Path) -> Daphne:
        daphne = Daphne(app, app_env, cwd, log)
        started.append(daphne)
        return daphne

    # -- start time --------------------------------------------------------------------------
    app_starts = []
    for _ in range(args.starts):
        daphne = start("qwenweb.asgi:application", env, ROOT)
        app_starts.append(daphne.start_seconds)
        daphne.stop()
    bare_starts = []
    for _ in range(max(3, args.starts // 2)):
        daphne = start("trivial_app:app", trivial_env, trivial_dir)
        bare_starts.append(daphne.start_seconds)
        daphne.stop()
    import_django = time_command([PYTHON, "-c", "import django"], env, ROOT, 5)
    import_app = time_command([PYTHON, "-c", "import qwenweb.asgi"], env, ROOT, 3)
    # First start after install: pip has compiled the libraries' bytecode, the project's own
    # sources are compiled on this start (a copy of them, with no __pycache__).
    checkout = data_dir / "checkout"
    for name in ("conversations", "qwenweb", "templates", "static", "locale", "manage.py"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            checkout / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    if not checkout.exists():
        raise RuntimeError("no checkout")
    fresh = start("qwenweb.asgi:application", env, checkout)
    fresh.stop()
    cold_env = {**env, "PYTHONPYCACHEPREFIX": str(data_dir / "empty-pycache")}
    cold = start("qwenweb.asgi:application", cold_env, ROOT)
    cold.stop()
    importtime = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "import daphne.server, qwenweb.asgi"],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip

    # -- idle RSS, then sockets: the app --------------------------------------------------------
    app = start("qwenweb.asgi:application", env, ROOT)
    rss_fresh = settled_rss_kb(app.pid, 1)
    client, session = login(app.url)
    ids = [
        line.split('href="/c/')[1].split("/")[0]
        for line in client.get("/").text.split("<a ")
        if 'href="/c/' in line
    ]
    for path in ["/", *[f"/c/{i}/" for i in ids[:5]], "/healthz", "/", f"/c/{ids[0]}/"]:
        assert client.get(path).status_code == 200, path
    rss_idle = settled_rss_kb(app.pid)
    # Every socket on its own conversation: the sidebar shows 200, so ask the database for all.
    out = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c",
         "from conversations.models import Conversation\n"
         "print(' '.join(str(i) for i in Conversation.objects.values_list('id', flat=True)))"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    # (the shell may print a line of its own first: keep the UUIDs only)
    paths = [f"/ws/c/{i}/" for i in out if len(i) == 36 and i.count("-") == 4]
    assert len(paths) >= max(steps), len(paths)
    app_sockets = asyncio.run(socket_growth(app.pid, app.url, paths, steps, session))
    app_alive = app.process.poll() is None
    client.close()
    app.stop()

    # -- the same for a bare daphne serving a trivial ASGI app -----------------------------------
    bare = start("trivial_app:app", trivial_env, trivial_dir)
    for _ in range(5):
        httpx.get(f"{bare.url}/healthz")
    bare_idle = settled_rss_kb(bare.pid)
    bare_sockets = asyncio.run(
        socket_growth(bare.pid, bare.url, [f"/ws/{i}/" for i in range(max(steps))], steps, None)
    )
    bare.stop()

    # -- report ----------------------------------------------------------------------------------
    def met(value, target):
        return "yes" if value <= target else "NO"

    start_median = statistics.median(app_starts)
    rows = [
        ("figure", "value", "target", "met", "baseline (same run)"),
        ("start: spawn -> /healthz 200 (median)", f"{start_median:.2f} s",
         f"<= {TARGETS['start_s']:.0f} s", met(start_median, TARGETS["start_s"]),
         f"bare daphne + trivial app {statistics.median(bare_starts):.2f} s; "
         f"python -c 'import django' {import_django:.2f} s"),
        ("  all starts", ", ".join(f"{s:.2f}" for s in app_starts), "", "",
         ", ".join(f"{s:.2f}" for s in bare_starts)),
        ("  import qwenweb.asgi (no serving)", f"{import_app:.2f} s", "", "", ""),
        ("  first start after install", f"{fresh.start_seconds:.2f} s",
         f"<= {TARGETS['start_s']:.0f} s", met(fresh.start_seconds, TARGETS["start_s"]),
         "fresh copy of the sources: their bytecode compiled on this start"),
        ("  start with no bytecode cache at all", f"{cold.start_seconds:.2f} s", "", "",
         "worst case: stdlib and libraries recompiled too"),
        ("idle RSS after login + 10 page loads", f"{rss_idle / 1024:.1f} MB",
         f"<= {TARGETS['idle_mb']} MB", met(rss_idle / 1024, TARGETS["idle_mb"]),
         f"bare daphne {bare_idle / 1024:.1f} MB; app freshly started {rss_fresh / 1024:.1f} MB"),
    ]  # fmt: skip
    for n in steps:
        ours, theirs = app_sockets[n], bare_sockets[n]
        rows.append((
            f"RSS per idle socket, {n:,} open", f"{ours['per_socket_kb']:.1f} KB",
            f"<= {TARGETS['socket_kb']} KB", met(ours["per_socket_kb"], TARGETS["socket_kb"]),
            f"bare daphne {theirs['per_socket_kb']:.1f} KB",
        ))  # fmt: skip
        rows.append((
            f"  RSS with {n:,} open", f"{ours['rss_kb'] / 1024:.1f} MB", "", "",
            f"bare daphne {theirs['rss_kb'] / 1024:.1f} MB",
        ))  # fmt: skip
        rows.append((
            f"  time to open {n - (steps[steps.index(n) - 1] if steps.index(n) else 0):,}",
            f"{ours['open_seconds']:.1f} s", "", "", f"bare daphne {theirs['open_seconds']:.1f} s",
        ))  # fmt: skip
    rows += [
        ("sockets open + answering pings at end",
         f"{app_sockets['alive']} / {app_sockets['open']}", "all",
         met(app_sockets["open"] - app_sockets["alive"], 0) if app_alive else "NO (died)",
         f"bare daphne {bare_sockets['alive']} / {bare_sockets['open']}"),
        ("  RSS before / all closed / after a 2nd open+close cycle",
         f"{app_sockets['before_kb'] / 1024:.1f} / {app_sockets['after_close_kb'] / 1024:.1f}"
         f" / {app_sockets['after_second_cycle_kb'] / 1024:.1f} MB",
         "", "", f"bare daphne {bare_sockets['before_kb'] / 1024:.1f} / "
         f"{bare_sockets['after_close_kb'] / 1024:.1f}"
         f" / {bare_sockets['after_second_cycle_kb'] / 1024:.1f} MB"),
    ]  # fmt: skip
    print_table(rows)
    # -X importtime lines: "import time: self [us] | cumulative | imported package"
    imports = []
    total = 0
    for line in importtime.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            if depth == 1:  # what daphne.server and qwenweb.asgi import directly
                imports.append((int(parts[1]), name.strip()))
            elif depth == 0:
                total += int(parts[1])
    imports.sort(reverse=True)
    print(f"\nwhere the start goes: python -X importtime of daphne.server + qwenweb.asgi, "
          f"{total / 1e6:.2f} s in all; the costliest direct imports (cumulative, first "
          "importer pays):")  # fmt: skip
    for us, name in imports[:10]:
        print(f"  {us / 1000:7.0f} ms  {name}")
    errors = [
        line for line in log.read_text().splitlines() if "Traceback" in line or "ERROR" in line
    ]
    if errors:
        print(f"\ndaphne log: {len(errors)} error lines, first: {errors[0][:200]}")


if __name__ == "__main__":
    main()
