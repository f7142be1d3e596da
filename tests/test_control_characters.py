"""NUL and the other invisible control characters, on SQLite and on real PostgreSQL.

PostgreSQL refuses NUL in text (SQLite stores it): a message, a title or a reply with one was
a 500 or a lost reply there. Every text that reaches the database comes without them — the
message over the socket and the composer form, the title, the model's reply and reasoning —
and a URL with one is refused. ``test_the_same_on_postgresql`` runs this module again against
a PostgreSQL database of its own.
"""

from __future__ import annotations

import logging
import os

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import AsyncClient, Client

from conversations.models import Conversation, Message, MessageImage, ModelProfile
from conversations.replies import rules, service
from conversations.replies.service import conversation_create
from dashscope_simulator import Scenario
from tests.postgres import rerun_on_postgresql
from tests.ws_support import (
    Transcript,
    assistant_reply,
    open_chat,
    receive_until,
    send_frame,
    wait_for_status,
)

# Set by test_the_same_on_postgresql for the run it starts: that run must really be on it.
EXPECTED_VENDOR = os.environ.get("QWENWEB_TEST_EXPECT_VENDOR")
# Every C0 control that is not tab, newline or carriage return, and those three.
INVISIBLE = "".join(chr(c) for c in range(32) if chr(c) not in "\t\n\r")
TYPED = "Hello\x00 wor\x1bld\x07\n\tindented\x01"
SAVED = "Hello world\n\tindented"


@pytest.fixture(autouse=True)
def _on_the_expected_database():
    if EXPECTED_VENDOR:
        assert connection.vendor == EXPECTED_VENDOR


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", password="pw")


def assert_no_controls(*texts: str) -> None:
    for text in texts:
        assert not set(text) & set(INVISIBLE), repr(text)


# -- what people type ------------------------------------------------------------------------


def test_clean_content_drops_invisible_controls_and_keeps_tabs_and_newlines():
    assert rules.clean_content(TYPED) == SAVED
    assert rules.clean_content("a\r\nb") == "a\r\nb"


@pytest.mark.parametrize("content", ["\x00", INVISIBLE, " \x00 \x1f\n"])
def test_a_message_of_nothing_but_controls_is_refused_as_empty(content):
    with pytest.raises(service.ReplyRefused, match="Type a message first."):
        rules.clean_content(content)


@pytest.mark.django_db
def test_a_message_and_the_title_it_gives_are_saved_without_controls(alice):
    conversation = conversation_create(owner=alice)
    started = service.reply_start(conversation=conversation, content=TYPED)
    started.user_message.refresh_from_db()
    conversation.refresh_from_db()
    assert started.user_message.content == SAVED
    assert conversation.title == "Hello world indented"


@pytest.mark.django_db
def test_an_image_url_with_a_control_character_is_refused_and_nothing_is_saved(alice):
    conversation = conversation_create(
        owner=alice, model=ModelProfile.objects.filter(endpoint="multimodal").first()
    )
    for url in ("https://example.com/cat\x00.png", "https://example.com/c\x1bat.png"):
        with pytest.raises(service.ReplyRefused, match="is not an image URL") as refused:
            service.reply_start(conversation=conversation, content="look", image_urls=url)
        assert_no_controls(str(refused.value))
    assert not Message.objects.exists() and not MessageImage.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("typed", "saved"), [("Trip\x00 plans\x1b", "Trip plans"), ("\x00\x01", "")]
)
def test_rename_drops_controls(alice, typed, saved):
    client = Client()
    client.force_login(alice)
    conversation = conversation_create(owner=alice)
    response = client.post(
        f"/c/{conversation.id}/rename/", {"title": typed}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert conversation.title == saved


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_composer_form_saves_the_message_without_controls(app_simulator):
    user = await get_user_model().objects.acreate_user("carol", password="pw")
    client = AsyncClient()
    await client.aforce_login(user)

    refused = await client.post("/c/new/", {"content": "\x00\x02"})
    assert refused.status_code == 400
    assert "Type a message first." in refused.content.decode()
    assert not await Conversation.objects.aexists()

    response = await client.post("/c/new/", {"content": TYPED})
    assert response.status_code == 302
    conversation = await Conversation.objects.aget(owner=user)
    assert conversation.title == "Hello world indented"
    sent = await Message.objects.aget(conversation=conversation, role="user")
    assert sent.content == SAVED
    await wait_for_status((await assistant_reply(conversation)).pk, {"complete"})


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_message_over_the_socket_is_saved_without_controls(app_simulator):
    _owner, conversation, ws = await open_chat()
    transcript = Transcript()
    try:
        await ws.send_to(text_data=send_frame("\x00\x1f"))
        notice = await ws.receive_from(timeout=5)
        assert "Type a message first." in notice
        await ws.send_to(text_data=send_frame(TYPED))
        await receive_until(ws, transcript, lambda t: "complete" in t.status.values())
    finally:
        await ws.disconnect()
    contents = [m.content async for m in Message.objects.filter(role="user")]
    assert contents == [SAVED]


# -- what the model writes -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_reply_with_nul_from_the_upstream_is_checkpointed_and_saved(
    app_simulator, settings, caplog
):
    """The simulator writes NUL into the reply and the reasoning, slowly enough for several
    checkpoints: none fails, and the reply is saved complete, without them."""
    settings.QWENWEB_CHECKPOINT_INTERVAL = 0.05
    words = " ".join(f"w\x00{i}\x01" for i in range(40))
    app_simulator.add_scenario(
        Scenario(reply=words, reasoning="think\x00ing hard", token_delay=0.01)
    )
    caplog.set_level(logging.WARNING, logger="conversations")
    _owner, conversation, ws = await open_chat()
    transcript = Transcript()
    try:
        await ws.send_to(text_data=send_frame("say something"))
        await receive_until(ws, transcript, lambda t: "complete" in t.status.values())
    finally:
        await ws.disconnect()
    reply = await wait_for_status((await assistant_reply(conversation)).pk, {"complete"})
    assert reply.content == " ".join(f"w{i}" for i in range(40))
    assert reply.reasoning == "thinking hard"
    assert_no_controls(*transcript.frames)
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert failures == []


# -- the same on PostgreSQL ------------------------------------------------------------------


def test_the_same_on_postgresql(tmp_path):
    """This module's other tests, again, in a pytest run of their own on a fresh PostgreSQL
    database: NUL is what PostgreSQL refuses."""
    rerun_on_postgresql(__file__, "test_the_same_on_postgresql", tmp_path)
