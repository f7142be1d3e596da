"""A real qwenweb server (daphne, in its own process) and headless Chromium, for browser tests.

The server gets its own SQLite file and talks to the session's simulator over loopback; tests
control replies through the simulator's scenarios.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORDS = {"alice": "alice-pass-5521", "bob": "bob-pass-9034"}

# Fixtures and their kin.
__all__ = ["LiveApp", "browser", "live_app", "new_page", "free_port", "running_app"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveApp:
    url: str
    env: dict
    process: subprocess.Popen
    log_path: Path

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def login(self, page, username: str) -> None:
        page.goto(f"{self.url}/accounts/login/")
        page.fill("#id_username", username)
        page.fill("#id_password", PASSWORDS[username])
        page.click("button[type=submit]")
        page.wait_for_url(f"{self.url}/")


def _start_daphne(
    env: dict, log_path: Path, *, send_buffer: int | None = None
) -> tuple[subprocess.Popen, str]:
    """daphne in a process of its own, its output in `log_path`, once it answers /healthz.

    With `send_buffer` (bytes), every connection it accepts gets a kernel send buffer that
    small (a listening socket of ours, handed to daphne with --fd, passes it on to them), so a
    client that stops reading backs frames up in daphne within a few KB, as a slow or vanishing
    client does on a real network; on loopback the kernel would otherwise absorb megabytes."""
    if send_buffer is None:
        port = free_port()
        where, pass_fds = ["-b", "127.0.0.1", "-p", str(port)], ()
    else:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        where, pass_fds = ["--fd", str(listener.fileno())], (listener.fileno(),)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daphne", *where, "qwenweb.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )
    if send_buffer is not None:
        listener.close()  # daphne has its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("daphne did not answer /healthz within 30 s")


def app_env(data_dir: Path, simulator, **extra: str) -> dict:
    """The environment of a server process of its own: SQLite in data_dir, the test simulator,
    the in-memory channel layer (one process), and `extra` on top."""
    from tests.conftest import APP_API_KEY

    env = {
        **os.environ,
        "QWENWEB_DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'db.sqlite3'}",
        "DASHSCOPE_API_KEY": APP_API_KEY,
        "DASHSCOPE_BASE_URL": simulator.native_base_url,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
        "QWENWEB_TITLE_MODEL": "",  # as in-process tests (tests/conftest.py)
        **extra,
    }
    env.pop("REDIS_URL", None)
    return env


def signed_in_client(url: str, username: str, password: str) -> httpx.Client:
    """An httpx client signed in through the sign-in form, as a browser would be."""
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    client.get("/accounts/login/")
    response = client.post(
        "/accounts/login/",
        data={"username": username, "password": password,
              "csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": f"{url}/accounts/login/"},
    )  # fmt: skip
    assert response.status_code == 302, response.text
    return client


def new_chat(client: httpx.Client) -> str:
    """POST /c/new/ as the signed-in client; the new chat's path."""
    response = client.post(
        "/c/new/", data={"csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": f"{client.base_url}/"},
    )  # fmt: skip
    assert response.status_code == 302, response.text
    return response.headers["Location"]


@pytest.fixture(scope="session")
def live_app(app_simulator) -> Iterator[LiveApp]:
    # alice's tests share this server and run within minutes: the per-minute limits (tested
    # in test_limits.py) would refuse the later ones.
    limits_off = {"QWENWEB_MESSAGES_PER_MINUTE": "0", "QWENWEB_CHATS_PER_MINUTE": "0"}
    with running_app(app_simulator, **limits_off) as app:
        yield app


@contextlib.contextmanager
def running_app(simulator, **extra_env: str) -> Iterator[LiveApp]:
    """A daphne of its own on a fresh SQLite file, with alice and bob, and `extra_env`."""
    data_dir = Path(tempfile.mkdtemp(prefix="qwenweb-live-"))
    env = app_env(data_dir, simulator, **extra_env)
    log_path = data_dir / "daphne.log"
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    create_users = "; ".join(
        f"User.objects.create_user({name!r}, password={password!r})"
        for name, password in PASSWORDS.items()
    )
    subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            f"from django.contrib.auth.models import User; {create_users}",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        check=True,
    )
    process, url = _start_daphne(env, log_path)
    try:
        yield LiveApp(url=url, env=env, process=process, log_path=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one test module. Playwright's sync API keeps an event loop
    running while it is open, so it must be closed before any asyncio test runs."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for browser tests: apt-get install chromium")
        pytest.skip("chromium is not installed: apt-get install chromium fonts-noto-cjk")
    from playwright.sync_api import sync_playwright

    # launch() starts Chromium on a fresh, temporary user-data dir of its own.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser):
    """Pages in fresh browser contexts (separate cookies), closed after the test."""
    contexts = []

    def make(color_scheme: str = "light", locale: str = "en-US", width: int = 1200):
        context = browser.new_context(
            viewport={"width": width, "height": 800}, color_scheme=color_scheme, locale=locale
        )
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()
