"""Search (/search/?q=) on SQLite: an FTS5 table of message text with the trigram tokenizer,
kept in step by triggers (conversations/chat_search.py), so that a substring search (any case,
Chinese too) reads the messages holding the text's trigrams rather than every message.

The trigram tokenizer came with SQLite 3.34 (2020); where it is missing, or FTS5 is, the
migration says so and search still works, reading every message. PostgreSQL has migration
0010's trigram indexes instead; nothing is done there."""

import logging

from django.db import migrations

from conversations import chat_search

logger = logging.getLogger(__name__)


def create(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "sqlite":
        return
    if not chat_search.sqlite_index_create(connection):
        logger.warning("SQLite has no FTS5 trigram tokenizer: search reads every message")
        print("\n  SQLite has no FTS5 trigram tokenizer: search will read every message.")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        chat_search.sqlite_index_drop(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0012_quotas_and_policies")]

    operations = [migrations.RunPython(create, drop)]
