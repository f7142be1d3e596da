"""Search of one's chats (conversations/chat_search.py) by either of its ways: reading the newest
chats row by row, and asking the index (SQLite's FTS5 trigram table, PostgreSQL's trigram
indexes). Each behaviour is checked both ways and must be the same: a substring in any case,
Chinese too, LIKE's wildcards taken literally, the newest first, another user's chats never.

These run on the test database (SQLite unless DATABASE_URL says otherwise);
test_the_same_holds_on_postgresql runs this module again on PostgreSQL (skipped where it is not
reachable; under CI it must be)."""

from __future__ import annotations

import copy
import random
import re
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import chat_search
from conversations.models import Conversation, Message
from conversations.replies.service import conversation_create
from tests.postgres import rerun_on_postgresql

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["newest chats first", "index"])
def way(request, monkeypatch):
    """Which way the search takes: "index" reads no chat row by row first."""
    if request.param == "index":
        monkeypatch.setattr(chat_search, "RECENT_CHATS", 0)
    return request.param


def chat(owner, *contents: str, title: str = "", age_days: float = 0) -> Conversation:
    conversation = conversation_create(owner=owner)
    for content in contents:
        Message.objects.create(conversation=conversation, role="user", content=content)
    updated_at = timezone.now() - timedelta(days=age_days)
    Conversation.objects.filter(pk=conversation.pk).update(
        title=title or conversation.title, updated_at=updated_at
    )
    conversation.refresh_from_db()
    return conversation


def found(client, query: str) -> list[str]:
    """The chats the search page lists for `query`, as their ids, in its order."""
    page = client.get("/search/", {"q": query}).content.decode()
    return re.findall(r'href="/c/([0-9a-f-]+)/" class="search-result"', page)


def test_a_substring_in_any_case_chinese_too(way, alice, alice_client):
    english = chat(alice, "Feed the Sourdough starter twice a day.")
    chinese = chat(alice, "帮我写一封请假邮件给经理")
    titled = chat(alice, title="Trip to Kyoto")
    assert found(alice_client, "SOURDOUGH STARTER") == [str(english.id)]
    assert found(alice_client, "ourdough sta") == [str(english.id)]
    assert found(alice_client, "请假邮件") == [str(chinese.id)]
    assert found(alice_client, "kyoto") == [str(titled.id)]
    assert found(alice_client, "sourdough starters") == []
    chat(alice, "kyo yot oto")  # each of the query's trigrams, but not the query
    assert found(alice_client, "kyoto") == [str(titled.id)]
    page = alice_client.get("/search/", {"q": "请假"}).content.decode()
    assert "帮我写一封<mark>请假</mark>邮件给经理" in page


def test_one_and_two_character_queries(way, alice, alice_client):
    # Too short for a trigram: read row by row whichever way was asked for.
    ab = chat(alice, "xABy")
    chinese = chat(alice, "请假一天")
    assert found(alice_client, "ab") == [str(ab.id)]
    assert found(alice_client, "请假") == [str(chinese.id)]
    assert found(alice_client, "y") == [str(ab.id)]


def test_wildcards_and_quotes_in_the_query_are_literal(way, alice, alice_client):
    percent = chat(alice, "Prices fall 50% today")
    chat(alice, "Prices fall 500 today")
    underscore = chat(alice, "call get_user now")
    chat(alice, "call getXuser now")
    quoted = chat(alice, 'She said "yes" AND NEAR(no)')
    backslash = chat(alice, r"C:\temp\files")
    assert found(alice_client, "50%") == [str(percent.id)]
    assert found(alice_client, "l 50% t") == [str(percent.id)]
    assert found(alice_client, "get_user") == [str(underscore.id)]
    assert found(alice_client, '"yes" AND NEAR(') == [str(quoted.id)]
    assert found(alice_client, "AND") == [str(quoted.id)]
    assert found(alice_client, r"\temp\f") == [str(backslash.id)]
    assert found(alice_client, "%%%") == []


def test_another_users_chats_are_never_shown(way, alice, alice_client, django_user_model):
    bob = django_user_model.objects.create_user("bob", password="pw")
    chat(bob, "the secret recipe of bob", title="Bob's secret recipe")
    mine = chat(alice, "my own recipe")
    assert found(alice_client, "recipe") == [str(mine.id)]
    assert found(alice_client, "secret") == []


def test_the_newest_chats_first_at_most_a_page(way, alice, alice_client, monkeypatch):
    monkeypatch.setattr("conversations.views.SEARCH_RESULTS", 3)
    chats = [chat(alice, f"note {n}: keep transactions short", age_days=n) for n in range(5)]
    chat(alice, "nothing to see", age_days=0.5)
    assert found(alice_client, "transactions") == [str(c.id) for c in chats[:3]]


def test_a_rare_text_in_an_old_chat_is_found_past_the_newest_ones(alice, monkeypatch):
    monkeypatch.setattr(chat_search, "RECENT_CHATS", 2)
    old = chat(alice, "a sourdough starter", age_days=30)
    for n in range(3):
        chat(alice, f"chat {n}")
    chats = chat_search.chats_matching(user=alice, query="sourdough", limit=50)
    assert chats == [old]


def test_edits_and_deletes_are_found_as_they_are_now(way, alice, alice_client, admin_client):
    conversation = chat(alice)
    message = Message.objects.create(conversation=conversation, role="user", content="old words")
    assert found(alice_client, "old words") == [str(conversation.id)]
    message.content = "new phrasing"
    message.save()
    assert found(alice_client, "old words") == []
    assert found(alice_client, "new phrasing") == [str(conversation.id)]
    Message.objects.filter(pk=message.pk).update(status="stopped")  # not its text
    assert found(alice_client, "new phrasing") == [str(conversation.id)]
    Message.objects.filter(pk=message.pk).update(content="streamed further")
    assert found(alice_client, "new phrasing") == []
    assert found(alice_client, "streamed further") == [str(conversation.id)]
    response = admin_client.post(
        f"/admin/conversations/message/{message.pk}/delete/", {"post": "yes"}
    )
    assert response.status_code == 302 and not Message.objects.filter(pk=message.pk).exists()
    assert found(alice_client, "streamed further") == []
    other = chat(alice, "gone with its chat")
    other.delete()
    assert found(alice_client, "gone with its chat") == []


def test_the_index_is_what_sqlite_reads(alice, alice_client, monkeypatch):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's FTS5 table")
    monkeypatch.setattr(chat_search, "RECENT_CHATS", 0)
    conversation = chat(alice, "feed the sourdough starter")
    with CaptureQueriesContext(connection) as queries:
        assert found(alice_client, "Sourdough") == [str(conversation.id)]
    assert any(f"{chat_search.SQLITE_INDEX} MATCH" in q["sql"] for q in queries.captured_queries)
    # The streaming replies, which the index does not hold, come from the status index, not
    # from a read of every message, and the index's matches are listed once; so too with
    # statistics that show every message sharing one status (as a site's almost do).
    notes = chat(alice, *(f"note {n}" for n in range(30)), age_days=1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
        # As a site's statistics read: 200,000 messages, one status for all (but a few).
        cursor.execute(
            "UPDATE sqlite_stat1 SET stat = '200000' || substr(stat, instr(stat, ' ')) "
            "WHERE tbl = 'conversations_message'"
        )
        cursor.execute(
            "UPDATE sqlite_stat1 SET stat = '200000 200000' "
            "WHERE tbl = 'conversations_message' AND idx LIKE 'conversations_message_status%'"
        )
        cursor.execute("ANALYZE sqlite_schema")  # read them again
    try:
        with CaptureQueriesContext(connection) as queries:
            chats = chat_search._newest_holding(
                Conversation.objects.filter(owner=alice), "sourdough", 50, indexed=True
            )
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN QUERY PLAN {queries.captured_queries[-1]['sql']}")
            plan = [row[-1] for row in cursor.fetchall()]
    finally:
        with connection.cursor() as cursor:  # no statistics for the tests after this one
            cursor.execute("DELETE FROM sqlite_stat1")
            cursor.execute("ANALYZE sqlite_schema")
    assert chats == [conversation]
    assert not any(step.startswith(("SCAN U", "SCAN conversations_message ")) for step in plan)
    assert "SCAN conversations_message" not in plan, plan
    assert any("conversations_message_status" in step for step in plan), plan
    assert not any("CORRELATED" in step for step in plan), plan
    notes.delete()
    # And the table itself follows the messages (a search falls back to LIKE without it).
    message = conversation.messages.get()
    assert _indexed("sourdough") == [message.pk]
    message.delete()
    assert _indexed("sourdough") == []


@pytest.mark.django_db(transaction=True)
def test_sqlite_index_follows_again_after_a_migration_remakes_the_table(
    transactional_db, alice, alice_client, monkeypatch
):
    """Django alters an SQLite table by copying it into a new one (as an added field with a
    default does): the old table's triggers go with it, and the check after every migrate puts
    them back and rebuilds the index."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's FTS5 triggers")
    monkeypatch.setattr(chat_search, "RECENT_CHATS", 0)
    conversation = chat(alice)
    field = Message._meta.get_field("error_code")
    wider = copy.deepcopy(field)
    wider.max_length += 1
    with connection.schema_editor() as editor:
        editor.alter_field(Message, field, wider)
        editor.alter_field(Message, wider, field)
    Message.objects.create(conversation=conversation, role="user", content="written meanwhile")
    assert _indexed("written meanwhile") == [], "the triggers went with the old table"
    call_command("migrate", verbosity=0)
    assert _indexed("written meanwhile") != []
    assert found(alice_client, "written meanwhile") == [str(conversation.id)]
    Message.objects.filter(conversation=conversation).update(content="and edited after")
    assert found(alice_client, "written meanwhile") == []
    assert found(alice_client, "and edited after") == [str(conversation.id)]


def test_postgresql_reads_the_trigram_index_for_a_rare_text(alice):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's trigram indexes (migration 0010)")
    chat(alice, "feed the sourdough starter")
    holding = Message.objects.filter(chat_search.text_holding("sourdough"))
    with connection.cursor() as cursor:
        # A handful of rows: the planner would read them all; would it take the index at all?
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_indexscan = off")  # nor the whole primary key
        sql, params = holding.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    # The index holds the messages no longer streaming; the others come from the status index.
    assert "BitmapOr" in plan and "conversations_message_content_trgm" in plan, plan


def test_a_streaming_reply_is_found_though_the_index_takes_it_only_once_ended(
    way, alice, alice_client
):
    """The indexes hold the text of messages no longer streaming (migration 0016): a streaming
    reply's checkpoints do not re-index it, yet both ways find it as it is now, while it
    streams, once it has ended or been marked interrupted, and when it streams again."""
    conversation = chat(alice, "a question")
    reply = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", content=""
    )
    for text in ("The bread", "The bread needs a levain", "The bread needs a levain, fed"):
        Message.objects.filter(pk=reply.pk).update(content=text)  # a checkpoint
    assert found(alice_client, "levain") == [str(conversation.id)]
    Message.objects.filter(pk=reply.pk).update(status="complete", content="levain, fed twice")
    assert found(alice_client, "levain") == [str(conversation.id)]
    Message.objects.filter(pk=reply.pk).update(status="interrupted")
    assert found(alice_client, "fed twice") == [str(conversation.id)]
    Message.objects.filter(pk=reply.pk).update(status="streaming", content="levain, fed thrice")
    assert found(alice_client, "thrice") == [str(conversation.id)]
    assert found(alice_client, "twice") == []
    Message.objects.filter(pk=reply.pk).update(status="stopped")
    assert found(alice_client, "thrice") == [str(conversation.id)]
    streaming = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", content="sourdough"
    )
    reply.delete()
    streaming.delete()
    assert found(alice_client, "thrice") == [] and found(alice_client, "sourdough") == []
    if connection.vendor == "sqlite":
        _index_matches_the_settled_messages()


def test_a_streaming_replys_checkpoints_leave_sqlites_index_alone(alice):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's FTS5 table")
    conversation = chat(alice, "a question")
    reply = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", content=""
    )

    def index_data() -> list:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT * FROM {chat_search.SQLITE_INDEX}_data ORDER BY id")
            return cursor.fetchall()

    before = index_data()
    for n in range(1, 6):
        Message.objects.filter(pk=reply.pk).update(content="word " * 100 * n)
    assert index_data() == before
    Message.objects.filter(pk=reply.pk).update(status="complete")
    assert index_data() != before
    assert _indexed("word") == [reply.pk]


@pytest.mark.django_db(transaction=True)
def test_going_back_before_migration_0016_gives_the_index_of_every_message(transactional_db, alice):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's FTS5 triggers")
    conversation = chat(alice, "settled words")
    reply = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", content="streamed words"
    )
    try:
        call_command("migrate", "conversations", "0015", verbosity=0)
        assert _indexed("streamed words") == [reply.pk]  # as the earlier version keeps it
        Message.objects.filter(pk=reply.pk).update(content="streamed further")
        assert _indexed("streamed further") == [reply.pk]
        _index_matches_the_settled_messages(streaming_too=True)
    finally:
        call_command("migrate", verbosity=0)
    assert _indexed("streamed further") == [] and _indexed("settled words") != []
    Message.objects.filter(pk=reply.pk).update(status="complete")
    assert _indexed("streamed further") == [reply.pk]
    _index_matches_the_settled_messages()


def _index_matches_the_settled_messages(streaming_too: bool = False) -> None:
    """FTS5's check of the index against the messages table (which fails with streaming
    messages present, unless the index holds them too)."""
    if not streaming_too:
        assert not Message.objects.filter(status="streaming").exists()
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {chat_search.SQLITE_INDEX}({chat_search.SQLITE_INDEX}, rank) "
            "VALUES ('integrity-check', 1)"
        )


def test_the_admins_search_reads_the_trigram_index_on_postgresql(alice):
    """The admin's conversation search finds messages by the same test (and index) as the
    chat's own search."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's trigram indexes")
    from django.contrib import admin

    conversation = chat(alice, "feed the sourdough starter")
    model_admin = admin.site._registry[Conversation]
    found, _distinct = model_admin.get_search_results(None, Conversation.objects.all(), "sourdough")
    assert list(found) == [conversation]
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_indexscan = off")
        sql, params = found.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "conversations_message_content_trgm" in plan, plan


def _indexed(text: str) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT rowid FROM {chat_search.SQLITE_INDEX} WHERE {chat_search.SQLITE_INDEX} "
            "MATCH %s",
            [" AND ".join(f'"{text[i : i + 3]}"' for i in range(len(text) - 2))],
        )
        return [rowid for (rowid,) in cursor.fetchall()]


def test_both_ways_find_what_a_substring_search_finds(alice, django_user_model, monkeypatch):
    """Random texts and queries over a small alphabet full of what SQL or FTS5 could read as
    syntax: each way finds exactly the chats a plain substring test (any case) picks."""
    rng = random.Random(13)
    alphabet = "aAbBcC %_\\\"'()*:^-请假ß"
    bob = django_user_model.objects.create_user("bob", password="pw")
    chats = []
    for n in range(40):
        owner = alice if n % 4 else bob
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        title = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        chats.append((chat(owner, text, title=title.strip() or "t", age_days=n), text))
    matched = 0
    for _ in range(80):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.7:  # a piece of a text, its case changed here and there
            text = rng.choice(chats)[1]
            start = rng.randint(0, len(text))
            piece = text[start : start + rng.randint(1, 8)]
            query = "".join(c.swapcase() if rng.random() < 0.3 else c for c in piece)
        query = " ".join(query.split())  # as the view has it
        if not query:
            continue
        expected = [
            c
            for c, text in chats
            if c.owner_id == alice.pk and (_holds(text, query) or _holds(c.title, query))
        ]
        for recent in (0, 5, 1000):
            monkeypatch.setattr(chat_search, "RECENT_CHATS", recent)
            got = chat_search.chats_matching(user=alice, query=query, limit=50)
            assert got == expected, (query, recent)
        matched += bool(expected) and len(query) >= 3
    assert matched >= 20, "enough queries for the index find something"


def _holds(text: str, query: str) -> bool:
    # SQLite's LIKE folds ASCII letters only; PostgreSQL's UPPER folds every letter (none
    # of the alphabet above but ß, whose UPPER is itself there).
    return (
        query.lower() in text.lower()
        if connection.vendor == "postgresql"
        else (_ascii_lower(query) in _ascii_lower(text))
    )


def _ascii_lower(text: str) -> str:
    return "".join(c.lower() if c.isascii() else c for c in text)


@pytest.mark.services
def test_the_same_holds_on_postgresql(tmp_path):
    rerun_on_postgresql(__file__, "test_the_same_holds_on_postgresql", tmp_path, may_skip=True)
