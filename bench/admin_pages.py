"""The admin's pages with a year of a team's history (issue 14): the usage page, its CSV, and
the conversation list (target: 300 ms with 10,000 conversations), on SQLite and PostgreSQL.

Builds 100 users in 5 groups (every fifth user in two), 100 chats each (10,000 conversations)
spread over the last 365 days, each with `--exchanges` questions and replies (replies of four
models, three of them priced in CNY), in a temporary SQLite file and in a temporary PostgreSQL
database (dropped at the end; skipped when PostgreSQL is not reachable). Then it times, through
Django's test Client signed in as a superuser: the usage page over 30 and 365 days grouped by
user, group and model, the CSV download over 365 days, the admin's conversation list (its
first page, and a search by owner), and a user's settings page (their usage today and this
month). Median and p95 of `--runs` each.

    .venv/bin/python bench/admin_pages.py [--runs 10] [--users 100] [--chats 100] [--exchanges 15]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import run_child_on_both  # noqa: E402

CHANGELIST_TARGET_MS = 300
PG = os.environ.get("QWENWEB_BENCH_POSTGRES", "postgres://root@127.0.0.1:5432/test")
GROUPS = ["engineering", "research", "sales", "support", "interns"]
# (model, price in / out per million tokens in CNY, or None: unpriced)
MODELS = [
    ("qwen-plus", Decimal("0.8"), Decimal("2")),
    ("qwen-max", Decimal("2.4"), Decimal("9.6")),
    ("qwen-turbo", Decimal("0.3"), Decimal("0.6")),
    ("qwen3-vl-plus", None, None),
]


def build(users: int, chats: int, exchanges: int) -> int:
    """The history; returns how many messages were written."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db import transaction
    from django.utils import timezone

    from conversations.models import Conversation, Message, ModelProfile

    # Written as they were a year ago: bulk_create would otherwise stamp them all now.
    for model in (Conversation, Message):
        model._meta.get_field("created_at").auto_now_add = False
    rng = random.Random(14)
    profile = ModelProfile.objects.default()
    groups = [Group.objects.create(name=name) for name in GROUPS]
    User = get_user_model()
    people = User.objects.bulk_create(
        User(username=f"user{n:03}", password="!") for n in range(users)
    )
    memberships = []
    for n, person in enumerate(people):
        memberships.append(User.groups.through(user_id=person.pk, group_id=groups[n % 5].pk))
        if n % 5 == 0:
            memberships.append(
                User.groups.through(user_id=person.pk, group_id=groups[(n + 1) % 5].pk)
            )
    User.groups.through.objects.bulk_create(memberships)
    now = timezone.now()
    written = 0
    for person in people:
        with transaction.atomic():
            minutes = sorted(rng.randint(0, 365 * 24 * 60) for _ in range(chats))
            starts = [now - timedelta(minutes=m) for m in reversed(minutes)]
            conversations = Conversation.objects.bulk_create(
                Conversation(
                    id=uuid.uuid4(),
                    owner=person,
                    model=profile,
                    title=f"Chat {n} of {person.username}",
                    created_at=start,
                    updated_at=start + timedelta(minutes=exchanges),
                )
                for n, start in enumerate(starts)
            )
            batch = []
            for conversation in conversations:
                name, price_in, price_out = rng.choice(MODELS)
                for m in range(exchanges):
                    at = conversation.created_at + timedelta(minutes=m)
                    tokens_in = rng.randint(200, 4000) + 300 * m
                    tokens_out = rng.randint(50, 1500)
                    cost = None
                    if price_in is not None:
                        cost = (tokens_in * price_in + tokens_out * price_out) / 1_000_000
                    batch.append(
                        Message(conversation=conversation, role="user", content="A question?",
                                created_at=at)
                    )  # fmt: skip
                    batch.append(
                        Message(
                            conversation=conversation,
                            role="assistant",
                            content="An answer.",
                            model=name,
                            input_tokens=tokens_in,
                            output_tokens=tokens_out,
                            reasoning_tokens=rng.choice([0, 0, 0, tokens_out // 2]),
                            cost=cost,
                            cost_currency="CNY" if cost is not None else "",
                            created_at=at,
                        )
                    )
            Message.objects.bulk_create(batch, batch_size=5000)
            written += len(batch)
    return written


def timed(client, url: str, params: dict, runs: int) -> tuple[float, float, int]:
    client.get(url, params)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(url, params)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    times.sort()
    p95 = times[math.ceil(len(times) * 0.95) - 1]
    return statistics.median(times), p95, len(response.content)


def report(label: str, median: float, p95: float, size: int, target: str = "") -> None:
    print(f"  {label:<34} median {median:7.1f} ms  p95 {p95:7.1f} ms  ({size / 1024:,.0f} KB)"
          f"{target}", flush=True)  # fmt: skip


def time_pages(runs: int) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    from conversations.usage import site_today

    admin = get_user_model().objects.create_superuser("boss", password="x")
    client = Client()
    client.force_login(admin)
    today = site_today()
    month = {"start": str(today - timedelta(days=29)), "end": str(today)}
    year = {"start": str(today - timedelta(days=364)), "end": str(today)}
    usage, csv = "/admin/conversations/usage/", "/admin/conversations/usage/csv/"
    pages = [
        ("usage, 30 days, by user", usage, month),
        ("usage, 30 days, by group", usage, {**month, "group_by": "group"}),
        ("usage, 30 days, by model", usage, {**month, "group_by": "model"}),
        ("usage, 365 days, by user", usage, year),
        ("usage, 365 days, by group", usage, {**year, "group_by": "group"}),
        ("usage, 365 days, by model", usage, {**year, "group_by": "model"}),
        ("CSV, 365 days, by user", csv, year),
        ("CSV, 365 days, by group", csv, {**year, "group_by": "group"}),
        ("conversation list", "/admin/conversations/conversation/", {}),
        ("conversation list, search owner", "/admin/conversations/conversation/", {"q": "user042"}),
    ]  # fmt: skip
    for label, url, params in pages:
        median, p95, size = timed(client, url, params, runs)
        target = ""
        if url.endswith("/conversation/") and not params:
            mark = "ok" if p95 <= CHANGELIST_TARGET_MS else "OVER"
            target = f"  target {CHANGELIST_TARGET_MS} ms: {mark}"
        report(label, median, p95, size, target)
    from django.db import connection

    if connection.vendor == "postgresql":
        # PostgreSQL's JIT compiles a search's plan (its estimate is above jit_above_cost) for
        # longer than the query runs: the same search with jit off, as a server can set it.
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            cursor.execute(f'ALTER DATABASE "{cursor.fetchone()[0]}" SET jit = off')
        connection.close()
        report("conversation list, search, jit off", *timed(client, *pages[-1][1:], runs))
    user = Client()
    user.force_login(get_user_model().objects.get(username="user042"))
    report("settings page (own usage)", *timed(user, "/settings/", {}, runs))


def run(database_url: str, users: int, chats: int, exchanges: int, runs: int) -> None:
    """In a process of its own: build, then time (Django is set up once per process)."""
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenweb.settings")
    os.environ["QWENWEB_LOG_LEVEL"] = "WARNING"
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    messages = build(users, chats, exchanges)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # what autovacuum does after so many inserts
    print(f"  built {users} users, {users * chats:,} chats, {messages:,} messages "
          f"in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    time_pages(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--exchanges", type=int, default=15)
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.child, args.users, args.chats, args.exchanges, args.runs)
        return
    common = ["--runs", str(args.runs), "--users", str(args.users), "--chats", str(args.chats),
              "--exchanges", str(args.exchanges)]  # fmt: skip
    run_child_on_both(__file__, "admin", common, PG, sqlite_only=args.sqlite_only)


if __name__ == "__main__":
    main()
