"""P5: server time to render a long chat and the home page of a user with many chats.

Builds, in a temp SQLite database, one user with 10,000 conversations, one of which holds
1,000 messages (user/assistant alternating; the replies realistic Markdown of 1-2 KB with
headings, lists, a code block and a table). Then it times, after a warm-up:

* the full view through Django's test Client (in-process, logged in): median and p95, SQL
  queries, response size, and what the page shows (messages, sidebar entries);
* the same pages over real HTTP against a daphne process on the same database (httpx,
  logged-in session);
* the parts: `render_markdown` alone over the chat's replies, and the chat page with every
  reply's HTML already cached (the markdown filter swapped for a dict lookup, in this process
  only) - what a per-message HTML cache would save;
* a cProfile of one chat render, summed by package, and its top functions.

    .venv/bin/python bench/pages.py [--runs 20] [--messages 1000] [--conversations 10000]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import closing
from datetime import timedelta
from pathlib import Path

from common import free_port, logged_in_client, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_MS = 150
PASSWORD = "bench-pass-5521"


def environment(data_dir: str) -> dict:
    return {
        "QWENWEB_DATA_DIR": data_dir,
        "DATABASE_URL": f"sqlite:///{data_dir}/bench.sqlite3",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        # A key (never used) and an unreachable base: no offline-demo simulator, no banner.
        "DASHSCOPE_API_KEY": "sk-x",
        "DASHSCOPE_BASE_URL": "http://127.0.0.1:9/api/v1",
        "QWENWEB_LOG_LEVEL": "WARNING",
    }


def setup(data_dir: str) -> None:
    os.environ.update(environment(data_dir))
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenweb.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


# -- data --------------------------------------------------------------------------------------

TOPICS = [
    ("SQLite WAL mode", "sqlite", "PRAGMA journal_mode=WAL;"),
    ("asyncio task groups", "python", "async with asyncio.TaskGroup() as tg:"),
    ("Django querysets", "python", "Conversation.objects.filter(owner=user)"),
    ("Rust ownership", "rust", 'let s = String::from("hello");'),
    ("CSS grid layouts", "css", ".layout { display: grid; }"),
    ("PostgreSQL indexes", "sql", "CREATE INDEX ON message (conversation_id, id);"),
]


def reply_markdown(i: int, rng: random.Random) -> str:
    """A 1-2 KB model reply: heading, paragraph, lists, a fenced code block, a table."""
    title, language, code = TOPICS[i % len(TOPICS)]
    rows = "\n".join(
        f"| `{name}` | {rng.randint(1, 900)} ms | {rng.choice(['yes', 'no', 'partly'])} |"
        for name in rng.sample(["read", "write", "scan", "sort", "join", "index", "vacuum"], 4)
    )
    steps = "\n".join(
        f"{n}. **Step {n}**: check the {rng.choice(['logs', 'config', 'schema', 'tests'])} "
        f"and the `{rng.choice(['timeout', 'limit', 'pool_size', 'retries'])}` setting."
        for n in range(1, rng.randint(3, 5) + 1)
    )
    return (
        f"## {title} (answer {i})\n\n"
        f"Short answer: it depends on the workload, but for *most* apps the defaults are fine. "
        f"Here is what matters, with a [reference](https://example.com/docs/{i}) and a note on "
        f"~~old~~ current behaviour.\n\n"
        f"### Key points\n\n"
        f"- Keep transactions **short**; long ones block the checkpointer.\n"
        f"- Measure before tuning: `EXPLAIN QUERY PLAN` tells you more than guessing.\n"
        f"- Prefer batching writes over many small commits.\n"
        f"  - nested: batches of ~{rng.randint(100, 1000)} rows work well\n\n"
        f"{steps}\n\n"
        f"```{language}\n{code}\n"
        + "\n".join(f"# line {n}: value = {rng.randint(0, 10**6)}" for n in range(6))
        + "\n```\n\n"
        f"| operation | time | cached |\n| :--- | ---: | :---: |\n{rows}\n\n"
        f"> Tip: re-run the benchmark after each change; numbers drift on shared machines.\n\n"
        f"That should cover it. Let me know if you want a deeper dive into {title.lower()}."
    )


def build_data(n_messages: int, n_conversations: int):
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from conversations.models import Conversation, Message, ModelProfile
    from conversations.replies import branches

    rng = random.Random(4)
    user = get_user_model().objects.create_user("bench", password=PASSWORD)
    model = ModelProfile.objects.default()
    now = timezone.now()
    started = time.perf_counter()
    with transaction.atomic():
        conversations = [
            Conversation(
                owner=user,
                model=model,
                title=f"Chat {i}: {TOPICS[i % len(TOPICS)][0]}",
                updated_at=now - timedelta(minutes=i + 1),
            )
            for i in range(n_conversations - 1)
        ]
        Conversation.objects.bulk_create(conversations, batch_size=2000)
        big = Conversation.objects.create(
            owner=user, model=model, title="The long one", updated_at=now
        )
        messages = []
        for i in range(n_messages):
            if i % 2 == 0:
                messages.append(
                    Message(
                        conversation=big,
                        role="user",
                        content=f"Question {i}: how should I tune {TOPICS[i % 6][0]} for a "
                        f"chat app with {rng.randint(2, 500)} users?",
                    )
                )
            else:
                messages.append(
                    Message(
                        conversation=big,
                        role="assistant",
                        content=reply_markdown(i, rng),
                        model=model.name,
                        status="complete",
                        finish_reason="stop",
                        input_tokens=rng.randint(100, 4000),
                        output_tokens=rng.randint(300, 700),
                        completed_at=now,
                    )
                )
        Message.objects.bulk_create(messages, batch_size=500)
        branches.link_in_order(big)
        # What a chat page showing only its newest 100 messages would render.
        short = Conversation.objects.create(
            owner=user, model=model, title="The last hundred", updated_at=now - timedelta(seconds=1)
        )
        Message.objects.bulk_create(
            [Message(**{f.attname: getattr(m, f.attname) for f in Message._meta.concrete_fields
                        if f.attname not in {"id", "conversation_id"}}, conversation=short)
             for m in messages[-100:]]
        )  # fmt: skip
        branches.link_in_order(short)
    return user, big, short, time.perf_counter() - started


# -- timing ------------------------------------------------------------------------------------


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


BUDGET = 8.0  # seconds of timed runs per figure, at least MIN_RUNS: slow pages get fewer runs
MIN_RUNS = 5


def timed_runs(fn, runs: int) -> list[float]:
    samples: list[float] = []
    spent = 0.0
    while len(samples) < runs and (len(samples) < MIN_RUNS or spent < BUDGET):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
        spent += samples[-1]
    return samples


def time_client(client, url: str, runs: int, warmup: int = 2) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(warmup):
        assert client.get(url).status_code == 200
    samples = timed_runs(lambda: client.get(url), runs)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    median, p95 = stats(samples)
    body = response.content.decode()
    return {
        "median": median,
        "p95": p95,
        "min": min(samples) * 1000,
        "runs": len(samples),
        "queries": len(queries.captured_queries),
        "query_ms": sum(float(q["time"]) for q in queries.captured_queries) * 1000,
        "bytes": len(response.content),
        "messages shown": body.count('<article id="message-'),
        "sidebar entries": body.count('class="sidebar__item'),
        "sql": [q["sql"][:110] for q in queries.captured_queries],
    }


def time_function(fn, runs: int, warmup: int = 1) -> tuple[float, float, float, int]:
    for _ in range(warmup):
        fn()
    samples = timed_runs(fn, runs)
    return (*stats(samples), min(samples) * 1000, len(samples))


# -- over HTTP ---------------------------------------------------------------------------------


def time_http(data_dir: str, urls: dict[str, str], runs: int) -> dict[str, tuple]:
    import httpx

    port = free_port()
    env = {**os.environ, **environment(data_dir), "PYTHONUNBUFFERED": "1"}
    log = open(Path(data_dir) / "daphne.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
         "qwenweb.asgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    results = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((Path(data_dir) / "daphne.log").read_text()[-2000:])
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        with closing(logged_in_client(base, "bench", PASSWORD)) as client:
            for name, url in urls.items():
                for _ in range(2):
                    assert client.get(url).status_code == 200
                size = len(client.get(url).content)
                samples = timed_runs(lambda url=url: client.get(url), runs)
                results[name] = (*stats(samples), min(samples) * 1000, len(samples), size)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    return results


# -- profile -----------------------------------------------------------------------------------


def package_of(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C)"
    path = filename.replace("\\", "/")
    if "site-packages/" in path:
        rest = path.split("site-packages/", 1)[1]
        top = rest.split("/", 1)[0]
        if top == "django":
            sub = rest.split("/")[1] if "/" in rest else ""
            return f"django.{sub}"
        return top
    if str(ROOT) in path:
        return "qwenweb: " + path.split(str(ROOT) + "/", 1)[1]
    return "stdlib"


def profile(
    client, url: str
) -> tuple[list[tuple[str, float]], list[tuple[str, float, float, int]]]:
    profiler = cProfile.Profile()
    profiler.enable()
    client.get(url)
    profiler.disable()
    stat = pstats.Stats(profiler)
    by_package: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stat.stats.items():
        package = package_of(filename)
        # builtins: attribute them to nh3 when nh3.clean is the builtin, else keep them apart
        if name.startswith("<built-in method nh3.") or name.startswith("<built-in function clean"):
            package = "nh3 (Rust)"
        by_package[package] = by_package.get(package, 0.0) + tottime
        short = f"{Path(filename).name}:{line}({name})" if line else name
        rows.append((short, tottime * 1000, cumtime * 1000, calls))
    total = sum(by_package.values())
    packages = sorted(((k, v * 1000) for k, v in by_package.items()), key=lambda kv: -kv[1])
    packages.insert(0, ("TOTAL (profiled)", total * 1000))
    rows.sort(key=lambda row: -row[1])
    return packages, rows


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=10000)
    parser.add_argument("--no-http", action="store_true", help="skip the daphne figures")
    args = parser.parse_args()
    # whitenoise warns that staticfiles/ is missing when collectstatic has not run: harmless here
    warnings.filterwarnings("ignore", message="No directory at")
    data_dir = tempfile.mkdtemp(prefix="qwenweb-bench-pages-")
    try:
        run(args, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def run(args, data_dir: str) -> None:
    setup(data_dir)
    from django.test import Client

    from conversations import views
    from conversations.models import Message
    from conversations.rendering import render_markdown
    from conversations.templatetags import qwenweb as tags

    user, big, short, build_seconds = build_data(args.messages, args.conversations)
    replies = list(
        Message.objects.filter(conversation=big, role="assistant").values_list("content", flat=True)
    )
    reply_bytes = [len(r.encode()) for r in replies]
    print(
        f"data: 1 user, {args.conversations + 1:,} conversations, one with {args.messages:,} "
        f"messages ({len(replies)} replies of {min(reply_bytes):,}-{max(reply_bytes):,} B, "
        f"median {statistics.median(reply_bytes):,.0f} B) and one with its last 100; built in "
        f"{build_seconds:.1f} s; SIDEBAR_LIMIT = {views.SIDEBAR_LIMIT}; runs: up to "
        f"{args.runs} after 2 warm-ups, at least {min(MIN_RUNS, args.runs)}, about "
        f"{BUDGET:.0f} s per figure",
        flush=True,
    )

    client = Client()
    client.force_login(user)
    chat_url = big.get_absolute_url()
    home = time_client(client, "/", args.runs)
    chat_page = time_client(client, chat_url, args.runs)
    chat_100 = time_client(client, short.get_absolute_url(), args.runs)

    # The parts of the chat page.
    markdown = time_function(lambda: [render_markdown(r) for r in replies], args.runs)
    original = tags.render_markdown
    html_cache = {text: render_markdown(text) for text in replies}
    tags.render_markdown = lambda text: html_cache.get(text) or original(text)
    try:
        cached = time_client(client, chat_url, args.runs)
        cached_100 = time_client(client, short.get_absolute_url(), args.runs)
    finally:
        tags.render_markdown = original
    fetch = time_function(lambda: list(big.messages.prefetch_related("images")), args.runs)
    fetch_plain = time_function(lambda: list(big.messages.all()), args.runs)

    http = {}
    if not args.no_http:
        http = time_http(data_dir, {"home": "/", "chat": chat_url}, args.runs)

    n = args.messages

    def ok(ms):
        return "yes" if ms <= TARGET_MS else "NO"

    def page_row(label, figures, shows="", target=True):
        return (label, f"{figures['median']:.1f}", f"{figures['p95']:.1f}",
                f"{figures['min']:.1f}", figures["runs"], f"<= {TARGET_MS}" if target else "",
                ok(figures["median"]) if target else "", figures["queries"],
                f"{figures['bytes']:,}", shows)  # fmt: skip

    def part_row(label, figures, shows=""):
        median, p95, least, runs = figures
        return (label, f"{median:.1f}", f"{p95:.1f}", f"{least:.1f}", runs, "", "", "", "", shows)

    rows = [
        ("figure", "median ms", "p95 ms", "min ms", "runs", "target", "met", "queries", "bytes",
         "page shows"),
        page_row("home, test Client", home,
                 f"{home['sidebar entries']} of {args.conversations + 1:,} chats in the sidebar"),
        page_row(f"chat {n:,} msgs, test Client", chat_page,
                 f"{chat_page['messages shown']} messages + {chat_page['sidebar entries']} "
                 "sidebar"),
    ]  # fmt: skip
    for name, label in (("home", "home, HTTP (daphne)"), ("chat", f"chat {n:,} msgs, HTTP")):
        if name in http:
            median, p95, least, runs, size = http[name]
            rows.append((label, f"{median:.1f}", f"{p95:.1f}", f"{least:.1f}", runs,
                         f"<= {TARGET_MS}", ok(median), "", f"{size:,}", ""))  # fmt: skip
    rows += [
        ("-- parts and what-ifs --", "", "", "", "", "", "", "", "", ""),
        part_row(f"render_markdown x{len(replies)} alone", markdown,
                 f"{markdown[0] * 1000 / len(replies):.0f} us per reply"),
        page_row(f"chat {n:,}, reply HTML cached", cached, "markdown filter = dict lookup"),
        page_row("chat, last 100 msgs only", chat_100, f"{chat_100['messages shown']} messages"),
        page_row("chat, last 100 + HTML cached", cached_100, "both changes"),
        part_row(f"ORM: {n:,} msgs + images prefetch", fetch, "as the view does"),
        part_row(f"ORM: {n:,} msgs, no prefetch", fetch_plain),
        ("SQL time in one chat page", f"{chat_page['query_ms']:.1f}", "", "", 1, "", "", "", "",
         ""),
    ]  # fmt: skip
    print()
    print_table(rows)

    print(f"\nSQL of one chat page ({chat_page['queries']} queries):")
    for sql in chat_page["sql"]:
        print(f"  {sql}")
    print(f"SQL of one home page ({home['queries']} queries):")
    for sql in home["sql"]:
        print(f"  {sql}")

    packages, functions = profile(client, chat_url)
    print(f"\ncProfile of one {n:,}-message chat page (test Client). Own time by package, ms "
          "(the profiler inflates pure-Python code such as markdown-it the most):")  # fmt: skip
    for name, ms in packages[:10]:
        print(f"  {ms:8.1f}  {name}")
    print("top functions by own time (ms own, ms cumulative, calls):")
    for name, tottime, cumtime, calls in functions[:12]:
        print(f"  {tottime:8.1f} {cumtime:8.1f} {calls:8d}  {name}")
    tags.render_markdown = lambda text: html_cache.get(text) or original(text)
    try:
        packages, functions = profile(client, chat_url)
    finally:
        tags.render_markdown = original
    print("\ncProfile of the same page with reply HTML cached (own time by package, ms):")
    for name, ms in packages[:8]:
        print(f"  {ms:8.1f}  {name}")
    print("top functions by own time (ms own, ms cumulative, calls):")
    for name, tottime, cumtime, calls in functions[:10]:
        print(f"  {tottime:8.1f} {cumtime:8.1f} {calls:8d}  {name}")


if __name__ == "__main__":
    main()
