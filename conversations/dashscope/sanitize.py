"""What the client does to every string DashScope sends before the caller sees it.

An upstream, or a proxy in front of it, may echo the request back: its ``Authorization``
header in a request id, an error message or the reply itself. Whatever the client yields or
raises is stored, logged, sent to sockets and exported, so the key is taken out here, at the
boundary, once. Control characters go too: PostgreSQL refuses NUL in a text column, so a NUL
in a reply would fail its checkpoints and its final save.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

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
    """The length of the longest end of `text`, shorter than `key`, that begins `key`.

    Run for every chunk of every reply: the ends tried are only those starting with the
    key's first character (found by str.find), not each length in turn."""
    at = text.find(key[0], max(0, len(text) - len(key) + 1))
    while at != -1:
        if key.startswith(text[at:]):
            return len(text) - at
        at = text.find(key[0], at + 1)
    return 0


# Web sources: what DashScope's search found. They reach a page as links, so each is reduced to
# plain strings of bounded length and an http(s) URL (never the icon: loading it would tell a
# third party who reads the chat).
MAX_SEARCH_RESULTS = 20
_MAX_TITLE = 300
_MAX_SITE_NAME = 100
_MAX_URL = 2048


def clean_search_results(raw: Any, api_key: str) -> list[dict[str, Any]]:
    """``search_info.search_results`` as ``{"index": int | None, "title", "url", "site_name"}``
    dicts: at most ``MAX_SEARCH_RESULTS``; control characters and the configured key taken
    out, whitespace runs made one space; a URL that is not http(s) (``javascript:``, ``data:``
    ...) or too long becomes "" and the title stays, as plain text for the page to escape.
    Entries with neither a title nor a URL are dropped."""
    if not isinstance(raw, list):
        return []
    results: list[dict[str, Any]] = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        index = item.get("index")
        result = {
            "index": index if isinstance(index, int) and not isinstance(index, bool) else None,
            "title": _plain(item.get("title"), api_key, _MAX_TITLE),
            "url": _web_url(item.get("url"), api_key),
            "site_name": _plain(item.get("site_name"), api_key, _MAX_SITE_NAME),
        }
        if result["title"] or result["url"]:
            results.append(result)
        if len(results) == MAX_SEARCH_RESULTS:
            break
    return results


def _plain(value: Any, api_key: str, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    text = " ".join(redact_key(strip_controls(value), api_key).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _web_url(value: Any, api_key: str) -> str:
    if not isinstance(value, str):
        return ""
    url = strip_controls(value).strip()
    if len(url) > _MAX_URL or any(c.isspace() for c in url) or redact_key(url, api_key) != url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return ""
    return url
