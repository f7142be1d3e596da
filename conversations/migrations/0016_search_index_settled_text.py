"""Search indexes hold the text of messages no longer streaming (conversations/chat_search.py).

A streaming reply's text is saved every few seconds (its checkpoints), and each save had the
index take all of its text again: ~1 ms of the database's time for a 2,500-character reply,
on PostgreSQL's trigram index and SQLite's FTS5 table alike, where the write itself costs
0.02 ms (SQLite) or 0.46 ms (PostgreSQL). A reply is now indexed once, when it ends.

PostgreSQL: migration 0010's index of message text becomes partial (WHERE status <> 'streaming'),
where pg_trgm let it be made, built concurrently (the app may go on running). SQLite: the FTS5
table's triggers are made again (their new definitions) and the table rebuilt without the
streaming replies, where migration 0013 made it. Back: the index of every message again."""

from django.db import migrations, transaction

from conversations import chat_search

INDEX = "conversations_message_content_trgm"


def _postgresql_index(schema_editor, where: str) -> None:
    """The index made again with `where`, built beside the old one (CONCURRENTLY: sends and
    checkpoints go on writing messages meanwhile, where a plain DROP and CREATE would lock
    the table for the whole build), then put in its place."""
    new = f"{INDEX}_new"
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", [INDEX])
        if cursor.fetchone() is None:  # no pg_trgm: search reads every message (0010)
            return
        cursor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{new}"')  # an earlier try's
        cursor.execute(
            f'CREATE INDEX CONCURRENTLY "{new}" ON "conversations_message" '
            f'USING gin (UPPER("content"::text) gin_trgm_ops){where}'
        )
        cursor.execute(f'DROP INDEX CONCURRENTLY "{INDEX}"')
        cursor.execute(f'ALTER INDEX "{new}" RENAME TO "{INDEX}"')


def _sqlite_index_made(connection) -> bool:
    """Whether migration 0013 made the FTS5 table (not without a trigram tokenizer: search
    then reads every message)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s",
            [chat_search.SQLITE_INDEX],
        )
        return cursor.fetchone() is not None


def settled_only(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor == "postgresql":
        _postgresql_index(schema_editor, " WHERE status <> 'streaming'")
    elif connection.vendor == "sqlite" and _sqlite_index_made(connection):
        chat_search.sqlite_index_create(connection)


# Migration 0013's triggers (every message indexed), for going back: an earlier version's code
# runs with them, and they must find the index holding what they would have put in it.
_EVERY_MESSAGE = {
    "insert": "AFTER INSERT ON conversations_message BEGIN "
    "INSERT INTO {index}(rowid, content) VALUES (new.id, new.content); END",
    "delete": "AFTER DELETE ON conversations_message BEGIN "
    "INSERT INTO {index}({index}, rowid, content) VALUES ('delete', old.id, old.content); END",
    "update": "AFTER UPDATE OF content ON conversations_message "
    "WHEN old.content IS NOT new.content BEGIN "
    "INSERT INTO {index}({index}, rowid, content) VALUES ('delete', old.id, old.content); "
    "INSERT INTO {index}(rowid, content) VALUES (new.id, new.content); END",
}


def every_message(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor == "postgresql":
        _postgresql_index(schema_editor, "")
        return
    if connection.vendor != "sqlite" or not _sqlite_index_made(connection):
        return
    index = chat_search.SQLITE_INDEX
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        for name, body in _EVERY_MESSAGE.items():
            cursor.execute(f"DROP TRIGGER IF EXISTS {index}_{name}")
            cursor.execute(f"CREATE TRIGGER {index}_{name} " + body.format(index=index))
        cursor.execute(f"INSERT INTO {index}({index}) VALUES ('rebuild')")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction
    dependencies = [("conversations", "0015_audit_and_invitations")]

    operations = [migrations.RunPython(settled_only, every_message)]
