"""Search (/search/?q=) on PostgreSQL: trigram indexes, so that a substring search of message
text and titles (`icontains`, which Django writes as UPPER(column) LIKE UPPER(pattern)) reads
the index rather than every message. pg_trgm is a trusted extension (PostgreSQL 13+): the
database's owner may create it. Where it cannot be created, search still works, reading every
message, and the migration says so. SQLite has no such index; nothing is done there."""

import logging

from django.db import migrations, transaction

logger = logging.getLogger(__name__)

INDEXES = [
    ("conversations_message_content_trgm", "conversations_message", "content"),
    ("conversations_conversation_title_trgm", "conversations_conversation", "title"),
]


def create(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    try:
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except Exception as exc:
        logger.warning("pg_trgm is not available (%s): search reads every message", exc)
        print(f"\n  pg_trgm is not available ({exc}): search will read every message.")
        return
    with connection.cursor() as cursor:
        for name, table, column in INDEXES:
            cursor.execute(
                f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" '
                f'USING gin (UPPER("{column}"::text) gin_trgm_ops)'
            )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        for name, _table, _column in INDEXES:
            cursor.execute(f'DROP INDEX IF EXISTS "{name}"')


class Migration(migrations.Migration):
    dependencies = [("conversations", "0009_shares")]

    operations = [migrations.RunPython(create, drop)]
