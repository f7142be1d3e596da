"""The audit log: every review read (a transcript opened, message text searched, an export)
is recorded, and nobody can change or delete the record from the admin."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from conversations.models import AuditEntry, Conversation, Message
from conversations.replies.service import conversation_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def alices_chat():
    alice = get_user_model().objects.create_user("alice", password="pw")
    conversation = conversation_create(owner=alice)
    Message.objects.create(conversation=conversation, role="user", content="我的工资是多少？")
    Message.objects.create(conversation=conversation, role="assistant", content="Salary talk.")
    return conversation


@pytest.fixture
def reviewer_client(client):
    rita = get_user_model().objects.create_user("rita", password="pw", is_staff=True)
    rita.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(rita)
    return client


def _entry() -> AuditEntry:
    entries = list(AuditEntry.objects.all())
    assert len(entries) == 1, entries
    return entries[0]


def test_opening_a_transcript_is_recorded_with_who_what_and_where(reviewer_client, alices_chat):
    url = f"/admin/conversations/conversation/{alices_chat.pk}/transcript/"
    response = reviewer_client.get(
        url,
        REMOTE_ADDR="203.0.113.9",
        HTTP_USER_AGENT="Firefox/140",
        HTTP_X_FORWARDED_FOR="6.6.6.6",
    )
    assert response.status_code == 200 and "我的工资是多少？" in response.content.decode()
    entry = _entry()
    assert (entry.actor.username, entry.actor_name, entry.action) == ("rita", "rita", "view")
    assert entry.conversation_ids == [str(alices_chat.pk)] and entry.owners == ["alice"]
    # X-Forwarded-For is trusted only behind QWENWEB_TRUSTED_PROXY_COUNT proxies (none here).
    assert entry.ip_address == "203.0.113.9" and entry.user_agent == "Firefox/140"


def test_the_address_behind_the_trusted_proxy(reviewer_client, alices_chat, settings):
    settings.QWENWEB_TRUSTED_PROXY_COUNT = 1
    reviewer_client.get(
        f"/admin/conversations/conversation/{alices_chat.pk}/change/",
        REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.4",
    )  # fmt: skip
    assert _entry().ip_address == "198.51.100.4"


def test_a_message_text_search_is_recorded_with_its_text_and_results(reviewer_client, alices_chat):
    response = reviewer_client.get("/admin/conversations/conversation/", {"q": "工资"})
    assert str(alices_chat.pk) in response.content.decode()
    entry = _entry()
    assert (entry.action, entry.query) == ("search", "工资")
    assert entry.conversation_ids == [str(alices_chat.pk)] and entry.owners == ["alice"]


def test_a_search_of_messages_is_recorded_too(reviewer_client, alices_chat):
    reviewer_client.get("/admin/conversations/message/", {"q": "Salary"})
    entry = _entry()
    assert (entry.action, entry.query, entry.conversation_ids) == (
        "search", "Salary", [str(alices_chat.pk)],
    )  # fmt: skip


def test_a_listing_without_search_is_not_a_search(reviewer_client, alices_chat):
    reviewer_client.get("/admin/conversations/conversation/")
    assert not AuditEntry.objects.exists()


@pytest.mark.parametrize(
    ("how", "format"),
    [("action:export_json", "json"), ("action:export_markdown", "markdown"),
     ("export.json", "json"), ("export.md", "markdown")],
)  # fmt: skip
def test_every_export_is_recorded_with_its_format(reviewer_client, alices_chat, how, format):
    if how.startswith("action:"):
        response = reviewer_client.post(
            "/admin/conversations/conversation/",
            {"action": how.split(":")[1], "_selected_action": [str(alices_chat.pk)]},
        )
    else:
        response = reviewer_client.get(f"/admin/conversations/conversation/{alices_chat.pk}/{how}")
    assert response.status_code == 200 and "attachment" in response["Content-Disposition"]
    entry = _entry()
    assert (entry.action, entry.format) == ("export", format)
    assert entry.conversation_ids == [str(alices_chat.pk)]


def test_a_bulk_export_names_every_conversation(reviewer_client, alices_chat):
    bob = get_user_model().objects.create_user("bob", password="pw")
    bobs = conversation_create(owner=bob)
    response = reviewer_client.post(
        "/admin/conversations/conversation/",
        {"action": "export_json", "_selected_action": [str(alices_chat.pk), str(bobs.pk)]},
    )
    assert {item["owner"] for item in json.loads(response.content)} == {"alice", "bob"}
    entry = _entry()
    assert set(entry.conversation_ids) == {str(alices_chat.pk), str(bobs.pk)}
    assert entry.owners == ["alice", "bob"]


def test_reading_ones_own_conversation_is_no_review(client, alices_chat):
    alice = alices_chat.owner
    alice.is_staff = True
    alice.save()
    alice.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(alice)
    response = client.get(f"/admin/conversations/conversation/{alices_chat.pk}/transcript/")
    assert response.status_code == 200
    assert not AuditEntry.objects.exists()


def test_nobody_can_add_change_or_delete_an_entry(admin_client, reviewer_client, alices_chat):
    reviewer_client.get(f"/admin/conversations/conversation/{alices_chat.pk}/change/")
    entry = _entry()
    base = "/admin/conversations/auditentry/"
    listing = admin_client.get(base)
    assert listing.status_code == 200 and "rita" in listing.content.decode()
    assert admin_client.get(f"{base}{entry.pk}/change/").status_code == 200  # read-only view
    for url, data in [
        (f"{base}add/", {"actor_name": "forged", "action": "view"}),
        (f"{base}{entry.pk}/change/", {"actor_name": "someone else", "action": "export"}),
        (f"{base}{entry.pk}/delete/", {"post": "yes"}),
    ]:
        assert admin_client.post(url, data).status_code == 403, url
    # No actions at all on the log, so no "delete selected" either.
    admin_client.post(
        base, {"action": "delete_selected", "_selected_action": [entry.pk], "post": "yes"}
    )
    entry_after = _entry()
    assert (entry_after.pk, entry_after.actor_name, entry_after.action) == (
        entry.pk, "rita", "view",
    )  # fmt: skip
    page = admin_client.get(f"{base}{entry.pk}/change/").content.decode()
    assert 'name="actor_name"' not in page and "deletelink" not in page
    assert not Permission.objects.filter(
        content_type__model="auditentry", codename__in=[
            "add_auditentry", "change_auditentry", "delete_auditentry"
        ],
    ).exists()  # fmt: skip


def test_the_audit_log_filters_by_action_actor_and_date(admin_client, reviewer_client, alices_chat):
    reviewer_client.get(f"/admin/conversations/conversation/{alices_chat.pk}/change/")
    reviewer_client.get("/admin/conversations/conversation/", {"q": "工资"})
    page = admin_client.get("/admin/conversations/auditentry/", {"action__exact": "search"})
    assert page.status_code == 200
    assert page.context["cl"].result_count == 1
    rita = get_user_model().objects.get(username="rita")
    page = admin_client.get("/admin/conversations/auditentry/", {"actor__id__exact": rita.pk})
    assert page.context["cl"].result_count == 2
    assert (
        admin_client.get(
            "/admin/conversations/auditentry/", {"created_at__gte": "2000-01-01 00:00:00+00:00"}
        )
        .context["cl"]
        .result_count
        == 2
    )
    assert admin_client.get("/admin/conversations/auditentry/", {"q": "alice"}).status_code == 200


def test_reviewers_do_not_read_the_audit_log(reviewer_client):
    assert reviewer_client.get("/admin/conversations/auditentry/").status_code == 403


def test_conversations_deleted_later_stay_in_the_log(reviewer_client, alices_chat):
    reviewer_client.get(f"/admin/conversations/conversation/{alices_chat.pk}/change/")
    Conversation.objects.all().delete()
    assert _entry().conversation_ids == [str(alices_chat.pk)]
