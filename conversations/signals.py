"""A socket ends with the session that opened it, in every server process.

A logout ends the sockets its session opened; a password change, or an account disabled or
deleted, ends all of the user's. An account disabled (is_active off, in the admin) also stops
the replies being written for it, as Stop would. Every socket listens on its user's group
(events.user_group) and closes when the event names its session, or names none (all of them).
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from conversations.replies import events

logger = logging.getLogger(__name__)

# A channel layer that does not answer (Redis down) must not hold up a logout for long.
SEND_TIMEOUT = 2.0


def end_sessions(user_id, session_key: str | None = None) -> None:
    """Close the user's open sockets: those of this session, or all of them (None). From
    synchronous code (signal handlers run in a view's or the admin's thread)."""
    event = events.SessionEnded(
        session=events.session_tag(session_key) if session_key else ""
    ).as_message()

    async def send() -> None:
        layer = get_channel_layer()
        await asyncio.wait_for(layer.group_send(events.user_group(user_id), event), SEND_TIMEOUT)

    try:
        async_to_sync(send)()
    except Exception:
        # The logout itself (or the admin's change) goes through; sockets then live on until
        # they close, and every page they could reach asks for a login.
        logger.warning("Could not close the open sockets of user %s", user_id, exc_info=True)


def stop_replies(user_id) -> None:
    """Stop every reply being written in the user's conversations, in whichever process it
    runs (as the Stop button does). From synchronous code, like end_sessions."""
    from conversations.models import Conversation, Message
    from conversations.replies.service import areply_stop

    writing = Message.objects.filter(
        conversation__owner_id=user_id, status=Message.Status.STREAMING
    ).values("conversation_id")
    conversations = list(Conversation.objects.filter(pk__in=writing))

    async def stop() -> None:
        for conversation in conversations:
            await asyncio.wait_for(areply_stop(conversation=conversation), SEND_TIMEOUT)

    if not conversations:
        return
    try:
        async_to_sync(stop)()
    except Exception:
        # The sweep, or the reply's own end, still closes them; the account is disabled.
        logger.warning("Could not stop the replies of user %s", user_id, exc_info=True)


@receiver(user_logged_out, dispatch_uid="conversations.session_ended_on_logout")
def _logged_out(sender, request, user, **kwargs) -> None:
    session_key = request.session.session_key if request is not None else None
    if user is not None and session_key:
        end_sessions(user.pk, session_key)


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="conversations.user_saved")
def _user_saved(sender, instance, created, **kwargs) -> None:
    if created:
        return
    # set_password() keeps the new password in `_password` until save() has run (and a hash
    # upgraded on login is saved without it): here it means the password was changed.
    changed_password = getattr(instance, "_password", None) is not None
    user_id = instance.pk
    if not getattr(instance, "is_active", True):
        transaction.on_commit(lambda: (end_sessions(user_id), stop_replies(user_id)))
    elif changed_password:
        transaction.on_commit(lambda: end_sessions(user_id))


@receiver(post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="conversations.user_gone")
def _user_deleted(sender, instance, **kwargs) -> None:
    user_id = instance.pk  # read now: the deletion clears it before the commit
    transaction.on_commit(lambda: end_sessions(user_id))
