"""PostgreSQL for the tests that must also hold there: where it is (QWENWEB_TEST_POSTGRES),
whether it answers, and a module's tests run again on a fresh database of its own."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.db import connection

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("QWENWEB_TEST_POSTGRES", "postgres://root@127.0.0.1:5432/test")


def reachable(url: str, default_port: int = 5432) -> bool:
    host_port = re.match(r"\w+://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", url)
    host, port = host_port.group(1), int(host_port.group(2) or default_port)
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def rerun_on_postgresql(
    module_file: str, this_test: str, data_dir: Path, *, may_skip: bool = False
) -> None:
    """Run the other tests of `module_file` (all but `this_test`) in a pytest run of their own
    on a fresh PostgreSQL database (pytest-django creates and drops it), and fail if any
    fails there, or is skipped (unless `may_skip`: some tests are about another database).
    Skipped where PostgreSQL is not reachable; under CI it must be.
    The run sets QWENWEB_TEST_EXPECT_VENDOR, for the module to check it is really there."""
    if connection.vendor == "postgresql":
        pytest.skip("this run is on PostgreSQL already")
    if not reachable(PG):
        reason = f"needs PostgreSQL: not reachable at {PG} (set QWENWEB_TEST_POSTGRES)"
        if IN_CI:
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    name = f"qwenweb_{Path(module_file).stem.removeprefix('test_')}_{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "DATABASE_URL": PG.rsplit("/", 1)[0] + f"/{name}",
        "QWENWEB_DATA_DIR": str(data_dir),
        "QWENWEB_TEST_EXPECT_VENDOR": "postgresql",
    }
    command = [sys.executable, "-m", "pytest", module_file, "-q", "-p", "no:cacheprovider",
               "-k", f"not {this_test}"]  # fmt: skip
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        # pytest-django drops its test database at the end, but not while connections to it
        # are open: the async tests' database calls keep theirs in the pool's threads.
        import psycopg

        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')
    summary = result.stdout.strip().splitlines()[-1:] or [result.stderr[-2000:]]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary[0] and " failed" not in summary[0], summary[0]
    assert may_skip or "skipped" not in summary[0], summary[0]
