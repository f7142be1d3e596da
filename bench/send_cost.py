"""What a send costs before its request can go, by the length of the chat: the save-first
work (the form, the chat read under its lock with the owner's load, the two messages and the
chat's move written, the tree read back) and the request built from the history.

    .venv/bin/python bench/send_cost.py [--turns 250]

In-process, on a temporary SQLite file, one chat growing a turn at a time (each reply saved
complete, 250 characters with a list and code), sends back to back (a warm CPU: in the
server, with the host idle between sends, the same work takes about twice as long). The
baseline is the same send in an empty chat. Each figure is the median of five sends around
that length (the five after it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPLY = "A reply of moderate length, with a list:\n\n- one\n- two\n\n```py\nprint('hi')\n```\n" * 3


def setup(data_dir: str) -> None:
    os.environ["QWENWEB_DATA_DIR"] = data_dir
    os.environ["DATABASE_URL"] = f"sqlite:///{data_dir}/bench.sqlite3"
    os.environ.pop("REDIS_URL", None)
    os.environ["QWENWEB_MESSAGES_PER_MINUTE"] = "1000000"  # every limit on, none reached
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenweb.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def run(turns: int) -> None:
    from django.contrib.auth import get_user_model

    from conversations.models import Conversation, Message, ModelProfile
    from conversations.replies import prompt, service

    owner = get_user_model().objects.create_user("bench", password="unused")
    chat = Conversation.objects.create(owner=owner, model=ModelProfile.objects.default())
    marks = sorted({0, 10, 50, 100, turns // 2, turns})
    samples: dict[int, list[tuple[float, float]]] = {mark: [] for mark in marks}
    for turn in range(turns + 6):
        began = time.perf_counter()
        started = service.reply_start(
            conversation=chat, content=f"question {turn}", client_message_id=uuid.uuid4()
        )
        saved = time.perf_counter()
        prompt.build_request(
            conversation=started.conversation, reply_to=started.assistant_message,
            tree=started.tree,
        )  # fmt: skip
        built = time.perf_counter()
        Message.objects.filter(pk=started.assistant_message.pk).update(
            status="complete", content=REPLY
        )
        chat = started.conversation
        for mark in marks:
            if mark < turn <= mark + 5:  # (the chat's first send warms up)
                samples[mark].append((saved - began, built - saved))
    base_save = statistics.median(s for s, _ in samples[marks[0]])
    base_build = statistics.median(b for _, b in samples[marks[0]])
    print(f"{'turns before':>12}  {'messages':>8}  {'save ms':>8}  {'request ms':>10}  "
          f"{'both / empty chat':>17}")  # fmt: skip
    for mark in marks:
        save = statistics.median(s for s, _ in samples[mark])
        build = statistics.median(b for _, b in samples[mark])
        print(f"{mark:>12}  {2 * mark:>8}  {save * 1000:>8.3f}  {build * 1000:>10.3f}  "
              f"{(save + build) / (base_save + base_build):>16.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=250, help="the longest chat, in turns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenweb-send-cost-") as data_dir:
        setup(data_dir)
        run(args.turns)


if __name__ == "__main__":
    main()
