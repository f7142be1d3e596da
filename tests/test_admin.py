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


def test_the_message_list_filters_by_the_catalogs_models_without_reading_every_message(
    admin_client, conversation
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    Message.objects.filter(role="assistant").update(model="qwen-plus")
    catalog = sorted(ModelProfile.objects.values_list("name", flat=True))
    assert "qwen-plus" in catalog and len(catalog) > 1
    with CaptureQueriesContext(connection) as queries:
        listing = admin_client.get("/admin/conversations/message/").content.decode()
    for name in catalog:
        assert f"?model={name}" in listing, name
    assert not [q for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]

    chosen = admin_client.get("/admin/conversations/message/?model=qwen-plus").content.decode()
    assert "A cat." in chosen and "A cat?" not in chosen
    other = next(name for name in catalog if name != "qwen-plus")
    assert (
        "A cat."
        not in admin_client.get(f"/admin/conversations/message/?model={other}").content.decode()
    )
    # A model renamed or removed since: its old links still filter, and show it chosen.
    Message.objects.filter(role="assistant").update(model="qwen-retired")
    retired = admin_client.get("/admin/conversations/message/?model=qwen-retired")
    assert "A cat." in retired.content.decode() and "qwen-retired" in retired.content.decode()
    # `?model=` (empty) keeps meaning the messages of no model, the user's.
    empty = admin_client.get("/admin/conversations/message/?model=").content.decode()
    assert "A cat?" in empty and "A cat." not in empty


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


# -- review: filters, search, the transcript, exports ---------------------------------------------


@pytest.fixture
def reviewer():
    rita = get_user_model().objects.create_user("rita", password="pw", is_staff=True)
    rita.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    return rita


def _listed(client, **params) -> set[str]:
    response = client.get("/admin/conversations/conversation/", params)
    assert response.status_code == 200, params
    return {str(c.pk) for c in response.context["cl"].result_list}


def test_reviewers_filter_conversations(client, reviewer, conversation):
    from django.contrib.auth.models import Group

    bob = get_user_model().objects.create_user("bob", password="pw")
    interns = Group.objects.create(name="interns")
    bob.groups.add(interns)
    plain = conversation_create(owner=bob)
    Message.objects.create(conversation=plain, role="user", content="hi")
    Message.objects.create(
        conversation=plain, role="assistant", status="error", error_code="Throttling",
        content="", rating=-1,
    )  # fmt: skip
    client.force_login(reviewer)
    a, b = str(conversation.pk), str(plain.pk)
    assert _listed(client) == {a, b}
    assert _listed(client, owner__id__exact=bob.pk) == {b}
    assert _listed(client, group=interns.pk) == {b}
    assert _listed(client, has_images="yes") == {a}
    assert _listed(client, has_images="no") == {b}
    assert _listed(client, has_errors="yes") == {b}
    assert _listed(client, rated_down="yes") == {b}
    assert _listed(client, last_status="error") == {b}
    assert _listed(client, last_status="complete") == {a}
    assert _listed(client, model__id__exact=conversation.model_id) == {a, b}
    assert _listed(client, created_at__gte="2000-01-01 00:00:00+00:00") == {a, b}


def test_search_finds_titles_and_message_text_in_chinese_too(client, reviewer, conversation):
    Message.objects.create(conversation=conversation, role="user", content="帮我翻译这段话")
    other = conversation_create(owner=conversation.owner)
    other.title = "周报 draft"
    other.save()
    client.force_login(reviewer)
    assert _listed(client, q="翻译") == {str(conversation.pk)}
    assert _listed(client, q="周报") == {str(other.pk)}
    assert _listed(client, q="A CAT") == {str(conversation.pk)}  # any case
    assert _listed(client, q="alice") == {str(conversation.pk), str(other.pk)}
    assert _listed(client, q="nowhere") == set()


def test_the_transcript_is_the_chats_message_partial_read_only(client, reviewer, conversation):
    Message.objects.filter(role="assistant").update(
        content="**bold** <script>alert(1)</script>", reasoning="Let me think.",
        tool_steps=[{
            "calls": [{"id": "c1", "function": {"name": "get_time", "arguments": "{}"}}],
            "results": [{"tool_call_id": "c1", "content": "12:00"}],
        }],
        model="qwen-plus", input_tokens=12, output_tokens=3, cost=Decimal("0.01"),
        cost_currency="CNY",
    )  # fmt: skip
    client.force_login(reviewer)
    page = client.get(
        f"/admin/conversations/conversation/{conversation.pk}/transcript/"
    ).content.decode()
    question = conversation.messages.get(role="user")
    assert f'id="message-{question.pk}"' in page
    assert "<strong>bold</strong>" in page and "<script>alert(1)" not in page  # sanitized
    assert '<details class="message__reasoning">' in page  # thinking folded
    assert 'data-tool-call="get_time"' in page
    assert f"/c/{conversation.pk}/messages/{question.pk}/images/0/" in page  # the image proxy
    assert "12 tokens in · 3 out" in page and "¥0.01" in page
    assert 'data-action="regenerate"' not in page and "ws-send" not in page  # read-only
    # The reviewer may load the image through the app's proxy (its route admits reviewers).
    change = client.get(f"/admin/conversations/conversation/{conversation.pk}/change/")
    assert f"/admin/conversations/conversation/{conversation.pk}/transcript/" in (
        change.content.decode()
    )


def test_exports_one_or_many_as_json_or_markdown(client, reviewer, conversation):
    client.force_login(reviewer)
    base = f"/admin/conversations/conversation/{conversation.pk}"
    one = json.loads(client.get(f"{base}/export.json").content)
    assert one["owner"] == "alice" and [m["content"] for m in one["messages"]] == [
        "A cat?", "A cat.",
    ]  # fmt: skip
    markdown = client.get(f"{base}/export.md").content.decode()
    assert "Owner: alice" in markdown and "A cat." in markdown
    other = conversation_create(owner=conversation.owner)
    Message.objects.create(conversation=other, role="user", content="Second chat")
    bulk = client.post(
        "/admin/conversations/conversation/",
        {"action": "export_markdown", "_selected_action": [str(conversation.pk), str(other.pk)]},
    ).content.decode()
    assert "A cat." in bulk and "Second chat" in bulk and "\n---\n" in bulk


# -- the permission matrix ---------------------------------------------------------------------


def _user(kind: str):
    users = get_user_model().objects
    if kind == "anonymous":
        return None
    if kind == "superuser":
        return users.create_superuser("root", password="pw")
    user = users.create_user(kind, password="pw", is_staff=kind != "user")
    if kind == "reviewer":
        user.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    return user


def _pages(conversation) -> dict[str, str]:
    c = f"/admin/conversations/conversation/{conversation.pk}"
    return {
        "conversation list": "/admin/conversations/conversation/",
        "conversation search": "/admin/conversations/conversation/?q=cat",
        "conversation": f"{c}/change/",
        "transcript": f"{c}/transcript/",
        "export json": f"{c}/export.json",
        "export markdown": f"{c}/export.md",
        "audit log": "/admin/conversations/auditentry/",
        "catalog": "/admin/conversations/modelprofile/",
        "users": "/admin/auth/user/",
    }


# What each kind of user may open (200); everything else is refused (a redirect to the
# admin's login for those not staff, 403 for staff).
ALLOWED = {
    "anonymous": set(),
    "user": set(),
    "staff": set(),
    "reviewer": {
        "conversation list", "conversation search", "conversation", "transcript",
        "export json", "export markdown",
    },
    "superuser": {
        "conversation list", "conversation search", "conversation", "transcript",
        "export json", "export markdown", "audit log", "catalog", "users",
    },
}  # fmt: skip


@pytest.mark.parametrize("kind", list(ALLOWED))
def test_permission_matrix(client, conversation, kind):
    user = _user(kind)
    if user is not None:
        client.force_login(user)
    for page, url in _pages(conversation).items():
        response = client.get(url)
        if page in ALLOWED[kind]:
            assert response.status_code == 200, (kind, page)
        else:
            assert response.status_code in (302, 403), (kind, page, response.status_code)
            assert b"A cat." not in response.content, (kind, page)
            if response.status_code == 302:
                assert "/login/" in response["Location"], (kind, page)
    for action in ("export_json", "export_markdown"):
        response = client.post(
            "/admin/conversations/conversation/",
            {"action": action, "_selected_action": [str(conversation.pk)]},
        )
        exported = response.status_code == 200 and b"A cat." in response.content
        assert exported == (kind in ("reviewer", "superuser")), (kind, action)


# -- catalog upkeep: "Sync from DashScope" -------------------------------------------------------


def test_sync_adds_the_missing_models_disabled(admin_client, app_simulator):
    known = list(ModelProfile.objects.values_list("name", flat=True))
    app_simulator.listed_models = [*known, "qwen3-coder-plus", "qwen3-vl-32b-instruct"]
    catalog = admin_client.get("/admin/conversations/modelprofile/").content.decode()
    assert "Sync from DashScope" in catalog
    response = admin_client.post("/admin/conversations/modelprofile/sync/", follow=True)
    page = response.content.decode()
    assert "Added 2 models: qwen3-coder-plus, qwen3-vl-32b-instruct" in page
    new = ["qwen3-coder-plus", "qwen3-vl-32b-instruct"]
    added = {m.name: m for m in ModelProfile.objects.filter(name__in=new)}
    assert len(added) == 2 and not any(m.enabled for m in added.values())
    assert added["qwen3-vl-32b-instruct"].endpoint == "multimodal"
    assert added["qwen3-coder-plus"].endpoint == "text"
    assert ModelProfile.objects.count() == len(known) + 2
    # The request went through the project's client to the models endpoint.
    assert any(r.path == "/api/v1/models" for r in app_simulator.requests)
    # Synced again: nothing more, and the admin's edits are kept.
    ModelProfile.objects.filter(name="qwen3-coder-plus").update(label="Qwen3 Coder", enabled=True)
    again = admin_client.post("/admin/conversations/modelprofile/sync/", follow=True)
    assert "already has every model" in again.content.decode()
    assert ModelProfile.objects.get(name="qwen3-coder-plus").label == "Qwen3 Coder"


def test_sync_says_why_when_dashscope_refuses(admin_client, app_simulator, settings):
    from conversations.upstream import reset_clients

    settings.DASHSCOPE_API_KEY = "sk-wrong-key"
    reset_clients()
    count = ModelProfile.objects.count()
    page = admin_client.post("/admin/conversations/modelprofile/sync/", follow=True)
    text = page.content.decode()
    assert page.status_code == 200 and "Could not read the model list from DashScope" in text
    assert "sk-wrong-key" not in text and ModelProfile.objects.count() == count


def test_only_those_who_may_add_models_sync(client, app_simulator):
    rita = get_user_model().objects.create_user("rita", password="pw", is_staff=True)
    rita.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(rita)
    app_simulator.listed_models = ["brand-new-model"]
    assert client.post("/admin/conversations/modelprofile/sync/").status_code == 403
    assert not ModelProfile.objects.filter(name="brand-new-model").exists()
    assert app_simulator.requests == []
