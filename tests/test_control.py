"""Requests to the replies being written (conversations/replies/control.py): one subscription a
process hears them all and hands each to the reply it names. What another process would send
is sent here over the channel layer (control.ask), to replies running against the simulator.
Across real processes and Redis: tests/test_team_deployment.py and tests/test_faults.py."""

from __future__ import annotations

import asyncio

import pytest
from channels.layers import get_channel_layer

from conversations.replies import control, events
from dashscope_simulator import Scenario
from tests.ws_support import Transcript, assistant_reply, open_chat, receive_until, send_frame

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

REPLY = " ".join(f"word{i}" for i in range(200))


def _subscriptions() -> dict[str, int]:
    """The in-memory layer's groups and how many channels each has."""
    return {name: len(members) for name, members in get_channel_layer().groups.items()}


async def _streaming(ws, transcript: Transcript, words: int = 3) -> None:
    def shown(t: Transcript) -> bool:
        return any(len(text.split()) >= words for text in t.text.values())

    await receive_until(ws, transcript, shown)


async def _stopped(ws, transcript: Transcript, pk: int) -> None:
    await receive_until(ws, transcript, lambda t: t.status.get(pk) == "stopped")


async def _another(ws, transcript: Transcript, content: str) -> None:
    """Send `content` and return once its reply streams on the page."""
    shown = len(transcript.status)
    await ws.send_to(text_data=send_frame(content))
    await receive_until(
        ws, transcript, lambda t: len(t.status) == shown + 1 and "streaming" in t.status.values()
    )


async def test_a_stop_from_another_process_reaches_the_reply_and_replies_join_nothing(
    app_simulator,
):
    app_simulator.add_scenario(Scenario(match="long", reply=REPLY, token_delay=0.02, times=3))
    _owner, conversation, ws = await open_chat()
    transcript = Transcript()
    await ws.send_to(text_data=send_frame("a long one"))
    await _streaming(ws, transcript)
    before = _subscriptions()
    assert events.control_group(conversation.id) not in before
    reply = await assistant_reply(conversation)

    await control.ask(conversation.id, events.Stop(message_id=reply.pk))
    await _stopped(ws, transcript, reply.pk)
    assert (await assistant_reply(conversation)).status == "stopped"

    # More replies: the process's one subscription serves them; none joins a group of its own.
    for n in range(2):
        await _another(ws, transcript, f"a long one, again {n}")
        assert _subscriptions() == before
        following = await assistant_reply(conversation)
        await control.ask(conversation.id, events.Stop(message_id=following.pk))
        await _stopped(ws, transcript, following.pk)
    await ws.disconnect()


async def test_a_catch_up_request_is_answered_with_the_text_so_far(app_simulator):
    app_simulator.add_scenario(Scenario(match="long", reply=REPLY, token_delay=0.02))
    _owner, conversation, ws = await open_chat()
    transcript = Transcript()
    await ws.send_to(text_data=send_frame("a long one"))
    await _streaming(ws, transcript, words=10)
    reply = await assistant_reply(conversation)
    layer = get_channel_layer()
    ours = await layer.new_channel()

    await control.ask(
        conversation.id, events.Sync(message_id=reply.pk, reply_channel=ours, process="elsewhere")
    )
    snapshot = await asyncio.wait_for(layer.receive(ours), 5)
    assert snapshot["type"] == events.Snapshot.TYPE
    assert snapshot["message_id"] == reply.pk
    assert len(snapshot["text"].split()) >= 10 and REPLY.startswith(snapshot["text"])
    await control.ask(conversation.id, events.Stop(message_id=reply.pk))
    await _stopped(ws, transcript, reply.pk)
    await ws.disconnect()


async def test_a_request_for_a_reply_that_runs_elsewhere_is_dropped(app_simulator):
    """Every process hears every request: one for a reply it does not run changes nothing
    here, and the next request still arrives."""
    app_simulator.add_scenario(Scenario(match="long", reply=REPLY, token_delay=0.02))
    _owner, conversation, ws = await open_chat()
    transcript = Transcript()
    await ws.send_to(text_data=send_frame("a long one"))
    await _streaming(ws, transcript)
    reply = await assistant_reply(conversation)

    await control.ask(conversation.id, events.Stop(message_id=reply.pk + 1000))
    elsewhere = events.Sync(message_id=reply.pk + 1000, reply_channel="nobody!x", process="p")
    await control.ask(conversation.id, elsewhere)
    await _streaming(ws, transcript, words=15)
    assert (await assistant_reply(conversation)).status == "streaming"
    await control.ask(conversation.id, events.Stop(message_id=reply.pk))
    await _stopped(ws, transcript, reply.pk)
    await ws.disconnect()
