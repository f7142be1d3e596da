"""Regenerate, edit and versions: over the real socket and views, against the simulator.

The guarantees of the spine hold for them too: idempotent per client_message_id, refused while
a reply streams (nothing saved), Stop, a dead reply regenerated, other users kept out, and only
the active branch sent to DashScope.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from django.utils import timezone

from conversations.models import Conversation, Message
from conversations.replies import branches
from dashscope_simulator import Scenario, ScenarioError
from tests.ws_support import (
    Transcript,
    connect,
    make_user,
    open_chat,
    receive_until,
    send_frame,
    wait_for_status,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

NAV = re.compile(r'<nav class="versions" data-versions="(\d+)" data-version="(\d+)"')


def frame(kind: str, **fields) -> str:
    return json.dumps({"type": kind, "client_message_id": str(uuid.uuid4()), **fields})


def sent_turns(simulator) -> list[tuple[str, str]]:
    """The (role, content) turns of the simulator's last request."""
    body = simulator.requests[-1].body
    messages = body["input"]["messages"] if "input" in body else body["messages"]
    return [(m["role"], m["content"]) for m in messages if m["role"] != "system"]


async def chat_with_two_turns(app_simulator):
    """alice's chat: "first?" → "One.", "second?" → "Two."; the socket open on it."""
    app_simulator.add_scenario(Scenario(match="first?", reply="One."))
    app_simulator.add_scenario(Scenario(match="second?", reply="Two."))
    owner, conversation, ws = await open_chat()
    transcript = Transcript()
    for text in ("first?", "second?"):
        await ws.send_to(text_data=send_frame(text))
        done = sum(s == "complete" for s in transcript.status.values()) + 1
        await receive_until(
            ws, transcript, lambda t, n=done: sum(s == "complete" for s in t.status.values()) >= n
        )
    return owner, conversation, ws, transcript


@sync_to_async
def messages_of(conversation) -> list[Message]:
    return list(Message.objects.filter(conversation=conversation).order_by("pk"))


@sync_to_async
def shown(conversation) -> list[tuple[str, str]]:
    """The active branch, as (role, content): what the chat shows and sends."""
    conversation = Conversation.objects.get(pk=conversation.pk)
    page = branches.page(conversation, size=100)["chat_messages"]
    return [(m.role, m.content) for m in page]


async def test_regenerate_keeps_both_versions_and_sends_only_the_active_branch(app_simulator):
    _owner, conversation, ws, transcript = await chat_with_two_turns(app_simulator)
    before = await messages_of(conversation)
    old_reply = before[-1]
    app_simulator.add_scenario(Scenario(match="second?", reply="Two, again."))
    await ws.send_to(text_data=frame("regenerate"))
    await receive_until(ws, transcript, lambda t: "Two, again." in "".join(t.frames))
    after = await messages_of(conversation)
    new_reply = after[-1]
    await wait_for_status(new_reply.pk, {"complete"})

    assert len(after) == len(before) + 1, "one new version, nothing deleted"
    assert new_reply.parent_id == old_reply.parent_id
    assert (await Message.objects.aget(pk=old_reply.pk)).content == "Two."
    assert sent_turns(app_simulator) == [
        ("user", "first?"),
        ("assistant", "One."),
        ("user", "second?"),
    ]
    assert await shown(conversation) == [
        ("user", "first?"), ("assistant", "One."),
        ("user", "second?"), ("assistant", "Two, again."),
    ]  # fmt: skip
    # The page swapped the branch in place, the new reply marked as version 2 of 2.
    branch = next(
        f
        for f in transcript.frames
        if 'id="messages" class="messages" hx-swap-oob="innerHTML"' in f
    )
    assert f'id="message-{old_reply.pk}"' not in branch
    await receive_until(ws, transcript, lambda t: t.status.get(new_reply.pk) == "complete")
    final = [f for f in transcript.frames if f'id="message-{new_reply.pk}"' in f][-1]
    assert 'data-status="complete"' in final
    assert NAV.search(final).groups() == ("2", "2"), "the finished reply keeps its switcher"
    await ws.disconnect()


async def test_regenerate_is_the_retry_of_a_failed_reply(app_simulator):
    app_simulator.add_scenario(
        Scenario(match="fails", error=ScenarioError(status=400, code="InvalidParameter"))
    )
    _owner, conversation, ws = await open_chat()
    await ws.send_to(text_data=send_frame("this fails"))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "error" in t.status.values())
    assert 'data-action="regenerate"' in transcript.frames[-1] and "Retry" in transcript.frames[-1]
    app_simulator.add_scenario(Scenario(match="fails", reply="Fine now."))
    await ws.send_to(text_data=frame("regenerate"))
    await receive_until(ws, transcript, lambda t: "complete" in t.status.values())
    failed, retried = [m for m in await messages_of(conversation) if m.role == "assistant"]
    assert (failed.status, retried.status, retried.content) == ("error", "complete", "Fine now.")
    await ws.disconnect()


async def test_edit_forks_and_the_old_branch_stays_reachable(app_simulator):
    _owner, conversation, ws, transcript = await chat_with_two_turns(app_simulator)
    first = (await messages_of(conversation))[0]
    app_simulator.add_scenario(Scenario(match="first, edited", reply="One, edited."))
    await ws.send_to(text_data=frame("edit", message_id=first.pk, content="first, edited?"))
    await receive_until(ws, transcript, lambda t: "One, edited." in "".join(t.frames))
    edited = [m for m in await messages_of(conversation) if m.content == "first, edited?"][0]
    reply = await wait_for_status(edited.pk + 1, {"complete"})

    assert edited.parent_id is None and reply.parent_id == edited.pk
    assert sent_turns(app_simulator) == [("user", "first, edited?")], "the old turns stay behind"
    assert await shown(conversation) == [("user", "first, edited?"), ("assistant", "One, edited.")]

    # The earlier version of the first message, with the turns that followed it, is one
    # click away, and stays chosen on reload.
    client = await sync_to_async(_client_of)(conversation)
    response = await sync_to_async(client.post)(
        f"/c/{conversation.id}/messages/{edited.pk}/version/",
        {"step": "-1"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    assert (
        "second?" in response.content.decode() and "first, edited?" not in response.content.decode()
    )
    assert await shown(conversation) == [
        ("user", "first?"), ("assistant", "One."), ("user", "second?"), ("assistant", "Two."),
    ]  # fmt: skip
    page = (await sync_to_async(client.get)(f"/c/{conversation.id}/")).content.decode()
    assert "second?" in page and "first, edited?" not in page
    assert NAV.search(page).groups() == ("2", "1")
    # The socket's other tab is told to show the branch too.
    await receive_until(
        ws, transcript, lambda t: "innerHTML" in t.frames[-1] and "second?" in t.frames[-1]
    )
    await ws.disconnect()


def _client_of(conversation) -> Client:
    client = Client()
    client.force_login(conversation.owner)
    return client


async def test_a_resent_regenerate_or_edit_starts_nothing_twice(app_simulator):
    _owner, conversation, ws, transcript = await chat_with_two_turns(app_simulator)
    first = (await messages_of(conversation))[0]
    again = frame("regenerate")
    await ws.send_to(text_data=again)
    await ws.send_to(text_data=again)  # a reconnecting socket replays its queue
    await receive_until(ws, transcript, lambda t: list(t.status.values()).count("complete") >= 3)
    edit = frame("edit", message_id=first.pk, content="once")
    await ws.send_to(text_data=edit)
    await ws.send_to(text_data=edit)
    await receive_until(ws, transcript, lambda t: list(t.status.values()).count("complete") >= 4)
    messages = await messages_of(conversation)
    assert [m.role for m in messages].count("assistant") == 4  # two replies, one of each
    assert [m.content for m in messages].count("once") == 1
    assert not any("still being written" in f for f in transcript.frames)
    await ws.disconnect()


async def test_regenerate_edit_and_switch_are_refused_while_a_reply_streams(app_simulator):
    app_simulator.add_scenario(Scenario(match="first?", reply="One."))
    app_simulator.add_scenario(Scenario(match="slow", reply="x " * 200, token_delay=0.05))
    _owner, conversation, ws = await open_chat()
    transcript = Transcript()
    await ws.send_to(text_data=send_frame("first?"))
    await receive_until(ws, transcript, lambda t: "complete" in t.status.values())
    await ws.send_to(text_data=frame("regenerate"))
    await receive_until(ws, transcript, lambda t: list(t.status.values()).count("complete") >= 2)
    await ws.send_to(text_data=send_frame("slow one"))
    await receive_until(ws, transcript, lambda t: "streaming" in t.status.values())
    count = len(await messages_of(conversation))
    first = (await messages_of(conversation))[0]
    await ws.send_to(text_data=frame("regenerate"))
    await receive_until(ws, transcript, lambda t: "still being written" in t.frames[-1])
    await ws.send_to(text_data=frame("edit", message_id=first.pk, content="edited"))
    await receive_until(ws, transcript, lambda t: "still being written" in t.frames[-1])
    client = await sync_to_async(_client_of)(conversation)
    second_reply = (await messages_of(conversation))[2]
    response = await sync_to_async(client.post)(
        f"/c/{conversation.id}/messages/{second_reply.pk}/version/", {"step": "-1"},
        HTTP_HX_REQUEST="true",
    )  # fmt: skip
    assert response.status_code == 409 and "still being written" in response.content.decode()
    assert len(await messages_of(conversation)) == count, "nothing saved"
    await ws.send_to(text_data='{"type": "stop"}')
    await receive_until(ws, transcript, lambda t: "stopped" in t.status.values())
    await ws.disconnect()


async def test_stop_a_regenerated_reply(app_simulator):
    _owner, conversation, ws, transcript = await chat_with_two_turns(app_simulator)
    app_simulator.add_scenario(Scenario(match="second?", reply="y " * 300, token_delay=0.03))
    await ws.send_to(text_data=frame("regenerate"))
    await receive_until(ws, transcript, lambda t: sum(f.startswith("+") for f in t.frames) >= 3)
    await ws.send_to(text_data='{"type": "stop"}')
    await receive_until(ws, transcript, lambda t: "stopped" in t.status.values())
    reply = (await messages_of(conversation))[-1]
    assert reply.status == "stopped" and reply.content
    await ws.disconnect()


async def test_a_dead_reply_is_regenerated(app_simulator):
    """A reply whose process died (still "streaming", no heartbeat) is marked interrupted and
    written again as a new version."""
    _owner, conversation, ws, transcript = await chat_with_two_turns(app_simulator)
    dead = (await messages_of(conversation))[-1]
    long_ago = timezone.now() - timedelta(seconds=Message.STALE_AFTER + 5)
    await Message.objects.filter(pk=dead.pk).aupdate(status="streaming", updated_at=long_ago)
    app_simulator.add_scenario(Scenario(match="second?", reply="Alive."))
    await ws.send_to(text_data=frame("regenerate", message_id=dead.pk))
    await receive_until(ws, transcript, lambda t: "Alive." in "".join(t.frames))
    assert (await Message.objects.aget(pk=dead.pk)).status == "interrupted"
    assert (await messages_of(conversation))[-1].parent_id == dead.parent_id
    await ws.disconnect()


async def test_other_users_cannot_regenerate_edit_or_switch(app_simulator):
    _owner, conversation, ws, _transcript = await chat_with_two_turns(app_simulator)
    messages = await messages_of(conversation)
    mallory = await make_user("mallory")
    client = Client()
    await sync_to_async(client.force_login)(mallory)
    response = await sync_to_async(client.post)(
        f"/c/{conversation.id}/messages/{messages[-1].pk}/version/", {"step": "-1"}
    )
    assert response.status_code == 404
    # Her own chat's socket cannot reach alice's messages.
    from tests.ws_support import make_conversation

    hers = await make_conversation(mallory)
    socket, connected, _ = await connect(mallory, hers)
    assert connected
    transcript = Transcript()
    await socket.send_to(text_data=frame("edit", message_id=messages[0].pk, content="mine now"))
    await receive_until(socket, transcript, lambda t: "cannot be edited" in "".join(t.frames))
    await socket.send_to(text_data=frame("regenerate", message_id=messages[-1].pk))
    await receive_until(socket, transcript, lambda t: "no reply to regenerate" in t.frames[-1])
    assert len(await messages_of(conversation)) == len(messages)
    assert not await Message.objects.filter(conversation=hers).aexists()
    await socket.disconnect()
    await ws.disconnect()


async def test_a_page_on_an_old_branch_catches_up_on_reconnect(app_simulator):
    """A tab that was away while another tab regenerated names its newest message in hello:
    it is not on the active branch any more, so it is sent the branch."""
    _owner, conversation, ws, _transcript = await chat_with_two_turns(app_simulator)
    old_reply = (await messages_of(conversation))[-1]
    await ws.disconnect()
    other, connected, _ = await connect(conversation.owner, conversation)
    app_simulator.add_scenario(Scenario(match="second?", reply="Newer."))
    await other.send_to(text_data=frame("regenerate"))
    transcript = Transcript()
    await receive_until(other, transcript, lambda t: "Newer." in "".join(t.frames))
    await wait_for_status((await messages_of(conversation))[-1].pk, {"complete"})
    await other.disconnect()

    back, connected, _ = await connect(conversation.owner, conversation)
    await back.send_to(
        text_data=json.dumps({"type": "hello", "streaming": [], "last": old_reply.pk})
    )
    transcript = Transcript()
    await receive_until(back, transcript, lambda t: "Newer." in "".join(t.frames))
    assert 'hx-swap-oob="innerHTML"' in transcript.frames[-1]
    await back.disconnect()


async def test_export_names_ids_parents_and_every_version(app_simulator):
    _owner, conversation, ws, transcript = await chat_with_two_turns(app_simulator)
    await ws.send_to(text_data=frame("regenerate"))
    await receive_until(ws, transcript, lambda t: list(t.status.values()).count("complete") >= 3)
    await ws.disconnect()
    client = await sync_to_async(_client_of)(conversation)
    data = json.loads(
        (await sync_to_async(client.get)(f"/c/{conversation.id}/export.json")).content
    )
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert len(data["all_messages"]) == 5
    ids = [m["id"] for m in data["messages"]]
    assert [m["parent_id"] for m in data["messages"]] == [None, *ids[:-1]]
    old = next(m for m in data["all_messages"] if m["id"] not in ids)
    assert (old["content"], old["parent_id"]) == ("Two.", ids[2])
    markdown = (await sync_to_async(client.get)(f"/c/{conversation.id}/export.md")).content.decode()
    assert "Two." not in markdown.replace(data["messages"][-1]["content"], "")
