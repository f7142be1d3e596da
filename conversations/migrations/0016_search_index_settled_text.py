"""Search indexes hold the text of messages no longer streaming (conversations/chat_search.py).

A streaming reply's text is saved every few seconds (its checkpoints), and each save had the
index take all of its text again: ~1 ms of the database's time for a 2,500-character reply,
on PostgreSQL's trigram index and SQLite's FTS5 table alike, where the write itself costs
0.02 ms (SQLite) or 0.46 ms (PostgreSQL). A reply is now indexed once, when it ends.

PostgreSQL: migration 0010's index of message text becomes partial (WHERE status <> 'streaming'),
where pg_trgm let it be made. SQLite: the FTS5 table's triggers are made again (their new
definitions) and the table rebuilt without the streaming replies, where migration 0013 made it."""

from django.db import migrations

from conversations import chat_search

INDEX = "conversations_message_content_trgm"


def _postgresql_index(schema_editor, where: str) -> None:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", [INDEX])
        if cursor.fetchone() is None:  # no pg_trgm: search reads every message (0010)
            return
        cursor.execute(f'DROP INDEX "{INDEX}"')
        cursor.execute(
            f'CREATE INDEX "{INDEX}" ON "conversations_message" '
            f'USING gin (UPPER("content"::text) gin_trgm_ops){where}'
        )


def _sqlite_index(schema_editor) -> None:
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s",
            [chat_search.SQLITE_INDEX],
        )
        if cursor.fetchone() is None:  # no trigram tokenizer: search reads every message (0013)
            return
    chat_search.sqlite_index_create(connection)


def settled_only(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        _postgresql_index(schema_editor, " WHERE status <> 'streaming'")
    elif vendor == "sqlite":
        _sqlite_index(schema_editor)


def every_message(apps, schema_editor):
    # SQLite: the triggers of this version stay (an index holding more text is no better).
    if schema_editor.connection.vendor == "postgresql":
        _postgresql_index(schema_editor, "")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0015_audit_and_invitations")]

    operations = [migrations.RunPython(settled_only, every_message)]
