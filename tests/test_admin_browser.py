"""The admin in headless Chromium: the catalog after a sync, a reviewed conversation with its
images, and the audit log that recorded the review. Screenshots go to test-artifacts/."""

from __future__ import annotations

import pytest

from tests.image_server import serve_images
from tests.live_server import ARTIFACTS, running_app

pytestmark = pytest.mark.browser

STAFF = {"root": "root-pass-7731", "rita": "rita-pass-4410"}

SEED = """
from decimal import Decimal
from django.contrib.auth.models import Permission, User
from conversations.models import Message, MessageImage, ModelProfile
from conversations.replies import branches
from conversations.replies.service import conversation_create
User.objects.create_superuser("root", password={root!r})
rita = User.objects.create_user("rita", password={rita!r}, is_staff=True)
rita.user_permissions.add(Permission.objects.get(codename="review_conversation"))
alice = User.objects.get(username="alice")
chat = conversation_create(owner=alice, model=ModelProfile.objects.get(name="qwen3-vl-plus"))
chat.title = "两张图片 · two pictures"
chat.save()
question = Message.objects.create(conversation=chat, role="user",
    content="这两张图片里有什么？ What is in these pictures?")
MessageImage.objects.create(message=question, url="{images}/cat.png")
MessageImage.objects.create(message=question, url="http://10.0.0.1/secret.png")
Message.objects.create(conversation=chat, parent=question, role="assistant",
    model="qwen3-vl-plus", finish_reason="stop",
    reasoning="The first picture is one orange colour; the second did not load.",
    content="The first is an **orange rectangle**; the second could not be "
    "loaded.\\n\\n| picture | colour |\\n| --- | --- |\\n| 1 | orange |\\n| 2 | - |",
    tool_steps=[{{"calls": [{{"id": "c1", "function": {{"name": "get_current_time",
    "arguments": "{{}}"}}}}], "results": [{{"tool_call_id": "c1",
    "content": "2026-12-06 08:00 CST"}}]}}],
    input_tokens=1840, output_tokens=96, reasoning_tokens=40, cost=Decimal("0.0031"),
    cost_currency="CNY")
branches.link_in_order(chat)
print(chat.pk)
"""


@pytest.fixture(scope="module")
def admin_app(app_simulator):
    with (
        serve_images() as images,
        running_app(app_simulator, QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS=images.host) as app,
    ):
        out = app.manage(
            "shell", "-c", SEED.format(images=images.base, **STAFF)
        )  # fmt: skip
        yield app, out.strip().splitlines()[-1]


def _admin_login(page, app, username: str) -> None:
    page.goto(f"{app.url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", STAFF[username])
    page.click("input[type=submit]")
    page.wait_for_url(f"{app.url}/admin/")


def test_review_then_audit_log_then_catalog_sync(admin_app, app_simulator, new_page):
    app, chat_id = admin_app
    reviewer = new_page()
    _admin_login(reviewer, app, "rita")
    reviewer.goto(f"{app.url}/admin/conversations/conversation/?q=图片")
    assert "两张图片" in reviewer.inner_text("#result_list")
    reviewer.goto(f"{app.url}/admin/conversations/conversation/{chat_id}/change/")
    reviewer.click("text=Transcript")
    reviewer.wait_for_function(
        "() => [...document.querySelectorAll('img.message__image')]"
        ".every((i) => i.complete && i.naturalWidth > 0)"
    )
    sizes = reviewer.locator("img.message__image").evaluate_all(
        "all => all.map((i) => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[64, 48], [160, 120]], "the PNG through the proxy, then the placeholder"
    text = reviewer.inner_text("main")
    assert "orange rectangle" in text and "1840 tokens in · 96 out" in text
    assert reviewer.locator("details.message__reasoning:not([open])").count() == 1
    assert reviewer.locator('[data-tool-call="get_current_time"]').count() == 1
    assert reviewer.locator("[ws-send], [data-action=regenerate]").count() == 0
    reviewer.screenshot(path=str(ARTIFACTS / "review-transcript.png"), full_page=True)

    admin = new_page()
    _admin_login(admin, app, "root")
    admin.set_viewport_size({"width": 1400, "height": 800})
    admin.goto(f"{app.url}/admin/conversations/auditentry/")
    rows = admin.inner_text("#result_list")
    assert "rita" in rows and "search" in rows and "view" in rows and "alice" in rows
    assert admin.locator(".object-tools a.addlink").count() == 0
    admin.screenshot(path=str(ARTIFACTS / "audit-log.png"), full_page=True)

    app_simulator.listed_models = [*app_simulator.listed_models, "qwen3-coder-plus"]
    try:
        admin.goto(f"{app.url}/admin/conversations/modelprofile/")
        admin.click("#sync-models")
        admin.wait_for_selector(".messagelist .success")
        assert "Added 1 model: qwen3-coder-plus" in admin.inner_text(".messagelist")
    finally:
        app_simulator.reset()
    admin.screenshot(path=str(ARTIFACTS / "catalog-synced.png"), full_page=True)
