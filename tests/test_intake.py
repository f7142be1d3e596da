"""The send path's statements (conversations/replies/intake.py): what they read under the
conversation's lock, and what they write, must be what the ORM would read and write; on
PostgreSQL they are written out (a pipeline of two reads, one statement of data-modifying CTEs),
so test_the_same_on_postgresql runs this module there too."""

from __future__ import annotations

import os
import re
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations.models import Conversation, Message, ModelProfile, SystemPrompt
from conversations.replies import intake, rules, service
from tests.postgres import rerun_on_postgresql

pytestmark = pytest.mark.django_db

# Set by test_the_same_on_postgresql for the run it starts: that run must really be on it.
EXPECTED_VENDOR = os.environ.get("QWENWEB_TEST_EXPECT_VENDOR")


@pytest.fixture(autouse=True)
def _on_the_expected_database():
    if EXPECTED_VENDOR:
        assert connection.vendor == EXPECTED_VENDOR


@pytest.fixture
def chat():
    owner = get_user_model().objects.create_user("ivy", password="pw")
    prompt = SystemPrompt.objects.create(name="Terse", text="Answer in one line.")
    return service.conversation_create(owner=owner, system_prompt=prompt)


def _read(conversation, client_message_id=None):
    query = rules.LoadQuery.of(
        conversation.owner_id,
        model_id=conversation.model_id,
        prompt_id=conversation.system_prompt_id,
    )
    with transaction.atomic():
        locked, way, row = intake.read_under_lock(
            conversation.pk, client_message_id, (query.sql, query.params)
        )
    return locked, way, query.load(row)


def test_the_locked_read_brings_the_chat_its_model_and_prompt(chat):
    locked, way, load = _read(chat)
    assert locked == chat and locked.model == chat.model
    assert locked.title == chat.title and locked.settings == chat.settings
    assert locked.created_at == Conversation.objects.get(pk=chat.pk).created_at
    default = ModelProfile.objects.default().name
    with CaptureQueriesContext(connection) as queries:
        assert locked.model.name == default
        assert locked.system_prompt.text == "Answer in one line."
    assert len(queries) == 0
    assert way == []
    assert load.model_allowed and load.prompt_allowed and load.streaming == 0


def test_the_locked_read_finds_the_replies_in_the_way_and_a_resent_message(chat):
    sent = uuid.uuid4()
    service.reply_start(conversation=chat, content="hello", client_message_id=sent)
    streaming = Message.objects.get(conversation=chat, role="assistant")
    _locked, way, load = _read(chat, client_message_id=sent)
    assert len(way) == 2
    found = {pk: (s, status, at) for s, status, at, pk in way}
    assert found[streaming.pk][1] == "streaming"
    assert found[streaming.pk][2] == Message.objects.get(pk=streaming.pk).updated_at
    assert found[streaming.parent_id][0] == sent
    assert load.streaming == 1


def test_a_chat_without_prompt_and_a_gone_chat(chat):
    Conversation.objects.filter(pk=chat.pk).update(system_prompt=None)
    locked, _way, _load = _read(chat)
    assert locked.system_prompt is None
    with pytest.raises(Conversation.DoesNotExist):
        _read(Conversation(pk=uuid.uuid4(), owner=chat.owner, model=chat.model))


def _fields(message: Message) -> dict:
    return {
        f.attname: getattr(message, f.attname)
        for f in Message._meta.concrete_fields
        if f.attname
        not in {
            "id",
            "parent_id",
            "created_at",
            "updated_at",
            "writer",
            "client_message_id",
        }  # fmt: skip
    }


def test_insert_turn_writes_what_model_save_writes(chat):
    """The statement written out on PostgreSQL leaves the rows Model.save would (defaults,
    JSON, booleans), returns the tree as message_tree reads it, and moves the chat."""
    earlier = service.reply_start(conversation=chat, content="first")
    Message.objects.filter(pk=earlier.assistant_message.pk).update(
        status="complete", content="one", tool_steps=[{"name": "get_current_time"}]
    )
    before = timezone.now()
    conversation = Conversation.objects.get(pk=chat.pk)
    user_message = Message(
        conversation=conversation,
        parent_id=conversation.current_message_id,
        role="user",
        content="second 第二",
        client_message_id=uuid.uuid4(),
    )
    reply = service._reply_to_be(conversation)
    with transaction.atomic():
        tree = intake.insert_turn(
            user_message, reply, conversation.pk, updated_at=before, title="Renamed"
        )
    saved_user, saved_reply = (Message.objects.get(pk=m.pk) for m in (user_message, reply))
    assert saved_reply.parent_id == saved_user.pk == reply.parent_id
    assert saved_user.parent_id == earlier.assistant_message.pk
    assert saved_user.client_message_id == user_message.client_message_id
    assert saved_reply.writer == reply.writer and saved_reply.status == "streaming"
    assert not user_message._state.adding and not reply._state.adding
    # The same messages saved by the ORM, field by field.
    by_orm = [
        Message(**{**_fields(m), "conversation_id": conversation.pk, "parent_id": None})
        for m in (user_message, reply)
    ]
    for message in by_orm:
        message.placed = True
        message.save()
    for written, expected in zip((saved_user, saved_reply), by_orm, strict=True):
        assert _fields(written) == _fields(Message.objects.get(pk=expected.pk))
        assert written.created_at >= before - timedelta(seconds=1)
    assert set(tree) == {
        earlier.user_message.pk, earlier.assistant_message.pk, saved_user.pk, saved_reply.pk
    }  # fmt: skip
    assert tree == {
        pk: row for pk, row in intake.message_tree(conversation.pk).items() if pk in set(tree)
    }
    assert intake.tool_steps(tree[earlier.assistant_message.pk][3]) == [
        {"name": "get_current_time"}
    ]
    moved = Conversation.objects.get(pk=chat.pk)
    assert moved.current_message_id == saved_reply.pk
    assert moved.title == "Renamed" and moved.updated_at == before


def test_insert_turn_refuses_a_client_message_id_twice(chat):
    sent = uuid.uuid4()
    service.reply_start(conversation=chat, content="once", client_message_id=sent)
    conversation = Conversation.objects.get(pk=chat.pk)
    again = Message(conversation=conversation, role="user", content="twice", client_message_id=sent)
    with pytest.raises(IntegrityError), transaction.atomic():
        intake.insert_turn(again, service._reply_to_be(conversation), conversation.pk)
    assert Message.objects.filter(conversation=chat).count() == 2


def test_a_sends_statements_are_parsed_once_on_postgresql(chat, monkeypatch):
    """psycopg keeps a statement's parsed form only under 4,096 bytes and 50 parameters;
    beyond, it parses the statement again on every send (0.1-0.15 ms of Python each, on the
    thread every send waits for). The send's own statements stay under both."""
    if connection.vendor != "postgresql":
        pytest.skip("psycopg's statement cache")
    from psycopg import _queries

    parsed = []
    split = _queries._split_query

    def counted(query, *args, **kwargs):
        parsed.append(query[:60])
        return split(query, *args, **kwargs)

    monkeypatch.setattr(_queries, "_split_query", counted)
    service.reply_start(conversation=chat, content="first")
    second = service.conversation_create(owner=chat.owner)
    parsed.clear()
    service.reply_start(conversation=second, content="second")
    assert parsed == []


def test_a_send_reads_the_limits_of_the_chats_current_model(chat):
    """The socket's copy of the chat may name a model the chat no longer has: the allowlist
    is checked for the one read under the lock."""
    from django.contrib.auth.models import Group

    from conversations.models import GroupPolicy

    other = ModelProfile.objects.create(name="qwen-turbo-test")
    group = Group.objects.create(name="interns")
    chat.owner.groups.add(group)
    policy = GroupPolicy.objects.create(group=group)
    policy.allowed_models.add(chat.model)
    stale = Conversation.objects.get(pk=chat.pk)
    Conversation.objects.filter(pk=chat.pk).update(model=other)
    with pytest.raises(service.ReplyRefused):
        service.reply_start(conversation=stale, content="hello")
    assert not Message.objects.filter(conversation=chat).exists()


def test_a_reply_is_updated_as_the_orm_would_and_only_while_it_is_the_writers(chat):
    """A checkpoint or an end writes the reply only while it is its generation's (its writer)
    and, for a checkpoint, still streaming; the values read back as the ORM wrote them."""
    writer, other = uuid.uuid4(), uuid.uuid4()
    reply = Message.objects.create(
        conversation=chat, role="assistant", status="streaming", writer=writer
    )
    moment = timezone.now()
    fields = {
        "content": "Hello 😀",
        "tool_steps": [{"end": 5, "calls": [{"id": "c1"}], "results": []}],
        "cost": Decimal("0.0012345"),
        "completed_at": moment,
        "input_tokens": 7,
    }
    assert intake.update_reply(reply.pk, other, fields) == 0
    assert intake.update_reply(reply.pk, writer, fields, status="interrupted") == 0
    assert intake.update_reply(reply.pk, writer, fields, status="streaming") == 1
    saved = Message.objects.get(pk=reply.pk)
    assert (saved.content, saved.tool_steps, saved.cost, saved.completed_at) == (
        "Hello 😀", fields["tool_steps"], Decimal("0.0012345"), moment,
    )  # fmt: skip
    assert saved.input_tokens == 7
    assert intake.update_reply(reply.pk, None, {"status": "complete"}) == 1
    assert Message.objects.get(pk=reply.pk).status == "complete"


def _snapshot(conversation):
    chat = Conversation.objects.get(pk=conversation.pk)
    return (
        chat.updated_at,
        chat.current_message_id,
        chat.title,
        chat.system_prompt_text,
        list(Message.objects.filter(conversation=conversation).values_list("pk", "status")),
    )


@pytest.mark.parametrize("turns", [0, 2])
def test_a_plan_is_the_request_the_send_makes_and_writes_nothing(chat, turns):
    """reply_plan builds, from reads alone (no lock, no write), the very request reply_start
    and build_request make once the message is written: in a new chat (its prompt not yet the
    chat's, no title) and after earlier turns, with the reply's fencing token kept."""
    from conversations.replies import prompt

    for turn in range(turns):
        started = service.reply_start(
            conversation=chat, content=f"turn {turn}", client_message_id=uuid.uuid4()
        )
        Message.objects.filter(pk=started.assistant_message.pk).update(
            status="complete", content=f"answer {turn}"
        )
    chat = Conversation.objects.get(pk=chat.pk)
    before = _snapshot(chat)
    sent = uuid.uuid4()
    with CaptureQueriesContext(connection) as queries:
        plan = service.reply_plan(conversation=chat, content="What now?  ", client_message_id=sent)
    assert isinstance(plan, service.Plan)
    assert _snapshot(chat) == before, "nothing written"
    assert not [q for q in queries if q["sql"].split()[0].upper() in {"INSERT", "UPDATE"}]

    started = service.reply_start(
        conversation=chat, content="What now?  ", client_message_id=sent, writer=plan.writer
    )
    request = prompt.build_request(
        conversation=started.conversation, reply_to=started.assistant_message, tree=started.tree
    )
    assert plan.request == request
    assert request.messages[0].content == "Answer in one line."
    assert [m.content for m in request.messages[1:]] == [
        *[text for turn in range(turns) for text in (f"turn {turn}", f"answer {turn}")],
        "What now?",
    ]
    assert started.assistant_message.writer == plan.writer
    assert Message.objects.get(pk=started.assistant_message.pk).writer == plan.writer


def test_a_plan_refuses_as_the_send_would_and_leaves_the_rest_to_it(chat):
    """A refusal comes from the plan as from reply_start; what the plan does not cover (a
    resent frame, a reply in the way, images) it leaves to reply_start (None)."""
    with pytest.raises(service.ReplyRefused):
        service.reply_plan(conversation=chat, content="   ", client_message_id=uuid.uuid4())
    sent = uuid.uuid4()
    first = service.reply_plan(conversation=chat, content="hello", client_message_id=sent)
    assert isinstance(first, service.Plan)
    started = service.reply_start(
        conversation=chat, content="hello", client_message_id=sent, writer=first.writer
    )
    assert service.reply_plan(conversation=chat, content="hello", client_message_id=sent) is None
    assert (
        service.reply_plan(conversation=chat, content="next", client_message_id=uuid.uuid4())
        is None
    )
    with pytest.raises(service.ReplyInProgress):
        service.reply_start(conversation=chat, content="next", client_message_id=uuid.uuid4())
    Message.objects.filter(pk=started.assistant_message.pk).update(status="complete")
    assert isinstance(
        service.reply_plan(conversation=chat, content="next", client_message_id=uuid.uuid4()),
        service.Plan,
    )
    chat.model = ModelProfile.objects.filter(endpoint=ModelProfile.Endpoint.MULTIMODAL).first()
    chat.save()
    with_image = service.reply_plan(
        conversation=chat,
        content="look",
        client_message_id=uuid.uuid4(),
        image_urls="https://example.com/cat.png",
    )
    assert with_image is None


def _owner_chat(name: str, prompt=None):
    owner = get_user_model().objects.create_user(name, password="pw")
    return service.conversation_create(owner=owner, system_prompt=prompt)


def _planned(chat, content: str, *, language=None) -> tuple:
    """A send of `content` to `chat` as planned (its request out), for reply_start_together:
    (its PlannedWrite, which hands back the StartedReply as written, and its caller's
    language)."""
    plan = service.reply_plan(conversation=chat, content=content, client_message_id=uuid.uuid4())
    assert isinstance(plan, service.Plan)
    return service.PlannedWrite(chat, plan, then=lambda started: started), language


def test_sends_written_together_are_each_what_reply_start_writes(chat):
    """The writes of sends queued together (several people's, each to a chat of their own)
    made in one transaction leave what reply_start leaves for each: the message and its
    reply at the end of the chat's branch, the reply with its plan's fencing token, the chat
    moved and titled, and the history read back the very request that went out."""
    from conversations.replies import prompt

    earlier = service.reply_start(
        conversation=chat, content="first", client_message_id=uuid.uuid4()
    )
    Message.objects.filter(pk=earlier.assistant_message.pk).update(status="complete", content="one")
    chats = [Conversation.objects.get(pk=chat.pk), _owner_chat("jo"), _owner_chat("kai")]
    writes = [_planned(c, f"hello from {c.owner.username} ") for c in chats]
    outcomes = service.reply_start_together(writes)
    assert [ok for ok, _ in outcomes] == [True, True, True], outcomes
    for (write, _language), (_ok, started), c in zip(writes, outcomes, chats, strict=True):
        assert started.created and started.user_message.content == write.plan.content
        saved = Message.objects.get(pk=started.assistant_message.pk)
        assert saved.parent_id == started.user_message.pk and saved.status == "streaming"
        assert saved.writer == write.plan.writer
        moved = Conversation.objects.get(pk=c.pk)
        assert moved.current_message_id == saved.pk == started.conversation.current_message_id
        assert moved.title == started.conversation.title
        assert moved.system_prompt_text == c.system_prompt.text  # the chat's from its start
        request = prompt.build_request(
            conversation=started.conversation, reply_to=started.assistant_message, tree=started.tree
        )
        assert request == write.plan.request
    user_message = Message.objects.get(pk=outcomes[0][1].user_message.pk)
    assert user_message.parent_id == earlier.assistant_message.pk
    assert moved.title == "hello from kai"
    assert Message.objects.count() == 2 + 3 * 2


def test_sends_written_together_leave_to_reply_start_what_it_alone_does(chat, settings):
    """An owner's second send waits for reply_start (the limits count it after the first), as
    does anything but the plain case under the lock (a reply in the way, a chat whose model
    changed); a send the limits refuse gets its refusal in its caller's language, and the
    others of the batch are written all the same."""
    settings.QWENWEB_MESSAGES_PER_MINUTE = 1
    twice = _owner_chat("lu")
    second_chat = service.conversation_create(owner=twice.owner)
    refused = _owner_chat("mo")
    busy, moved, fine = _owner_chat("ned"), _owner_chat("ola"), _owner_chat("pia")
    writes = [
        _planned(twice, "one"),
        _planned(second_chat, "two"),
        _planned(refused, "later", language="zh-hans"),
        _planned(busy, "again"),
        _planned(moved, "new model"),
        _planned(fine, "fine"),
    ]
    # Between the plans and the writes: mo sends from another chat (the minute's one), a
    # reply starts in ned's chat, and ola's chat changes model.
    service.reply_start(
        conversation=service.conversation_create(owner=refused.owner), content="meanwhile"
    )
    settings.QWENWEB_MESSAGES_PER_MINUTE = 2
    service.reply_start(conversation=busy, content="meanwhile")
    settings.QWENWEB_MESSAGES_PER_MINUTE = 1
    other = ModelProfile.objects.create(name="qwen-other", label="Other")
    Conversation.objects.filter(pk=moved.pk).update(model=other)
    before = Message.objects.count()
    outcomes = service.reply_start_together(writes)
    ELSEWHERE = service.ELSEWHERE
    assert outcomes[0][0] is True and outcomes[5][0] is True
    assert outcomes[1] is ELSEWHERE and outcomes[3] is ELSEWHERE and outcomes[4] is ELSEWHERE
    ok, refusal = outcomes[2]
    assert not ok and isinstance(refusal, service.ReplyRefused)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in str(refusal)), str(refusal)
    assert Message.objects.count() == before + 4
    assert not Message.objects.filter(conversation=refused, content="later").exists()
    with pytest.raises(service.ReplyRefused):  # alone, as reply_start writes it
        service.reply_start(conversation=second_chat, content="two")


def test_sends_written_together_that_fail_are_each_written_alone(chat, monkeypatch):
    """A failure in the transaction (a lost connection, a constraint) writes nothing of it:
    every send of it is left to reply_start."""
    from django.db import OperationalError

    writes = [_planned(c, "hi") for c in (chat, _owner_chat("quin"), _owner_chat("ros"))]
    insert_turns = intake.insert_turns

    def lost(turns):
        insert_turns(turns)
        raise OperationalError("the server closed the connection")

    monkeypatch.setattr(intake, "insert_turns", lost)
    outcomes = service.reply_start_together(writes)
    assert outcomes == [service.ELSEWHERE] * 3
    assert Message.objects.count() == 0
    assert Conversation.objects.get(pk=chat.pk).current_message_id is None


def _planning(chat, content, *, language=None, guard=None, sent=None, **images):
    """A send of `content` to `chat` as reply_plan_together takes it."""

    def make(db):
        return service.reply_plan(
            conversation=chat,
            content=content,
            client_message_id=sent or uuid.uuid4(),
            guard=guard,
            db=db,
            split=True,
            **images,
        )

    return make, language


def test_plans_read_together_are_each_the_plan_made_alone(chat):
    """The plans of sends queued together (one round trip of reads for all on PostgreSQL)
    are the plans each makes alone: the same requests, nothing written."""
    started = service.reply_start(
        conversation=chat, content="first", client_message_id=uuid.uuid4()
    )
    Message.objects.filter(pk=started.assistant_message.pk).update(status="complete", content="one")
    chats = [Conversation.objects.get(pk=chat.pk), _owner_chat("sal"), _owner_chat("tam")]
    before = [_snapshot(c) for c in chats]
    outcomes = service.reply_plan_together([_planning(c, f"to {c.owner.username}") for c in chats])
    assert [_snapshot(c) for c in chats] == before, "nothing written"
    for c, (ok, plan) in zip(chats, outcomes, strict=True):
        assert ok and isinstance(plan, service.Plan)
        alone = service.reply_plan(
            conversation=c, content=f"to {c.owner.username}", client_message_id=uuid.uuid4()
        )
        assert plan.request == alone.request and plan.content == alone.content
    assert [m.content for m in outcomes[0][1].request.messages[1:]] == ["first", "one", "to ivy"]


def test_plans_read_together_refuse_each_in_its_language_and_leave_the_rest(chat, monkeypatch):
    """In a batch of plans: a refused message (in its caller's language), an ended session,
    a send that is not the plain case (no plan: reply_start does it) each get their own
    outcome, and the others their plans; if the reads fail, each plan is made alone."""
    from django.contrib.sessions.models import Session
    from django.db import OperationalError
    from django.test import Client

    from conversations.socket_auth import SessionCheck, SessionEnded

    gone = _owner_chat("uma")
    client = Client()
    client.force_login(gone.owner)
    check = SessionCheck(client.cookies["sessionid"].value, gone.owner_id, checked_at=-100.0)
    Session.objects.all().delete()
    resent = uuid.uuid4()
    service.reply_start(conversation=_owner_chat("val"), content="hi", client_message_id=resent)
    busy = Conversation.objects.get(owner__username="val")
    multimodal = ModelProfile.objects.filter(endpoint=ModelProfile.Endpoint.MULTIMODAL).first()
    seeing = service.conversation_create(owner=_owner_chat("wen").owner, model=multimodal)
    plans = [
        _planning(chat, "   ", language="zh-hans"),
        _planning(gone, "hi", guard=check.guard(10.0)),
        _planning(busy, "hi", sent=resent),
        _planning(seeing, "look", image_urls="https://example.com/cat.png"),
        _planning(_owner_chat("xia"), "fine"),
    ]
    outcomes = service.reply_plan_together(plans)
    ok, refusal = outcomes[0]
    assert not ok and any("\u4e00" <= ch <= "\u9fff" for ch in str(refusal)), str(refusal)
    assert outcomes[1][0] is False and isinstance(outcomes[1][1], SessionEnded)
    assert outcomes[2] == (True, None) and outcomes[3] == (True, None)
    assert outcomes[4][0] is True and isinstance(outcomes[4][1], service.Plan)

    def lost(db, statements):
        raise OperationalError("the server closed the connection")

    monkeypatch.setattr(intake, "run_reads", lost)
    fine = [_planning(_owner_chat(name), "hi") for name in ("yan", "zoe")]
    assert service.reply_plan_together(fine) == [service.ELSEWHERE] * 2


def _session_verdicts(key, user_id) -> tuple[bool, bool]:
    """(what a guard concludes from the two rows it reads with a send's plan, what Django's
    session store and backend say: socket_auth._signs_in)."""
    from conversations.socket_auth import SessionCheck, SessionEnded, _signs_in

    guard = SessionCheck(key, user_id, checked_at=-100.0).guard(0.0)
    statements = guard.reads(connection)
    assert statements, "the reads apply to this site's sessions and users"
    try:
        guard.check(connection, *intake.run_reads(connection, statements))
        read = True
    except SessionEnded:
        read = False
        assert guard.session.ended
    return read, _signs_in(key, user_id)


def test_the_session_read_with_a_plan_concludes_as_djangos_check(settings):
    """SessionGuard's two reads and what it concludes from them agree with the check through
    Django's session store and backend, whatever ended the session: a rotated SECRET_KEY kept
    as a fallback (still signed in), another user's id, a deactivated account, a changed
    password, an expired or a deleted session. Sessions kept elsewhere than the database:
    the guard makes the check itself."""
    from django.contrib.sessions.models import Session
    from django.test import Client

    from conversations.socket_auth import SessionCheck

    owner = get_user_model().objects.create_user("una", password="pw-1")
    client = Client()
    client.force_login(owner)
    key = client.cookies["sessionid"].value
    assert _session_verdicts(key, owner.pk) == (True, True)
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "rotated-" + "y" * 50
    assert _session_verdicts(key, owner.pk) == (True, True)
    assert _session_verdicts(key, owner.pk + 1) == (False, False)
    owner.is_active = False
    owner.save()
    assert _session_verdicts(key, owner.pk) == (False, False)
    owner.is_active = True
    owner.save()
    assert _session_verdicts(key, owner.pk) == (True, True)
    owner.set_password("changed-pw-2")
    owner.save()
    assert _session_verdicts(key, owner.pk) == (False, False)
    client.force_login(owner)
    key = client.cookies["sessionid"].value
    assert _session_verdicts(key, owner.pk) == (True, True)
    expired = timezone.now() - timedelta(seconds=1)
    Session.objects.filter(session_key=key).update(expire_date=expired)
    assert _session_verdicts(key, owner.pk) == (False, False)
    Session.objects.filter(session_key=key).delete()
    assert _session_verdicts(key, owner.pk) == (False, False)
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    assert SessionCheck(key, owner.pk, checked_at=-100.0).guard(0.0).reads(connection) is None


def test_a_plan_reads_the_session_with_its_own_reads_and_refuses_an_ended_one(chat):
    """A send's plan with a session check due reads the session's rows in its own run of
    reads (one round trip on PostgreSQL): a live session lets the plan through and is trusted
    from then on; an ended one raises SessionEnded before anything is written."""
    from django.contrib.sessions.models import Session
    from django.test import Client

    from conversations.socket_auth import SessionCheck, SessionEnded

    client = Client()
    client.force_login(chat.owner)
    check = SessionCheck(client.cookies["sessionid"].value, chat.owner_id, checked_at=-100.0)
    with CaptureQueriesContext(connection) as queries:
        plan = service.reply_plan(
            conversation=chat, content="hi", client_message_id=uuid.uuid4(), guard=check.guard(0.0)
        )
    assert isinstance(plan, service.Plan) and check.checked_at == 0.0
    sessions = [q["sql"] for q in queries if "django_session" in q["sql"]]
    assert all(sql.startswith("SELECT session_data FROM") for sql in sessions), "the guard's reads"
    Session.objects.all().delete()
    guard = check.guard(10.0)
    with pytest.raises(SessionEnded):
        service.reply_plan(
            conversation=chat, content="hi", client_message_id=uuid.uuid4(), guard=guard
        )
    assert check.ended
    assert not Message.objects.filter(conversation=chat).exists()


@pytest.mark.django_db(transaction=True)  # the setting is made outside any transaction
def test_a_sends_limits_are_planned_once_from_the_senders_own_chats(chat, settings):
    """On PostgreSQL the statement reading the sender's limits and load is planned once for
    the connection, not again at every send (PostgreSQL's own choice replanned it each time:
    1.5-2 ms of the server's time a send), and that one plan, made without statistics (a new
    database), starts from the sender's chats or the replies streaming now: never from the
    (role, created_at) index, through every user's replies since the window began."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's plan cache")
    from psycopg import ClientCursor

    settings.QWENWEB_TOKENS_PER_DAY = settings.QWENWEB_TOKENS_PER_MONTH = 1000
    settings.QWENWEB_MAX_CONCURRENT_REPLIES, settings.QWENWEB_MESSAGES_PER_MINUTE = 2, 20
    settings.QWENWEB_COST_PER_MONTH = Decimal("5")
    for _ in range(7):  # past the five sends after which PostgreSQL picks a plan of its own
        assert service.reply_plan(conversation=chat, content="hi", client_message_id=uuid.uuid4())
    raw = intake._raw_postgresql()
    with raw.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE %s",
            ["%load_nth_recent%"],
        )
        assert cursor.fetchall() == [(7, 0)]

    query = rules.LoadQuery.of(chat.owner_id, model_id=chat.model_id)
    numbers = iter(range(1, len(query.params) + 1))
    numbered = re.sub("%s", lambda _: f"${next(numbers)}", query.sql)
    with ClientCursor(raw) as cursor:
        cursor.execute(f"PREPARE limits_plan AS {numbered}")
        values = ", ".join(cursor.mogrify("%s", [value]) for value in query.params)
        cursor.execute(f"EXPLAIN EXECUTE limits_plan({values})")
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("DEALLOCATE limits_plan")
    assert "message_role_created_idx" not in plan, plan
    assert "owner_id" in plan, plan


def test_the_same_on_postgresql(tmp_path):
    rerun_on_postgresql(__file__, "test_the_same_on_postgresql", tmp_path)


def test_a_sends_statements_skip_djangos_per_statement_work_unless_watched(chat, monkeypatch):
    """On SQLite the send's statements go to the sqlite3 cursor with their text turned to
    sqlite3's form once a process (Django's cursor redoes that on every statement: a regex
    over the load statement's 4 KB); a query log (a debug page, the tests' query counts) still
    sees them (on PostgreSQL, but for the two pipelined reads)."""
    converted = []
    if connection.vendor == "sqlite":
        from django.db.backends.sqlite3.base import SQLiteCursorWrapper

        convert = SQLiteCursorWrapper.convert_query

        def counted(self, query, **kwargs):
            converted.append(query[:60])
            return convert(self, query, **kwargs)

        monkeypatch.setattr(SQLiteCursorWrapper, "convert_query", counted)
    service.reply_start(conversation=chat, content="first")
    Message.objects.update(status="complete")
    second = service.conversation_create(owner=chat.owner)
    converted.clear()
    started = service.reply_start(conversation=second, content="second")
    assert converted == [], converted
    assert Message.objects.get(pk=started.user_message.pk).content == "second"
    Message.objects.update(status="complete")
    third = service.conversation_create(owner=chat.owner)
    with CaptureQueriesContext(connection) as queries:
        service.reply_start(conversation=third, content="third")
    logged = " ".join(query["sql"] for query in queries.captured_queries)
    assert "INSERT INTO" in logged
    assert ("ROW_NUMBER()" in logged) == (connection.vendor == "sqlite")
