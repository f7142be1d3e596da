"""Invitations: an admin adds a person and gets a one-time link, valid for a few days, at
which the person sets their own password and is signed in."""

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from conversations.models import Invitation

pytestmark = pytest.mark.django_db

PASSWORD = "a-Long-passw0rd-for-tests"


def _link(response) -> str:
    """The path of the (first) invitation link on the admin's page."""
    match = re.search(r'value="https?://[^/"]+(/invite/[^"]+/)"', response.content.decode())
    assert match, "no link shown"
    return match.group(1)


def test_an_admin_adds_a_person_with_groups_and_gets_a_link_that_works_once(admin_client):
    interns = Group.objects.create(name="interns")
    response = admin_client.post(
        "/admin/auth/user/add/",
        {"username": "ivy", "usable_password": "false", "password1": "", "password2": ""},
    )
    assert response.status_code == 200, response.content[:2000]
    link = _link(response)
    ivy = get_user_model().objects.get(username="ivy")
    assert not ivy.has_usable_password()
    ivy.groups.add(interns)

    person = Client()
    page = person.get(link)
    assert page.status_code == 200 and "Welcome, ivy" in page.content.decode()
    # Django's password validators apply.
    refused = person.post(link, {"new_password1": "ivy", "new_password2": "ivy"})
    assert refused.status_code == 200 and "field-error" in refused.content.decode()
    done = person.post(link, {"new_password1": PASSWORD, "new_password2": PASSWORD})
    assert done.status_code == 302 and done["Location"] == "/"
    assert person.get("/").status_code == 200  # signed in
    ivy.refresh_from_db()
    assert ivy.check_password(PASSWORD) and ivy.groups.filter(name="interns").exists()
    signed_in = Client().post("/accounts/login/", {"username": "ivy", "password": PASSWORD})
    assert signed_in.status_code == 302

    again = Client().get(link)
    assert again.status_code == 410 and "already been used" in again.content.decode()
    resent = Client().post(
        link, {"new_password1": "x-" + PASSWORD, "new_password2": "x-" + PASSWORD}
    )
    assert resent.status_code == 410
    ivy.refresh_from_db()
    assert ivy.check_password(PASSWORD)


def test_invite_button_on_a_users_page(admin_client):
    bob = get_user_model().objects.create_user("bob")
    page = admin_client.get(f"/admin/auth/user/{bob.pk}/change/").content.decode()
    assert f"/admin/auth/user/{bob.pk}/invite/" in page
    assert admin_client.get(f"/admin/auth/user/{bob.pk}/invite/").status_code == 200
    assert not Invitation.objects.exists()  # a GET makes nothing
    link = _link(admin_client.post(f"/admin/auth/user/{bob.pk}/invite/"))
    invitation = Invitation.objects.get()
    assert invitation.user == bob and invitation.created_by.username == "admin"
    assert link.split("/")[2] not in invitation.token_hash  # only a hash is kept
    assert Client().get(link).status_code == 200


def test_a_new_link_replaces_the_old_one(admin_client):
    bob = get_user_model().objects.create_user("bob")
    first = _link(admin_client.post(f"/admin/auth/user/{bob.pk}/invite/"))
    second = _link(admin_client.post(f"/admin/auth/user/{bob.pk}/invite/"))
    assert Client().get(first).status_code == 404
    assert Client().get(second).status_code == 200


def test_the_invite_action_for_several_users(admin_client):
    users = [get_user_model().objects.create_user(name) for name in ("bob", "cy")]
    response = admin_client.post(
        "/admin/auth/user/", {"action": "invite", "_selected_action": [u.pk for u in users]}
    )
    assert response.content.decode().count("data-invitation-link") == 2
    assert Invitation.objects.count() == 2


def test_an_expired_link_says_so(admin_client, settings):
    settings.QWENWEB_INVITE_DAYS = 3
    bob = get_user_model().objects.create_user("bob")
    link = _link(admin_client.post(f"/admin/auth/user/{bob.pk}/invite/"))
    invitation = Invitation.objects.get()
    assert (
        timedelta(days=3) - timedelta(minutes=1)
        < invitation.expires_at - timezone.now()
        <= timedelta(days=3)
    )
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    page = Client().get(link)
    assert page.status_code == 410 and "expired" in page.content.decode()
    posted = Client().post(link, {"new_password1": PASSWORD, "new_password2": PASSWORD})
    assert posted.status_code == 410
    bob.refresh_from_db()
    assert not bob.has_usable_password()


def test_a_wrong_link_and_a_disabled_account(admin_client):
    assert Client().get("/invite/not-a-real-token/").status_code == 404
    bob = get_user_model().objects.create_user("bob")
    link = _link(admin_client.post(f"/admin/auth/user/{bob.pk}/invite/"))
    bob.is_active = False
    bob.save()
    assert Client().get(link).status_code == 410


@pytest.mark.parametrize("kind", ["anonymous", "user", "staff", "reviewer"])
def test_only_those_who_may_change_users_invite(client, kind):
    from django.contrib.auth.models import Permission

    bob = get_user_model().objects.create_user("bob")
    if kind != "anonymous":
        user = get_user_model().objects.create_user(kind, is_staff=kind != "user")
        if kind == "reviewer":
            user.user_permissions.add(Permission.objects.get(codename="review_conversation"))
        client.force_login(user)
    response = client.post(f"/admin/auth/user/{bob.pk}/invite/")
    assert response.status_code in (302, 403) and not Invitation.objects.exists()
    assert client.get("/admin/conversations/invitation/").status_code in (302, 403)


def test_the_invitations_page_lists_them_read_only(admin_client):
    bob = get_user_model().objects.create_user("bob")
    admin_client.post(f"/admin/auth/user/{bob.pk}/invite/")
    page = admin_client.get("/admin/conversations/invitation/")
    assert page.status_code == 200 and "bob" in page.content.decode()
    invitation = Invitation.objects.get()
    assert admin_client.get("/admin/conversations/invitation/add/").status_code == 403
    admin_client.post(
        f"/admin/conversations/invitation/{invitation.pk}/change/",
        {"expires_at": "2999-01-01"},
    )
    invitation.refresh_from_db()
    assert invitation.expires_at.year != 2999
