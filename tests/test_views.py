"""Pages and partials: login, ownership, the conversation list, rename, delete, export."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client

from conversations.models import Conversation, Message, MessageImage, ModelProfile
from conversations.replies import branches
from conversations.replies.service import conversation_create
from tests.ws_support import wait_for_status

pytestmark = pytest.mark.django_db


@pytest.fixture
def bob():
    return get_user_model().objects.create_user("bob", password="pw")


def test_pages_need_a_login(client, alice):
    conversation = conversation_create(owner=alice)
    for url in ["/", f"/c/{conversation.id}/", f"/c/{conversation.id}/export.json"]:
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    assert client.post("/c/new/").status_code == 302


def test_healthz_is_public_and_reports_its_dependencies(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["channel_layer"] == "ok"


def test_login_page_has_username_and_password_fields(client):
    html = client.get("/accounts/login/").content.decode()
    assert 'name="username"' in html and 'name="password"' in html


def test_home_lists_only_my_conversations_newest_first(alice_client, alice, bob):
    older = conversation_create(owner=alice)
    Conversation.objects.filter(pk=older.pk).update(title="Older chat")
    newer = conversation_create(owner=alice)
    Conversation.objects.filter(pk=newer.pk).update(title="Newer chat")
    theirs = conversation_create(owner=bob)
    Conversation.objects.filter(pk=theirs.pk).update(title="Bob's secret")
    html = alice_client.get("/").content.decode()
    assert html.index("Newer chat") < html.index("Older chat")
    assert "Bob&#x27;s secret" not in html and "Bob's secret" not in html
    assert 'id="composer"' in html and 'name="content"' in html


def test_offline_demo_is_labelled_on_every_page(alice_client, settings):
    settings.DASHSCOPE_API_KEY = ""
    assert "Offline demo" in alice_client.get("/").content.decode()
    settings.DASHSCOPE_API_KEY = "sk-real"
    assert "Offline demo" not in alice_client.get("/").content.decode()


def test_new_creates_an_empty_conversation_and_redirects(alice_client, alice):
    response = alice_client.post("/c/new/")
    conversation = Conversation.objects.get(owner=alice)
    assert response.status_code == 302
    assert response["Location"] == f"/c/{conversation.id}/"
    assert conversation.model == ModelProfile.objects.default()
    assert conversation.system_prompt is not None


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_first_message_on_home_creates_the_conversation_and_starts_the_reply():
    user = await get_user_model().objects.acreate_user("carol", password="pw")
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.post("/c/new/", {"content": "Hi from the home page"})
    conversation = await Conversation.objects.aget(owner=user)
    assert response.status_code == 302
    assert response["Location"] == f"/c/{conversation.id}/"
    assert conversation.title == "Hi from the home page"
    reply = await Message.objects.filter(conversation=conversation, role="assistant").afirst()
    reply = await wait_for_status(reply.pk, {"complete"})
    assert reply.content


def test_too_long_first_message_is_refused_and_kept_in_the_composer(alice_client, settings):
    settings.QWENWEB_MAX_MESSAGE_CHARS = 10
    response = alice_client.post("/c/new/", {"content": "a message that is too long"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "too long" in html
    assert "a message that is too long</textarea>" in html
    assert not Conversation.objects.exists()


def test_foreign_conversation_is_404_on_every_route(alice_client, bob):
    theirs = conversation_create(owner=bob)
    base = f"/c/{theirs.id}/"
    for url in [base, base + "export.json", base + "export.md"]:
        assert alice_client.get(url).status_code == 404, url
    for url in [base + "rename/", base + "delete/", base + "settings/"]:
        assert alice_client.post(url, {"title": "x", "model": 1}).status_code == 404, url
    theirs.refresh_from_db()
    assert theirs.title == ""


def test_chat_page_renders_messages_with_the_dom_contract(alice_client, alice):
    conversation = conversation_create(owner=alice)
    user_message = Message.objects.create(conversation=conversation, role="user", content="Hi")
    reply = Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="**Hello** <script>alert(1)</script>",
        model="qwen-plus",
    )
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert f'<article id="message-{user_message.pk}"' in html
    assert f'id="message-{reply.pk}-body"' in html
    assert 'data-role="assistant" data-status="complete"' in html
    assert "<strong>Hello</strong>" in html
    assert "<script>alert(1)</script>" not in html
    assert f'ws-connect="/ws/c/{conversation.id}/"' in html


def test_streaming_message_shows_a_stop_button(alice_client, alice):
    conversation = conversation_create(owner=alice)
    Message.objects.create(conversation=conversation, role="assistant", status="streaming")
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert 'data-action="stop"' in html


def test_rename(alice_client, alice):
    conversation = conversation_create(owner=alice)
    response = alice_client.post(
        f"/c/{conversation.id}/rename/", {"title": "  Trip   plans "}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert conversation.title == "Trip plans"
    assert "Trip plans" in response.content.decode()


def test_delete(alice_client, alice):
    conversation = conversation_create(owner=alice)
    response = alice_client.post(f"/c/{conversation.id}/delete/")
    assert response.status_code == 302
    assert not Conversation.objects.filter(pk=conversation.pk).exists()


def test_model_picker_offers_enabled_models_and_refuses_others(alice_client, alice):
    conversation = conversation_create(owner=alice)
    disabled = ModelProfile.objects.filter(enabled=False).first()
    enabled = ModelProfile.objects.enabled().exclude(pk=conversation.model_id).first()
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert enabled.label in html and disabled.label not in html
    response = alice_client.post(f"/c/{conversation.id}/settings/", {"model": disabled.pk})
    assert response.status_code == 400
    response = alice_client.post(f"/c/{conversation.id}/settings/", {"model": enabled.pk})
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert conversation.model == enabled


def test_export_json(alice_client, alice):
    conversation = conversation_create(owner=alice)
    Message.objects.create(conversation=conversation, role="user", content="Question?")
    Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="Answer.",
        model="qwen-plus",
        finish_reason="stop",
        request_id="req-1",
        input_tokens=5,
        output_tokens=2,
    )
    response = alice_client.get(f"/c/{conversation.id}/export.json")
    assert response["Content-Type"] == "application/json"
    assert "attachment" in response["Content-Disposition"]
    data = json.loads(response.content)
    assert data["messages"][1] == {
        **data["messages"][1],
        "role": "assistant",
        "content": "Answer.",
        "status": "complete",
        "model": "qwen-plus",
        "finish_reason": "stop",
        "usage": {"input_tokens": 5, "output_tokens": 2, "reasoning_tokens": None},
        "cost": None,
        "request_id": "req-1",
    }
    assert "created_at" in data["messages"][0]


def test_export_markdown(alice_client, alice):
    conversation = conversation_create(owner=alice)
    Conversation.objects.filter(pk=conversation.pk).update(title="Notes")
    Message.objects.create(conversation=conversation, role="user", content="Question & answer")
    response = alice_client.get(f"/c/{conversation.id}/export.md")
    text = response.content.decode()
    assert response["Content-Type"].startswith("text/markdown")
    assert text.startswith("# Notes")
    assert "Question & answer" in text


def test_chinese_interface(alice_client):
    html = alice_client.get("/", HTTP_ACCEPT_LANGUAGE="zh-CN,zh;q=0.9").content.decode()
    assert 'lang="zh-hans"' in html
    assert "新对话" in html and "发送" in html


def test_the_sign_in_page_switches_language_before_signing_in():
    """Someone who cannot read English switches the sign-in page to Chinese: the form is on it,
    it takes an anonymous visitor (with the CSRF token of the page, not without), and the page
    comes back in Chinese."""
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    page = client.get("/accounts/login/").content.decode()
    assert 'class="lang-form"' in page and 'action="/i18n/setlang/"' in page
    choose = {"language": "zh-hans", "next": "/accounts/login/"}
    assert client.post("/i18n/setlang/", choose).status_code == 403
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post("/i18n/setlang/", {**choose, "csrfmiddlewaretoken": token})
    assert (response.status_code, response["Location"]) == (302, "/accounts/login/")
    page = client.get("/accounts/login/").content.decode()
    assert 'lang="zh-hans"' in page and "登录" in page
    assert client.get("/").status_code == 302, "the chats still need a sign-in"


def test_first_message_with_an_image_for_a_text_model_is_refused_and_kept(alice_client):
    response = alice_client.post(
        "/c/new/",
        {"content": "What is this?", "image_urls": "https://example.com/cat.png",
         "model": ModelProfile.objects.get(name="qwen-plus").pk},
    )  # fmt: skip
    assert response.status_code == 400
    html = response.content.decode()
    assert "cannot see images" in html
    assert "https://example.com/cat.png</textarea>" in html
    assert not Conversation.objects.exists()


def test_non_numeric_model_is_refused_not_a_crash(alice_client, alice):
    conversation = conversation_create(owner=alice)
    response = alice_client.post(f"/c/{conversation.id}/settings/", {"model": "abc"})
    assert response.status_code == 400
    assert alice_client.post("/c/new/", {"model": "abc"}).status_code == 302


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_double_submit_on_home_opens_the_same_chat():
    user = await get_user_model().objects.acreate_user("dave", password="pw")
    client = AsyncClient()
    await client.aforce_login(user)
    form = {"content": "hello", "client_message_id": "5f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"}
    first = await client.post("/c/new/", form)
    second = await client.post("/c/new/", form)
    assert first["Location"] == second["Location"]
    assert await Conversation.objects.filter(owner=user).acount() == 1
    reply = await Message.objects.filter(conversation__owner=user, role="assistant").afirst()
    await wait_for_status(reply.pk, {"complete"})


def test_long_chat_shows_the_newest_messages_and_loads_earlier_ones(alice_client, alice):
    conversation = conversation_create(owner=alice)
    Message.objects.bulk_create(
        Message(conversation=conversation, role="user", content=f"message number {i}")
        for i in range(250)
    )
    branches.link_in_order(conversation)
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert html.count("<article") == 100
    assert "message number 249" in html and "message number 149<" not in html
    assert 'id="earlier-messages"' in html
    first_shown = Message.objects.filter(conversation=conversation).order_by("-pk")[99].pk
    earlier = alice_client.get(f"/c/{conversation.id}/messages/?before={first_shown}")
    page = earlier.content.decode()
    assert page.count("<article") == 100
    assert "message number 149<" in page and "message number 50<" in page
    assert "message number 49<" not in page
    assert 'id="earlier-messages"' in page
    last_page = alice_client.get(
        f"/c/{conversation.id}/messages/?before="
        f"{Message.objects.filter(conversation=conversation).order_by('-pk')[199].pk}"
    ).content.decode()
    assert last_page.count("<article") == 50
    assert 'id="earlier-messages"' not in last_page


def test_earlier_messages_of_a_foreign_chat_are_404(alice_client, bob):
    theirs = conversation_create(owner=bob)
    assert alice_client.get(f"/c/{theirs.id}/messages/?before=1").status_code == 404


def test_image_urls_show_on_the_users_message(alice_client, alice):
    conversation = conversation_create(owner=alice)
    question = Message.objects.create(conversation=conversation, role="user", content="look")
    MessageImage.objects.create(message=question, url="https://example.com/cat.png")
    html = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert 'href="https://example.com/cat.png"' in html


FORGED_MODEL_IDS = ["999999", "-1", "0", "1.5", "1 OR 1=1", "qwen-maxx", "", "[1]", "0x1"]


def test_settings_refuse_disabled_unknown_and_forged_model_ids(alice_client, alice):
    conversation = conversation_create(owner=alice)
    disabled = ModelProfile.objects.filter(enabled=False).first()
    for value in [disabled.pk, *FORGED_MODEL_IDS]:
        response = alice_client.post(f"/c/{conversation.id}/settings/", {"model": value})
        assert response.status_code == 400, value
        conversation.refresh_from_db()
        assert conversation.model == ModelProfile.objects.default(), value
    # A model the admin disables after it was picked cannot be picked again.
    qwen_max = ModelProfile.objects.get(name="qwen-max")
    response = alice_client.post(f"/c/{conversation.id}/settings/", {"model": qwen_max.pk})
    assert response.status_code == 200
    ModelProfile.objects.filter(pk=qwen_max.pk).update(enabled=False)
    other = conversation_create(owner=alice)
    response = alice_client.post(f"/c/{other.id}/settings/", {"model": qwen_max.pk})
    assert response.status_code == 400


def test_a_new_chat_never_gets_a_disabled_unknown_or_forged_model(alice_client, alice):
    disabled = ModelProfile.objects.filter(enabled=False).first()
    for value in [disabled.pk, *FORGED_MODEL_IDS]:
        response = alice_client.post("/c/new/", {"model": value})
        assert response.status_code == 302, value
    models = set(Conversation.objects.filter(owner=alice).values_list("model", flat=True))
    assert models == {ModelProfile.objects.default().pk}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_first_message_over_a_limit_is_refused_and_kept(settings):
    settings.QWENWEB_MESSAGES_PER_MINUTE = 1
    user = await get_user_model().objects.acreate_user("erin", password="pw")
    client = AsyncClient()
    await client.aforce_login(user)
    await client.post("/c/new/", {"content": "the first"})
    reply = await Message.objects.filter(conversation__owner=user, role="assistant").afirst()
    await wait_for_status(reply.pk, {"complete"})
    response = await client.post("/c/new/", {"content": "the second, too soon"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "Messages are limited to 1 a minute" in html
    assert "the second, too soon</textarea>" in html
    assert await Conversation.objects.filter(owner=user).acount() == 1


@pytest.mark.django_db
def test_every_stopped_or_interrupted_reply_offers_a_way_to_finish_it(alice_client, alice):
    """One click, whatever the crash: Continue on a reply with text, Try again on one
    without (both send {"type": "continue"} over the socket)."""
    conversation = conversation_create(owner=alice)
    replies = {}
    for status, content in [("interrupted", ""), ("stopped", ""), ("interrupted", "Half")]:
        Message.objects.create(conversation=conversation, role="user", content="q")
        replies[status, content] = Message.objects.create(
            conversation=conversation, role="assistant", status=status, content=content,
            model="qwen-plus",
        )  # fmt: skip
    page = alice_client.get(conversation.get_absolute_url()).content.decode()
    for (_status, content), reply in replies.items():
        article = re.search(rf'<article id="message-{reply.pk}".*?</article>', page, re.S)
        assert article, reply
        button = re.search(r'<button[^>]*data-action="continue"[^>]*>([^<]*)<', article.group())
        assert button, reply
        assert button.group(1) == ("Continue" if content else "Try again")


def test_each_message_shows_when_it_was_written(alice_client, alice, settings):
    from django.utils import translation

    conversation = conversation_create(owner=alice)
    question = Message.objects.create(conversation=conversation, role="user", content="When?")
    Message.objects.create(conversation=conversation, role="assistant", content="Now.")
    page = alice_client.get(f"/c/{conversation.id}/").content.decode()
    stamp = question.created_at.isoformat()[:19]
    assert page.count('<time class="message__time') == 2
    assert f'datetime="{stamp}' in page
    with translation.override("zh-hans"):
        chinese = alice_client.get(
            f"/c/{conversation.id}/", headers={"Accept-Language": "zh-hans"}
        ).content.decode()
    assert "年" in chinese.split('class="message__time')[1][:80], "localized"


def test_a_reply_is_rated_with_an_optional_comment_and_the_rating_is_exported(alice_client, alice):
    import json

    conversation = conversation_create(owner=alice)
    question = Message.objects.create(conversation=conversation, role="user", content="Q")
    reply = Message.objects.create(conversation=conversation, role="assistant", content="A")
    url = f"/c/{conversation.id}/messages/{reply.pk}/rating/"
    response = alice_client.post(url, {"rating": "1"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert 'data-action="rate-up" ' in response.content.decode()
    assert 'aria-pressed="true" aria-label="Good reply"' in response.content.decode()
    alice_client.post(url, {"comment": "Clear and \x00short."})
    reply.refresh_from_db()
    assert (reply.rating, reply.rating_comment) == (1, "Clear and short.")
    alice_client.post(url, {"rating": "-1"})
    reply.refresh_from_db()
    assert reply.rating == -1 and reply.rating_comment == "Clear and short."
    export = json.loads(alice_client.get(f"/c/{conversation.id}/export.json").content)
    assert export["messages"][1]["rating"] == -1
    assert export["messages"][1]["rating_comment"] == "Clear and short."
    alice_client.post(url, {"rating": "0"})
    reply.refresh_from_db()
    assert (reply.rating, reply.rating_comment) == (None, "")
    assert alice_client.post(url, {"rating": "5"}).status_code == 400
    assert alice_client.post(url, {"rating": "1", "comment": "x" * 2001}).status_code == 400
    reply.refresh_from_db()
    assert reply.rating is None, "an invalid post changes nothing"
    question_url = f"/c/{conversation.id}/messages/{question.pk}/rating/"
    assert alice_client.post(question_url, {"rating": "1"}).status_code == 404


def test_the_chat_list_pages_beyond_its_newest_200(alice_client, alice, django_user_model):
    import re

    from django.utils import timezone

    now = timezone.now()
    chats = Conversation.objects.bulk_create(
        [
            Conversation(owner=alice, title=f"chat {i:03}", model=ModelProfile.objects.default(),
                         updated_at=now - timedelta(minutes=i))
            for i in range(205)
        ]
    )  # fmt: skip
    bob = django_user_model.objects.create_user("bob", password="pw")
    Conversation.objects.create(
        owner=bob, title="bob's", model=ModelProfile.objects.default(), updated_at=now
    )
    home = alice_client.get("/").content.decode()
    shown = re.findall(r'class="sidebar__item[^"]*"[^>]*>(chat \d+)<', home)
    assert shown == [f"chat {i:03}" for i in range(200)]
    more = re.search(r'id="more-conversations" hx-get="([^"]+)"', home)
    older = alice_client.get(more[1].replace("&amp;", "&"))
    assert older.status_code == 200
    rest = re.findall(r'class="sidebar__item[^"]*"[^>]*>(chat \d+)<', older.content.decode())
    assert rest == [f"chat {i:03}" for i in range(200, 205)]
    assert "more-conversations" not in older.content.decode()
    assert "bob's" not in home + older.content.decode()
    assert alice_client.get("/c/?before=yesterday&id=x").status_code == 400
    assert len(chats) == 205


def test_search_finds_ones_own_chats_by_title_or_message_with_the_passage_marked(
    alice_client, alice, django_user_model
):
    first = conversation_create(owner=alice)
    Conversation.objects.filter(pk=first.pk).update(title="Holiday plans")
    second = conversation_create(owner=alice)
    Message.objects.create(
        conversation=second, role="user", content="Tell me about the <b>Fibonacci</b> numbers"
    )
    bob = django_user_model.objects.create_user("bob", password="pw")
    theirs = conversation_create(owner=bob)
    Message.objects.create(conversation=theirs, role="user", content="fibonacci secrets of bob")
    page = alice_client.get("/search/?q=fibonacci").content.decode()
    assert f'href="/c/{second.id}/"' in page and "secrets of bob" not in page
    assert "about the &lt;b&gt;<mark>Fibonacci</mark>&lt;/b&gt; numbers" in page, "escaped"
    page = alice_client.get("/search/?q=HOLIDAY").content.decode()
    assert f'href="/c/{first.id}/"' in page and f'href="/c/{second.id}/"' not in page
    fragment = alice_client.get(
        "/search/?q=nothing-like-this",
        headers={"HX-Request": "true", "HX-Target": "search-results"},
    ).content.decode()
    assert fragment.lstrip().startswith('<div id="search-results"')
    assert "No chat contains “nothing-like-this”." in fragment
    assert alice_client.get("/search/").status_code == 200


@pytest.mark.django_db
def test_not_found_is_a_friendly_page_inside_the_app(alice_client):
    response = alice_client.get(f"/c/{uuid.uuid4()}/")
    assert response.status_code == 404
    html = response.content.decode()
    assert "This page is not here" in html and 'href="/"' in html and "Back to your chats" in html
    assert "app.css" in html and "skip-link" in html


def test_the_server_error_page_needs_no_request_and_leads_back():
    from django.template.loader import render_to_string

    html = render_to_string("500.html")
    assert "Something went wrong on this server" in html and 'href="/"' in html
    assert "<script" not in html, "no script: a 500 page has no CSP nonce to give one"


# -- the notice that conversations may be reviewed ----------------------------------------------


@pytest.mark.django_db
def test_users_are_told_their_conversations_may_be_reviewed(client, alice_client, alice):
    sign_in = Client().get("/accounts/login/").content.decode()
    assert 'id="review-notice"' in sign_in and "may be read by its administrators" in sign_in
    assert 'id="review-notice"' in alice_client.get("/").content.decode()
    chat = conversation_create(owner=alice)
    assert 'id="review-notice"' in alice_client.get(chat.get_absolute_url()).content.decode()


@pytest.mark.django_db
def test_the_review_notice_is_a_setting_and_empty_turns_it_off(alice_client, settings):
    settings.QWENWEB_REVIEW_NOTICE = "Chats here are reviewed by the IT team."
    assert "Chats here are reviewed by the IT team." in alice_client.get("/").content.decode()
    assert "reviewed by the IT team" in Client().get("/accounts/login/").content.decode()
    settings.QWENWEB_REVIEW_NOTICE = ""
    assert 'id="review-notice"' not in alice_client.get("/").content.decode()
    assert 'id="review-notice"' not in Client().get("/accounts/login/").content.decode()


def test_the_default_review_notice_is_translated_on_each_page():
    from django.utils.functional import Promise

    from qwenweb import settings as project_settings

    # Lazy: rendered in each page's language (gettext), not in the language of start-up.
    assert isinstance(project_settings.QWENWEB_REVIEW_NOTICE, Promise)
