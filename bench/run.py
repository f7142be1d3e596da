"""`make bench`: every benchmark in turn, each printing its figures beside its baseline.

    .venv/bin/python bench/run.py [--quick]

Runs on loopback only and starts and stops everything it uses; about 11 minutes (3 with
--quick). Tests never assert timings; CI does not run this.
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ("P3, P4: one streamed reply's frames, bytes and database writes", ["reply_cost.py"]),
    ("P1: a send's save and request by the chat's length (in-process)", ["send_cost.py"]),
    ("P5: page render times", ["pages.py"]),
    ("Search over 10,000 chats / 100,000 messages, SQLite and PostgreSQL", ["search.py"]),
    ("Admin pages over a year of 100 users' history (issue 14)", ["admin_pages.py"]),
    ("P6: memory and start time", ["memory.py"]),
    ("P1, P2: first-token latency and concurrent replies", ["load.py"]),
]
QUICK = {
    "pages.py": ["--runs", "5"],
    "search.py": ["--runs", "5", "--conversations", "2000"],
    "admin_pages.py": ["--runs", "5", "--chats", "20"],
    "memory.py": ["--sockets", "200", "--starts", "3"],
    "send_cost.py": ["--turns", "100"],
    "load.py": ["--quick"],
}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for title, (script, *args) in SCRIPTS:
        if quick:
            args = [*args, *QUICK.get(script, [])]
        print(f"\n== {title} ({script}) ==", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE.parent)
        print(f"-- {script}: {time.monotonic() - started:.0f} s, exit {result.returncode}")
        if result.returncode:
            failed.append(script)
    if failed:
        print(f"\nFailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
