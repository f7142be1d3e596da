from django.apps import AppConfig
from django.db.models.signals import post_migrate
from django.utils.translation import gettext_lazy as _


class ConversationsConfig(AppConfig):
    name = "conversations"
    verbose_name = _("Conversations")

    def ready(self) -> None:
        # A logout (and a password change, an account disabled or deleted) closes the sockets;
        # an upload deleted takes its file with it.
        from conversations import signals, uploads  # noqa: F401

        # A migration that alters the messages table on SQLite drops the search index's
        # triggers with the old table (conversations/chat_search.py).
        post_migrate.connect(_search_index_repair, sender=self)


def _search_index_repair(using, **kwargs) -> None:
    from django.db import connections

    from conversations.chat_search import sqlite_index_repair

    sqlite_index_repair(connections[using])
