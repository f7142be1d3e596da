"""What one streamed reply costs: websocket frames and bytes, and database writes.

Runs the real consumer and generation against the simulator on loopback at a realistic pace
(first token after 0.3 s, then 50 tokens/s) and prints the figures for a reply of N tokens,
beside its baseline: the size of the reply's final HTML.

    .venv/bin/python bench/reply_cost.py [--tokens 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup(data_dir: str) -> None:
    os.environ["QWENWEB_DATA_DIR"] = data_dir
    os.environ["DATABASE_URL"] = f"sqlite:///{data_dir}/bench.sqlite3"
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenweb.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


WRITES: list[str] = []
WRITE_SECONDS: list[float] = []  # each write's time in the database, in WRITES' order


def count_writes(execute, sql, params, many, context):
    if sql.lstrip().split(" ", 1)[0].upper() not in {"INSERT", "UPDATE", "DELETE"}:
        return execute(sql, params, many, context)
    WRITES.append(f"{sql.split(' ', 1)[0]} {sql.split(chr(34))[1]}")
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        WRITE_SECONDS.append(time.perf_counter() - started)


async def one_reply(tokens: int) -> dict:
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth import get_user_model
    from django.db.backends.signals import connection_created
    from django.template.loader import render_to_string
    from django.test import Client

    from conversations.models import Message
    from conversations.replies.service import conversation_create
    from dashscope_simulator import Scenario
    from qwenweb.asgi import application

    def prepare():
        from django.db import connection

        # Every ORM call of the app runs on this one thread (thread_sensitive), on this
        # connection; new connections get the counter through the signal below.
        connection.ensure_connection()
        connection.execute_wrappers.append(count_writes)
        user = get_user_model().objects.create_user(f"bench{time.time_ns()}", password="x")
        client = Client()
        client.force_login(user)
        return user, conversation_create(owner=user), client.cookies["sessionid"].value

    user, conversation, session = await sync_to_async(prepare)()
    connection_created.connect(
        lambda connection, **kw: connection.execute_wrappers.append(count_writes), weak=False
    )
    ws = WebsocketCommunicator(
        application,
        f"/ws/c/{conversation.id}/",
        headers=[(b"host", b"localhost"), (b"origin", b"http://localhost"),
                 (b"cookie", f"sessionid={session}".encode())],
    )  # fmt: skip
    await ws.connect()
    SIMULATOR.add_scenario(Scenario(match="bench", tokens=tokens))
    WRITES.clear()
    WRITE_SECONDS.clear()
    started = time.monotonic()
    await ws.send_to(text_data='{"type":"send","content":"bench this","client_message_id":"'
                     '7b0c6a4e-1d7e-4c8e-9a55-1a2b3c4d5e6f"}')  # fmt: skip
    frames: list[str] = []
    first_delta_at = None
    while True:
        frame = await ws.receive_from(timeout=60)
        frames.append(frame)
        if frame.startswith("+") and first_delta_at is None:
            first_delta_at = time.monotonic() - started
        if 'data-role="assistant" data-status="complete"' in frame:
            break
    elapsed = time.monotonic() - started
    await ws.disconnect()
    reply = await Message.objects.filter(conversation=conversation, role="assistant").alast()
    final_html = await sync_to_async(render_to_string)(
        "conversations/partials/stream.html#message", {"message": reply}
    )
    deltas = [f for f in frames if f.startswith("+")]
    streaming_seconds = elapsed - (first_delta_at or 0)
    return {
        "tokens": reply.output_tokens,
        "reply chars": len(reply.content),
        "final HTML bytes (baseline)": len(final_html.strip().encode()),
        "frames": len(frames),
        "delta frames": len(deltas),
        "delta frames per second": round(len(deltas) / streaming_seconds, 1),
        "payload bytes": sum(len(f.encode()) for f in frames),
        "payload / final HTML": round(
            sum(len(f.encode()) for f in frames) / len(final_html.strip().encode()), 2
        ),
        "payload: reply text in deltas": sum(len(f.partition(":")[2].encode()) for f in deltas),
        "payload: delta frame prefixes": sum(len(f.partition(":")[0].encode()) + 1 for f in deltas),
        "payload: other frames": ", ".join(
            f"{label(f)} {len(f.encode())}" for f in frames if not f.startswith("+")
        ),
        "database writes": len(WRITES),
        "writes": ", ".join(WRITES),
        # The reply's saves after the intake: its checkpoints (UPDATEs of a growing text while
        # it streams; on SQLite, what the search index's triggers do with them included) and
        # its final save.
        "database time of the reply's saves": ", ".join(
            f"{seconds * 1000:.2f}"
            for write, seconds in zip(WRITES, WRITE_SECONDS, strict=True)
            if write.startswith("UPDATE") and "message" in write
        )
        + " ms",
        "reply seconds": round(elapsed, 1),
    }


def intake_database_work(rounds: int = 200) -> dict:
    """The save-first part of P1's intake, alone: what reply_start and build_request cost
    per send on this machine's SQLite (the lock, the limits and the replies in the way, two
    inserts, the conversation's update and the history read, in one transaction), median of
    `rounds` sends to fresh chats, with nothing else running. No design that saves the
    message before calling DashScope avoids this; bench/load.py's floor (daphne + the
    client) does not include it."""
    import statistics
    import uuid

    from django.contrib.auth import get_user_model

    from conversations.replies.prompt import build_request
    from conversations.replies.service import conversation_create, reply_start

    user = get_user_model().objects.create_user(f"intake{time.time_ns()}", password="x")
    with override_limits():
        chats = [conversation_create(owner=user) for _ in range(rounds + 20)]
        times = []
        for n, chat in enumerate(chats):
            started = time.perf_counter()
            reply = reply_start(conversation=chat, content="hello", client_message_id=uuid.uuid4())
            build_request(
                conversation=reply.conversation, reply_to=reply.assistant_message, tree=reply.tree
            )
            if n >= 20:  # the first ones warm the caches
                times.append(time.perf_counter() - started)
    median_ms = statistics.median(times) * 1000
    return {"intake database work per send (median, SQLite)": f"{median_ms:.2f} ms"}


def override_limits():
    from django.test import override_settings

    # One user sends all of them: limits high enough never to refuse, still counted.
    return override_settings(
        QWENWEB_MAX_CONCURRENT_REPLIES=10**6,
        QWENWEB_MESSAGES_PER_MINUTE=10**6,
        QWENWEB_CHATS_PER_MINUTE=10**6,
    )


def label(frame: str) -> str:
    """A short name for a fragment: the ids it swaps in."""
    ids = (
        re.findall(r'<(\w+) id="([^"]+)"[^>]*hx-swap-oob', frame)
        or re.findall(r'id="([^"]+)"', frame)[:1]
    )
    return "+".join(i if isinstance(i, str) else i[1] for i in ids) or frame[:20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args()
    global SIMULATOR
    with tempfile.TemporaryDirectory() as data_dir:
        setup(data_dir)
        from django.conf import settings

        from dashscope_simulator import SimulatorServer

        with SimulatorServer(api_key="sk-bench", first_token_delay=0.3, token_delay=0.02) as sim:
            SIMULATOR = sim
            settings.DASHSCOPE_API_KEY = "sk-bench"
            settings.DASHSCOPE_BASE_URL = sim.native_base_url
            figures = asyncio.run(one_reply(args.tokens))
            figures |= intake_database_work()
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")


SIMULATOR = None

if __name__ == "__main__":
    main()
