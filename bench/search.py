"""Search your chats (/search/?q=): time over 10,000 chats and 100,000 messages, SQLite and
PostgreSQL (issue 13's target: 150 ms).

Builds one user's 10,000 conversations of 10 messages each (user questions and 0.5-1.5 KB
replies, English and Chinese), plus another user's as many, in a temporary SQLite file and in a
temporary PostgreSQL database (dropped at the end; skipped when PostgreSQL is not reachable).
Then it times the search view through Django's test Client, signed in, for: a phrase a few
chats hold, a Chinese phrase, a word in every other chat, a word in 1 chat of 12 (too few for
the newest 500 chats to fill a page: conversations/chat_search.py then asks the index), one in
no chat (every message read), and a title word. Median and p95 of `--runs` each, beside the
target.

    .venv/bin/python bench/search.py [--runs 15] [--conversations 10000] [--per-chat 10]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import run_child_on_both  # noqa: E402

TARGET_MS = 150
PG = os.environ.get("QWENWEB_BENCH_POSTGRES", "postgres://root@127.0.0.1:5432/test")
QUERIES = {
    "rare phrase (20 chats)": "sourdough starter",
    "Chinese phrase": "请假邮件",
    "common word (half the chats)": "transactions",
    "word in 1 chat of 12": "rotate the logs",
    "no match (reads everything)": "zyzzyva",
    "title word": "Kyoto",
}
WORDS = [
    "the", "model", "answers", "with", "a", "short", "plan", "and", "then", "explains", "each",
    "step", "in", "more", "detail", "so", "that", "reader", "can", "follow", "along", "check",
    "numbers", "against", "logs", "config",
]  # fmt: skip


def build(conversations: int, per_chat: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from conversations.models import Conversation, Message, ModelProfile

    rng = random.Random(5)
    model = ModelProfile.objects.default()
    users = [get_user_model().objects.create_user(n, password="x") for n in ("searcher", "other")]
    now = timezone.now()
    for user in users:
        with transaction.atomic():
            chats = Conversation.objects.bulk_create(
                Conversation(
                    id=uuid.uuid4(),
                    owner=user,
                    model=model,
                    title=("Trip to Kyoto" if n % 500 == 0 else f"Chat {n} about work"),
                    updated_at=now,
                )
                for n in range(conversations)
            )
            batch = []
            for n, chat in enumerate(chats):
                for m in range(per_chat):
                    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200)))
                    if m % 2 == 1 and n % 2 == 0:
                        words += " Keep transactions short."
                    if m == 7 and n % 12 == 5:
                        words += " Rotate the logs weekly."
                    if m == 3 and n % 500 == 7:
                        words += " Feed the sourdough starter twice a day."
                    if m == 5 and n % 1000 == 3:
                        words += " 帮我写一封请假邮件给经理，说明下周一需要请假一天。"
                    batch.append(
                        Message(
                            conversation=chat,
                            role="user" if m % 2 == 0 else "assistant",
                            content=words,
                            status="complete",
                        )
                    )
                if len(batch) >= 20_000:
                    Message.objects.bulk_create(batch, batch_size=5000)
                    batch = []
            Message.objects.bulk_create(batch, batch_size=5000)


def time_searches(runs: int) -> dict[str, tuple[float, float, int]]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username="searcher"))
    found = {}
    for label, query in QUERIES.items():
        client.get("/search/", {"q": query})  # warm-up
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            response = client.get("/search/", {"q": query})
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        hits = response.content.decode().count("data-search-result")
        times.sort()
        found[label] = (statistics.median(times), times[int(len(times) * 0.95) - 1], hits)
    return found


def run(database_url: str, conversations: int, per_chat: int, runs: int) -> None:
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
    build(conversations, per_chat)
    from django.db import connection

    with connection.cursor() as cursor:
        # What autovacuum does after so many inserts: statistics for the planner (the
        # expression indexes' too).
        cursor.execute("ANALYZE")
    print(f"  built {2 * conversations:,} chats, {2 * conversations * per_chat:,} messages "
          f"in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    for label, (median, p95, hits) in time_searches(runs).items():
        mark = "ok" if p95 <= TARGET_MS else "OVER"
        print(f"  {label:<30} median {median:7.1f} ms  p95 {p95:7.1f} ms  "
              f"({hits} results shown)  target {TARGET_MS} ms: {mark}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--per-chat", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.child, args.conversations, args.per_chat, args.runs)
        return
    common = ["--runs", str(args.runs), "--conversations", str(args.conversations),
              "--per-chat", str(args.per_chat)]  # fmt: skip
    run_child_on_both(__file__, "search", common, PG)


if __name__ == "__main__":
    main()
