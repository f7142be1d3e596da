"""A signed-in user's own account: the password change on the settings page."""

from __future__ import annotations

from django import forms
from django.contrib.auth import authenticate
from django.contrib.auth.forms import PasswordChangeForm
from django.core.exceptions import PermissionDenied


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
