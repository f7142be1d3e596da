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
from importlib import import_module

from django.conf import settings
from django.contrib import auth
from django.utils import translation
from django.utils.crypto import constant_time_compare
from django.utils.translation.trans_real import parse_accept_lang_header

from conversations.db import db_async, quiet
from conversations.models import Conversation

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


class SessionEnded(Exception):
    """The session that opened a socket no longer signs its user in (SessionCheck.guard)."""


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

    def guard(self, now: float):
        """For a frame whose work goes to the database anyway (a send, a regenerate, an
        edit): None if the session is trusted at `now`, else the check as a function for the
        database thread, to run before that work in the same trip (a separate trip first
        held up every send after a quiet spell, most of them: bench/README.md, fourteenth
        pass). It raises SessionEnded if the session is gone, as errors of the database
        (the work after it would meet them too); once passed, calling it again is free."""
        if now - self.checked_at < SESSION_CHECK_INTERVAL:
            return None

        def check() -> None:
            if self.checked_at >= now:  # passed already (a send's plan, then its save)
                return
            if not _signs_in(self.session_key, self.user_id):
                self.ended = True
                raise SessionEnded
            self.checked_at = max(self.checked_at, now)  # a float, set from the thread

        return check

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
    stored = data.get(auth.HASH_SESSION_KEY) or ""
    if user is None or not stored:
        return False
    hashes = [user.get_session_auth_hash()] + [
        user._get_session_auth_hash(secret=secret) for secret in settings.SECRET_KEY_FALLBACKS
    ]
    return any(constant_time_compare(stored, value) for value in hashes)


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
