from django.conf import settings

from conversations.upstream import demo_mode


def qwenweb(request) -> dict:
    return {
        "demo_mode": demo_mode(),
        "max_message_chars": settings.QWENWEB_MAX_MESSAGE_CHARS,
    }
