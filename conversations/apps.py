from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ConversationsConfig(AppConfig):
    name = "conversations"
    verbose_name = _("Conversations")

    def ready(self) -> None:
        # A logout (and a password change, an account disabled or deleted) closes the sockets;
        # an upload deleted takes its file with it.
        from conversations import signals, uploads  # noqa: F401
