"""The admin: catalog and prompts for admins, read-only review for reviewers."""

import json
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.forms.models import model_to_dict

from conversations.models import Conversation, Message, MessageImage, ModelProfile
from conversations.replies.service import conversation_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation():
    owner = get_user_model().objects.create_user("alice", password="pw")
    conversation = conversation_create(owner=owner)
    question = Message.objects.create(conversation=conversation, role="user", content="A cat?")
    MessageImage.objects.create(message=question, url="https://example.com/cat.png")
    Message.objects.create(conversation=conversation, role="assistant", content="A cat.")
    return conversation


def test_admin_pages_load_for_a_superuser(admin_client, conversation):
    for url in [
        "/admin/conversations/modelprofile/",
        "/admin/conversations/systemprompt/",
        "/admin/conversations/conversation/",
        f"/admin/conversations/conversation/{conversation.pk}/change/",
        "/admin/conversations/message/",
        f"/admin/conversations/message/{conversation.messages.first().pk}/change/",
    ]:
        assert admin_client.get(url).status_code == 200, url
    catalog = admin_client.get("/admin/conversations/modelprofile/").content.decode()
    assert "qwen-plus" in catalog and "qwen3-vl-plus" in catalog


def test_image_url_messages_show_their_images(admin_client, conversation):
    question = conversation.messages.get(role="user")
    html = admin_client.get(f"/admin/conversations/message/{question.pk}/change/").content
    assert b"https://example.com/cat.png" in html


def test_reviewer_reads_conversations_but_cannot_change_them(client, conversation):
    reviewer = get_user_model().objects.create_user("rita", password="pw", is_staff=True)
    reviewer.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(reviewer)
    url = f"/admin/conversations/conversation/{conversation.pk}/change/"
    response = client.get(url)
    assert response.status_code == 200
    assert b"A cat." in response.content
    client.post(url, {"title": "changed"})
    conversation.refresh_from_db()
    assert conversation.title != "changed"
    assert client.get("/admin/conversations/modelprofile/").status_code == 403


def test_staff_without_review_permission_sees_no_conversations(client, conversation):
    staff = get_user_model().objects.create_user("sam", password="pw", is_staff=True)
    client.force_login(staff)
    assert client.get("/admin/conversations/conversation/").status_code == 403


def test_export_action(admin_client, conversation):
    response = admin_client.post(
        "/admin/conversations/conversation/",
        {"action": "export_json", "_selected_action": [str(conversation.pk)]},
    )
    data = json.loads(response.content)
    assert data[0]["owner"] == "alice"
    assert [m["content"] for m in data[0]["messages"]] == ["A cat?", "A cat."]
    assert data[0]["messages"][0]["images"] == ["https://example.com/cat.png"]
    assert Conversation.objects.count() == 1


def test_admin_says_when_replies_are_simulated(admin_client, settings):
    settings.DASHSCOPE_API_KEY = ""
    assert b"Offline demo" in admin_client.get("/admin/").content
    settings.DASHSCOPE_API_KEY = "sk-real"
    assert b"Offline demo" not in admin_client.get("/admin/").content


def _model_form(model, **changes) -> dict:
    """The model's change form as the admin would post it, with `changes`."""
    data = {**model_to_dict(model), **changes}
    form = {}
    for name, value in data.items():
        if value is None or value is False or name == "id":
            continue
        form[name] = json.dumps(value) if name == "parameters" else value
    return form


def test_an_admin_prices_a_model_and_the_catalog_shows_it(admin_client):
    model = ModelProfile.objects.get(name="qwen-plus")
    url = f"/admin/conversations/modelprofile/{model.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert "Prices" in page and 'name="reasoning_price_per_million"' in page
    form = _model_form(
        model, input_price_per_million="0.8", output_price_per_million="2", currency="CNY"
    )
    assert admin_client.post(url, form).status_code == 302
    model.refresh_from_db()
    assert (model.input_price_per_million, model.output_price_per_million) == (
        Decimal("0.8"), Decimal("2"),
    )  # fmt: skip
    catalog = admin_client.get("/admin/conversations/modelprofile/").content.decode()
    assert "0.8 / 2 CNY" in catalog


@pytest.mark.parametrize(
    "prices",
    [
        {"input_price_per_million": "-1", "output_price_per_million": "2"},
        {"input_price_per_million": "0.8"},
        {"reasoning_price_per_million": "4"},
        {"input_price_per_million": "0.8", "output_price_per_million": "2", "currency": "rmb"},
    ],
)
def test_a_negative_or_half_given_price_is_refused(admin_client, prices):
    model = ModelProfile.objects.get(name="qwen-plus")
    url = f"/admin/conversations/modelprofile/{model.pk}/change/"
    response = admin_client.post(url, _model_form(model, **prices))
    assert response.status_code == 200 and b"errorlist" in response.content
    model.refresh_from_db()
    assert not model.priced and model.reasoning_price_per_million is None


def test_reviewers_see_each_replys_tokens_and_cost(admin_client, conversation):
    Message.objects.filter(role="assistant").update(
        model="qwen-plus", input_tokens=1200, output_tokens=300, reasoning_tokens=120,
        cost=Decimal("0.00156"), cost_currency="CNY",
    )  # fmt: skip
    page = admin_client.get(
        f"/admin/conversations/conversation/{conversation.pk}/change/"
    ).content.decode()
    assert "1200 tokens in · 300 out (120 thinking) · ¥0.0016" in page
    listing = admin_client.get("/admin/conversations/message/").content.decode()
    assert "¥0.0016" in listing


def test_conversation_list_search_finds_titles_owners_and_message_text(admin_client, conversation):
    conversation.title = "Pets"
    conversation.save()
    other = conversation_create(owner=get_user_model().objects.create_user("bob"))
    Message.objects.create(conversation=other, role="user", content="A dog?")
    url = "/admin/conversations/conversation/"

    def found(query):
        html = admin_client.get(url, {"q": query}).content.decode()
        return [f"/{pk}/change/" in html for pk in (conversation.pk, other.pk)]

    assert found("pets") == [True, False]  # the title
    assert found("bob") == [False, True]  # the owner
    assert found("a cat") == [True, False]  # a message's text, each word
    assert found('"a dog?"') == [False, True]  # a quoted phrase
    assert found("zyzzyva") == [False, False]


def test_conversation_list_counts_each_chats_messages(admin_client, conversation):
    html = admin_client.get("/admin/conversations/conversation/").content.decode()
    assert '<td class="field-message_count">2</td>' in html
    ordered = admin_client.get("/admin/conversations/conversation/", {"o": "-4"})
    assert ordered.status_code == 200
