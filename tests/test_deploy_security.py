"""Deployment security: the DJANGO_HTTPS settings, the Content-Security-Policy, sign-in
throttling and the session cookie.

Settings are read when Django starts, so the environment-driven ones are checked in fresh
processes (`manage.py`, daphne); the rest run through Django's test client, two daphne
processes on PostgreSQL (skipped without it, as in test_team_deployment.py) and headless
Chromium (last in this module: Playwright's event loop must not be open while the others run).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from django.contrib.sessions.models import Session
from django.test import Client, RequestFactory

from conversations.replies.service import conversation_create
from qwenweb.client_address import client_ip_address
from tests.live_server import ARTIFACTS, PASSWORDS, ROOT, _start_daphne
from tests.test_team_deployment import team  # noqa: F401 (a fixture)

EXPECTED_POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'", "'nonce-*'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "frame-ancestors": ["'none'"],
    "form-action": ["'self'"],
    "base-uri": ["'self'"],
    "object-src": ["'none'"],
}


def _production_env(data_dir: Path, **extra: str) -> dict:
    env = {
        **os.environ,
        "DJANGO_DEBUG": "0",
        "DJANGO_HTTPS": "1",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "QWENWEB_DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'db.sqlite3'}",
        **extra,
    }
    env.pop("REDIS_URL", None)
    return env


def _manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


SETTINGS_JSON = (
    "import json; from django.conf import settings as s; print(json.dumps({name: getattr(s, name)"
    " for name in ['SECURE_SSL_REDIRECT', 'SECURE_HSTS_SECONDS', 'SECURE_HSTS_INCLUDE_SUBDOMAINS',"
    " 'SECURE_HSTS_PRELOAD', 'SECURE_PROXY_SSL_HEADER', 'SECURE_REDIRECT_EXEMPT',"
    " 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SESSION_COOKIE_HTTPONLY',"
    " 'SESSION_COOKIE_SAMESITE', 'CSRF_COOKIE_SAMESITE']}))"
)


def _settings_under(env: dict) -> dict:
    result = _manage(env, "shell", "-c", SETTINGS_JSON)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- 1. DJANGO_HTTPS and `check --deploy` -----------------------------------------------------


def test_check_deploy_passes_under_production_settings(tmp_path):
    result = _manage(_production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr


def test_https_flag_turns_on_redirect_hsts_and_secure_cookies(tmp_path):
    values = _settings_under(_production_env(tmp_path))
    assert values == {
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 365 * 24 * 60 * 60,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "SECURE_REDIRECT_EXEMPT": ["^healthz$"],
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "CSRF_COOKIE_SAMESITE": "Lax",
    }


def test_without_https_flag_plain_http_settings_are_unchanged(tmp_path):
    env = _production_env(tmp_path)
    del env["DJANGO_HTTPS"]
    values = _settings_under(env)
    assert values["SECURE_SSL_REDIRECT"] is False
    assert values["SECURE_HSTS_SECONDS"] == 0
    assert values["SECURE_PROXY_SSL_HEADER"] is None
    assert values["SESSION_COOKIE_SECURE"] is False
    assert values["CSRF_COOKIE_SECURE"] is False
    assert values["SESSION_COOKIE_HTTPONLY"] is True


def _cookie(response: httpx.Response, name: str) -> dict:
    """The attributes of one Set-Cookie, lower-cased names: {'secure': True, 'samesite': 'Lax'}."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            attributes = [part.strip() for part in header.split(";")[1:]]
            return {
                key.lower(): value or True
                for key, _, value in (attribute.partition("=") for attribute in attributes)
            }
    raise AssertionError(f"no {name} cookie in {response.headers.get_list('set-cookie')}")


@pytest.fixture(scope="module")
def https_app(app_simulator):
    """daphne as production runs it: DEBUG off, DJANGO_HTTPS=1, plain http behind a TLS proxy."""
    from tests.conftest import APP_API_KEY

    data_dir = Path(tempfile.mkdtemp(prefix="qwenweb-https-"))
    env = _production_env(
        data_dir,
        DASHSCOPE_API_KEY=APP_API_KEY,
        DASHSCOPE_BASE_URL=app_simulator.native_base_url,
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
    )
    assert _manage(env, "migrate", "-v0").returncode == 0
    create = (
        "from django.contrib.auth.models import User; "
        "User.objects.create_user('hana', password='hana-pw-77')"
    )
    assert _manage(env, "shell", "-c", create).returncode == 0
    # _start_daphne waits for /healthz over plain http: the health check is exempt.
    process, url = _start_daphne(env, data_dir / "daphne.log")
    yield url
    process.terminate()
    process.wait(timeout=10)
    shutil.rmtree(data_dir, ignore_errors=True)


def test_https_redirects_everything_but_the_health_check(https_app):
    response = httpx.get(f"{https_app}/accounts/login/")
    assert response.status_code == 301
    assert response.headers["location"] == https_app.replace("http://", "https://") + (
        "/accounts/login/"
    )
    health = httpx.get(f"{https_app}/healthz")
    assert health.status_code == 200 and health.json()["database"] == "ok"
    # Through the TLS proxy: served, and browsers are told to stay on https.
    secure = httpx.get(f"{https_app}/accounts/login/", headers={"X-Forwarded-Proto": "https"})
    assert secure.status_code == 200
    assert secure.headers["strict-transport-security"] == (
        "max-age=31536000; includeSubDomains; preload"
    )


def test_https_cookies_are_secure_httponly_and_lax(https_app):
    # What the TLS proxy forwards. Secure cookies are not sent over this plain-http hop by a
    # client, so they are passed along by hand, as the proxy would.
    proxy = {"X-Forwarded-Proto": "https", "Origin": https_app.replace("http://", "https://")}
    page = httpx.get(f"{https_app}/accounts/login/", headers=proxy)
    csrf = _cookie(page, "csrftoken")
    assert csrf["secure"] is True and csrf["httponly"] is True and csrf["samesite"] == "Lax"
    token = page.cookies["csrftoken"]
    response = httpx.post(
        f"{https_app}/accounts/login/",
        data={"username": "hana", "password": "hana-pw-77", "csrfmiddlewaretoken": token},
        headers={**proxy, "Cookie": f"csrftoken={token}"},
    )
    assert response.status_code == 302, response.text[:300]
    session = _cookie(response, "sessionid")
    assert session["secure"] is True
    assert session["httponly"] is True
    assert session["samesite"] == "Lax"
    signed_in = f"csrftoken={token}; sessionid={response.cookies['sessionid']}"
    language = httpx.post(
        f"{https_app}/i18n/setlang/",
        data={"language": "zh-hans", "next": "/", "csrfmiddlewaretoken": token},
        headers={**proxy, "Cookie": signed_in},
    )
    assert language.status_code == 302 and language.headers["location"] == "/"
    assert _cookie(language, "django_language")["secure"] is True


def test_plain_http_without_https_flag_has_no_redirect_and_no_secure_cookies(live_app):
    with httpx.Client(base_url=live_app.url) as client:
        page = client.get("/accounts/login/")
        assert page.status_code == 200
        assert "strict-transport-security" not in page.headers
        csrf = _cookie(page, "csrftoken")
        assert "secure" not in csrf and csrf["samesite"] == "Lax"
        response = client.post(
            "/accounts/login/",
            data={"username": "alice", "password": PASSWORDS["alice"],
                  "csrfmiddlewaretoken": client.cookies["csrftoken"]},
        )  # fmt: skip
        assert response.status_code == 302
        session = _cookie(response, "sessionid")
        assert "secure" not in session
        assert session["httponly"] is True and session["samesite"] == "Lax"
        assert client.get("/").status_code == 200


# -- 2. the session key changes at sign-in (no session fixation) -----------------------------


@pytest.fixture
def fast_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.mark.django_db
def test_session_key_changes_at_login(client, django_user_model, fast_hashing, settings):
    django_user_model.objects.create_user("sid", password="sid-pass-1")
    planted = client.session  # a session that exists before signing in, as an attacker's would
    planted["before"] = "login"
    planted.save()
    before = client.cookies[settings.SESSION_COOKIE_NAME].value
    response = client.post("/accounts/login/", {"username": "sid", "password": "sid-pass-1"})
    assert response.status_code == 302
    after = client.cookies[settings.SESSION_COOKIE_NAME].value
    assert after != before
    assert not Session.objects.filter(session_key=before).exists()
    assert client.get("/").status_code == 200


# -- 3. Content-Security-Policy ----------------------------------------------------------------


def _policy(response) -> dict[str, list[str]]:
    header = response.headers["Content-Security-Policy"]
    return {
        name: values for name, *values in (directive.split() for directive in header.split(";"))
    }


def _nonce(policy: dict[str, list[str]]) -> str | None:
    nonces = [v[len("'nonce-") : -1] for v in policy["script-src"] if v.startswith("'nonce-")]
    assert len(nonces) <= 1
    return nonces[0] if nonces else None


def _scripts(html: str) -> list[tuple[dict, str]]:
    return [
        (dict(re.findall(r'([\w-]+)="([^"]*)"', attributes)), body)
        for attributes, body in re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    ]


def _inline_code_and_styles(html: str) -> list[str]:
    """Markup the policy would refuse: event-handler or style attributes, <style> blocks."""
    found = []
    for tag in re.findall(r"<[a-zA-Z][^>]*>", html):
        found += re.findall(r"\s(on[a-z]+|style)\s*=", tag)
    found += re.findall(r"<style\b", html)
    return found


def _assert_policy_shape(policy: dict[str, list[str]]) -> None:
    assert {
        name: ["'nonce-*'" if v.startswith("'nonce-") else v for v in values]
        for name, values in policy.items()
    } == EXPECTED_POLICY | {
        "script-src": ["'self'"] + (["'nonce-*'"] if _nonce(policy) else []),
    }
    header = " ".join(" ".join(values) for values in policy.values())
    assert "unsafe-eval" not in header and "unsafe-inline" not in header
    assert policy["img-src"] == ["'self'", "data:"]  # no remote host, no scheme wildcard


@pytest.fixture
def pages(client, admin_client, django_user_model):
    alice = django_user_model.objects.create_user("alice", password="pw")
    conversation = conversation_create(owner=alice)
    alice_client = Client()
    alice_client.force_login(alice)
    return {
        "home": (alice_client, "/"),
        "chat": (alice_client, f"/c/{conversation.id}/"),
        "login": (client, "/accounts/login/"),
        "admin login": (Client(), "/admin/login/"),
        "admin index": (admin_client, "/admin/"),
        "admin change list": (admin_client, "/admin/conversations/conversation/"),
        "admin editable change list": (admin_client, "/admin/conversations/modelprofile/"),
        "admin change form": (
            admin_client,
            f"/admin/conversations/conversation/{conversation.pk}/change/",
        ),
    }


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["home", "chat", "login"])
def test_app_pages_send_the_policy_and_their_scripts_carry_its_nonce(pages, name):
    client, url = pages[name]
    response = client.get(url)
    assert response.status_code == 200
    policy = _policy(response)
    _assert_policy_shape(policy)
    nonce = _nonce(policy)
    assert nonce and len(nonce) >= 22  # 16 random bytes
    html = response.content.decode()
    scripts = _scripts(html)
    assert len(scripts) == 4  # the theme, htmx, its websocket extension, the chat's
    for attributes, body in scripts:
        assert attributes.get("nonce") == nonce, attributes
        assert attributes["src"].startswith("/static/") and not body.strip()
    assert '"allowEval":false' in html and '"includeIndicatorStyles":false' in html
    assert _inline_code_and_styles(html) == []
    # Each response has a nonce of its own.
    assert _nonce(_policy(client.get(url))) != nonce


@pytest.mark.django_db
@pytest.mark.parametrize(
    "name",
    [
        "admin login",
        "admin index",
        "admin change list",
        "admin editable change list",
        "admin change form",
    ],
)
def test_admin_pages_send_the_policy_and_run_only_same_origin_scripts(pages, name, settings):
    """Django's admin templates load every script from a file (none inline), which
    script-src 'self' allows; they carry no nonce, so the header has none either."""
    settings.DASHSCOPE_API_KEY = ""  # the offline-demo banner is shown in the admin too
    client, url = pages[name]
    response = client.get(url)
    assert response.status_code == 200
    policy = _policy(response)
    _assert_policy_shape(policy)
    html = response.content.decode()
    scripts = _scripts(html)
    assert scripts
    for attributes, body in scripts:
        assert not body.strip(), f"inline script in {url}"
        assert attributes["src"].startswith("/"), attributes
        assert attributes.get("nonce", _nonce(policy)) == _nonce(policy)
    assert _inline_code_and_styles(html) == []


def test_the_exact_policy():
    from csp.utils import build_policy

    # django-csp writes the directives in no fixed order.
    assert sorted(build_policy(nonce="N").split("; ")) == sorted(
        [
            "default-src 'self'",
            "script-src 'self' 'nonce-N'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
            "base-uri 'self'",
            "object-src 'none'",
        ]
    )


# -- 4. sign-in throttling -----------------------------------------------------------------------

LOCKED_OUT = "Too many failed sign-ins"


def _sign_in(username: str, password: str, address: str, url="/accounts/login/", **headers):
    return Client().post(
        url, {"username": username, "password": password}, REMOTE_ADDR=address, headers=headers
    )


def _signed_in(response) -> bool:
    return response.status_code == 302 and "_auth_user_id" in response.wsgi_request.session


@pytest.mark.django_db
def test_failures_for_one_account_lock_it_from_every_address(django_user_model, fast_hashing):
    django_user_model.objects.create_user("victim", password="right-pw-1")
    django_user_model.objects.create_user("bystander", password="right-pw-2")
    statuses = [_sign_in("victim", "wrong", f"10.0.0.{n}").status_code for n in range(1, 6)]
    # The fifth failure reaches the limit and is itself answered with the lockout.
    assert statuses == [200, 200, 200, 200, 429]
    locked = _sign_in("victim", "right-pw-1", "10.0.0.6")
    assert locked.status_code == 429 and not _signed_in(locked)
    html = locked.content.decode()
    assert LOCKED_OUT in html and "Try again in 15 minutes" in html
    _assert_policy_shape(_policy(locked))
    assert all(a.get("nonce") == _nonce(_policy(locked)) for a, _ in _scripts(html))
    # Other accounts, from a new address, are not affected.
    assert _signed_in(_sign_in("bystander", "right-pw-2", "10.0.0.7"))


@pytest.mark.django_db
def test_failures_from_one_address_lock_that_address(django_user_model, fast_hashing):
    django_user_model.objects.create_user("real", password="real-pw-1")
    statuses = [_sign_in(f"guess{n}", "wrong", "10.9.9.9").status_code for n in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    assert _sign_in("real", "real-pw-1", "10.9.9.9").status_code == 429
    assert _signed_in(_sign_in("real", "real-pw-1", "10.9.9.10"))


@pytest.mark.django_db
def test_a_successful_sign_in_resets_the_count(django_user_model, fast_hashing):
    django_user_model.objects.create_user("rosa", password="rosa-pw-1")
    assert [_sign_in("rosa", "wrong", "10.5.5.5").status_code for _ in range(4)] == [200] * 4
    assert _signed_in(_sign_in("rosa", "rosa-pw-1", "10.5.5.5"))
    # Without the reset, the next failure would be the fifth.
    statuses = [_sign_in("rosa", "wrong", "10.5.5.5").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]


@pytest.mark.django_db
def test_admin_sign_in_is_throttled_too(django_user_model, fast_hashing):
    django_user_model.objects.create_superuser("boss", password="boss-pw-1")
    statuses = [
        _sign_in("boss", "wrong", f"10.4.0.{n}", url="/admin/login/").status_code for n in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]
    assert _sign_in("boss", "boss-pw-1", "10.4.0.9", url="/admin/login/").status_code == 429


@pytest.mark.django_db
def test_guessing_the_old_password_on_the_settings_page_is_throttled_too(
    django_user_model, fast_hashing
):
    """A stolen session must not let its holder guess the password on /settings/ without
    bound: the old-password check counts as a sign-in, and its failures lock the account
    there and at the sign-in page alike."""
    user = django_user_model.objects.create_user("sam", password="sam-pw-123")
    thief = Client(REMOTE_ADDR="10.6.0.1")
    thief.force_login(user)

    def change(old: str):
        return thief.post(
            "/settings/",
            {"form": "password", "old_password": old, "new_password1": "n3w-Passw0rd!",
             "new_password2": "n3w-Passw0rd!"},
        )  # fmt: skip

    assert [change(f"guess-{n}").status_code for n in range(5)] == [400, 400, 400, 400, 429]
    locked = change("sam-pw-123")
    assert locked.status_code == 429 and LOCKED_OUT in locked.content.decode()
    user.refresh_from_db()
    assert user.check_password("sam-pw-123"), "not changed while locked"
    assert _sign_in("sam", "sam-pw-123", "10.6.0.2").status_code == 429


@pytest.mark.django_db
def test_lockout_page_speaks_the_users_language(fast_hashing):
    for _ in range(5):
        client = Client()
        client.cookies["django_language"] = "zh-hans"
        response = client.post(
            "/accounts/login/", {"username": "nobody", "password": "x"}, REMOTE_ADDR="10.8.8.8"
        )
    assert response.status_code == 429
    html = response.content.decode()
    assert "登录失败次数过多" in html and "15 分钟" in html


@pytest.mark.django_db
def test_forwarded_for_is_ignored_without_trusted_proxies(fast_hashing):
    statuses = [
        _sign_in(f"user{n}", "wrong", "10.7.7.7", x_forwarded_for=f"203.0.113.{n}").status_code
        for n in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]


@pytest.mark.django_db
def test_behind_a_trusted_proxy_the_address_it_saw_counts(
    django_user_model, fast_hashing, settings
):
    settings.QWENWEB_TRUSTED_PROXY_COUNT = 1
    django_user_model.objects.create_user("kim", password="kim-pw-1")
    proxy = "127.0.0.1"
    # Five different clients through the same proxy: none is locked out.
    statuses = [
        _sign_in(f"user{n}", "wrong", proxy, x_forwarded_for=f"198.51.100.{n}").status_code
        for n in range(5)
    ]
    assert statuses == [200] * 5
    # One client that writes its own X-Forwarded-For: only the proxy's entry counts.
    statuses = [
        _sign_in(
            f"other{n}", "wrong", proxy, x_forwarded_for=f"10.1.1.{n}, 198.51.100.77"
        ).status_code
        for n in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]
    assert _signed_in(_sign_in("kim", "kim-pw-1", proxy, x_forwarded_for="198.51.100.78"))


@pytest.mark.parametrize(
    ("count", "forwarded", "expected"),
    [
        (0, "203.0.113.9", "192.0.2.1"),
        (1, "203.0.113.9", "203.0.113.9"),
        (1, "10.0.0.1, 203.0.113.9", "203.0.113.9"),
        (2, "10.0.0.1, 203.0.113.9, 198.51.100.2", "203.0.113.9"),
        (2, "203.0.113.9", "192.0.2.1"),  # came through fewer proxies than configured
        (1, "203.0.113.9:4431", "203.0.113.9"),
        (1, "[2001:db8::7]:443", "2001:db8::7"),
        (1, "2001:db8::7", "2001:db8::7"),
        (1, "not-an-address", "192.0.2.1"),
        (1, "", "192.0.2.1"),
    ],
)
def test_client_address(settings, count, forwarded, expected):
    settings.QWENWEB_TRUSTED_PROXY_COUNT = count
    request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip_address(request) == expected


@pytest.mark.services
def test_failures_count_across_server_processes(team):  # noqa: F811
    """Three failures through one daphne process and two through another lock the account
    on both: the count lives in the shared PostgreSQL database."""
    url_a, url_b = team

    def attempt(url: str, password: str) -> int:
        with httpx.Client(base_url=url) as client:
            client.get("/accounts/login/")
            return client.post(
                "/accounts/login/",
                data={"username": "tess", "password": password,
                      "csrfmiddlewaretoken": client.cookies["csrftoken"]},
            ).status_code  # fmt: skip

    statuses = [attempt(url_a, "wrong") for _ in range(3)]
    statuses += [attempt(url_b, "wrong") for _ in range(2)]
    assert statuses == [200, 200, 200, 200, 429]
    assert attempt(url_a, "tess-pw-1") == 429
    assert attempt(url_b, "tess-pw-1") == 429


# -- 5. in a browser: nothing the pages need is refused -----------------------------------------

CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


class ImageServer:
    """An http server on a loopback port that counts the requests it gets."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> int:
        self.server.shutdown()
        self.server.server_close()
        return len(self.hits)


class PageWatch:
    """What a page reports: console messages, uncaught errors, requests, CSP violations."""

    def __init__(self, page):
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))

    def violations(self) -> list[str]:
        in_console = [m for m in self.console if "Content Security Policy" in m]
        return in_console + self.page.evaluate("window.__cspViolations || []")

    def assert_clean(self) -> None:
        assert self.violations() == []
        assert self.errors == []


@pytest.fixture
def watched_page(new_page):
    def make():
        page = new_page()
        page.add_init_script(CSP_LISTENER)
        return PageWatch(page)

    return make


@pytest.mark.browser
def test_chat_runs_under_the_policy(live_app, app_simulator, watched_page):
    from dashscope_simulator import Scenario
    from tests.test_browser import ASSISTANT, _start_chat, _token, _wait_status

    image_server = ImageServer()
    image_url = f"http://127.0.0.1:{image_server.port}/x.png"
    first, second = _token(), _token()
    app_simulator.add_scenario(Scenario(match=first, reply="Hello **there**, " + "word " * 30))
    app_simulator.add_scenario(
        Scenario(match=second, reply=f"Here is a picture: ![x]({image_url}) and more text.")
    )
    watch = watched_page()
    page = watch.page
    live_app.login(page, "alice")
    watch.assert_clean()

    # A message is sent and its reply streams over the websocket (connect-src 'self').
    _start_chat(page, live_app, f"Say hello {first}")
    _wait_status(page, "complete")
    assert "word" in page.locator(ASSISTANT).last.inner_text()
    # A second one through the chat page's websocket; its reply has a remote image.
    page.fill("#composer-input", f"Show a picture {second}")
    page.press("#composer-input", "Enter")
    page.wait_for_function(
        """(selector) => {
          const all = document.querySelectorAll(selector);
          return all.length === 2 && all[1].dataset.status === 'complete';
        }""",
        arg=ASSISTANT,
        timeout=15_000,
    )
    body = page.locator(ASSISTANT).last.locator(".message__body")
    assert "more text" in body.inner_text()
    assert body.locator("img").count() == 0
    page.screenshot(path=str(ARTIFACTS / "csp-chat.png"))
    watch.assert_clean()

    # The language switch (a handler in chat.js now, not an inline onchange) still works.
    chat_url = page.url
    with page.expect_navigation():
        page.select_option(".lang-form select", "zh-hans")
    assert page.get_attribute("html", "lang") == "zh-hans"
    assert page.url == chat_url
    assert "新对话" in page.locator("#new-chat").inner_text()
    with page.expect_navigation():
        page.select_option(".lang-form select", "en")
    assert page.get_attribute("html", "lang") == "en"
    _wait_status(page, "complete")
    watch.assert_clean()
    assert not [url for url in watch.requests if url.startswith(image_url)]

    # The policy is the second wall: an image that got past the sanitizer would not load.
    with page.expect_event("requestfailed") as blocked:
        directive = page.evaluate(
            """(url) => new Promise((resolve) => {
              document.addEventListener("securitypolicyviolation",
                (e) => resolve(e.violatedDirective), {once: true});
              const img = document.createElement("img");
              img.src = url;
              document.body.appendChild(img);
            })""",
            image_url,
        )
    assert directive == "img-src"
    assert any(image_url in m for m in watch.console), "CSP reports reach the console listener"
    # Chromium announces the request, then refuses it before it leaves the browser.
    assert (blocked.value.url, blocked.value.failure) == (image_url, "csp")
    assert image_server.close() == 0, "the image server was reached"


@pytest.mark.browser
def test_admin_runs_under_the_policy(live_app, watched_page):
    live_app.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User\n"
        "if not User.objects.filter(username='sage').exists():\n"
        "    User.objects.create_superuser('sage', password='sage-pass-3141')",
    )
    watch = watched_page()
    page = watch.page
    page.goto(f"{live_app.url}/admin/login/")
    page.fill("#id_username", "sage")
    page.fill("#id_password", "sage-pass-3141")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_app.url}/admin/")
    watch.assert_clean()

    # The nav sidebar's filter (nav_sidebar.js) runs.
    page.goto(f"{live_app.url}/admin/conversations/modelprofile/")
    page.fill("#nav-filter", "prompt")
    assert page.locator("#nav-sidebar tr.model-systemprompt").is_visible()
    assert not page.locator("#nav-sidebar tr.model-message").is_visible()
    # The change list's actions (actions.js): "select all" ticks every row.
    page.check("#action-toggle")
    rows = page.locator("input.action-select")
    assert rows.count() > 3
    assert all(rows.nth(i).is_checked() for i in range(rows.count()))
    page.screenshot(path=str(ARTIFACTS / "csp-admin.png"))
    watch.assert_clean()

    page.click("#result_list tbody tr th a")
    page.wait_for_selector("#modelprofile_form")
    page.goto(f"{live_app.url}/admin/auth/user/add/")
    page.wait_for_selector("#user_form")
    page.goto(f"{live_app.url}/admin/conversations/conversation/")
    watch.assert_clean()


@pytest.mark.browser
def test_lockout_page_in_a_browser(live_app, watched_page):
    watch = watched_page()
    page = watch.page
    try:
        for _ in range(5):
            page.goto(f"{live_app.url}/accounts/login/")
            page.fill("#id_username", "mallory")
            page.fill("#id_password", "guess")
            with page.expect_response(f"{live_app.url}/accounts/login/") as answer:
                page.click("button[type=submit]")
        assert answer.value.status == 429
        assert page.locator("#locked-out").is_visible()
        assert "Try again in 15 minutes" in page.locator("#locked-out").inner_text()
        page.screenshot(path=str(ARTIFACTS / "locked-out.png"))
        watch.assert_clean()
    finally:
        # Every browser test signs in from 127.0.0.1: lift the address's lockout.
        live_app.manage("axes_reset")
