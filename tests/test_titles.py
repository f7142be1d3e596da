"""A chat's title written by the title model after its first reply (conversations/replies/
titles.py), against the simulator: in the user's language, never over a name the user gave,
never delaying the reply, and the first line kept on any failure."""

from __future__ import annotations

import asyncio

import pytest

from conversations.models import Conversation
from conversations.replies import titles
from dashscope_simulator import Scenario
from tests.ws_support import (
    Transcript,
    connect,
    make_conversation,
    make_user,
    receive_until,
    send_frame,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def title_model(settings):
    settings.QWENWEB_TITLE_MODEL = "qwen-flash"


async def first_exchange(text: str) -> tuple[Conversation, Transcript, object]:
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    ws, connected, _ = await connect(owner, conversation)
    assert connected
    await ws.send_to(text_data=send_frame(text))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "complete" in t.status.values())
    return conversation, transcript, ws


async def test_the_title_model_titles_a_chat_after_its_first_reply(title_model, app_simulator):
    conversation, transcript, ws = await first_exchange(
        "how do I bake sourdough bread at home with a young starter"
    )
    await receive_until(ws, transcript, lambda t: 'id="chat-title"' in t.frames[-1], within=10)
    title = "About: How do I bake sourdough bread"
    assert f'value="{title}"' in transcript.frames[-1]
    assert f">{title}</a>" in transcript.frames[-1], "the sidebar entry too"
    await conversation.arefresh_from_db()
    assert conversation.title == title
    asked = [r for r in app_simulator.requests if "title for this conversation" in str(r.body)]
    assert len(asked) == 1 and asked[0].body["model"] == "qwen-flash"
    # Only after the reply: the chat's own request came first, and the reply ended before.
    assert app_simulator.requests.index(asked[0]) == len(app_simulator.requests) - 1
    await ws.disconnect()


async def test_a_chinese_chat_gets_a_chinese_title(title_model, app_simulator):
    conversation, transcript, ws = await first_exchange("请帮我写一封请假邮件给我的经理")
    await receive_until(ws, transcript, lambda t: 'id="chat-title"' in t.frames[-1], within=10)
    await conversation.arefresh_from_db()
    assert conversation.title.startswith("关于：请帮我写一封请假邮件")
    await ws.disconnect()


async def test_a_name_the_user_gave_is_never_overwritten(title_model, app_simulator):
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    await Conversation.objects.filter(pk=conversation.pk).aupdate(title="My own name")
    changed = await titles.write(
        conversation_id=conversation.pk,
        message="how do I bake bread",
        reply="Like this.",
        first_line_title="how do I bake bread",
    )
    assert not changed
    await conversation.arefresh_from_db()
    assert conversation.title == "My own name"


async def test_a_failing_title_model_leaves_the_first_line(settings, app_simulator):
    settings.QWENWEB_TITLE_MODEL = "no-such-model"
    conversation, transcript, ws = await first_exchange("plan a trip to Kyoto in spring")
    await asyncio.sleep(0.5)
    await conversation.arefresh_from_db()
    assert conversation.title == "plan a trip to Kyoto in spring"
    assert any("no-such-model" in str(r.body) for r in app_simulator.requests)
    await ws.disconnect()


async def test_no_title_model_no_request(app_simulator):
    app_simulator.add_scenario(Scenario(match="only one", reply="Just the reply."))
    conversation, _transcript, ws = await first_exchange("only one request please")
    await asyncio.sleep(0.3)
    assert len(app_simulator.requests) == 1
    await ws.disconnect()


async def test_a_title_is_one_clean_line():
    assert titles.clean('"Baking Bread at Home."\n\nMore text') == "Baking Bread at Home"
    assert titles.clean("## Title: Sourdough tips") == "Sourdough tips"
    assert titles.clean("标题：请假邮件。") == "请假邮件"
    assert len(titles.clean("word " * 40)) <= 60
