"""Per-user limits, checked before anything is saved or sent upstream: replies at once, messages
a minute, new chats a minute, the model still enabled. Counted in the database, so they hold
across processes."""

from __future__ import annotations

import html
import json
import threading
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone, translation

from conversations.models import Conversation, Message, ModelProfile
from conversations.replies import service
from dashscope_simulator import Scenario
from tests.test_team_deployment import team  # noqa: F401 (a fixture)
from tests.ws_support import Transcript, open_chat, receive_until, send_frame

pytestmark = pytest.mark.django_db

REPLY = "A reply that takes its time: " + " ".join(f"word{i}" for i in range(40))


@pytest.fixture
def user():
    return get_user_model().objects.create_user("lima", password="pw")


def streaming_reply(owner, *, age: float = 0) -> Message:
    """A reply being written in a chat of its own, its heartbeat `age` seconds old."""
    conversation = service.conversation_create(owner=owner)
    reply = Message.objects.create(conversation=conversation, role="assistant", status="streaming")
    Message.objects.filter(pk=reply.pk).update(updated_at=timezone.now() - timedelta(seconds=age))
    return reply


def send(conversation, content="hello") -> service.StartedReply:
    started = service.reply_start(
        conversation=conversation, content=content, client_message_id=uuid.uuid4()
    )
    # The reply is over at once: only the per-minute count is left to stand in the way.
    Message.objects.filter(pk=started.assistant_message.pk).update(status="complete")
    return started


def test_concurrent_replies_are_limited_across_the_users_chats(user, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 2
    streaming_reply(user)
    streaming_reply(user)
    conversation = service.conversation_create(owner=user)
    with pytest.raises(service.ReplyRefused) as refused:
        service.reply_start(conversation=conversation, content="a third one")
    assert str(refused.value) == (
        "You already have 2 replies being written in other chats. "
        "Wait for one to finish or stop it, then send."
    )
    assert not conversation.messages.exists()


def test_one_reply_at_a_time_reads_in_the_singular(user, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 1
    streaming_reply(user)
    with pytest.raises(service.ReplyRefused, match="1 reply being written in another chat"):
        service.reply_start(conversation=service.conversation_create(owner=user), content="hi")


def test_dead_replies_and_other_users_replies_take_no_place(user, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 2
    streaming_reply(user)
    streaming_reply(user, age=Message.STALE_AFTER + 5)  # its process is gone
    streaming_reply(get_user_model().objects.create_user("other", password="pw"))
    streaming_reply(get_user_model().objects.create_user("another", password="pw"))
    started = service.reply_start(
        conversation=service.conversation_create(owner=user), content="hi"
    )
    assert started.created


def test_zero_turns_the_concurrent_limit_off(user, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 0
    for _ in range(3):
        streaming_reply(user)
    assert service.reply_start(conversation=service.conversation_create(owner=user), content="hi")


def test_continue_counts_as_a_reply_being_written(user, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 1
    conversation = service.conversation_create(owner=user)
    Message.objects.create(conversation=conversation, role="user", content="tell me")
    Message.objects.create(
        conversation=conversation, role="assistant", content="Once upon", status="stopped",
        model="qwen-plus",
    )  # fmt: skip
    streaming_reply(user)
    with pytest.raises(service.ReplyRefused, match="being written in another chat"):
        service.reply_continue(conversation=conversation)
    assert conversation.messages.last().status == "stopped"


def age_messages(started: service.StartedReply, when) -> None:
    """Date a send (its message and its reply) back to `when`."""
    Message.objects.filter(pk__in=[started.user_message.pk, started.assistant_message.pk]).update(
        created_at=when
    )


def test_messages_per_minute_are_limited_and_the_refusal_says_when_to_try_again(user, settings):
    settings.QWENWEB_MESSAGES_PER_MINUTE = 3
    first, second = service.conversation_create(owner=user), service.conversation_create(owner=user)
    sent = [send(first), send(second), send(first)]
    with pytest.raises(service.ReplyRefused) as refused:
        send(second, "one too many")
    assert str(refused.value).startswith("Messages are limited to 3 a minute. Try again in ")
    assert not second.messages.filter(content="one too many").exists()
    # Sent 50, 30 and 10 seconds ago: the oldest leaves the window in 10 seconds.
    now = timezone.now()
    for message, age in zip(sent, [50, 30, 10], strict=True):
        age_messages(message, now - timedelta(seconds=age))
    with pytest.raises(service.ReplyRefused) as refused:
        send(second, "still too many")
    assert str(refused.value) == "Messages are limited to 3 a minute. Try again in 10 seconds."
    age_messages(sent[0], now - timedelta(seconds=61))
    assert send(second, "now it goes").created


def test_regenerating_and_editing_count_against_the_per_minute_limit(user, settings):
    """Each starts a reply, a call to DashScope, as a send does: clicking Regenerate in a
    loop is limited like sending."""
    settings.QWENWEB_MESSAGES_PER_MINUTE = 3
    conversation = service.conversation_create(owner=user)
    first = send(conversation)
    Message.objects.filter(pk=first.assistant_message.pk).update(status="complete")
    again = service.reply_regenerate(conversation=conversation)
    Message.objects.filter(pk=again.assistant_message.pk).update(status="complete")
    service.reply_edit(
        conversation=conversation, message_id=first.user_message.pk, content="better"
    )
    Message.objects.filter(role="assistant", status="streaming").update(status="complete")
    with pytest.raises(service.ReplyRefused, match="Messages are limited to 3 a minute"):
        service.reply_regenerate(conversation=conversation)
    assert Message.objects.filter(role="assistant").count() == 3


def test_a_lowered_per_minute_limit_waits_for_enough_messages_to_leave_the_window(user, settings):
    settings.QWENWEB_MESSAGES_PER_MINUTE = 0  # off: any number
    conversation = service.conversation_create(owner=user)
    sent = [send(conversation) for _ in range(4)]
    now = timezone.now()
    for message, age in zip(sent, [55, 40, 20, 5], strict=True):
        age_messages(message, now - timedelta(seconds=age))
    settings.QWENWEB_MESSAGES_PER_MINUTE = 2
    # Four in the window, two allowed: the second newest (20 s old) must leave it first.
    with pytest.raises(service.ReplyRefused, match=r"Try again in 40 seconds\.$"):
        send(conversation)


def test_a_resent_frame_is_answered_from_before_even_at_the_limit(user, settings):
    settings.QWENWEB_MESSAGES_PER_MINUTE = 1
    conversation = service.conversation_create(owner=user)
    client_message_id = uuid.uuid4()
    first = service.reply_start(
        conversation=conversation, content="once", client_message_id=client_message_id
    )
    again = service.reply_start(
        conversation=conversation, content="once", client_message_id=client_message_id
    )
    assert not again.created and again.user_message.pk == first.user_message.pk


def test_a_model_disabled_since_is_refused_before_anything_is_saved(user):
    conversation = service.conversation_create(owner=user)
    Message.objects.create(conversation=conversation, role="user", content="tell me")
    Message.objects.create(
        conversation=conversation, role="assistant", content="Once upon", status="stopped",
        model="qwen-plus",
    )  # fmt: skip
    ModelProfile.objects.filter(name="qwen-plus").update(enabled=False)
    for start in [
        lambda: service.reply_start(conversation=conversation, content="hello again"),
        lambda: service.reply_continue(conversation=conversation),
    ]:
        with pytest.raises(service.ReplyRefused) as refused:
            start()
        assert str(refused.value) == (
            "Qwen-Plus is no longer available. Pick another model at the top of the chat and "
            "try again."
        )
    assert conversation.messages.count() == 2
    assert conversation.messages.last().status == "stopped"
    # Picking another model unblocks the chat.
    Conversation.objects.filter(pk=conversation.pk).update(
        model=ModelProfile.objects.get(name="qwen-max")
    )
    assert service.reply_start(conversation=conversation, content="hello again").created


def test_length_and_image_count_are_checked_before_any_query(user, settings):
    settings.QWENWEB_MAX_MESSAGE_CHARS = 10
    conversation = service.conversation_create(owner=user)
    urls = " ".join(f"https://example.com/{i}.png" for i in range(settings.QWENWEB_MAX_IMAGES + 1))
    with CaptureQueriesContext(connection) as queries:
        with pytest.raises(service.ReplyRefused, match="too long"):
            service.reply_start(conversation=conversation, content="x" * 11)
        with pytest.raises(service.ReplyRefused, match="At most"):
            service.reply_start(conversation=conversation, content="look", image_urls=urls)
    assert queries.captured_queries == []


def test_the_limits_cost_no_query_of_their_own(user, settings):
    # The owner's load is read by the statement that finds the replies in the way.
    conversation = service.conversation_create(owner=user)

    def queries_of_a_send() -> int:
        with CaptureQueriesContext(connection) as queries:
            send(conversation)
        return len(queries.captured_queries)

    settings.QWENWEB_MAX_CONCURRENT_REPLIES = settings.QWENWEB_MESSAGES_PER_MINUTE = 0
    queries_of_a_send()  # the first also reads the system prompt it keeps
    without = queries_of_a_send()
    settings.QWENWEB_MAX_CONCURRENT_REPLIES, settings.QWENWEB_MESSAGES_PER_MINUTE = 2, 20
    assert queries_of_a_send() == without


def test_the_limits_read_only_the_senders_own_replies(user, settings):
    """A send's cost does not grow with the rest of the site: on SQLite (no statistics to
    plan with) the limits' counts once went through every user's replies since the window
    began, by the (role, created_at) index. Each search of the messages must now start from
    the sender's chats, or from the replies streaming now."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's plan (PostgreSQL plans from its statistics)")
    from conversations.replies.rules import LoadQuery

    settings.QWENWEB_TOKENS_PER_DAY = settings.QWENWEB_TOKENS_PER_MONTH = 1000
    settings.QWENWEB_MAX_CONCURRENT_REPLIES, settings.QWENWEB_MESSAGES_PER_MINUTE = 2, 20
    query = LoadQuery.of(user.pk)
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {query.sql}", query.params)
        plan = [row[-1] for row in cursor.fetchall()]
    messages = [step for step in plan if step.startswith(("SEARCH m ", "SCAN m"))]
    assert len(messages) == 5, plan  # streaming, a minute's, the day's, the month's, cost
    for step in messages:
        assert "message_conv_created_idx (conversation_id=?" in step or "(status=?)" in step, step
    chats = [step for step in plan if step.startswith(("SEARCH c ", "SCAN c"))]
    assert all("owner_id=?" in step or "(id=?)" in step for step in chats), chats


def test_refusals_speak_chinese(user, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 2
    settings.QWENWEB_MESSAGES_PER_MINUTE = 3  # the two replies below count, as a send's does
    streaming_reply(user)
    streaming_reply(user)
    conversation = service.conversation_create(owner=user)
    with translation.override("zh-hans"), pytest.raises(service.ReplyRefused) as refused:
        service.reply_start(conversation=conversation, content="你好")
    assert str(refused.value) == (
        "你已有 2 条回复正在其他对话中生成。请等待回复完成或将其停止，然后再发送。"
    )
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 0
    send(conversation)
    with translation.override("zh-hans"), pytest.raises(service.ReplyRefused) as refused:
        send(conversation)
    assert str(refused.value).startswith("每分钟最多发送 3 条消息。请在 ")
    ModelProfile.objects.filter(name="qwen-plus").update(enabled=False)
    with translation.override("zh-hans"), pytest.raises(service.ReplyRefused) as refused:
        send(conversation)
    assert str(refused.value) == "Qwen-Plus 已不再提供。请在对话顶部选择其他模型后重试。"


# -- new chats a minute -----------------------------------------------------------------------


def age_chats(owner, *ages: float) -> None:
    """Make the owner's chats, newest first, `ages` seconds old."""
    now = timezone.now()
    chats = Conversation.objects.owned_by(owner).order_by("-created_at")
    for conversation, age in zip(chats, ages, strict=True):
        Conversation.objects.filter(pk=conversation.pk).update(
            created_at=now - timedelta(seconds=age)
        )


def test_the_31st_chat_in_a_minute_is_refused_and_says_when_to_try_again(user, client, settings):
    settings.QWENWEB_CHATS_PER_MINUTE = 30
    client.force_login(user)
    for _ in range(30):
        assert client.post("/c/new/").status_code == 302
    sentence = "New chats are limited to 30 a minute. Try again in "
    # From the home page's composer (its first message kept in the box), and as htmx would.
    for headers in ({}, {"HX-Request": "true"}):
        response = client.post("/c/new/", {"content": "one chat too many"}, headers=headers)
        assert response.status_code == 400
        page = html.unescape(response.content.decode())
        assert sentence in page
        assert "one chat too many</textarea>" in page
    assert Conversation.objects.owned_by(user).count() == 30
    assert not Message.objects.exists()
    # The oldest of the 30 was created 45 seconds ago: in 15 seconds one more may be.
    age_chats(user, *[45] * 30)
    with pytest.raises(service.ReplyRefused) as refused:
        service.conversation_create(owner=user)
    assert str(refused.value) == sentence + "15 seconds."
    with translation.override("zh-hans"), pytest.raises(service.ReplyRefused) as refused:
        service.conversation_create(owner=user)
    assert str(refused.value) == "每分钟最多新建 30 个对话。请在 15 秒后重试。"
    age_chats(user, *[45] * 29, 61)
    assert client.post("/c/new/").status_code == 302
    assert Conversation.objects.owned_by(user).count() == 31


def test_zero_chats_per_minute_means_no_limit(user, settings):
    settings.QWENWEB_CHATS_PER_MINUTE = 0
    for _ in range(40):
        service.conversation_create(owner=user)
    assert Conversation.objects.owned_by(user).count() == 40


def test_another_users_chats_leave_ones_own_limit_alone(user, settings):
    settings.QWENWEB_CHATS_PER_MINUTE = 3
    other = get_user_model().objects.create_user("other", password="pw")
    for _ in range(3):
        service.conversation_create(owner=other)
    with pytest.raises(service.ReplyRefused, match="limited to 3 a minute"):
        service.conversation_create(owner=other)
    for _ in range(3):
        service.conversation_create(owner=user)
    assert Conversation.objects.owned_by(user).count() == 3


# -- over the socket --------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_refused_send_is_a_notice_and_the_composer_keeps_the_text(app_simulator, settings):
    settings.QWENWEB_MESSAGES_PER_MINUTE = 1
    _owner, conversation, ws = await open_chat()
    await ws.send_to(text_data=send_frame("the first"))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "complete" in t.status.values())
    sent = len(transcript.frames)
    await ws.send_to(text_data=send_frame("the second"))
    await receive_until(ws, transcript, lambda t: 'class="notice"' in t.frames[-1])
    assert "Messages are limited to 1 a minute. Try again in " in transcript.frames[-1]
    # No acknowledgement: the page clears the composer only on one (static/qwenweb/chat.js).
    assert not any("composer-ack" in frame for frame in transcript.frames[sent:])
    assert len(app_simulator.requests) == 1
    contents = [m async for m in conversation.messages.values_list("content", flat=True)]
    assert "the second" not in contents
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_model_disabled_while_the_chat_is_open_is_refused_over_the_socket(app_simulator):
    _owner, conversation, ws = await open_chat()
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(enabled=False)
    frame = json.loads(send_frame("still there?"))
    await ws.send_to(text_data=json.dumps(frame))
    notice = await ws.receive_from(timeout=5)
    assert "Qwen-Plus is no longer available. Pick another model" in notice
    assert "composer-ack" not in notice
    assert app_simulator.requests == []
    assert await conversation.messages.acount() == 0
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_concurrent_limit_holds_over_sockets_of_two_chats(app_simulator, settings):
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 1
    app_simulator.add_scenario(Scenario(match="slow", reply=REPLY, token_delay=0.02))
    from tests.ws_support import connect, make_conversation

    owner, first, ws_first = await open_chat()
    second = await make_conversation(owner)
    ws_second, _, _ = await connect(owner, second)
    await ws_first.send_to(text_data=send_frame("slow please"))
    transcript = Transcript()
    await receive_until(ws_first, transcript, lambda t: any(f.startswith("+") for f in t.frames))
    await ws_second.send_to(text_data=send_frame("meanwhile"))
    notice = await ws_second.receive_from(timeout=5)
    assert "1 reply being written in another chat" in notice
    await receive_until(ws_first, transcript, lambda t: "complete" in t.status.values())
    await ws_second.send_to(text_data=send_frame("now"))
    other = Transcript()
    await receive_until(ws_second, other, lambda t: "complete" in t.status.values())
    assert len(app_simulator.requests) == 2
    await ws_first.disconnect()
    await ws_second.disconnect()


@pytest.mark.django_db(transaction=True)
def test_sends_at_the_same_moment_in_two_chats_cannot_both_pass_the_limit(settings):
    """The owner's row is locked with the conversation: concurrent sends of one user, even
    through two server processes, are counted one after the other."""
    if connection.vendor != "postgresql":
        # SQLite runs one write transaction at a time anyway; its in-memory test database
        # refuses a second writer instead of making it wait.
        pytest.skip(
            "needs PostgreSQL: DATABASE_URL=postgres://… (across two processes on PostgreSQL: "
            "the test below, which CI runs)"
        )
    settings.QWENWEB_MAX_CONCURRENT_REPLIES = 1
    owner = get_user_model().objects.create_user("racer", password="pw")
    chats = [service.conversation_create(owner=owner) for _ in range(8)]
    barrier = threading.Barrier(len(chats))
    outcomes = []

    def send_now(conversation) -> None:
        try:
            barrier.wait()
            service.reply_start(conversation=conversation, content="at once")
            outcomes.append("started")
        except service.ReplyRefused:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=send_now, args=(c,)) for c in chats]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * (len(chats) - 1) + ["started"]
    assert Message.objects.filter(conversation__owner=owner, status="streaming").count() == 1


@pytest.mark.services
def test_one_persons_sends_through_two_processes_at_once_start_only_their_limit(
    team,  # noqa: F811
    app_simulator,
):
    """QWENWEB_MAX_CONCURRENT_REPLIES (2) holds across server processes: six chats of one
    person, three open on each process, send at the same moment; two replies start, the four
    other tabs are told why, on PostgreSQL with its row locks (the test above, in threads, runs
    only where the test database is PostgreSQL)."""
    import asyncio

    from tests.test_faults import LONG_REPLY, Tab, new_team_chat, open_team_chat, sent, until

    app_simulator.add_scenario(Scenario(match="at once", reply=LONG_REPLY, token_delay=0.02))
    url_a, url_b = team
    client, path, cookie = open_team_chat(url_a)
    paths = [path, *(new_team_chat(client, url_a) for _ in range(5))]

    def refused(tab: Tab) -> bool:
        return any('role="alert"' in frame for frame in tab.page.frames)

    async def scenario() -> list[Tab]:
        tabs = [await Tab((url_a, url_b)[i % 2], p, cookie).open() for i, p in enumerate(paths)]
        await asyncio.gather(*(tab.send(**sent("all at once")) for tab in tabs))
        await until(
            lambda: sum(bool(tab.newest_reply()) or refused(tab) for tab in tabs) == 6,
            "every tab's answer", tuple(tabs),
        )  # fmt: skip
        for tab in tabs:  # stop what started, so the next test finds no reply running
            if tab.newest_reply():
                await tab.send(type="stop")
        started = [tab for tab in tabs if tab.newest_reply()]
        await until(
            lambda: all(tab.statuses(tab.newest_reply())[-1] == "stopped" for tab in started),
            "the stops", tuple(tabs),
        )  # fmt: skip
        for tab in tabs:  # only now: `until` takes a closed tab for a failure
            await tab.close()
        return tabs

    tabs = asyncio.run(scenario())
    app_simulator.clear_scenarios()
    started = [tab for tab in tabs if tab.newest_reply()]
    told = [tab for tab in tabs if refused(tab)]
    assert (len(started), len(told)) == (2, 4)
    assert {tab.base for tab in started} | {tab.base for tab in told} == {url_a, url_b}
    for tab in told:
        assert "replies being written" in html.unescape(" ".join(tab.page.frames))
