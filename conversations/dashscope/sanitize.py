"""What the client does to every string DashScope sends before the caller sees it.

An upstream, or a proxy in front of it, may echo the request back: its ``Authorization``
header in a request id, an error message or the reply itself. Whatever the client yields or
raises is stored, logged, sent to sockets and exported, so the key is taken out here, at the
boundary, once. Control characters go too: PostgreSQL refuses NUL in a text column, so a NUL
in a reply would fail its checkpoints and its final save.
"""

from __future__ import annotations

import re

REDACTED = "sk-***"
# Real keys are ~35 characters; redacting a toy key of a letter or two would only garble text
# ("chunked" -> "chun***ed") without protecting anything.
MIN_REDACTED_KEY = 8
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")
# C0 controls except tab, newline and carriage return: invisible, and NUL breaks PostgreSQL.
# Lone surrogates too (JSON's "\ud800" decodes to one): no database can encode them.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def strip_controls(text: str) -> str:
    """``text`` without the C0 control characters other than tab, newline and carriage return.

    They are invisible on a page, so dropping them changes nothing a person can read, and
    PostgreSQL refuses NUL in text (SQLite would store it and a later move to PostgreSQL fail).
    """
    return _CONTROLS.sub("", text)


def redact_key(text: str, api_key: str) -> str:
    """``text`` with the configured key replaced by ``sk-***``."""
    if len(api_key) < MIN_REDACTED_KEY:
        return text
    return text.replace(api_key, REDACTED)


def clean_metadata(text: str | None, api_key: str) -> str | None:
    """A string from DashScope that is not model output: a request id, an error code or
    message, a finish reason, a tool call's id or name.

    The configured key goes, and so does anything shaped like a key (``sk-…``): a proxy may
    echo another key than ours, and none of these strings has a reason to hold one.
    """
    if text is None:
        return None
    return _KEY_SHAPE.sub(REDACTED, redact_key(strip_controls(text), api_key))


class OutputCleaner:
    """Model output (reply or reasoning text), one chunk at a time.

    Only the configured key is redacted, not every ``sk-…`` shape: a model that explains API
    keys writes examples such as ``sk-xxxxxxxx``, and those are the reply. A key may arrive
    split over two chunks, so the end of a chunk that could be the start of the key is held
    back until the next chunk (or ``flush``) shows what follows; a reply that is stopped or
    fails at that moment loses those few characters, never more than the key's length.
    """

    def __init__(self, api_key: str) -> None:
        self._key = api_key if len(api_key) >= MIN_REDACTED_KEY else ""
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to hand on now."""
        text = strip_controls(text)
        if not self._key:
            return text
        text = (self._held + text).replace(self._key, REDACTED)
        held = _longest_key_prefix_at_end(text, self._key)
        self._held = text[len(text) - held :] if held else ""
        return text[: len(text) - held]

    def flush(self) -> str:
        """What was held back: the stream ended, so it cannot be the start of the key."""
        held, self._held = self._held, ""
        return held


def _longest_key_prefix_at_end(text: str, key: str) -> int:
    for length in range(min(len(key) - 1, len(text)), 0, -1):
        if text.endswith(key[:length]):
            return length
    return 0
