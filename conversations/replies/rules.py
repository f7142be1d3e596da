"""The rules a reply must pass before anything is saved or sent: what a valid message, title
and image list are, and the limits (the model still enabled, replies at once, messages and new
chats a minute). Each refusal is a ReplyRefused whose text is a sentence for the user.

Limits are counted in the database under the owner's row lock (service._lock), so they hold
across server processes.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import connection
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from conversations.dashscope.sanitize import strip_controls
from conversations.models import Conversation, Message, ModelProfile

# The window QWENWEB_MESSAGES_PER_MINUTE and QWENWEB_CHATS_PER_MINUTE count in.
RATE_WINDOW = timedelta(seconds=60)


TITLE_LENGTH = 60


class ReplyRefused(Exception):
    """A message that cannot start a reply; the text is a sentence for the user."""


class ReplyInProgress(ReplyRefused):
    pass


class StopUndelivered(ReplyRefused):
    """Stop could not reach a reply running in another process (Redis is away)."""


def clean_content(content: object) -> str:
    """The message as it will be saved, or ReplyRefused with a sentence for the user.

    NUL and the other C0 control characters (tab, newline and carriage return aside) are
    dropped, not refused: they are invisible, so a person cannot see what to remove, and
    PostgreSQL refuses NUL in text (it was a 500 there, and stored as is on SQLite). A message
    of nothing else is an empty one: "Type a message first."
    """
    if isinstance(content, str):
        content = strip_controls(content)
    if not isinstance(content, str) or not content.strip():
        raise ReplyRefused(_("Type a message first."))
    if len(content) > settings.QWENWEB_MAX_MESSAGE_CHARS:
        raise ReplyRefused(
            _("This message is too long (%(length)s characters; the limit is %(limit)s).")
            % {"length": len(content), "limit": settings.QWENWEB_MAX_MESSAGE_CHARS}
        )
    # Keep the message as typed (indented code, say), less blank lines around it.
    return content.strip("\r\n").rstrip()


def clean_title(title: str) -> str:
    """A title as typed into Rename: one line, spaces collapsed, 200 characters at most, and
    without control characters (dropped, as in messages; ``clean_content`` says why). Empty
    is allowed: the chat is then shown untitled."""
    return " ".join(strip_controls(title).split())[:200]


def clean_image_urls(value: object) -> list[str]:
    """Image URLs for a vision model, one per line (or space): http(s) only, a few at most."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        urls = value.split()
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        urls = [item.strip() for item in value if item.strip()]
    else:
        raise ReplyRefused(_("Image URLs must be text, one per line."))
    if len(urls) > settings.QWENWEB_MAX_IMAGES:
        raise ReplyRefused(too_many_images())
    validate = URLValidator(schemes=["http", "https"])
    for url in urls:
        try:
            if len(url) > 2000:
                raise ValidationError("too long")
            # URLValidator lets a control character in the path through (NUL too, which
            # PostgreSQL refuses); dropping it would send another URL than the one typed.
            if strip_controls(url) != url:
                raise ValidationError("control character")
            validate(url)
        except ValidationError:
            raise ReplyRefused(
                _("“%(url)s” is not an image URL: use a link that starts with https://.")
                % {"url": strip_controls(url)[:80]}
            ) from None
    return urls


def title_from(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


def check_model(conversation: Conversation) -> None:
    """An admin may have disabled the conversation's model since it was chosen."""
    if not conversation.model.enabled:
        raise ReplyRefused(
            _("%(model)s is no longer available. Pick another model at the top of the chat and "
              "try again.")
            % {"model": conversation.model.label}
        )  # fmt: skip


def check_chats_per_minute(owner, per_minute: int) -> None:
    """Refuse a chat beyond QWENWEB_CHATS_PER_MINUTE, saying when one more may be created.
    Empty chats cost no tokens, but made by the hundred they fill the database and bury the
    sidebar."""
    now = timezone.now()
    # The newest chat but (limit - 1): while it is in the window the limit is reached, and
    # one more may be created when it leaves.
    nth_recent = (
        Conversation.objects.owned_by(owner)
        .filter(created_at__gt=now - RATE_WINDOW)
        .order_by("-created_at")
        .values_list("created_at", flat=True)[per_minute - 1 : per_minute]
        .first()
    )
    if nth_recent is None:
        return
    wait = nth_recent + RATE_WINDOW - now
    seconds = min(60, max(1, math.ceil(wait.total_seconds())))
    raise ReplyRefused(
        ngettext(
            "New chats are limited to %(limit)s a minute. Try again in %(seconds)s second.",
            "New chats are limited to %(limit)s a minute. Try again in %(seconds)s seconds.",
            seconds,
        )
        % {"limit": per_minute, "seconds": seconds}
    )


@dataclass(frozen=True)
class LoadQuery:
    """The statement that reads one user's load for the per-user limits (see check_user_limits),
    made at `now`. The send path reads it together with the replies in the way
    (intake.in_the_way): one round trip fewer on every send."""

    sql: str
    params: list
    now: datetime

    @classmethod
    def of(cls, owner_id) -> LoadQuery | None:
        """None when no per-user limit is set: nothing to read."""
        per_minute = settings.QWENWEB_MESSAGES_PER_MINUTE
        if settings.QWENWEB_MAX_CONCURRENT_REPLIES <= 0 and per_minute <= 0:
            return None
        now = timezone.now()
        # A reply whose heartbeat stopped has no process behind it: it takes no place.
        alive_since = now - timedelta(seconds=Message.STALE_AFTER)
        recent_since = now - RATE_WINDOW
        # The newest reply but (limit - 1): while it is in the window the limit is reached,
        # and one more may start when it leaves.
        nth = max(per_minute, 1)
        # `streaming`, the user's replies being written (heartbeat since alive_since), and
        # `nth_recent`, when their nth newest reply since recent_since was started (None:
        # fewer than n): a send, a regenerate and an edit each start one. Neither reads the
        # user's whole history: the first goes through the status index (replies streaming
        # now), the second through the (owner, updated_at) index of conversations to the chats
        # active within the window (every reply started moves its chat's updated_at on), whose
        # messages it reads. SQL rather than the ORM: the same statement built from querysets
        # cost about 1 ms of Python per send, on SQLite and PostgreSQL alike. Table names from
        # the models; every value goes as a parameter.
        messages, chats = Message._meta.db_table, Conversation._meta.db_table
        sql = f"""
            SELECT
              (SELECT COUNT(*) FROM {messages} m JOIN {chats} c ON c.id = m.conversation_id
                WHERE c.owner_id = %s AND m.status = %s AND m.role = %s AND m.updated_at >= %s)
                AS load_streaming,
              (SELECT m.created_at FROM {messages} m JOIN {chats} c ON c.id = m.conversation_id
                WHERE c.owner_id = %s AND c.updated_at > %s AND m.role = %s AND m.created_at > %s
                ORDER BY m.created_at DESC LIMIT 1 OFFSET %s) AS load_nth_recent
        """
        moment = connection.ops.adapt_datetimefield_value
        params = [
            owner_id, Message.Status.STREAMING.value, Message.Role.ASSISTANT.value,
            moment(alive_since),
            owner_id, moment(recent_since), Message.Role.ASSISTANT.value, moment(recent_since),
            nth - 1,
        ]  # fmt: skip
        return cls(sql, params, now)

    def read(self) -> tuple:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, self.params)
            return cursor.fetchone()


def check_user_limits(
    conversation: Conversation, load: tuple[LoadQuery, tuple] | None = None
) -> None:
    """Refuse a new reply beyond its owner's limits: replies being written at once across
    their chats (QWENWEB_MAX_CONCURRENT_REPLIES) and messages sent in the last minute
    (QWENWEB_MESSAGES_PER_MINUTE: each reply started counts, so a regenerate or an edit costs
    one as a send does). Counted in the database, so they hold across server processes, in one
    query; `load` is that query and the row it read already, if the caller read it."""
    if load is None:
        query = LoadQuery.of(conversation.owner_id)
        if query is None:
            return
        load = query, query.read()
    query, (streaming, nth_recent) = load
    max_replies = settings.QWENWEB_MAX_CONCURRENT_REPLIES
    per_minute = settings.QWENWEB_MESSAGES_PER_MINUTE
    if isinstance(nth_recent, str):  # SQLite: the text Django stores, in UTC
        nth_recent = datetime.fromisoformat(nth_recent)
    if nth_recent is not None and timezone.is_naive(nth_recent):
        nth_recent = nth_recent.replace(tzinfo=UTC)
    if max_replies > 0 and streaming >= max_replies:
        raise ReplyRefused(
            ngettext(
                "You already have %(count)s reply being written in another chat. Wait for it "
                "to finish or stop it, then send.",
                "You already have %(count)s replies being written in other chats. Wait for one "
                "to finish or stop it, then send.",
                streaming,
            )
            % {"count": streaming}
        )
    if per_minute > 0 and nth_recent is not None:
        wait = nth_recent + RATE_WINDOW - query.now
        seconds = min(60, max(1, math.ceil(wait.total_seconds())))
        raise ReplyRefused(
            ngettext(
                "Messages are limited to %(limit)s a minute. Try again in %(seconds)s second.",
                "Messages are limited to %(limit)s a minute. Try again in %(seconds)s seconds.",
                seconds,
            )
            % {"limit": per_minute, "seconds": seconds}
        )


def check_json_mentioned(conversation: Conversation, content: str) -> None:
    """JSON output answers only a prompt that asks for JSON (DashScope refuses the request
    otherwise): say so before anything is sent."""
    if not (conversation.settings or {}).get("json_output") or not conversation.model.json_output:
        return
    if "json" in content.lower() or "json" in conversation.prompt_text.lower():
        return
    if conversation.messages.filter(role=Message.Role.USER, content__icontains="json").exists():
        return
    raise ReplyRefused(
        _("JSON output is on, and the model answers in JSON only when asked to: mention JSON "
          "in your message (for example “Answer in JSON.”), or turn JSON output off in this "
          "chat's settings.")
    )  # fmt: skip


def check_images(images: list, model: ModelProfile) -> None:
    if images and not model.accepts_images:
        raise ReplyRefused(
            _("%(model)s cannot see images. Pick a vision model, or remove the images.")
            % {"model": model.label}
        )


def clean_image_ids(value: object) -> list[int]:
    """The uploads a send names (conversations/uploads.py): a list of ids (numbers, or their
    digits as text, as htmx's ws-send sends a form's fields), or one; repeats count once."""
    if value in (None, "", []):
        return []
    values = value if isinstance(value, list) else [value]
    ids = [clean_message_id(item) for item in values]
    if any(pk is None for pk in ids):
        raise ReplyRefused(_("An image you added is gone. Add it again, then send."))
    ids = list(dict.fromkeys(ids))
    if len(ids) > settings.QWENWEB_MAX_IMAGES:
        raise ReplyRefused(too_many_images())
    return ids


def too_many_images() -> str:
    return _("At most %(count)s images can go with one message.") % {
        "count": settings.QWENWEB_MAX_IMAGES
    }


def clean_client_message_id(value: object) -> uuid.UUID | None:
    """The id a page gave a message it sends (repeats are answered once); an invalid one
    counts as none."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def clean_message_id(value: object) -> int | None:
    """A message pk from a frame: a number, or its digits as text (htmx's ws-send sends a
    form's fields as text), from 1 to the largest a database's bigint holds; anything else
    is None (a larger number would overflow the query)."""
    if isinstance(value, str) and value.isdecimal() and len(value) < 19:
        value = int(value)
    return value if type(value) is int and 0 < value < 2**63 else None


class AnyValue(forms.Field):
    """A field that passes its value on as it came (text from a form, or any JSON value from
    a socket's frame): the form's clean_<name> says what is valid."""

    def to_python(self, value):
        return value


class MessageForm(forms.Form):
    """A message as typed, from the home page's form or a socket's send or edit frame alike:
    its text (clean_content), its image URLs (clean_image_urls, and the model's vision when
    `model` is given) and the id the page gave it (an invalid one counts as none). The errors
    are ReplyRefused's sentences; `refusal()` gives the first as one."""

    content = AnyValue(required=False)
    image_urls = AnyValue(required=False)
    image_ids = AnyValue(required=False)
    client_message_id = AnyValue(required=False)

    def __init__(self, data, *, model: ModelProfile | None = None, with_images: bool = True):
        super().__init__(data)
        self.model = model
        if not with_images:
            del self.fields["image_urls"]
            del self.fields["image_ids"]

    def clean_content(self) -> str:
        return _as_field_error(clean_content, self.cleaned_data.get("content"))

    def clean_image_urls(self) -> list[str]:
        return _as_field_error(clean_image_urls, self.cleaned_data.get("image_urls"))

    def clean_image_ids(self) -> list[int]:
        return _as_field_error(clean_image_ids, self.cleaned_data.get("image_ids"))

    def clean_client_message_id(self) -> uuid.UUID | None:
        return clean_client_message_id(self.cleaned_data.get("client_message_id"))

    def clean(self) -> dict:
        data = super().clean()
        images = [*data.get("image_urls", ()), *data.get("image_ids", ())]
        if len(images) > settings.QWENWEB_MAX_IMAGES:
            self.add_error(None, too_many_images())
        elif self.model is not None and images:
            _as_field_error(check_images, images, self.model)
        return data

    def refusal(self) -> ReplyRefused:
        errors = [error for field in self.errors.values() for error in field]
        return ReplyRefused(errors[0] if errors else _("Type a message first."))

    def valid(self) -> dict:
        """The cleaned message, or ReplyRefused with the first error's sentence."""
        if not self.is_valid():
            raise self.refusal()
        return self.cleaned_data


def _as_field_error(check, *args):
    try:
        return check(*args)
    except ReplyRefused as refusal:
        raise ValidationError(str(refusal)) from None
