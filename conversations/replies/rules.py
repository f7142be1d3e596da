"""The rules a reply must pass before anything is saved or sent: what a valid message, title
and image list are, and the limits (the model still enabled, and the user's to use; replies at
once, messages and new chats a minute; tokens a day and a month, cost a month: quotas.py says
whose limits are in force). Each refusal is a ReplyRefused whose text is a sentence for the
user.

Limits are counted in the database under the owner's row lock (service._lock), so they hold
across server processes.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import connection
from django.utils import formats, timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from conversations.dashscope.sanitize import strip_controls
from conversations.models import Conversation, GroupPolicy, Message, ModelProfile, UserQuota
from conversations.replies import quotas
from conversations.templatetags.qwenweb import cost_text

# The window QWENWEB_MESSAGES_PER_MINUTE and QWENWEB_CHATS_PER_MINUTE count in.
RATE_WINDOW = timedelta(seconds=60)
# A chat is moved on (updated_at) just before its new reply is created (created_at): the
# counts find a window's replies through the chats moved since a little before the window.
CHAT_MOVED_BEFORE = timedelta(minutes=1)


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


def _tables() -> dict:
    from django.contrib.auth import get_user_model

    members = get_user_model().groups.through
    return {
        "messages": Message._meta.db_table,
        "chats": Conversation._meta.db_table,
        "quotas": UserQuota._meta.db_table,
        "policies": GroupPolicy._meta.db_table,
        "members": members._meta.db_table,
        "member": members._meta.get_field("user").column,
        "member_group": members._meta.get_field("group").column,
        "allowed_models": GroupPolicy.allowed_models.through._meta.db_table,
        "allowed_prompts": GroupPolicy.allowed_prompts.through._meta.db_table,
    }


# The limits counted by LoadQuery, in the order its row gives them.
_INTEGER_LIMITS = (
    "max_concurrent_replies", "messages_per_minute", "tokens_per_day", "tokens_per_month",
)  # fmt: skip


@dataclass(frozen=True)
class Load:
    """One user's load and limits as LoadQuery read them (limits: 0 is none)."""

    limits: dict
    streaming: int
    nth_recent: datetime | None
    tokens_today: int
    tokens_this_month: int
    cost_this_month: Decimal
    model_allowed: bool
    prompt_allowed: bool
    windows: quotas.Windows  # the day and month counted, and when they end


@functools.lru_cache(maxsize=16)
def _window_moments(vendor: str, since: datetime) -> tuple:
    """A quota window's start as the load statement takes it (a chat moved since a while
    before it, a reply made since it), in the database's form: the same for a day or a month
    of sends (as text on SQLite, made anew each time: 0.05 ms a send)."""
    moment = connection.ops.adapt_datetimefield_value
    return moment(since - CHAT_MOVED_BEFORE), moment(since)


@dataclass(frozen=True)
class LoadQuery:
    """The statement that reads one user's limits and load (see check_user_limits), made at
    `now`, and whether the chat's model and system prompt are theirs to use. The send path
    reads it together with the conversation under its lock (intake.read_under_lock): one
    round trip fewer on every send.

    The limits in force are resolved in the statement as quotas.py says (the user's own, else
    the most generous of their groups', else the site's), and each count is read only when its
    limit is on. No count reads the user's whole history: replies streaming now go through
    the status index; the others through the (owner, updated_at) index of conversations to the
    chats active within the window (every reply started moves its chat's updated_at on), and
    the (conversation, created_at) index of messages to the window's replies in each.
    """

    sql: str
    params: list
    now: datetime
    windows: quotas.Windows

    @classmethod
    def of(cls, owner_id, *, model_id=None, prompt_id=None) -> LoadQuery:
        now = timezone.now()
        windows = quotas.Windows.at(now)
        site = quotas.site_limits()
        # A reply whose heartbeat stopped has no process behind it: it takes no place.
        alive_since = now - timedelta(seconds=Message.STALE_AFTER)
        recent_since = now - RATE_WINDOW
        moment = connection.ops.adapt_datetimefield_value
        assistant = Message.Role.ASSISTANT.value

        def in_window(since) -> list:
            moved_since, made_since = _window_moments(connection.vendor, since)
            return [owner_id, moved_since, assistant, made_since]

        params = [  # in the order they appear in the text: `lim`'s last
            owner_id, Message.Status.STREAMING.value, assistant, moment(alive_since),
            owner_id, moment(recent_since - CHAT_MOVED_BEFORE), assistant, moment(recent_since),
            *in_window(windows.day_start), *in_window(windows.month_start),
            *in_window(windows.month_start), settings.QWENWEB_CURRENCY,
            model_id, owner_id,
            prompt_id, owner_id,
            *[site[name] for name in _INTEGER_LIMITS], owner_id, owner_id,
        ]  # fmt: skip
        return cls(_load_sql(site["cost_per_month"] > 0, connection.vendor), params, now, windows)

    def read(self) -> tuple:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, self.params)
            return cursor.fetchone()

    def load(self, row: tuple) -> Load:
        """The row this statement read, as a Load."""
        (*integers, cost_user, cost_group, streaming, nth_recent, today, month, cost,
         model_allowed, prompt_allowed) = row  # fmt: skip
        limits = dict(zip(_INTEGER_LIMITS, (int(value) for value in integers), strict=True))
        limits["cost_per_month"] = quotas.resolve(
            _decimal(cost_user), _decimal(cost_group), settings.QWENWEB_COST_PER_MONTH
        )
        return Load(
            limits=limits,
            streaming=streaming or 0,
            nth_recent=_moment(nth_recent),
            tokens_today=int(today or 0),
            tokens_this_month=int(month or 0),
            cost_this_month=_decimal(cost) or Decimal(0),
            model_allowed=bool(model_allowed),
            prompt_allowed=bool(prompt_allowed),
            windows=self.windows,
        )


def user_load(user) -> Load:
    """A user's limits in force and what they have used of them (today's and this month's
    tokens and cost: read only where that limit is on), for a page that shows what is left.
    Its model_allowed and prompt_allowed say nothing here (no chat was named)."""
    query = LoadQuery.of(user.pk)
    return query.load(query.read())


@functools.cache
def _load_sql(site_cost_limit: bool, vendor: str) -> str:
    """LoadQuery's statement (its text depends only on whether the site limits cost, and on
    the database), written once a process: a send pays only for its parameters.

    Each count reads the user's own replies only, whatever the rest of the site holds: the
    replies streaming now from the status index, the others from the user's chats active in
    the window. SQLite has no statistics to plan with (nothing runs ANALYZE) and took the
    (role, created_at) index instead, reading every reply of every user since the window's
    start: 6.8 ms a send with 20,000 messages in the database, growing with it. There the
    joins are written in the order to run them (SQLite keeps a CROSS JOIN's order) and the
    role is kept out of the index choice (`+m.role`). PostgreSQL plans this statement once a
    connection (intake._raw_postgresql), maybe on a new database without statistics, where
    it took the same index: there too the role is kept out of it (`m.role || ''`), and it
    reorders the joins as it sees fit."""
    t = _tables()
    role = "+m.role" if vendor == "sqlite" else "(m.role || '')"

    # `lim`: the limits in force. Of the user's groups' policies, MIN tells whether one
    # lifts the limit (0) and MAX is otherwise the most generous; the user's own value,
    # if set, comes first and the site's last.
    group_values = ", ".join(
        f"MIN(p.{name}) AS {name}_min, MAX(p.{name}) AS {name}_max"
        for name in (*_INTEGER_LIMITS, "cost_per_month")
    )
    resolved = ", ".join(
        f"COALESCE(q.{name}, CASE WHEN g.{name}_min = 0 THEN 0 ELSE g.{name}_max END, %s) AS {name}"
        for name in _INTEGER_LIMITS
    )
    # The cost limit's site default stays out of SQL (a decimal parameter is text on
    # SQLite): the user's and the groups' values are read, and Python adds the site's.
    limits = f"""
        SELECT {resolved},
          q.cost_per_month AS cost_user,
          CASE WHEN g.cost_per_month_min = 0 THEN 0 ELSE g.cost_per_month_max END
            AS cost_group
        FROM (SELECT {group_values} FROM {t["policies"]} p JOIN {t["members"]} u
                ON u.{t["member_group"]} = p.group_id WHERE u.{t["member"]} = %s) g
        LEFT JOIN {t["quotas"]} q ON q.user_id = %s
    """
    cost_on = "1 = 1" if site_cost_limit else "COALESCE(lim.cost_user, lim.cost_group, 0) > 0"

    # A user's replies since a moment (the start of the day or month: a parameter): their
    # chats active since then, then each one's messages since then.
    window = (
        f"FROM {t['chats']} c CROSS JOIN {t['messages']} m WHERE m.conversation_id = c.id "
        f"AND c.owner_id = %s AND c.updated_at >= %s AND {role} = %s AND m.created_at >= %s"
    )
    tokens = "COALESCE(SUM(COALESCE(m.input_tokens, 0) + COALESCE(m.output_tokens, 0)), 0)"

    def allowed(through: str, column: str) -> str:
        # 1 when no group of the user's lists any (no restriction), or one lists this.
        return (
            f"(SELECT CASE WHEN COUNT(*) = 0 THEN 1 "
            f"ELSE MAX(CASE WHEN a.{column} = %s THEN 1 ELSE 0 END) END "
            f"FROM {through} a JOIN {t['policies']} p ON p.id = a.grouppolicy_id "
            f"JOIN {t['members']} u ON u.{t['member_group']} = p.group_id "
            f"WHERE u.{t['member']} = %s)"
        )

    # `load_streaming`: the user's replies being written (heartbeat since alive_since);
    # `load_nth_recent`: when their nth newest reply since recent_since was started (None:
    # fewer than n), n the limit a minute (a send, a regenerate and an edit each start
    # one); the tokens and cost of the replies started today and this month. SQL rather
    # than the ORM: the same statement built from querysets cost about 1 ms of Python per
    # send, on SQLite and PostgreSQL alike. Table names from the models; every value goes
    # as a parameter.
    sql = f"""
        SELECT lim.*,
          CASE WHEN lim.max_concurrent_replies > 0 THEN
            (SELECT COUNT(*) FROM {t["messages"]} m CROSS JOIN {t["chats"]} c
              WHERE c.id = m.conversation_id
              AND c.owner_id = %s AND m.status = %s AND {role} = %s
              AND m.updated_at >= %s) END AS load_streaming,
          CASE WHEN lim.messages_per_minute > 0 THEN
            (SELECT r.created_at FROM (
              SELECT m.created_at, ROW_NUMBER() OVER (ORDER BY m.created_at DESC) AS n
              FROM {t["chats"]} c CROSS JOIN {t["messages"]} m
              WHERE m.conversation_id = c.id
              AND c.owner_id = %s AND c.updated_at > %s AND {role} = %s
              AND m.created_at > %s) r
             WHERE r.n = lim.messages_per_minute) END AS load_nth_recent,
          CASE WHEN lim.tokens_per_day > 0 THEN (SELECT {tokens} {window}) END
            AS load_tokens_today,
          CASE WHEN lim.tokens_per_month > 0 THEN (SELECT {tokens} {window}) END
            AS load_tokens_month,
          CASE WHEN {cost_on} THEN
            (SELECT COALESCE(SUM(m.cost), 0) {window} AND m.cost_currency = %s) END
            AS load_cost_month,
          {allowed(t["allowed_models"], "modelprofile_id")} AS load_model_allowed,
          {allowed(t["allowed_prompts"], "systemprompt_id")} AS load_prompt_allowed
        FROM ({limits}) lim
    """
    # In one line: the text is shorter than 4,096 bytes, under which psycopg keeps its parsed
    # form between sends rather than parsing it again (0.09 ms a send). No literal in it
    # holds a space.
    return " ".join(sql.split())


def _decimal(value) -> Decimal | None:
    """A decimal column or sum as read (a float or text on SQLite)."""
    if value is None or isinstance(value, Decimal):
        return value
    return Decimal(str(value))


def _moment(value) -> datetime | None:
    if isinstance(value, str):  # SQLite: the text Django stores, in UTC
        value = datetime.fromisoformat(value)
    if value is not None and timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return value


def check_user_limits(
    conversation: Conversation, load: tuple[LoadQuery, tuple] | None = None
) -> None:
    """Refuse a new reply beyond its owner's limits, or with a model or system prompt that is
    not theirs to use (quotas.py: their own limits, their groups', the site's): replies being
    written at once across their chats, messages sent in the last minute (each reply started
    counts, so a regenerate or an edit costs one as a send does), tokens today and this month,
    and cost this month, each refusal saying when the limit resets. Counted in the database, so
    they hold across server processes, in one query; `load` is that query and the row it read
    already, if the caller read it."""
    if load is None:
        query = LoadQuery.of(
            conversation.owner_id,
            model_id=conversation.model_id,
            prompt_id=conversation.system_prompt_id,
        )
        load = query, query.read()
    query, row = load
    found = query.load(row)
    limits = found.limits
    if not found.model_allowed:
        raise ReplyRefused(model_not_allowed(conversation.owner_id, conversation.model))
    if not found.prompt_allowed:
        raise ReplyRefused(prompt_not_allowed(conversation.owner_id))
    streaming, max_replies = found.streaming, limits["max_concurrent_replies"]
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
    per_minute = limits["messages_per_minute"]
    if per_minute > 0 and found.nth_recent is not None:
        wait = found.nth_recent + RATE_WINDOW - query.now
        seconds = min(60, max(1, math.ceil(wait.total_seconds())))
        raise ReplyRefused(
            ngettext(
                "Messages are limited to %(limit)s a minute. Try again in %(seconds)s second.",
                "Messages are limited to %(limit)s a minute. Try again in %(seconds)s seconds.",
                seconds,
            )
            % {"limit": per_minute, "seconds": seconds}
        )
    windows, zone = query.windows, quotas.zone_name()
    per_day = limits["tokens_per_day"]
    if per_day > 0 and found.tokens_today >= per_day:
        raise ReplyRefused(
            _("You have used your %(limit)s tokens for today. The limit resets at 00:00 "
              "(%(zone)s).")
            % {"limit": f"{per_day:,}", "zone": zone}
        )  # fmt: skip

    def resets() -> str:  # formatted only for a refusal (0.05 ms a send otherwise)
        return formats.date_format(
            timezone.localtime(windows.next_month, timezone.get_default_timezone()),
            "MONTH_DAY_FORMAT",
        )

    per_month = limits["tokens_per_month"]
    if per_month > 0 and found.tokens_this_month >= per_month:
        raise ReplyRefused(
            _("You have used your %(limit)s tokens for this month. The limit resets on "
              "%(date)s at 00:00 (%(zone)s).")
            % {"limit": f"{per_month:,}", "date": resets(), "zone": zone}
        )  # fmt: skip
    cost_limit = limits["cost_per_month"]
    if cost_limit > 0 and found.cost_this_month >= cost_limit:
        amount = cost_text(
            SimpleNamespace(cost=cost_limit, cost_currency=settings.QWENWEB_CURRENCY)
        )
        raise ReplyRefused(
            _("Your replies have cost the %(limit)s allowed for this month. The limit resets "
              "on %(date)s at 00:00 (%(zone)s).")
            % {"limit": amount, "date": resets(), "zone": zone}
        )  # fmt: skip


def model_not_allowed(user_id, model: ModelProfile) -> str:
    """The refusal of a model the user may not use, naming the ones they may."""
    from django.contrib.auth import get_user_model

    user = get_user_model()(pk=user_id)
    labels = [m.label for m in quotas.allowed_models(user)]
    if not labels:
        return _("No model is available to you. Ask an administrator.")
    return _("%(model)s is not available to you. Pick one of these at the top of the chat: "
             "%(models)s.") % {"model": model.label, "models": ", ".join(labels)}  # fmt: skip


def prompt_not_allowed(user_id) -> str:
    """The refusal of a chat whose system prompt the user may not use."""
    from django.contrib.auth import get_user_model

    prompts, _none = quotas.allowed_prompts(get_user_model()(pk=user_id))
    return _("This chat's system prompt is not available to you. Pick one of these in the "
             "chat's settings: %(prompts)s.") % {
        "prompts": ", ".join(p.name for p in prompts)
    }  # fmt: skip


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
