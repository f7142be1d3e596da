"""The use cases of a reply (conversations/replies/service.py): start, continue, regenerate,
edit, stop; saved before anything can fail."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from conversations.models import Message
from conversations.replies import service

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return get_user_model().objects.create_user("dora", password="pw")


def add(conversation, role, content, **fields):
    return Message.objects.create(conversation=conversation, role=role, content=content, **fields)


def test_reply_start_saves_before_any_call_and_titles_the_chat(user):
    conversation = service.conversation_create(owner=user)
    started = service.reply_start(
        conversation=conversation, content="\n  Plan a trip to Hangzhou  \n"
    )
    assert started.created
    assert started.user_message.content == "  Plan a trip to Hangzhou"
    assert started.assistant_message.status == "streaming"
    conversation.refresh_from_db()
    assert conversation.title == "Plan a trip to Hangzhou"


def test_empty_message_is_refused(user):
    conversation = service.conversation_create(owner=user)
    with pytest.raises(service.ReplyRefused):
        service.reply_start(conversation=conversation, content="   ")
    assert not conversation.messages.exists()


def test_a_reply_whose_process_died_is_marked_interrupted_and_unblocks_the_chat(user):
    conversation = service.conversation_create(owner=user)
    add(conversation, "user", "hello")
    dead = add(conversation, "assistant", "partial text", status="streaming")
    alive = timezone.now() - timedelta(seconds=Message.STALE_AFTER - 20)
    Message.objects.filter(pk=dead.pk).update(updated_at=alive)
    with pytest.raises(service.ReplyInProgress):
        service.reply_start(conversation=conversation, content="again")

    stale = timezone.now() - timedelta(seconds=Message.STALE_AFTER + 5)
    Message.objects.filter(pk=dead.pk).update(updated_at=stale)
    started = service.reply_start(conversation=conversation, content="again")
    dead.refresh_from_db()
    assert (dead.status, dead.content) == ("interrupted", "partial text")
    assert started.created


def test_continue_is_not_offered_for_replies_of_models_without_partial_mode():
    """DashScope documents partial mode for Qwen models without thinking only."""
    assert Message(role="assistant", content="x", status="stopped", model="qwen-plus").can_continue
    for model, reasoning in [("deepseek-v3", ""), ("qwen-plus", "thought first")]:
        message = Message(
            role="assistant", content="x", status="stopped", model=model, reasoning=reasoning
        )
        assert not message.can_continue


def test_a_stopped_or_interrupted_reply_that_cannot_be_carried_on_can_be_written_again():
    """Every stopped or interrupted reply can be finished in place: carried on from its
    text, or, with no text (its process died before the first checkpoint) or no partial mode
    for its model, written again from the same user message."""
    for status in ("stopped", "interrupted"):
        empty = Message(role="assistant", content="", status=status, model="qwen-plus")
        assert empty.can_retry and not empty.can_continue
        thinking = Message(role="assistant", content="x", status=status, model="deepseek-r1",
                           reasoning="first")  # fmt: skip
        assert thinking.can_retry and not thinking.can_continue
        carried = Message(role="assistant", content="x", status=status, model="qwen-plus")
        assert carried.can_continue and not carried.can_retry
    for status in ("complete", "streaming", "error"):
        assert not Message(role="assistant", content="", status=status, model="q").can_retry
    assert not Message(role="user", content="", status="stopped").can_retry
