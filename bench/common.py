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
