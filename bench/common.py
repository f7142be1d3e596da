"""What the benchmarks share: a free loopback port, and a logged-in HTTP client."""

import socket

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
