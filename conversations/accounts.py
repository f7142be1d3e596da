"""Accounts: a signed-in user's password change (the settings page), and invitations, the
one-time links at which a person an admin added sets their own password."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.forms import PasswordChangeForm
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _


class ThrottledPasswordChangeForm(PasswordChangeForm):
    """Django's password change, whose old-password check is a sign-in: it goes through the
    authentication backends, so django-axes counts its failures and refuses it while the
    account or the address is locked out (its middleware then answers 429). Without this, a
    stolen session could guess the password on the settings page without bound."""

    def __init__(self, user, *args, request=None, **kwargs):
        self.request = request
        super().__init__(user, *args, **kwargs)

    def clean_old_password(self):
        old_password = self.cleaned_data["old_password"]
        try:
            user = authenticate(
                self.request, username=self.user.get_username(), password=old_password
            )
        except PermissionDenied:  # locked out; axes has marked the request
            user = None
        if user is None or user.pk != self.user.pk:
            raise forms.ValidationError(
                self.error_messages["password_incorrect"], code="password_incorrect"
            )
        return old_password


# -- invitations ---------------------------------------------------------------------------------


class InvitationUnusable(Exception):
    """An invitation link that cannot be used, with the sentence that says why."""

    def __init__(self, message: str, status: int = 410):
        super().__init__(message)
        self.message = message
        self.status = status


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_create(*, user, created_by) -> str:
    """A new one-time link for `user` to set their password, valid for QWENWEB_INVITE_DAYS;
    earlier unused links of theirs stop working. Returns the token: only its hash is kept,
    so this is the one moment it can be shown."""
    from conversations.models import Invitation

    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        Invitation.objects.filter(user=user, used_at__isnull=True).delete()
        Invitation.objects.create(
            user=user,
            token_hash=_token_hash(token),
            created_by=created_by,
            expires_at=timezone.now() + timedelta(days=settings.QWENWEB_INVITE_DAYS),
        )
    return token


def invitation_find(token: str):
    """The usable invitation with this token; else InvitationUnusable saying why."""
    from conversations.models import Invitation

    invitation = (
        Invitation.objects.select_related("user").filter(token_hash=_token_hash(token)).first()
    )
    if invitation is None:
        raise InvitationUnusable(
            _("This invitation link is not valid. Check that you copied all of it."), 404
        )
    if invitation.used_at is not None:
        raise InvitationUnusable(
            _("This invitation has already been used. Sign in with the password you chose, "
              "or ask an administrator for a new link.")
        )  # fmt: skip
    if invitation.expires_at <= timezone.now() or not invitation.user.is_active:
        raise InvitationUnusable(
            _("This invitation has expired. Ask an administrator for a new link.")
        )
    return invitation


def invitation_accept(*, invitation, form) -> None:
    """Set the password from a valid SetPasswordForm and spend the invitation, once: of two
    submissions at the same moment, only one succeeds."""
    from conversations.models import Invitation

    with transaction.atomic():
        spent = Invitation.objects.filter(
            pk=invitation.pk, used_at__isnull=True, expires_at__gt=timezone.now()
        ).update(used_at=timezone.now())
        if not spent:
            raise InvitationUnusable(
                _("This invitation has already been used. Sign in with the password you "
                  "chose, or ask an administrator for a new link.")
            )  # fmt: skip
        form.save()
