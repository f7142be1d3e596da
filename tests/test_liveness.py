"""Liveness (conversations/replies/liveness.py): replies whose process died become
`interrupted` in one place, and open sockets are told.

The cross-process case (a daphne process killed with SIGKILL mid-reply, swept by the other)
is tests/test_team_deployment.py::test_a_killed_process_leaves_an_interrupted_reply_that_...
"""

import asyncio
import html
import re
import time
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone

from conversations.models import Message
from conversations.replies import generation
from conversations.replies import liveness as sweep
from conversations.replies.service import announce_finished, conversation_create
from dashscope_simulator import Scenario
from tests.ws_support import Transcript, open_chat, receive_until, send_frame


def _reply(conversation, *, saved_at):
    Message.objects.create(conversation=conversation, role="user", content="hello")
    reply = Message.objects.create(
        conversation=conversation, role="assistant", content="the checkpoint", status="streaming"
    )
    Message.objects.filter(pk=reply.pk).update(updated_at=saved_at)
    return reply


@pytest.fixture
def conversation():
    owner = get_user_model().objects.create_user("ann", password="pw")
    return conversation_create(owner=owner)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_sweep_marks_a_silent_reply_interrupted_and_tells_open_sockets():
    _owner, conversation, ws = await open_chat()
    silent = timezone.now() - timedelta(seconds=Message.STALE_AFTER + 1)
    reply = await sync_to_async(_reply)(conversation, saved_at=silent)
    assert await sweep.sweep_and_announce() == 1
    transcript = await receive_until(
        ws, Transcript(), lambda t: t.status.get(reply.pk) == "interrupted"
    )
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("interrupted", "the checkpoint")
    assert transcript.status[reply.pk] == "interrupted"
    await ws.disconnect()


@pytest.mark.django_db
def test_a_reply_saved_lately_is_left_alone(conversation):
    reply = _reply(conversation, saved_at=timezone.now())
    assert sweep.sweep() == []
    reply.refresh_from_db()
    assert reply.status == "streaming"


@pytest.mark.django_db
def test_at_start_the_only_process_takes_every_reply_of_its_previous_run(
    conversation, settings, monkeypatch
):
    """Without Redis there is one process: a reply last saved before it started has no one
    writing it, however recently it was saved. With Redis another process may be writing it."""
    monkeypatch.setattr(sweep, "STARTED_AT", timezone.now())
    reply = _reply(conversation, saved_at=sweep.STARTED_AT - timedelta(seconds=1))
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    assert sweep.sweep(at_start=True) == []
    settings.REDIS_URL = ""
    assert sweep.sweep() == []  # not silent long enough for a periodic sweep
    assert sweep.sweep(at_start=True) == [(str(conversation.id), reply.pk)]
    reply.refresh_from_db()
    assert (reply.status, reply.content) == ("interrupted", "the checkpoint")


# -- a live reply taken for dead (its checkpoints failed longer than STALE_AFTER) -------------

LONG = " ".join(f"word{i}" for i in range(150))  # 3 s at 0.02 s a word


def _statuses(transcript: Transcript, pk: int) -> list[str]:
    """Every status the page showed the reply in, in order, repeats folded."""
    pattern = re.compile(rf'<article id="message-{pk}"[^>]*data-status="(\w+)"')
    seen = [m.group(1) for frame in transcript.frames for m in pattern.finditer(frame)]
    return [status for i, status in enumerate(seen) if i == 0 or seen[i - 1] != status]


async def _taken_for_dead(app_simulator, settings, *, checkpoint_every: float):
    """A long reply streaming on a socket, with a checkpoint saved, then marked interrupted as
    a sweep marks it after a database outage longer than QWENWEB_REPLY_STALE_AFTER (its
    heartbeat failed meanwhile, though its generation lives on) and the pages told so."""
    settings.QWENWEB_CHECKPOINT_INTERVAL = checkpoint_every
    app_simulator.add_scenario(Scenario(match="alive", reply=LONG, token_delay=0.02, times=2))
    _owner, conversation, ws = await open_chat()
    await ws.send_to(text_data=send_frame("still alive?"))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "word10 " in "".join(t.text.values()))
    reply = await Message.objects.filter(conversation=conversation, role="assistant").aget()
    deadline = time.monotonic() + 5
    while not (await Message.objects.aget(pk=reply.pk)).content:  # the first checkpoint
        assert time.monotonic() < deadline, "no checkpoint was saved"
        await asyncio.sleep(0.02)
    await Message.objects.filter(pk=reply.pk).aupdate(status="interrupted")
    await announce_finished(conversation.id, reply.pk)
    return conversation, ws, transcript, reply


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_live_reply_marked_interrupted_streams_on_and_ends_complete(
    app_simulator, settings
):
    """Its next checkpoint finds it interrupted and takes it back: the page shows it streaming
    again (no Continue button to press meanwhile) and it ends complete and whole, from one
    upstream request."""
    conversation, ws, transcript, reply = await _taken_for_dead(
        app_simulator, settings, checkpoint_every=0.3
    )
    await receive_until(ws, transcript, lambda t: t.status.get(reply.pk) == "complete", 15)
    await ws.disconnect()
    assert _statuses(transcript, reply.pk) == ["streaming", "interrupted", "streaming", "complete"]
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("complete", LONG)
    assert LONG in html.unescape(transcript.frames[-1])
    assert len([r for r in app_simulator.requests if r.path.endswith("/generation")]) == 1
    app_simulator.clear_scenarios()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_continue_on_a_reply_still_alive_retires_its_generation(app_simulator, settings):
    """Continue pressed on such a reply before its next checkpoint: the earlier generation
    stops at once and writes nothing more; the new one carries on from the saved text, and
    the reply ends as one text, not two interleaved."""
    conversation, ws, transcript, reply = await _taken_for_dead(
        app_simulator, settings, checkpoint_every=1.0
    )
    earlier = generation.running(reply.pk)
    assert earlier is not None
    # No more checkpoints of its own: only the word from Continue can stop it (the fencing
    # token alone is the next test's).
    earlier.checkpoint_interval = 60
    await ws.send_to(text_data='{"type": "continue"}')
    await asyncio.wait_for(asyncio.shield(earlier.task), 1)  # it runs on for 3 s otherwise
    assert earlier.superseded
    await receive_until(ws, transcript, lambda t: t.status.get(reply.pk) == "complete", 15)
    await asyncio.sleep(1.2)  # an earlier generation still writing would have saved by now
    await ws.disconnect()
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("complete", LONG)
    assert LONG in html.unescape(transcript.frames[-1])
    requests = [r for r in app_simulator.requests if r.path.endswith("/generation")]
    assert len(requests) == 2 and requests[-1].body["input"]["messages"][-1]["partial"] is True
    app_simulator.clear_scenarios()


@pytest.mark.filterwarnings("ignore:async_to_sync was passed a non-async-marked callable")
@pytest.mark.django_db(transaction=True)  # on PostgreSQL the save runs on another connection
def test_saves_of_a_generation_whose_reply_was_handed_on_change_nothing(conversation):
    """The fencing token: only the reply's current writer saves it; a checkpoint of a reply a
    sweep marked interrupted takes it back; any other save changes nothing."""
    mine, newer = uuid.uuid4(), uuid.uuid4()
    reply = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", writer=mine
    )
    save = async_to_sync(generation.save_reply)
    assert save(reply.pk, mine, content="one") == generation.SAVED
    Message.objects.filter(pk=reply.pk).update(status="interrupted")
    assert save(reply.pk, mine, content="one two") == generation.RESUMED
    reply.refresh_from_db()
    assert (reply.status, reply.content, reply.completed_at) == ("streaming", "one two", None)
    Message.objects.filter(pk=reply.pk).update(writer=newer)  # Continue
    assert save(reply.pk, mine, content="stale") == ""
    assert save(reply.pk, mine, final=True, content="stale", status="complete") == ""
    reply.refresh_from_db()
    assert (reply.status, reply.content) == ("streaming", "one two")
    assert save(reply.pk, newer, final=True, content="done", status="complete") == generation.SAVED


@pytest.mark.django_db
def test_mark_interrupted_takes_only_silent_streaming_replies_and_keeps_their_text(conversation):
    """The one interrupted write: of the given replies, those still streaming and silent
    since the cutoff; the text of their last checkpoint stays, finished and fresh replies are
    left as they are, and the pks of those it marked come back (for the sockets)."""
    silent = _reply(conversation, saved_at=timezone.now() - timedelta(seconds=60))
    fresh = _reply(conversation, saved_at=timezone.now())
    finished = _reply(conversation, saved_at=timezone.now() - timedelta(seconds=60))
    Message.objects.filter(pk=finished.pk).update(status="complete")
    cutoff = sweep.stale_cutoff()
    assert sweep.mark_interrupted(conversation.messages.all(), saved_before=cutoff) == [silent.pk]
    statuses = dict(conversation.messages.values_list("pk", "status"))
    assert (statuses[silent.pk], statuses[fresh.pk], statuses[finished.pk]) == (
        "interrupted", "streaming", "complete",
    )  # fmt: skip
    silent.refresh_from_db()
    assert silent.content == "the checkpoint" and silent.completed_at is not None
    assert sweep.mark_interrupted(conversation.messages.all()) == []  # once


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_page_load_writes_nothing_and_its_socket_marks_a_dead_reply():
    """GET shows a dead reply as interrupted without writing; the page's socket, asking after
    the reply and hearing from no generation, marks it."""
    from django.test import Client

    owner, conversation, ws = await open_chat()
    await ws.disconnect()
    silent = timezone.now() - timedelta(seconds=Message.STALE_AFTER + 1)
    reply = await sync_to_async(_reply)(conversation, saved_at=silent)
    client = Client()
    await sync_to_async(client.force_login)(owner)
    page = (await sync_to_async(client.get)(f"/c/{conversation.id}/")).content.decode()
    assert re.search(rf'id="message-{reply.pk}"[^>]*data-status="interrupted"', page)
    await reply.arefresh_from_db()
    assert (reply.status, reply.updated_at) == ("streaming", silent), "the GET wrote nothing"

    from tests.ws_support import connect

    socket, connected, _ = await connect(owner, conversation)
    assert connected
    await receive_until(socket, Transcript(), lambda t: t.status.get(reply.pk) == "interrupted")
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("interrupted", "the checkpoint")
    await socket.disconnect()
