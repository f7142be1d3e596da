from django.conf import settings

from conversations.upstream import demo_mode

# The theme switch's choice, kept in a cookie so the page is rendered in it (no flash of the
# other theme); "system" follows the browser's setting (templates/base.html).
THEME_COOKIE = "qwenweb_theme"
THEMES = ("system", "light", "dark")


def qwenweb(request) -> dict:
    theme = request.COOKIES.get(THEME_COOKIE, "system")
    return {
        "demo_mode": demo_mode(),
        "max_message_chars": settings.QWENWEB_MAX_MESSAGE_CHARS,
        "review_notice": settings.QWENWEB_REVIEW_NOTICE,
        "theme": theme if theme in THEMES else "system",
    }
