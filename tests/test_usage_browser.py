"""The admin's usage page in headless Chromium: its chart drawn within the Content-Security-
Policy, in the admin's light and dark themes (screenshots in test-artifacts/)."""

from __future__ import annotations

import pytest

from tests.live_server import ARTIFACTS, running_app

pytestmark = pytest.mark.browser

# A month of replies for alice (an admin here) and bob, two models, one unpriced.
SEED = """
from datetime import timedelta
from decimal import Decimal
from django.contrib.auth.models import Group, User
from django.utils import timezone
from conversations.models import Message
from conversations.replies.service import conversation_create
alice, bob = User.objects.get(username="alice"), User.objects.get(username="bob")
User.objects.filter(pk=alice.pk).update(is_staff=True, is_superuser=True)
Group.objects.create(name="research").user_set.add(alice, bob)
Group.objects.create(name="interns").user_set.add(bob)
now = timezone.now()
for day in range(30):
    for n, user in enumerate([alice, bob] * (1 + day % 3)):
        chat = conversation_create(owner=user)
        priced = (n + day) % 3 != 0
        tokens_in, tokens_out = 800 + 97 * ((day * 7 + n * 13) % 40), 300 + 41 * (day % 9)
        reply = Message.objects.create(
            conversation=chat, role="assistant", content="An answer.",
            model="qwen-plus" if priced else "qwen3-vl-plus",
            input_tokens=tokens_in, output_tokens=tokens_out,
            reasoning_tokens=tokens_out // 3 if day % 4 == 0 else 0,
            cost=Decimal(tokens_in * 8 + tokens_out * 20) / 10_000_000 if priced else None,
            cost_currency="CNY" if priced else "",
        )
        Message.objects.filter(pk=reply.pk).update(created_at=now - timedelta(days=day, hours=n))
"""


@pytest.fixture(scope="module")
def usage_app(app_simulator):
    with running_app(
        app_simulator,
        QWENWEB_CHATS_PER_MINUTE="0",
        QWENWEB_TOKENS_PER_DAY="200000",
        QWENWEB_TOKENS_PER_MONTH="5000000",
        QWENWEB_COST_PER_MONTH="50",
    ) as app:
        app.manage("shell", "-c", SEED)
        yield app


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_the_usage_page_draws_its_chart_within_the_csp(usage_app, new_page, color_scheme):
    page = new_page(color_scheme=color_scheme)
    refused = []
    page.on("console", lambda message: refused.append(message.text) if "Refused" in message.text
            else None)  # fmt: skip
    usage_app.login(page, "alice")
    page.goto(f"{usage_app.url}/admin/")
    page.click('a[href="/admin/conversations/usage/"]')
    page.wait_for_selector("#usage-chart")
    assert page.locator("#usage-chart g.usage-chart__day").count() == 30
    # The bars take their colours from admin-usage.css (no inline style is allowed).
    fill = page.locator("#usage-chart .usage-chart__input").first.evaluate(
        "element => getComputedStyle(element).fill"
    )
    assert fill == "rgb(65, 118, 144)"
    assert page.locator("#usage-table tbody tr").count() == 2
    assert page.input_value("#id_start") != ""  # the range shown is the range in the form
    page.screenshot(path=str(ARTIFACTS / f"admin-usage-{color_scheme}.png"), full_page=True)
    page.select_option("#id_group_by", "group")
    page.click("input[type=submit][value=Show]")
    page.wait_for_url("**group_by=group**")
    assert page.locator("#usage-table tbody th").all_inner_texts() == ["research", "interns"]
    if color_scheme == "light":
        page.screenshot(path=str(ARTIFACTS / "admin-usage-by-group.png"), full_page=True)
    assert refused == []


@pytest.mark.parametrize(
    ("color_scheme", "width"), [("light", 1200), ("dark", 375), ("light", 375)]
)
def test_a_users_settings_page_shows_their_own_usage(usage_app, new_page, color_scheme, width):
    """Their usage, and each quota in force with what is left, on a desktop and on a phone
    (nothing wider than the screen), light and dark."""
    page = new_page(color_scheme=color_scheme, width=width)
    usage_app.login(page, "bob")
    page.goto(f"{usage_app.url}/settings/")
    usage = page.locator("#usage")
    assert usage.locator('[data-usage="month-replies"]').inner_text() != "0"
    quotas = page.locator("#quotas")
    assert sorted(quotas.locator("tr[data-quota]").evaluate_all(
        "rows => rows.map(row => row.dataset.quota)"
    )) == ["cost_per_month", "tokens_per_day", "tokens_per_month"]  # fmt: skip
    too_wide = page.evaluate(
        """width => [...document.querySelectorAll("body *")]
            .filter(element => element.getBoundingClientRect().right > width + 0.5)
            .map(element => element.tagName + "#" + element.id + "." + element.className)
            .slice(0, 8)""",
        width,
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= width, too_wide
    box = quotas.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= width
    name = "settings-usage" + ("" if width > 720 else f"-phone-{color_scheme}")
    page.locator("#usage").screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if width <= 720:
        page.screenshot(path=str(ARTIFACTS / f"{name}-page.png"), full_page=True)
