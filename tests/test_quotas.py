"""Quotas and who may use what (conversations/replies/quotas.py): tokens a day and a month and
cost a month, per user, per group and site-wide, refused before anything is sent upstream and
lifted when the day or month turns; groups limited to some models and prompts, enforced against
forged frames and posts, and the pickers showing only what the user may use."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection
from django.utils import timezone

from conversations.models import (
    Conversation,
    GroupPolicy,
    Message,
    ModelProfile,
    Preferences,
    SystemPrompt,
    UserQuota,
)
from conversations.replies import quotas, rules, service
from dashscope_simulator import Scenario
from tests.test_team_deployment import team  # noqa: F401 (a fixture)
from tests.ws_support import Transcript, connect, open_chat, receive_until, send_frame

pytestmark = pytest.mark.django_db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def user():
    return get_user_model().objects.create_user("quinn", password="pw")


def spend(owner, *, tokens: tuple[int, int] = (0, 0), cost=None, currency="CNY", when=None):
    """A finished exchange in a chat of the owner's: a reply of `tokens` (input, output) that
    cost `cost`, started at `when` (now)."""
    conversation = service.conversation_create(owner=owner)
    Message.objects.create(conversation=conversation, role="user", content="earlier")
    reply = Message.objects.create(
        conversation=conversation, role="assistant", content="done", model="qwen-plus",
        input_tokens=tokens[0], output_tokens=tokens[1],
        cost=None if cost is None else Decimal(cost), cost_currency=currency if cost else "",
    )  # fmt: skip
    if when is not None:
        Message.objects.filter(conversation=conversation).update(created_at=when)
    return reply


def send(conversation, content="hello") -> service.StartedReply:
    started = service.reply_start(
        conversation=conversation, content=content, client_message_id=uuid.uuid4()
    )
    Message.objects.filter(pk=started.assistant_message.pk).update(status="complete")
    return started


def refusal(start) -> str:
    with pytest.raises(service.ReplyRefused) as refused:
        start()
    return html.unescape(str(refused.value))


def group(name: str, *members, **policy) -> Group:
    found = Group.objects.create(name=name)
    found.user_set.add(*members)
    models = policy.pop("models", ())
    prompts = policy.pop("prompts", ())
    made = GroupPolicy.objects.create(group=found, **policy)
    made.allowed_models.set(ModelProfile.objects.filter(name__in=models))
    made.allowed_prompts.set(prompts)
    return found


# -- the site's defaults ----------------------------------------------------------------------


def _settings_in_a_process(env: dict) -> list:
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.QWENWEB_TOKENS_PER_DAY, s.QWENWEB_TOKENS_PER_MONTH, s.QWENWEB_COST_PER_MONTH, "
        "s.QWENWEB_CURRENCY)"
    )
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("QWENWEB_")
    }
    environment.update(DJANGO_SETTINGS_MODULE="qwenweb.settings", **env)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True
    )
    return [done.returncode, done.stdout.split(), done.stderr]


def test_the_sites_defaults_come_from_the_environment_and_unset_means_no_limit():
    code, values, _err = _settings_in_a_process({})
    assert (code, values) == (0, ["0", "0", "0", "CNY"])
    code, values, _err = _settings_in_a_process(
        {"QWENWEB_TOKENS_PER_DAY": "200000", "QWENWEB_TOKENS_PER_MONTH": "3000000",
         "QWENWEB_COST_PER_MONTH": "50.5", "QWENWEB_CURRENCY": "usd"}
    )  # fmt: skip
    assert (code, values) == (0, ["200000", "3000000", "50.5", "USD"])
    code, _values, err = _settings_in_a_process({"QWENWEB_TOKENS_PER_DAY": "-1"})
    assert code != 0 and "must be 0 (no limit) or more" in err
    code, _values, err = _settings_in_a_process({"QWENWEB_COST_PER_MONTH": "fifty"})
    assert code != 0 and "QWENWEB_COST_PER_MONTH must be a decimal number" in err


# -- tokens and cost, refused and reset -------------------------------------------------------


def test_the_day_and_the_month_begin_at_midnight_in_the_servers_time_zone(settings):
    settings.TIME_ZONE = "Asia/Shanghai"
    # 16:30 UTC on 31 January is 00:30 on 1 February in Shanghai.
    windows = quotas.Windows.at(datetime(2026, 1, 31, 16, 30, tzinfo=UTC))
    assert windows.day_start == datetime(2026, 1, 31, 16, 0, tzinfo=UTC)
    assert windows.next_day == datetime(2026, 2, 1, 16, 0, tzinfo=UTC)
    assert windows.month_start == datetime(2026, 1, 31, 16, 0, tzinfo=UTC)
    assert windows.next_month == datetime(2026, 2, 28, 16, 0, tzinfo=UTC)


def test_tokens_per_day_are_refused_with_the_reset_and_count_again_after_midnight(user, settings):
    settings.TIME_ZONE = "Asia/Shanghai"
    settings.QWENWEB_TOKENS_PER_DAY = 1000
    day_start = quotas.Windows.at(timezone.now()).day_start
    yesterday = spend(user, tokens=(500, 500), when=day_start - timedelta(seconds=1))
    conversation = service.conversation_create(owner=user)
    send(conversation)  # yesterday's 1,000 tokens (in Shanghai) do not count today
    today = spend(user, tokens=(300, 700), when=day_start)  # thinking is part of the output
    assert refusal(lambda: send(conversation, "over")) == (
        "You have used your 1,000 tokens for today. The limit resets at 00:00 (Asia/Shanghai)."
    )
    assert not conversation.messages.filter(content="over").exists()
    # The day turns: what was today is yesterday.
    Message.objects.filter(pk=today.pk).update(created_at=day_start - timedelta(seconds=1))
    assert send(conversation, "a new day").created
    assert yesterday.conversation.messages.count() == 2


def test_tokens_per_month_are_refused_until_the_first_of_the_next_month(user, settings):
    settings.TIME_ZONE = "Asia/Shanghai"
    settings.QWENWEB_TOKENS_PER_MONTH = 5000
    windows = quotas.Windows.at(timezone.now())
    spend(user, tokens=(1000, 4000), when=windows.month_start)
    conversation = service.conversation_create(owner=user)
    resets = timezone.localtime(windows.next_month).strftime("%B %-d")
    assert refusal(lambda: send(conversation)) == (
        f"You have used your 5,000 tokens for this month. The limit resets on {resets} at 00:00 "
        "(Asia/Shanghai)."
    )
    Message.objects.filter(conversation__owner=user).update(
        created_at=windows.month_start - timedelta(seconds=1)
    )
    assert send(conversation).created


def test_cost_per_month_counts_the_sites_currency_only(user, settings):
    settings.QWENWEB_COST_PER_MONTH = Decimal("2.50")
    spend(user, tokens=(10, 10), cost="2.00")
    spend(user, tokens=(10, 10), cost="9.00", currency="USD")  # not CNY: not counted
    conversation = service.conversation_create(owner=user)
    assert send(conversation).created
    spend(user, tokens=(10, 10), cost="0.50")
    resets = timezone.localtime(quotas.Windows.at(timezone.now()).next_month).strftime("%B %-d")
    assert refusal(lambda: send(conversation)) == (
        f"Your replies have cost the ¥2.50 allowed for this month. The limit resets on {resets} "
        "at 00:00 (UTC)."
    )
    settings.QWENWEB_CURRENCY = "USD"  # now the other way round: 9.00 USD is over 2.50
    assert "have cost the $2.50 allowed" in refusal(lambda: send(conversation))


def test_regenerate_edit_and_continue_are_refused_over_a_quota(user, settings):
    conversation = service.conversation_create(owner=user)
    first = send(conversation)
    Message.objects.filter(pk=first.assistant_message.pk).update(
        status="stopped", content="Once upon", input_tokens=50, output_tokens=60
    )
    settings.QWENWEB_TOKENS_PER_DAY = 100
    for start in [
        lambda: service.reply_regenerate(conversation=conversation),
        lambda: service.reply_edit(
            conversation=conversation, message_id=first.user_message.pk, content="again"
        ),
        lambda: service.reply_continue(conversation=conversation),
    ]:
        assert "your 100 tokens for today" in refusal(start)
    assert conversation.messages.count() == 2
    assert conversation.messages.get(pk=first.assistant_message.pk).status == "stopped"


# -- who sets the limit -----------------------------------------------------------------------


def test_the_user_beats_their_groups_which_beat_the_site(user, settings):
    settings.QWENWEB_TOKENS_PER_DAY = 1_000_000
    spend(user, tokens=(100, 50))
    conversation = service.conversation_create(owner=user)
    group("interns", user, tokens_per_day=100)
    assert "your 100 tokens for today" in refusal(lambda: send(conversation))
    # Of several groups, the most generous.
    group("reviewers", user, tokens_per_day=200)
    assert send(conversation).created
    group("testers", user, tokens_per_day=0)  # 0: no limit, the most generous of all
    assert quotas.user_limits(user)["tokens_per_day"] == 0
    assert send(conversation).created
    # The user's own value wins, stricter or not; blank inherits.
    quota = UserQuota.objects.create(user=user, tokens_per_day=120)
    assert "your 120 tokens for today" in refusal(lambda: send(conversation))
    quota.tokens_per_day = None
    quota.save()
    assert send(conversation).created
    Group.objects.filter(name__in=["reviewers", "testers"]).delete()
    assert "your 100 tokens for today" in refusal(lambda: send(conversation))
    quota.tokens_per_day = 0
    quota.save()
    assert send(conversation).created


def test_a_group_may_lift_or_set_the_other_limits_for_its_members(user, settings):
    settings.QWENWEB_MESSAGES_PER_MINUTE = 1
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 1
    conversation = service.conversation_create(owner=user)
    send(conversation)
    assert "limited to 1 a minute" in refusal(lambda: send(conversation))
    group("chatty", user, messages_per_minute=3)
    send(conversation)
    send(conversation)
    assert "limited to 3 a minute" in refusal(lambda: send(conversation))
    UserQuota.objects.create(user=user, messages_per_minute=0, cost_per_month=Decimal("0.01"))
    assert quotas.user_limits(user) == {
        "tokens_per_day": 0, "tokens_per_month": 0, "cost_per_month": Decimal("0.01"),
        "max_concurrent_replies": 1, "messages_per_minute": 0,
    }  # fmt: skip
    assert send(conversation).created
    spend(user, cost="0.01")
    assert "have cost the ¥0.01 allowed" in refusal(lambda: send(conversation))
    # What a settings page would show: the limits in force and what is used of them.
    load = rules.user_load(user)
    assert load.limits == quotas.user_limits(user)
    assert (load.cost_this_month, load.tokens_today) == (Decimal("0.01"), 0)


def test_the_quotas_read_only_the_windows_rows_in_the_sends_one_statement(user, settings):
    """No query of their own (the owner's load is read with the replies in the way)."""
    from django.test.utils import CaptureQueriesContext

    conversation = service.conversation_create(owner=user)
    send(conversation)
    settings.QWENWEB_TOKENS_PER_DAY = settings.QWENWEB_TOKENS_PER_MONTH = 10**9
    settings.QWENWEB_COST_PER_MONTH = Decimal(1000)
    with CaptureQueriesContext(connection) as with_quotas:
        send(conversation)
    settings.QWENWEB_TOKENS_PER_DAY = settings.QWENWEB_TOKENS_PER_MONTH = 0
    settings.QWENWEB_COST_PER_MONTH = Decimal(0)
    with CaptureQueriesContext(connection) as without:
        send(conversation)
    assert len(with_quotas.captured_queries) == len(without.captured_queries)


# -- over the socket: nothing reaches DashScope ------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_send_over_the_daily_quota_is_a_notice_and_nothing_goes_upstream(
    app_simulator, settings
):
    settings.TIME_ZONE = "Asia/Shanghai"
    settings.QWENWEB_TOKENS_PER_DAY = 200_000
    owner, conversation, ws = await open_chat()
    await sync_to_async(spend)(owner, tokens=(150_000, 50_000))
    await ws.send_to(text_data=send_frame("one more, please"))
    notice = html.unescape(await ws.receive_from(timeout=5))
    assert (
        "You have used your 200,000 tokens for today. The limit resets at 00:00 "
        "(Asia/Shanghai)." in notice
    )
    assert "composer-ack" not in notice  # the page keeps the typed text
    assert app_simulator.requests == []
    assert not await conversation.messages.aexists()
    # Tomorrow: yesterday's tokens are behind the limit.
    day_start = quotas.Windows.at(timezone.now()).day_start
    await Message.objects.filter(conversation__owner=owner).aupdate(
        created_at=day_start - timedelta(minutes=1)
    )
    await ws.send_to(text_data=send_frame("one more, please"))
    await receive_until(ws, Transcript(), lambda t: "complete" in t.status.values())
    assert len(app_simulator.requests) == 1
    await ws.disconnect()


async def _frames_refused(ws, frames: list[dict], sentence: str) -> None:
    for frame in frames:
        await ws.send_to(text_data=json.dumps({**frame, "HEADERS": {"HX-Request": "true"}}))
        notice = html.unescape(await ws.receive_from(timeout=5))
        assert sentence in notice, (frame, notice)


@sync_to_async
def _finished_and_cut_short_replies(conversation) -> tuple[int, int]:
    """A finished exchange, then one whose reply was stopped (Continue's case)."""
    Message.objects.create(conversation=conversation, role="user", content="tell me")
    Message.objects.create(
        conversation=conversation, role="assistant", content="A story.", model="qwen-plus",
        input_tokens=40, output_tokens=80,
    )  # fmt: skip
    asked = Message.objects.create(conversation=conversation, role="user", content="go on")
    Message.objects.create(
        conversation=conversation, role="assistant", content="Once upon", status="stopped",
        model="qwen-plus", input_tokens=10, output_tokens=10,
    )  # fmt: skip
    return asked.pk, conversation.messages.count()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_regenerate_edit_and_continue_frames_over_the_monthly_quotas_go_nowhere(
    app_simulator, settings
):
    owner, conversation, ws = await open_chat()
    asked, count = await _finished_and_cut_short_replies(conversation)
    settings.QWENWEB_TOKENS_PER_MONTH = 100
    frames = [
        {"type": "regenerate"},
        {"type": "continue"},
        {"type": "edit", "message_id": asked, "content": "go on, then",
         "client_message_id": str(uuid.uuid4())},
    ]  # fmt: skip
    await _frames_refused(ws, frames, "You have used your 100 tokens for this month.")
    settings.QWENWEB_TOKENS_PER_MONTH = 0
    settings.QWENWEB_COST_PER_MONTH = Decimal(1)
    await sync_to_async(spend)(owner, cost="1.00")
    await _frames_refused(ws, frames, "Your replies have cost the ¥1.00 allowed for this month.")
    assert app_simulator.requests == []
    assert await conversation.messages.acount() == count
    await ws.disconnect()


# -- who may use which model and prompt -------------------------------------------------------


def test_a_chat_whose_model_was_taken_from_the_user_is_refused_saying_which_they_may_use(user):
    conversation = service.conversation_create(owner=user)  # Qwen-Plus, before the policy
    interns = group("interns", user, models=["qwen-flash", "qwen-max"])
    sentence = (
        "Qwen-Plus is not available to you. Pick one of these at the top of the chat: {}."
    ).format(", ".join(m.label for m in quotas.allowed_models(user)))
    assert "Qwen-Max" in sentence and "Qwen-Flash" in sentence
    assert refusal(lambda: send(conversation)) == sentence
    assert not conversation.messages.exists()
    # Another group of the user's allowing it: the union of the two lists.
    group("writers", user, models=["qwen-plus"])
    assert send(conversation).created
    interns.user_set.clear()
    Group.objects.filter(name="writers").delete()
    assert send(conversation).created  # no restricting group left: every model


def test_new_chats_start_with_the_users_then_the_groups_then_the_catalogs_defaults(user):
    flash, plus = (
        ModelProfile.objects.get(name="qwen-flash"),
        ModelProfile.objects.get(name="qwen-plus"),
    )
    friendly = SystemPrompt.objects.create(name="Friendly", text="Be friendly.")
    strict = SystemPrompt.objects.create(name="Strict", text="Be strict.")
    interns = group("interns", user, models=["qwen-flash", "qwen-max"], prompts=[friendly, strict])
    chat = service.conversation_create(owner=user)
    assert chat.model == ModelProfile.objects.filter(name__in=["qwen-flash", "qwen-max"]).default()
    assert chat.system_prompt in (friendly, strict)  # restricted: never none
    GroupPolicy.objects.filter(group=interns).update(
        default_model=flash, default_system_prompt=strict
    )
    chat = service.conversation_create(owner=user)
    assert (chat.model, chat.system_prompt) == (flash, strict)
    # The user's own default wins, if they may use it.
    Preferences.objects.create(user=user, default_model=plus, default_system_prompt=friendly)
    chat = service.conversation_create(owner=user)
    assert (chat.model, chat.system_prompt) == (flash, friendly)
    Preferences.objects.filter(user=user).update(
        default_model=ModelProfile.objects.get(name="qwen-max")
    )
    assert service.conversation_create(owner=user).model.name == "qwen-max"
    assert "is not available to you" in refusal(
        lambda: service.conversation_create(owner=user, model=plus)
    )


def test_the_pickers_show_only_the_models_and_prompts_the_user_may_use(user, client):
    friendly = SystemPrompt.objects.create(name="Friendly", text="Be friendly.")
    SystemPrompt.objects.create(name="Pirate", text="Arr.")
    conversation = service.conversation_create(owner=user)
    group("interns", user, models=["qwen-flash", "qwen-max"], prompts=[friendly])
    client.force_login(user)

    def offered(page: str) -> set[str]:
        import re

        return set(re.findall(r'<option value="\d+" data-model="([\w.-]+)"', page))

    home = client.get("/").content.decode()
    assert offered(home) == {"qwen-flash", "qwen-max"}
    chat = client.get(conversation.get_absolute_url()).content.decode()
    # The chat's own model stays in view, not to be picked again.
    assert offered(chat) == {"qwen-plus", "qwen-flash", "qwen-max"}
    assert f'<option value="{conversation.model_id}" data-model="qwen-plus"' in chat
    plus_option = chat.split('data-model="qwen-plus"')[1].split(">")[0]
    assert " disabled" in plus_option
    assert ">Friendly</option>" in chat and ">Pirate</option>" not in chat
    assert '<option value="">None</option>' not in chat
    page = client.get("/settings/").content.decode()
    assert "Qwen-Flash" in page and "Qwen-Plus" not in page
    assert "Friendly" in page and "Pirate" not in page


def test_a_forbidden_model_or_prompt_posted_is_an_error_beside_its_field(user, client):
    pirate = SystemPrompt.objects.create(name="Pirate", text="Arr.")
    friendly = SystemPrompt.objects.create(name="Friendly", text="Be friendly.")
    conversation = service.conversation_create(owner=user)
    group("interns", user, models=["qwen-flash"], prompts=[friendly])
    client.force_login(user)
    url = f"/c/{conversation.id}/settings/"
    response = client.post(url, {"model": "qwen-max"}, headers={"HX-Request": "true"})
    assert response.status_code == 400
    page = html.unescape(response.content.decode())
    assert '<p class="field-error" id="error-model" role="alert">Qwen-Max is not available' in page
    response = client.post(url, {"system_prompt": str(pirate.pk), "open": "1"})
    assert response.status_code == 400
    assert 'id="error-system_prompt"' in response.content.decode()
    assert client.post(url, {"system_prompt": "", "open": "1"}).status_code == 400  # no "none"
    conversation.refresh_from_db()
    assert conversation.model.name == "qwen-plus"
    assert conversation.system_prompt == SystemPrompt.objects.get(is_default=True)
    assert client.post(url, {"model": "qwen-flash"}).status_code == 200
    assert client.post(url, {"system_prompt": str(friendly.pk), "open": "1"}).status_code == 200
    # /settings/ and a new chat, with a forged model.
    max_pk = ModelProfile.objects.get(name="qwen-max").pk
    response = client.post("/settings/", {"default_model": max_pk, "default_preset": ""})
    assert response.status_code == 400
    assert not Preferences.objects.filter(user=user, default_model=max_pk).exists()
    before = Conversation.objects.count()
    response = client.post("/c/new/", {"model": max_pk, "content": "keep me"})
    assert response.status_code == 400
    page = html.unescape(response.content.decode())
    assert "Qwen-Max is not available to you." in page and "keep me</textarea>" in page
    assert Conversation.objects.count() == before


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_forged_frames_in_a_chat_of_a_model_not_allowed_are_refused(app_simulator):
    owner, conversation, ws = await open_chat()  # Qwen-Plus
    asked, count = await _finished_and_cut_short_replies(conversation)
    await sync_to_async(group)("interns", owner, models=["qwen-flash"])
    frames = [
        json.loads(send_frame("hello")),
        {"type": "regenerate"},
        {"type": "continue"},
        {"type": "edit", "message_id": asked, "content": "go on, then",
         "client_message_id": str(uuid.uuid4())},
    ]  # fmt: skip
    await _frames_refused(ws, frames, "Qwen-Plus is not available to you.")
    assert app_simulator.requests == []
    assert await conversation.messages.acount() == count
    # And a forged model name in a frame is no way round it: the chat's model is the one used.
    await ws.send_to(text_data=json.dumps({**json.loads(send_frame("hi")), "model": "qwen-flash"}))
    assert "Qwen-Plus is not available to you." in html.unescape(await ws.receive_from(timeout=5))
    assert app_simulator.requests == []
    await ws.disconnect()
    # Once the chat is on a model of theirs, it goes.
    await Conversation.objects.filter(pk=conversation.pk).aupdate(
        model=await ModelProfile.objects.aget(name="qwen-flash")
    )
    ws, _connected, _code = await connect(owner, conversation)
    await ws.send_to(text_data=send_frame("now then"))
    await receive_until(ws, Transcript(), lambda t: "complete" in t.status.values())
    assert [r.body["model"] for r in app_simulator.requests] == ["qwen-flash"]
    await ws.disconnect()


def test_an_admin_limits_the_interns_to_two_models_and_200000_tokens_a_day(admin_client):
    """The issue's "done when", in the admin's own forms: the group page, its policy inline."""
    ids = [str(ModelProfile.objects.get(name=name).pk) for name in ("qwen-flash", "qwen-max")]
    response = admin_client.post(
        "/admin/auth/group/add/",
        {
            "name": "interns",
            "policy-TOTAL_FORMS": "1", "policy-INITIAL_FORMS": "0",
            "policy-MIN_NUM_FORMS": "0", "policy-MAX_NUM_FORMS": "1",
            "policy-0-tokens_per_day": "200000",
            "policy-0-allowed_models": ids,
            "policy-0-default_model": ids[0],
        },
    )  # fmt: skip
    assert response.status_code == 302, response.content.decode()[:3000]
    policy = GroupPolicy.objects.get(group__name="interns")
    assert policy.tokens_per_day == 200_000 and policy.tokens_per_month is None
    assert {m.name for m in policy.allowed_models.all()} == {"qwen-flash", "qwen-max"}
    # A default outside the allowed list is an error beside it.
    plus = str(ModelProfile.objects.get(name="qwen-plus").pk)
    response = admin_client.post(
        "/admin/auth/group/add/",
        {
            "name": "others",
            "policy-TOTAL_FORMS": "1", "policy-INITIAL_FORMS": "0",
            "policy-MIN_NUM_FORMS": "0", "policy-MAX_NUM_FORMS": "1",
            "policy-0-allowed_models": ids, "policy-0-default_model": plus,
        },
    )  # fmt: skip
    assert response.status_code == 200
    assert "Choose one of the allowed ones, or allow it." in response.content.decode()
    # And a user's own quota, on their page.
    page = admin_client.get(f"/admin/auth/user/{get_user_model().objects.get().pk}/change/")
    assert "quota-0-tokens_per_day" in page.content.decode()


# -- across two server processes, on PostgreSQL -----------------------------------------------


def _in_the_team(deployment, code: str) -> None:
    """Run Python against the team's database, as `manage.py shell` does."""
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT, env=deployment.env, check=True, capture_output=True,
    )  # fmt: skip


@pytest.mark.services
def test_a_groups_limits_hold_across_two_processes(team, app_simulator):  # noqa: F811
    """tess is an intern; the interns' policy (set as an admin would, in the database the two
    processes share) allows 3 messages a minute and no limit on replies at once. Six of her
    tabs, three on each process, send at the same moment: three replies start, three tabs are
    told why. Then the interns get 1,000 tokens a day, which her replies have used: every tab,
    on either process, is refused, and DashScope hears nothing more."""
    import asyncio

    from tests.test_faults import LONG_REPLY, Tab, new_team_chat, open_team_chat, sent, until

    _in_the_team(
        team,
        "from django.contrib.auth.models import Group, User\n"
        "from conversations.models import GroupPolicy\n"
        "interns = Group.objects.create(name='interns')\n"
        "interns.user_set.add(User.objects.get(username='tess'))\n"
        "GroupPolicy.objects.create(group=interns, messages_per_minute=3,"
        " max_concurrent_replies=0)\n",
    )
    app_simulator.add_scenario(Scenario(match="at once", reply=LONG_REPLY, token_delay=0.02))
    url_a, url_b = team
    client, path, cookie = open_team_chat(url_a)
    paths = [path, *(new_team_chat(client, url_a) for _ in range(5))]

    def alerts(tab: Tab) -> list[str]:
        return [html.unescape(f) for f in tab.page.frames if 'role="alert"' in f]

    async def scenario() -> tuple[list[Tab], int]:
        tabs = [await Tab((url_a, url_b)[i % 2], p, cookie).open() for i, p in enumerate(paths)]
        await asyncio.gather(*(tab.send(**sent("all at once")) for tab in tabs))
        await until(
            lambda: sum(bool(tab.newest_reply()) or bool(alerts(tab)) for tab in tabs) == 6,
            "every tab's answer", tuple(tabs),
        )  # fmt: skip
        for tab in tabs:
            if tab.newest_reply():
                await tab.send(type="stop")
        started = [tab for tab in tabs if tab.newest_reply()]
        await until(
            lambda: all(tab.statuses(tab.newest_reply())[-1] == "stopped" for tab in started),
            "the stops", tuple(tabs),
        )  # fmt: skip
        asked = len(app_simulator.requests)
        await asyncio.to_thread(
            _in_the_team, team,
            "from conversations.models import GroupPolicy, Message\n"
            "GroupPolicy.objects.update(messages_per_minute=0, tokens_per_day=1000)\n"
            "Message.objects.filter(role='assistant')"
            ".update(input_tokens=300, output_tokens=300)\n",
        )  # fmt: skip
        before = [len(alerts(tab)) for tab in tabs]
        await asyncio.gather(*(tab.send(**sent("once more")) for tab in tabs))
        await until(
            lambda: all(len(alerts(t)) > n for t, n in zip(tabs, before, strict=True)),
            "every tab's refusal", tuple(tabs),
        )  # fmt: skip
        for tab in tabs:
            await tab.close()
        return tabs, asked

    tabs, asked = asyncio.run(scenario())
    app_simulator.clear_scenarios()
    started = [tab for tab in tabs if tab.newest_reply()]
    assert len(started) == 3
    told = [tab for tab in tabs if not tab.newest_reply()]
    for tab in told:
        assert "Messages are limited to 3 a minute." in alerts(tab)[0]
    for tab in tabs:
        assert (
            "You have used your 1,000 tokens for today. The limit resets at 00:00"
            in alerts(tab)[-1]
        )
    assert len(app_simulator.requests) == asked


def test_the_settings_page_shows_what_is_left_of_each_quota_and_when_it_resets(user, client):
    client.force_login(user)
    page = client.get("/settings/").content.decode()
    assert 'id="quotas"' not in page  # no limit is on: nothing to show
    group("interns", user, tokens_per_day=200_000, cost_per_month=Decimal("5"))
    spend(user, tokens=(150_000, 50_000), cost="5.10")
    spend(get_user_model().objects.create_user("other"), tokens=(9, 9))  # not theirs
    page = client.get("/settings/").content.decode()
    day = page[page.index('data-quota="tokens_per_day"') :].split("</tr>")[0]
    assert "200,000" in day and "data-exhausted" in day and "<td data-quota-left>0</td>" in day
    resets = quotas.Windows.at(timezone.now()).next_day.isoformat()
    assert f'datetime="{resets}"' in day
    cost = page[page.index('data-quota="cost_per_month"') :].split("</tr>")[0]
    assert "¥5.00" in cost and "<td data-quota-left>¥0.00</td>" in cost
    assert 'data-quota="tokens_per_month"' not in page  # that limit is off
    GroupPolicy.objects.filter(group__name="interns").update(tokens_per_day=500_000)
    page = client.get("/settings/").content.decode()
    day = page[page.index('data-quota="tokens_per_day"') :].split("</tr>")[0]
    assert "<td data-quota-left>300,000</td>" in day and "data-exhausted" not in day
