"""The issue's "done when" for quotas, in Chromium: bob is an intern, the interns are kept to two
models and 200,000 tokens a day; the home page offers him those two, his chat works, and once
his replies have used the day's tokens a send is refused with a note saying when the limit
resets, his text kept in the box. (A daphne of its own: the policy must not reach the other
browser tests' users.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.live_server import ROOT, running_app

pytestmark = pytest.mark.browser

INTERNS = """
from django.contrib.auth.models import Group, User
from conversations.models import GroupPolicy, ModelProfile
interns = Group.objects.create(name="interns")
interns.user_set.add(User.objects.get(username="bob"))
policy = GroupPolicy.objects.create(group=interns, tokens_per_day=200000)
policy.allowed_models.set(ModelProfile.objects.filter(name__in=["qwen-flash", "qwen-max"]))
"""


def _shell(app, code: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT, env=app.env, check=True, capture_output=True,
    )  # fmt: skip


def test_an_intern_sees_two_models_and_is_told_when_the_days_tokens_are_used(
    app_simulator, new_page
):
    with running_app(app_simulator, TZ="Asia/Shanghai") as app:
        _shell(app, INTERNS)
        page = new_page()
        app.login(page, "bob")
        options = page.locator("#model-select option").evaluate_all(
            "options => options.map(o => o.dataset.model)"
        )
        assert sorted(options) == ["qwen-flash", "qwen-max"]
        page.fill("#composer-input", "hello there")
        page.press("#composer-input", "Enter")
        page.wait_for_selector('article[data-role="assistant"][data-status="complete"]')
        # In the chat, too, only his models are offered.
        options = page.locator("#model-select option:not([disabled])").evaluate_all(
            "options => options.map(o => o.dataset.model)"
        )
        assert sorted(options) == ["qwen-flash", "qwen-max"]
        asked = len(app_simulator.requests)
        _shell(
            app,
            "from conversations.models import Message\n"
            "Message.objects.filter(role='assistant')"
            ".update(input_tokens=150000, output_tokens=50000)\n",
        )
        page.fill("#composer-input", "and another thing")
        page.press("#composer-input", "Enter")
        notice = page.locator("#notices .notice")
        notice.wait_for(timeout=5_000)
        assert notice.inner_text().strip() == (
            "You have used your 200,000 tokens for today. The limit resets at 00:00 "
            "(Asia/Shanghai)."
        )
        assert page.input_value("#composer-input") == "and another thing"
        assert len(app_simulator.requests) == asked
        assert page.locator('article[data-role="user"]').count() == 1
