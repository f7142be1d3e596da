"""ASGI entry point: HTTP to Django, websockets to the conversation consumer (login and an
allowed Origin required)."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenweb.settings")
# Django must be set up before the consumers (and the models they import) are loaded.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.template.loader import get_template  # noqa: E402

from conversations.rendering import ready_highlighters  # noqa: E402
from conversations.replies.liveness import StartSweeper  # noqa: E402
from conversations.routing import websocket_urlpatterns  # noqa: E402
from qwenweb import daphne_guard  # noqa: E402

daphne_guard.install(backlog_limit=settings.QWENWEB_SOCKET_BACKLOG_BYTES)

application = StartSweeper(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": AllowedHostsOriginValidator(
                AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
            ),
        }
    )
)

# What exists now lives as long as the process: modules, settings, URL patterns, the templates
# every socket renders and the highlighters of the common languages (loaded here: see
# rendering.COMMON_LANGUAGES). Frozen, it is left out of the garbage collector's full
# collections, which otherwise walk all of it while every stream waits (a 100-stream bench
# saw full collections of 53 and 47 ms; frozen, 20 and 10 ms).
get_template("conversations/partials/stream.html")
ready_highlighters()
gc.collect()
gc.freeze()
