"""Who may keep a conversation's socket open, and in which language it speaks.

A socket opens for the conversation's owner only (anyone else is closed with 4403, as a page
would answer 404), and ends with the session that opened it: a logout, a password change, or
the account disabled or deleted closes it (conversations/signals.py tells every process), and
since a change made where no signal reaches (`manage.py shell`, another host on the in-memory
layer) would leave it open, the socket also re-checks its session before it acts on a frame,
at most every SESSION_CHECK_INTERVAL seconds.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import import_module

from django.conf import settings
from django.contrib import auth
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.sessions.models import Session
from django.db.models.manager import BaseManager
from django.utils import timezone, translation
from django.utils.crypto import constant_time_compare
from django.utils.translation import gettext as _
from django.utils.translation.trans_real import parse_accept_lang_header

from conversations.db import db_async, quiet
from conversations.models import Conversation
from conversations.replies.rules import ReplyRefused

logger = logging.getLogger(__name__)

# How long a socket trusts its session between checks (a password change, a deactivation or
# a deleted session closes it at the next frame after at most this long).
SESSION_CHECK_INTERVAL = 2.0
# How long a check in the background waits, at most, for sends on their way to the database
# (db.quiet): when many people send at once, each socket's check would hold up the others'
# requests on the database thread (P1, bench/README.md). It still ends before the next frame
# would have to wait for one.
REFRESH_DEFER = SESSION_CHECK_INTERVAL / 4


@db_async
def owned_conversation(user, conversation_id) -> Conversation | None:
    return (
        Conversation.objects.owned_by(user)
        .select_related("model")
        .filter(pk=conversation_id)
        .first()
    )


class SessionEnded(ReplyRefused):
    """The session that opened a socket no longer signs its user in (SessionGuard)."""


class SessionCheck:
    """Whether the session that opened a socket still signs its user in, checked against the
    session store and the user's row (a change made anywhere counts), and trusted for
    SESSION_CHECK_INTERVAL after a check that passed.

    A socket in use keeps its check fresh in the background (`due`, `refresh`: once half the
    interval has passed, after a frame was handled), so that a send does not wait for a check
    on the way to DashScope (P1 in bench/README.md); a frame after a quiet spell still waits
    for one (`still_valid`), unless it goes to the database anyway (`guard`: a send)."""

    def __init__(self, session_key: str | None, user_id, checked_at: float) -> None:
        self.session_key = session_key
        self.user_id = user_id
        self.checked_at = checked_at  # the auth middleware checked it as the socket opened
        self.refreshing = False
        self.ended = False  # a check in the background found the session gone

    def due(self, now: float) -> bool:
        return not self.refreshing and now - self.checked_at >= SESSION_CHECK_INTERVAL / 2

    async def refresh(self, now: float) -> None:
        """Check again, in the background, once the sends on their way to the database have
        gone; the next frame is refused if the session is gone."""
        self.refreshing = True
        try:
            await quiet(REFRESH_DEFER)
            valid = await session_signs_in(self.session_key, self.user_id)
        except Exception:
            return  # the next frame past the interval checks again, and says why
        finally:
            self.refreshing = False
        if valid:
            self.checked_at = max(self.checked_at, now)
        else:
            self.ended = True

    def guard(self, now: float) -> SessionGuard | None:
        """For a frame whose work goes to the database anyway (a send, a regenerate, an
        edit): None if the session is trusted at `now`, else the check, made in that work's
        own trip to the database (SessionGuard)."""
        if now - self.checked_at < SESSION_CHECK_INTERVAL:
            return None
        return SessionGuard(self, now)

    async def still_valid(self, now: float) -> bool:
        if self.ended:
            return False
        if now - self.checked_at < SESSION_CHECK_INTERVAL:
            return True
        try:
            valid = await session_signs_in(self.session_key, self.user_id)
        except Exception:
            # The database is away: the frame's own work needs it too, and says so.
            logger.warning("Checking the session of a socket failed", exc_info=True)
            return True
        if valid:
            self.checked_at = now
        return valid


class SessionGuard:
    """A socket's session check, made in the trip to the database of the frame it guards
    (a separate trip first held up every send after a quiet spell, most of them: a page's
    send comes after its typing; bench/README.md, fourteenth pass). A send's plan reads its
    two rows with its own, in the same round trip on PostgreSQL (`reads`, then `check` with
    their rows); other work calls it (`__call__`: _signs_in). Either raises SessionEnded if
    the session is gone; once passed, it is free. It runs on the database thread, and marks
    its SessionCheck from there (a float and a flag)."""

    def __init__(self, session: SessionCheck, now: float) -> None:
        self.session = session
        self.now = now

    def passed(self) -> bool:
        return self.session.checked_at >= self.now

    def __call__(self) -> None:
        if not self.passed():
            self._conclude(_signs_in(self.session.session_key, self.session.user_id))

    def reads(self, db) -> list[tuple[str, list, bool]] | None:
        """The session's row and its user's, as (sql, params, prepare) statements to read with
        other work (intake.run_reads), in that order; None if this site's sessions or users
        are kept otherwise than these statements assume (then call the guard itself)."""
        if self.passed() or not self.session.session_key or not _plain_rows():
            return None
        user = get_user_model()
        columns = ", ".join(
            db.ops.quote_name(user._meta.get_field(name).column) for name in _USER_FIELDS
        )
        pk = db.ops.quote_name(user._meta.pk.column)
        return [
            (
                f"SELECT session_data FROM {db.ops.quote_name(Session._meta.db_table)} "
                "WHERE session_key = %s AND expire_date > %s",
                [self.session.session_key, db.ops.adapt_datetimefield_value(timezone.now())],
                True,
            ),
            (
                f"SELECT {columns} FROM {db.ops.quote_name(user._meta.db_table)} WHERE {pk} = %s",
                [user._meta.pk.get_db_prep_value(self.session.user_id, db)],
                True,
            ),
        ]

    def check(self, db, session_rows: list, user_rows: list) -> None:
        """Conclude from the rows of `reads`, as _signs_in would."""
        if self.passed():
            return
        session = self.session
        valid = _signs_in_from(db, session.session_key, session.user_id, session_rows, user_rows)
        if valid is None:  # the account's backend finds users its own way
            valid = _signs_in(session.session_key, session.user_id)
        self._conclude(valid)

    def _conclude(self, valid: bool) -> None:
        if not valid:
            self.session.ended = True
            raise SessionEnded(_("Your session has ended. Sign in again to go on."))
        self.session.checked_at = max(self.session.checked_at, self.now)


# What SessionGuard reads of a user: what ModelBackend.user_can_authenticate and
# get_session_auth_hash look at.
_USER_FIELDS = ("id", "password", "is_active")


def _plain_rows() -> bool:
    """Whether a session and its user can be read as SessionGuard.reads does: sessions kept in
    the database, and users as their model's plain manager finds them, with the fields it
    reads."""
    return settings.SESSION_ENGINE == "django.contrib.sessions.backends.db" and _plain_users(
        get_user_model()
    )


@cache
def _plain_users(user) -> bool:
    names = {field.name for field in user._meta.concrete_fields}
    return (
        user._meta.pk.name == "id"
        and set(_USER_FIELDS) <= names
        and type(user._default_manager).get_queryset is BaseManager.get_queryset
    )


def _signs_in_from(db, session_key: str, user_id, session_rows: list, user_rows: list):
    """_signs_in's answer from the rows SessionGuard.reads read; None if the session's backend
    finds its users otherwise than ModelBackend (then ask _signs_in)."""
    if not session_rows:  # gone, or expired
        return False
    data = (
        import_module(settings.SESSION_ENGINE).SessionStore(session_key).decode(session_rows[0][0])
    )
    backend_path = data.get(auth.BACKEND_SESSION_KEY)
    if str(data.get(auth.SESSION_KEY)) != str(user_id) or (
        backend_path not in settings.AUTHENTICATION_BACKENDS
    ):
        return False
    backend = auth.load_backend(backend_path)
    if type(backend).get_user is not ModelBackend.get_user:
        return None
    if not user_rows:
        return False
    user = get_user_model().from_db(db.alias, list(_USER_FIELDS), list(user_rows[0]))
    user.is_active = bool(user.is_active)  # SQLite's 0 or 1
    if not backend.user_can_authenticate(user):
        return False
    return _hash_matches(user, data)


def _hash_matches(user, data: dict) -> bool:
    """Whether the session's hash is the user's password's, made with SECRET_KEY or one of
    SECRET_KEY_FALLBACKS."""
    stored = data.get(auth.HASH_SESSION_KEY) or ""
    if not stored:
        return False
    hashes = [user.get_session_auth_hash()] + [
        user._get_session_auth_hash(secret=secret) for secret in settings.SECRET_KEY_FALLBACKS
    ]
    return any(constant_time_compare(stored, value) for value in hashes)


def _signs_in(session_key: str | None, user_id) -> bool:
    """What a page request would find: the session still there and signing this user in, its
    password hash today's (or one made with a SECRET_KEY_FALLBACKS key), and the account
    active as its backend sees it. The checks of django.contrib.auth.get_user, without its
    writes: it would cycle the key of a session hashed with a fallback secret, and a key
    cycled here reaches no browser (the page's own session would be gone)."""
    if not session_key:
        return False
    data = import_module(settings.SESSION_ENGINE).SessionStore(session_key).load()
    backend_path = data.get(auth.BACKEND_SESSION_KEY)
    if str(data.get(auth.SESSION_KEY)) != str(user_id) or (
        backend_path not in settings.AUTHENTICATION_BACKENDS
    ):
        return False
    user = auth.load_backend(backend_path).get_user(user_id)
    return user is not None and _hash_matches(user, data)


session_signs_in = db_async(_signs_in)


def language(scope) -> str | None:
    """The page's language, as LocaleMiddleware picked it: cookie, then Accept-Language."""
    candidates = [scope.get("cookies", {}).get(settings.LANGUAGE_COOKIE_NAME, "")]
    headers = dict(scope.get("headers", []))
    accept = headers.get(b"accept-language", b"").decode("latin-1")
    candidates += [code for code, _q in parse_accept_lang_header(accept) if code != "*"]
    for code in candidates:
        try:
            return translation.get_supported_language_variant(code)
        except LookupError:
            continue
    return None
