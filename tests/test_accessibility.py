"""An axe-core scan of the pages people use, in headless Chromium: no serious or critical
violation on the sign-in, home, chat, search, settings, shared-chat and not-found pages, in
the light and dark themes, on a phone (375 px) and a desktop (1440 px).

axe-core is vendored from the npm registry (tests/vendor/, MPL-2.0, checked by its hash) and
evaluated in the page through the DevTools protocol, which the page's CSP does not govern: the
app itself serves no test code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dashscope_simulator import Scenario
from tests.live_server import ARTIFACTS

pytestmark = pytest.mark.browser

AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1.min.js"
AXE_SHA256 = "29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c"
SIZES = {"phone": (375, 812), "desktop": (1440, 900)}
REPLY = (
    "## A reply with everything\n\nSome **bold** text, a [link](https://example.com/), "
    "`inline code` and math $E = mc^2$.\n\n| Column | Value |\n|---|---|\n| a | 1 |\n\n"
    "```python\nprint('hello')\n```\n\n> A quote.\n"
)


@pytest.fixture(scope="module")
def axe_source() -> str:
    source = AXE.read_text()
    assert hashlib.sha256(source.encode()).hexdigest() == AXE_SHA256, "the vendored axe changed"
    return source


@pytest.fixture(scope="module")
def chat_url(live_app, app_simulator, browser) -> tuple[str, str]:
    """One chat with a reply of every kind of block, and its share link, made once."""
    app_simulator.add_scenario(Scenario(match="a11y-scan", reply=REPLY, token_delay=0.001))
    context = browser.new_context()
    page = context.new_page()
    live_app.login(page, "alice")
    page.fill("#composer-input", "Show me everything a11y-scan")
    page.press("#composer-input", "Enter")
    page.wait_for_selector('article[data-role="assistant"][data-status="complete"]')
    url = page.url
    page.click(".chat-header .menu summary")
    page.click("[data-action=open-share]")
    page.click("#share-panel [data-action=share]")
    shared = page.locator("#share-link").input_value()
    context.close()
    return url, shared


def scan(page, axe_source: str) -> list[dict]:
    """axe's serious and critical violations on the page as it is."""
    page.evaluate(axe_source)
    results = page.evaluate(
        """async () => {
          const r = await axe.run(document, {resultTypes: ["violations"]});
          return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 5).map(n => n.target.join(" ") + " :: " + n.failureSummary)}));
        }"""
    )
    return [v for v in results if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_no_serious_accessibility_violation(browser, live_app, chat_url, axe_source, theme, size):
    width, height = SIZES[size]
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=theme)
    page = context.new_page()
    found = {}
    try:
        page.goto(f"{live_app.url}/accounts/login/")
        found["sign-in"] = scan(page, axe_source)
        live_app.login(page, "alice")
        chat, shared = (url.removeprefix(live_app.url) for url in chat_url)
        pages = {
            "home": "/",
            "chat": chat,
            "search": "/search/?q=everything",
            "settings": "/settings/",
            "shared": shared,
            "not-found": "/c/00000000-0000-0000-0000-000000000000/",
        }
        for name, path in pages.items():
            page.goto(live_app.url + path)
            page.wait_for_load_state("networkidle")
            found[name] = scan(page, axe_source)
            page.screenshot(path=str(ARTIFACTS / f"a11y-{name}-{theme}-{size}.png"))
    finally:
        context.close()
    failing = {name: violations for name, violations in found.items() if violations}
    assert not failing, json.dumps(failing, indent=1)
