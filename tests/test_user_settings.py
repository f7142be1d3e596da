"""A user's own settings page (/settings/): defaults for new chats, and the password."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from conversations.models import Conversation, ModelProfile, SystemPrompt

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice():
    return get_user_model().objects.create_user("alice", password="old-pw-123")


def test_defaults_apply_to_the_users_new_chats_only(alice_client, alice):
    page = alice_client.get("/settings/")
    assert page.status_code == 200
    assert 'id="preferences-form"' in page.content.decode()
    vl = ModelProfile.objects.get(name="qwen3-vl-plus")
    pirate = SystemPrompt.objects.create(name="Pirate", text="Talk like a pirate.")
    response = alice_client.post(
        "/settings/",
        {"form": "preferences", "default_model": vl.pk, "default_preset": "code",
         "default_system_prompt": pirate.pk},
    )  # fmt: skip
    assert response.status_code == 302
    assert 'data-saved="preferences"' in alice_client.get(response.url).content.decode()
    home = alice_client.get("/").content.decode()
    assert f'<option value="{vl.pk}" data-model="qwen3-vl-plus"' in home
    assert (
        'data-model="qwen3-vl-plus" data-capabilities="vision thinking " '
        'data-context="262144" selected' in home
    )
    alice_client.post("/c/new/", {"content": ""})
    chat = Conversation.objects.get(owner=alice)
    assert chat.model == vl and chat.system_prompt == pirate
    assert chat.settings == {"temperature": 0.2, "top_p": 0.8}
    # Someone else's new chats keep the catalog's defaults.
    bob = get_user_model().objects.create_user("bob", password="pw")
    bobs = Client()
    bobs.force_login(bob)
    bobs.post("/c/new/", {"content": ""})
    theirs = Conversation.objects.get(owner=bob)
    assert theirs.model == ModelProfile.objects.default() and theirs.settings == {}


def test_a_disabled_model_or_an_unknown_preset_is_refused(alice_client):
    disabled = ModelProfile.objects.filter(enabled=False).first()
    response = alice_client.post(
        "/settings/", {"form": "preferences", "default_model": disabled.pk}
    )
    assert response.status_code == 400
    assert 'id="error-default_model"' in response.content.decode()
    response = alice_client.post("/settings/", {"form": "preferences", "default_preset": "x"})
    assert response.status_code == 400
    assert 'id="error-default_preset"' in response.content.decode()


def test_a_model_disabled_since_falls_back_to_the_catalogs_default(alice_client, alice):
    qwen_max = ModelProfile.objects.get(name="qwen-max")
    alice_client.post("/settings/", {"form": "preferences", "default_model": qwen_max.pk})
    ModelProfile.objects.filter(pk=qwen_max.pk).update(enabled=False)
    alice_client.post("/c/new/", {"content": ""})
    assert Conversation.objects.get(owner=alice).model == ModelProfile.objects.default()


def test_the_password_changes_here_and_other_sessions_end(alice_client, alice):
    other = Client()
    other.force_login(alice)
    assert other.get("/").status_code == 200
    response = alice_client.post(
        "/settings/",
        {"form": "password", "old_password": "wrong", "new_password1": "n3w-Passw0rd!",
         "new_password2": "n3w-Passw0rd!"},
    )  # fmt: skip
    assert response.status_code == 400
    assert 'id="error-old_password"' in response.content.decode()
    response = alice_client.post(
        "/settings/",
        {"form": "password", "old_password": "old-pw-123", "new_password1": "n3w-Passw0rd!",
         "new_password2": "n3w-Passw0rd!"},
    )  # fmt: skip
    assert response.status_code == 302 and response.url.endswith("?saved=password")
    assert alice_client.get("/").status_code == 200, "this session goes on"
    assert other.get("/").status_code == 302, "the other one is signed out"
    alice.refresh_from_db()
    assert alice.check_password("n3w-Passw0rd!")


def test_the_page_needs_a_login(client):
    response = client.get("/settings/")
    assert response.status_code == 302 and "/accounts/login/" in response.url
