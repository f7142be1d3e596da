"""The README's "Deploying for a team" section, run as written: deploy/check.sh puts two daphne
processes (as deploy/qwenweb@.service starts them) on a fresh PostgreSQL database and Redis
behind an nginx running deploy/nginx.conf, signs in, chats through the proxy, restarts the
processes one at a time and kills one mid-reply; it prints a PASS or FAIL line per step.

It needs root (nginx), nginx, psql, PostgreSQL and Redis: skipped where any is missing, a
failure under CI (.ci/run installs nginx-light and the PostgreSQL client)."""

import os
import re
import shutil
import subprocess

import pytest

from tests.live_server import ROOT
from tests.postgres import PG, reachable
from tests.test_team_deployment import REDIS

pytestmark = pytest.mark.services


def test_the_team_section_of_the_readme_works_as_written():
    missing = [tool for tool in ("nginx", "psql") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (nginx is started as root, as on a server)")
    if not reachable(PG, 5432):
        missing.append(f"PostgreSQL ({PG})")
    if not reachable(REDIS, 6379):
        missing.append(f"Redis ({REDIS})")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run deploy/check.sh: missing {', '.join(missing)}")
        pytest.skip(f"deploy/check.sh needs {', '.join(missing)}")
    check = subprocess.run(
        ["bash", str(ROOT / "deploy" / "check.sh")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "QWENWEB_CHECK_POSTGRES": PG.rsplit("/", 1)[0] + "/postgres"},
    )  # fmt: skip
    failed = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert check.returncode == 0 and not failed, check.stdout[-6000:] + check.stderr[-2000:]
    passed = re.search(r"check.sh: (\d+) passed, 0 failed", check.stdout)
    assert passed and int(passed.group(1)) >= 30, check.stdout[-3000:]  # every step ran
