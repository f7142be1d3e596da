"""The sweep: replies whose process died become `interrupted`, and open sockets are told.

The cross-process case (a daphne process killed with SIGKILL mid-reply, swept by the other)
is tests/test_team_deployment.py::test_a_killed_process_leaves_an_interrupted_reply_that_...
"""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone

from conversations import sweep
from conversations.chat import conversation_create
from conversations.models import Message
from tests.ws_support import Transcript, open_chat, receive_until


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
