import time, uuid
from tests.test_browser import *  # noqa
from tests.test_browser import _start_chat, _wait_status, _token

def test_t(live_app, new_page):
    t=time.monotonic()
    alice = new_page(); live_app.login(alice, "alice"); print("login", time.monotonic()-t)
    url = _start_chat(alice, live_app, "x "+_token()); print("start", time.monotonic()-t)
    _wait_status(alice, "complete"); print("complete", time.monotonic()-t)
    bob = new_page(); live_app.login(bob, "bob"); print("bob", time.monotonic()-t)
    for path in ("", "export.json", "export.md"):
        r = bob.goto(f"{url}{path}"); print(path, r.status, time.monotonic()-t)
