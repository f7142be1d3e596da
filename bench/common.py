"""What the benchmarks share: a free loopback port, and a logged-in HTTP client."""

import os
import socket
import subprocess
import sys
import tempfile

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_in_client(url: str, username: str, password: str) -> httpx.Client:
    """An httpx client signed in through the login form (its cookies hold the session)."""
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    client.get("/accounts/login/")
    response = client.post(
        "/accounts/login/",
        data={"username": username, "password": password,
              "csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": f"{url}/accounts/login/"},
    )  # fmt: skip
    if response.status_code != 302:
        client.close()
        raise RuntimeError(f"login of {username} failed: HTTP {response.status_code}")
    return client


def print_table(rows: list[tuple]) -> None:
    """Rows as aligned columns; the first row is the header, underlined."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * width for width in widths))


def run_child_on_both(
    script: str, name: str, child_args: list[str], pg: str, sqlite_only: bool = False
) -> None:
    """Run `script --child <database url> …` on a fresh SQLite file, then on a PostgreSQL
    database made for the run (and dropped after it) on the server `pg` names; PostgreSQL is
    skipped, saying why, when it cannot be reached."""
    with tempfile.TemporaryDirectory() as data_dir:
        print("SQLite:", flush=True)
        env = {**os.environ, "QWENWEB_DATA_DIR": data_dir}
        url = f"sqlite:///{data_dir}/{name}.sqlite3"
        subprocess.run([sys.executable, script, "--child", url, *child_args], env=env,
                       check=True)  # fmt: skip
    if sqlite_only:
        return
    try:
        import psycopg

        database = f"qwenweb_bench_{name}_{os.getpid()}"
        with psycopg.connect(pg, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
    except Exception as exc:
        print(f"PostgreSQL: skipped ({type(exc).__name__}: {exc})")
        return
    try:
        print("PostgreSQL:", flush=True)
        with tempfile.TemporaryDirectory() as data_dir:
            env = {**os.environ, "QWENWEB_DATA_DIR": data_dir}
            url = pg.rsplit("/", 1)[0] + "/" + database
            subprocess.run([sys.executable, script, "--child", url, *child_args], env=env,
                           check=True)  # fmt: skip
    finally:
        with psycopg.connect(pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
