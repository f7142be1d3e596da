"""Sharing a chat as a read-only snapshot (/s/<token>/): for signed-in teammates, never for
anyone signed out, revocable, showing the branch as it was when shared."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from conversations import uploads
from conversations.models import Message, MessageImage, ModelProfile, Share
from conversations.replies.service import conversation_create
from tests.image_server import png

pytestmark = pytest.mark.django_db


def add(conversation, role, content):
    message = Message.objects.create(conversation=conversation, role=role, content=content)
    conversation.refresh_from_db()
    return message


@pytest.fixture
def chat(alice):
    conversation = conversation_create(
        owner=alice, model=ModelProfile.objects.get(name="qwen3-vl-plus")
    )
    conversation.title = "Quarterly plan"
    conversation.save()
    add(conversation, "user", "What is the plan?")
    add(conversation, "assistant", "# The plan\n\n- **ship** it\n\n<script>alert(1)</script>")
    return conversation


def teammate(name="bob") -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user(name, password="pw"))
    return client


def share(client, chat) -> str:
    response = client.post(f"/c/{chat.id}/share/")
    assert response.status_code == 200
    return re.search(r'id="share-link"[^>]*value="([^"]+)"', response.content.decode())[1]


def test_a_teammate_with_the_link_reads_the_chat_as_it_was_shared(alice_client, chat):
    link = share(alice_client, chat)
    assert re.fullmatch(r"http://testserver/s/[\w-]{32}/", link)
    add(chat, "user", "A later question, not shared")
    bob = teammate()
    page = bob.get(link)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Quarterly plan" in html and "Shared by alice" in html
    assert "What is the plan?" in html and "<h1>The plan</h1>" in html
    assert "<strong>ship</strong>" in html and "<script>alert(1)" not in html
    assert "A later question" not in html, "a snapshot: later messages are not shared"
    # Read-only: no composer, no socket, no message actions.
    for part in ('id="composer"', "ws-connect", 'data-action="regenerate"', 'data-action="edit"',
                 'data-action="rate-up"'):  # fmt: skip
        assert part not in html, part
    # Sharing again updates the snapshot and keeps the link.
    assert share(alice_client, chat) == link
    assert "A later question" in bob.get(link).content.decode()
    assert Share.objects.count() == 1


def test_nobody_signed_out_reads_a_shared_chat_and_revoking_ends_the_link(alice_client, chat):
    link = share(alice_client, chat)
    anonymous = Client().get(link)
    assert anonymous.status_code == 302 and "/accounts/login/" in anonymous.url
    response = alice_client.post(f"/c/{chat.id}/share/", {"revoke": "1"})
    assert "The link no longer works." in response.content.decode()
    assert teammate().get(link).status_code == 404
    assert teammate("carol").get("/s/not-a-token/").status_code == 404
    # A new share is a new link; the old one stays dead.
    new = share(alice_client, chat)
    assert new != link and teammate("dave").get(new).status_code == 200


def test_only_the_owner_shares_or_revokes(alice_client, chat):
    bob = teammate()
    assert bob.get(f"/c/{chat.id}/share/").status_code == 404
    assert bob.post(f"/c/{chat.id}/share/").status_code == 404
    link = share(alice_client, chat)
    assert bob.post(f"/c/{chat.id}/share/", {"revoke": "1"}).status_code == 404
    assert bob.get(link).status_code == 200


def test_a_shared_chats_images_are_served_with_its_link_only(alice_client, chat):
    question = chat.messages.get(role="user")
    upload = uploads.save_upload(chat, SimpleUploadedFile("p.png", png()))
    MessageImage.objects.create(message=question, upload=upload)
    link = share(alice_client, chat)
    bob = teammate()
    html = bob.get(link).content.decode()
    src = re.search(r'<img class="message__image" src="([^"]+)"', html)[1]
    assert "?share=" in src
    assert bob.get(src.replace("&amp;", "&")).status_code == 200
    assert bob.get(src.split("?")[0]).status_code == 404, "not without the link"
    alice_client.post(f"/c/{chat.id}/share/", {"revoke": "1"})
    assert bob.get(src.replace("&amp;", "&")).status_code == 404, "not once revoked"


def test_an_admin_sees_the_shared_links_and_revokes_one(alice_client, chat):
    link = share(alice_client, chat)
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", password="pw"))
    listing = admin.get("/admin/conversations/share/").content.decode()
    assert "Quarterly plan" in listing and "alice" in listing
    assert admin.get("/admin/conversations/share/add/").status_code == 403
    response = admin.post(
        "/admin/conversations/share/",
        {"action": "revoke", "_selected_action": [Share.objects.get().pk]},
    )
    assert response.status_code == 302
    assert teammate().get(link).status_code == 404
