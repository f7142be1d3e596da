"""Search of a user's chats (/search/?q=): the newest chats whose title or messages contain
the text, in any case, and each one's first message holding it.

No single plan is fast for every query (bench/search.py times them over 10,000 chats). A word
in many chats is found among the newest ones at once, where any index would first have to list
every message holding it, everyone's, only to keep 50 chats: so the newest chats are read row
by row first, SCAN_CHUNK at a time, up to RECENT_CHATS. As soon as the matches come too slowly
for those to fill a page (a rarer text, which then has fewer messages to list), the search asks
the index instead: PostgreSQL's trigram indexes (migration 0010) or SQLite's FTS5 trigram table
(migration 0013, created by `sqlite_index_create`). Without an index, or for a text too short
for trigrams, the database reads the user's messages one by one: correct, only slower.

The indexes hold the text of messages that are no longer streaming (migration 0016): a
streaming reply's text changes with every checkpoint, and re-indexing all of it each time
cost ~1 ms a checkpoint for a 2,500-character reply on either database, against 0.02 ms
(SQLite) and 0.46 ms (PostgreSQL) for the write itself (bench/README.md, ninth pass). The
replies streaming, a few at most, are found through the status index instead (`text_holding`).
"""

from __future__ import annotations

from django.db import connection, transaction
from django.db.models import BooleanField, Exists, OuterRef, Q, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import StrIndex, Upper
from django.db.models.lookups import GreaterThan

from conversations.models import Conversation, Message

RECENT_CHATS = 500
SCAN_CHUNK = 100

SQLITE_INDEX = "conversations_message_search"

# An external-content FTS5 table: it keeps trigrams and rowids only (detail=none: 30% of the
# text's size, where positions would cost 200%), so a match is a candidate that LIKE confirms.
# Triggers keep it in step with every insert, edit and delete of a message, whoever makes it
# (the app, the admin, a cascade). It holds a message's text once the message is not streaming
# (`_INDEXED`; NULL: not held): a delete must name the text the index holds for the row, so an
# edit removes the old text before adding the new, and only a change of what is held
# re-indexes (not a streaming reply's checkpoints, nor its heartbeats).
_STREAMING = Message.Status.STREAMING.value
_INDEXED = "(CASE WHEN {row}.status = '" + _STREAMING + "' THEN NULL ELSE {row}.content END)"
_SQLITE_TABLE = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {SQLITE_INDEX} USING fts5(content, "
    "content='conversations_message', content_rowid='id', tokenize='trigram', detail=none)"
)
_SQLITE_TRIGGERS = {
    f"{SQLITE_INDEX}_insert": f"""
        CREATE TRIGGER {SQLITE_INDEX}_insert AFTER INSERT ON conversations_message
        WHEN new.status IS NOT '{_STREAMING}' BEGIN
            INSERT INTO {SQLITE_INDEX}(rowid, content) VALUES (new.id, new.content);
        END""",
    f"{SQLITE_INDEX}_delete": f"""
        CREATE TRIGGER {SQLITE_INDEX}_delete AFTER DELETE ON conversations_message
        WHEN old.status IS NOT '{_STREAMING}' BEGIN
            INSERT INTO {SQLITE_INDEX}({SQLITE_INDEX}, rowid, content)
            VALUES ('delete', old.id, old.content);
        END""",
    f"{SQLITE_INDEX}_update": f"""
        CREATE TRIGGER {SQLITE_INDEX}_update AFTER UPDATE OF content, status
        ON conversations_message
        WHEN {_INDEXED.format(row="old")} IS NOT {_INDEXED.format(row="new")} BEGIN
            INSERT INTO {SQLITE_INDEX}({SQLITE_INDEX}, rowid, content)
            SELECT 'delete', old.id, old.content WHERE old.status IS NOT '{_STREAMING}';
            INSERT INTO {SQLITE_INDEX}(rowid, content)
            SELECT new.id, new.content WHERE new.status IS NOT '{_STREAMING}';
        END""",
}


def text_holding(query: str) -> Q:
    """Messages whose text contains `query`, in any case, in the form the indexes answer:
    the trigram index (PostgreSQL) holds the messages no longer streaming, and the few that
    are streaming come from the status index."""
    streaming = Q(status=_STREAMING)
    # The same test written two ways: PostgreSQL would take a test common to both sides out
    # of the OR, and then find no index for it.
    return (Q(content__icontains=query) & ~streaming) | (_contains("content", query) & streaming)


def chats_matching(*, user, query: str, limit: int) -> list[Conversation]:
    """`user`'s newest `limit` chats (by updated_at) whose title or any message contains
    `query`, in any case."""
    owned = Conversation.objects.owned_by(user)
    recent = list(owned.order_by("-updated_at").values_list("pk", flat=True)[:RECENT_CHATS])
    chats: list[Conversation] = []
    for start in range(0, len(recent), SCAN_CHUNK):
        chunk = owned.filter(pk__in=recent[start : start + SCAN_CHUNK])
        chats += _newest_holding(chunk, query, limit - len(chats), indexed=False)
        if len(chats) == limit:
            return chats
        read = start + SCAN_CHUNK
        if len(recent) == RECENT_CHATS and len(chats) * RECENT_CHATS < limit * read:
            break  # at this rate the newest chats would not fill a page
    else:
        if len(recent) < RECENT_CHATS:
            return chats  # every chat was read
    return _newest_holding(owned, query, limit, indexed=True)


def first_matches(*, chats: list[Conversation], query: str) -> dict:
    """Each chat's first message (by pk) containing `query`: {conversation id: its text}."""
    found: dict = {}
    # Sorted here: ordered by pk in SQL, SQLite would read every message in pk order rather
    # than these chats'.
    rows = (
        Message.objects.filter(conversation__in=chats)
        .filter(_contains("content", query))
        .values_list("conversation_id", "pk", "content")
    )
    for conversation_id, _pk, content in sorted(rows, key=lambda row: row[1]):
        found.setdefault(conversation_id, content)
    return found


def _newest_holding(chats, query: str, limit: int, *, indexed: bool) -> list[Conversation]:
    if indexed and len(query) >= 3 and _sqlite_index_ready():
        # Lists of the chats (each found once), not an EXISTS per chat, which SQLite would
        # answer by reading each chat's messages to test them against the list of matches.
        # The index holds the messages no longer streaming; the streaming ones, a few at
        # most, come from the status index, in a list of their own (one OR of both in a
        # single list had SQLite read the index's matches once per chat: 20 -> 160 ms).
        holding = Q(pk__in=_sqlite_matches(query).values("conversation_id")) | Q(
            pk__in=_sqlite_streaming(query).values("conversation_id")
        )
    else:
        # An EXISTS per chat: walking the chats newest first, the database stops at `limit`.
        # (On PostgreSQL, an IN list with the OR runs as a subplan per chat.)
        contains = text_holding(query) if indexed else _contains("content", query)
        holding = Exists(Message.objects.filter(Q(conversation=OuterRef("pk")), contains))
    title = Q(title__icontains=query) if indexed else _contains("title", query)
    return list(
        chats.filter(title | holding)
        .order_by("-updated_at")
        .only("id", "title", "updated_at")[:limit]
    )


def _contains(field: str, query: str):
    """`field` contains `query` in any case, tested row by row: on PostgreSQL, written so
    that the planner cannot take the trigram index, which for a common word would list
    every message holding it, everyone's, before the few chats asked about are looked at."""
    if connection.vendor == "postgresql":
        return GreaterThan(StrIndex(Upper(field), Upper(Value(query))), 0)
    return Q(**{f"{field}__icontains": query})


def _sqlite_matches(query: str):
    """The messages containing `query` (3 characters or more), through the FTS5 table: the
    messages holding each of its trigrams (any case; an FTS5 phrase needs positions, which
    detail=none does not keep), then LIKE for the text itself, so that a match is what
    icontains matches, no more."""
    trigrams = sorted({query[i : i + 3] for i in range(len(query) - 2)})
    expression = " AND ".join('"' + trigram.replace('"', '""') + '"' for trigram in trigrams)
    listed = RawSQL(f"SELECT rowid FROM {SQLITE_INDEX} WHERE {SQLITE_INDEX} MATCH %s", [expression])
    return Message.objects.filter(pk__in=listed, content__icontains=query)


def _sqlite_streaming(query: str):
    """The streaming messages containing `query` (which the FTS5 table does not hold), from
    the status index. SQLite's statistics say a status is shared by most messages (all but a
    few are complete), and it would read every message instead (150 ms for 200,000, against
    20 for the whole search): likelihood() tells it how rare this one is."""
    rare = RawSQL("likelihood(status = %s, 0.0001)", [_STREAMING], output_field=BooleanField())
    return Message.objects.filter(rare, content__icontains=query)


def _sqlite_index_ready() -> bool:
    if connection.vendor != "sqlite":
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = %s", [SQLITE_INDEX]
        )
        return cursor.fetchone()[0] == 1


def sqlite_index_create(connection) -> bool:
    """Create SQLite's FTS5 index of message text and its triggers, filled from the messages
    there are (those not streaming, as the triggers keep it), or make them again; False where
    this SQLite has no FTS5 trigram tokenizer (before 3.34)."""
    try:
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute(
                "CREATE VIRTUAL TABLE temp.trigram_probe USING fts5(x, tokenize=trigram)"
            )
            cursor.execute("DROP TABLE temp.trigram_probe")
    except Exception:
        return False
    # One transaction: no write may come between the rebuild, which indexes every message,
    # and taking out the streaming ones, whose text must be what the rebuild read.
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(_SQLITE_TABLE)
        for name, statement in _SQLITE_TRIGGERS.items():
            cursor.execute(f"DROP TRIGGER IF EXISTS {name}")
            cursor.execute(statement)
        cursor.execute(f"INSERT INTO {SQLITE_INDEX}({SQLITE_INDEX}) VALUES ('rebuild')")
        cursor.execute(
            f"INSERT INTO {SQLITE_INDEX}({SQLITE_INDEX}, rowid, content) "
            "SELECT 'delete', id, content FROM conversations_message WHERE status = %s",
            [_STREAMING],
        )
    return True


def sqlite_index_drop(connection) -> None:
    with connection.cursor() as cursor:
        for name in _SQLITE_TRIGGERS:
            cursor.execute(f"DROP TRIGGER IF EXISTS {name}")
        cursor.execute(f"DROP TABLE IF EXISTS {SQLITE_INDEX}")


def sqlite_index_repair(connection) -> None:
    """Put back the index's triggers, and rebuild it, if the messages table lost them.

    Django alters an SQLite table by copying it into a new one and dropping the old, and the
    old table's triggers go with it: after such a migration the index would silently stop
    following edits. Run after every migrate (apps.py). (Triggers of an earlier definition
    are migrations' business: 0016 made the current ones.)"""
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger') AND name IN "
            f"({', '.join(['%s'] * (len(_SQLITE_TRIGGERS) + 1))})",
            [SQLITE_INDEX, *_SQLITE_TRIGGERS],
        )
        present = {name for (name,) in cursor.fetchall()}
    if SQLITE_INDEX in present and len(present) < len(_SQLITE_TRIGGERS) + 1:
        sqlite_index_create(connection)
