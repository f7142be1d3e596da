"""qwenweb settings: one file, configured by environment variables.

Every variable is documented in README.md ("Configuration"). Without any of them the app runs
on one machine with SQLite, the in-memory channel layer and the offline DashScope simulator.
"""

import os
import secrets
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import dj_database_url
from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("QWENWEB_DATA_DIR", BASE_DIR / "var"))


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_flag("DJANGO_DEBUG")


def _secret_key() -> str:
    """The key from the environment, or one generated once and kept in the data directory.

    A generated key keeps `make run` a one-command start without ever shipping a fixed key.
    """
    key = os.environ.get("DJANGO_SECRET_KEY", "")
    if key:
        return key
    key_file = DATA_DIR / "secret_key"
    try:
        return key_file.read_text().strip()
    except FileNotFoundError:
        pass
    try:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        key_file.write_text(key)
        key_file.chmod(0o600)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"DJANGO_SECRET_KEY is not set and {key_file} cannot be written ({exc}). "
            "Set DJANGO_SECRET_KEY to a long random string."
        ) from exc
    return key


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "csp",
    "axes",
    "conversations",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # After WhiteNoise, so static files keep their long caching; see the module.
    "qwenweb.cache_control.no_store_for_signed_in_users",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a lockout into the 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "qwenweb.urls"
ASGI_APPLICATION = "qwenweb.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "conversations.context_processors.qwenweb",
                "csp.context_processors.nonce",
            ],
        },
    },
]

# Database: a SQLite file by default, anything dj-database-url understands otherwise.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        # 0: under ASGI every synchronous view runs in a thread of its own, and a connection
        # kept by such a thread is never reused nor closed (PostgreSQL runs out of them).
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "0")),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    # WAL lets readers run beside the writer; IMMEDIATE transactions and a busy timeout make
    # concurrent checkpoints and intake wait their turn instead of failing with "locked".
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Channel layer: in-memory for one process, Redis when several processes share the work.
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    # Redis pub/sub rather than channels-redis's queue layer: every streamed frame is a
    # message, and the queue layer pops them one round trip at a time from one sorted set per
    # process, whose capacity then drops frames under load (measured in bench/load.py: 23 of
    # 50 concurrent replies lost frames; none with pub/sub, at half the CPU). Pub/sub delivers
    # at most once to whoever listens; the database is the source of truth, and a socket that
    # misses a frame sees the gap in the offsets and catches up.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "qwenweb.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = os.environ.get("TZ", "UTC") or "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Hashed, compressed, long-cached files once collectstatic has run (`make run` does); straight
# from static/ before that (tests, a quick `manage.py runserver`).
_collected = (STATIC_ROOT / "staticfiles.json").exists()
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if _collected or os.environ.get("QWENWEB_COLLECTSTATIC")
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not _collected

# --- Security -------------------------------------------------------------------------------
# Plain http on a private network works as it is. DJANGO_HTTPS=1 says the site is served over
# https (by daphne itself or behind a TLS proxy that sets X-Forwarded-Proto): http is redirected
# to https, browsers are told to stay on https (HSTS), and cookies go over https only.
HTTPS = env_flag("DJANGO_HTTPS")
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# No script reads the CSRF cookie: pages send the token from the page itself (the body's
# hx-headers and {% csrf_token %} fields), so the cookie can be HttpOnly.
CSRF_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
LANGUAGE_COOKIE_HTTPONLY = True
LANGUAGE_COOKIE_SAMESITE = "Lax"
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # A load balancer's health check may stay on plain http.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SECURE_HSTS_SECONDS = 365 * 24 * 60 * 60
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    LANGUAGE_COOKIE_SECURE = True

# Content-Security-Policy on every response (django-csp). Scripts run only from this origin
# and only with the page's nonce when inline (there are none); no eval, no inline styles or
# event handlers, images only from this origin or data: URLs (so an image in model output can
# never load, even if it slipped past the sanitizer), websockets to this host ('self' covers
# ws:/wss: of the same host), and no framing, plugins, foreign form targets or <base>.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
        "base-uri": [SELF],
        "object-src": [NONE],
    }
}

# Sign-in throttling (django-axes, counted in the database, so across every server process):
# after QWENWEB_LOGIN_FAILURE_LIMIT failed sign-ins for one account, or from one address, that
# account or address gets HTTP 429 for QWENWEB_LOGIN_LOCKOUT_MINUTES (counted from the last
# attempt). A successful sign-in clears the count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = int(os.environ.get("QWENWEB_LOGIN_FAILURE_LIMIT", "5"))
_lockout_minutes = float(os.environ.get("QWENWEB_LOGIN_LOCKOUT_MINUTES", "15"))
AXES_COOLOFF_TIME = timedelta(minutes=_lockout_minutes)
if AXES_FAILURE_LIMIT < 1 or _lockout_minutes <= 0:
    # django-axes reads a zero lockout time as "locked until an admin unlocks".
    raise ImproperlyConfigured(
        "QWENWEB_LOGIN_FAILURE_LIMIT must be at least 1 and QWENWEB_LOGIN_LOCKOUT_MINUTES "
        "more than 0."
    )
# Separate parameters: each account and each address has a count of its own.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_HTTP_RESPONSE_CODE = 429
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False  # no banner on every start; failures and lockouts are still logged
# How many proxies in front of the servers append to X-Forwarded-For; 0 means clients connect
# directly and REMOTE_ADDR is their address.
QWENWEB_TRUSTED_PROXY_COUNT = int(os.environ.get("QWENWEB_TRUSTED_PROXY_COUNT", "0"))


AXES_CLIENT_IP_CALLABLE = "qwenweb.client_address.client_ip_address"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("QWENWEB_LOG_LEVEL", "INFO")},
    "loggers": {
        "httpx": {"level": "WARNING"},
        # httpcore's debug lines quote response headers as received (an upstream that echoes
        # the Authorization header puts the key there); keep them out of the logs.
        "httpcore": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}

# DashScope. No API key means the offline demo: the project's simulator on a loopback port,
# reached through the very same client code.
DASHSCOPE_API_KEY = os.environ.get("DASHSCOPE_API_KEY", "").strip()
DASHSCOPE_REGION = os.environ.get("DASHSCOPE_REGION", "intl") or "intl"
DASHSCOPE_BASE_URL = os.environ.get("DASHSCOPE_BASE_URL", "")
DASHSCOPE_COMPATIBLE_BASE_URL = os.environ.get("DASHSCOPE_COMPATIBLE_BASE_URL", "")
if DASHSCOPE_REGION not in {"intl", "cn"}:
    raise ImproperlyConfigured(
        f"DASHSCOPE_REGION must be 'intl' (Singapore) or 'cn' (Beijing), not {DASHSCOPE_REGION!r}."
    )
# Seconds without a byte from DashScope mid-reply before the reply is given up as stalled.
DASHSCOPE_STALL_TIMEOUT = float(os.environ.get("DASHSCOPE_STALL_TIMEOUT", "60"))
# What moves the bytes under the DashScope client: aiohttp (less CPU per streamed token,
# bench/README.md) or httpx's own transport. Both give the same replies and the same errors.
DASHSCOPE_HTTP_ENGINE = os.environ.get("DASHSCOPE_HTTP_ENGINE", "aiohttp") or "aiohttp"
if DASHSCOPE_HTTP_ENGINE not in {"aiohttp", "httpx"}:
    raise ImproperlyConfigured(
        f"DASHSCOPE_HTTP_ENGINE must be 'aiohttp' or 'httpx', not {DASHSCOPE_HTTP_ENGINE!r}."
    )
QWENWEB_DEFAULT_MODEL = os.environ.get("QWENWEB_DEFAULT_MODEL", "qwen-plus") or "qwen-plus"

# Streaming: one frame per this many seconds after the first delta, and a database checkpoint
# of the partial reply at most this often.
QWENWEB_FRAME_INTERVAL = float(os.environ.get("QWENWEB_FRAME_INTERVAL", "0.04"))
QWENWEB_CHECKPOINT_INTERVAL = float(os.environ.get("QWENWEB_CHECKPOINT_INTERVAL", "2.0"))
# A streaming reply not saved for this many seconds lost its process (killed, crashed, its host
# gone): every process sweeps such replies to `interrupted` (conversations/replies/liveness.py),
# keeping the text of their last checkpoint, and the user can Continue them.
QWENWEB_REPLY_STALE_AFTER = float(os.environ.get("QWENWEB_REPLY_STALE_AFTER", "30"))

# Function calling (conversations/replies/tools.py). The weather tool calls the function this
# dotted path names (given the location, it returns text); unset, it answers with the docs'
# stand-in, labelled as example data. A tool still running after QWENWEB_TOOL_TIMEOUT seconds
# is abandoned and the model told so.
QWENWEB_WEATHER_PROVIDER = os.environ.get("QWENWEB_WEATHER_PROVIDER", "").strip()
QWENWEB_TOOL_TIMEOUT = float(os.environ.get("QWENWEB_TOOL_TIMEOUT", "10"))

# The image proxy (conversations/images.py): thumbnails of URL images come through this
# server, which fetches only public addresses, except on the hosts listed here (`host` or
# `host:port`: an intranet image server a private deployment trusts). What it fetched is kept
# in MEDIA_ROOT/image-proxy/, at most QWENWEB_IMAGE_CACHE_BYTES in all (least recently used
# first out), and reaches a browser only through the view that checks who asks.
QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS = env_list("QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS")
QWENWEB_IMAGE_CACHE_BYTES = int(os.environ.get("QWENWEB_IMAGE_CACHE_BYTES", str(256 << 20)))

# --- Limits ---------------------------------------------------------------------------------
# Checked before anything is saved or sent to DashScope (conversations/replies/rules.py). The
# per-user ones are counted in the database, so they hold across every server process; 0 turns
# them off.
QWENWEB_MAX_MESSAGE_CHARS = int(os.environ.get("QWENWEB_MAX_MESSAGE_CHARS", "32000"))
QWENWEB_MAX_IMAGES = int(os.environ.get("QWENWEB_MAX_IMAGES", "4"))
# Images users upload into their chats (PNG, JPEG, WebP, GIF, checked by their content), kept
# here and served only by the app, to their owner and to reviewers. Several server processes
# (or hosts) must share this directory.
MEDIA_ROOT = Path(os.environ.get("QWENWEB_MEDIA_DIR", DATA_DIR / "media"))
MEDIA_URL = "/media/"  # never served as files: conversations/uploads.py checks who asks
QWENWEB_MAX_UPLOAD_BYTES = 7 * 1024 * 1024  # DashScope's limit for an image sent inline
# Replies one user may have being written at once, across all their chats.
QWENWEB_MAX_CONCURRENT_REPLIES = int(os.environ.get("QWENWEB_MAX_CONCURRENT_REPLIES", "2"))
# Messages one user may send in any 60 seconds.
QWENWEB_MESSAGES_PER_MINUTE = int(os.environ.get("QWENWEB_MESSAGES_PER_MINUTE", "20"))
# The model that writes a chat's title after its first reply (conversations/replies/titles.py);
# empty: chats keep the first line of their first message as their title.
QWENWEB_TITLE_MODEL = os.environ.get("QWENWEB_TITLE_MODEL", "qwen-flash").strip()
# New chats one user may create in any 60 seconds (an empty chat costs no tokens, but made by
# the hundred they fill the database and bury the sidebar).
QWENWEB_CHATS_PER_MINUTE = int(os.environ.get("QWENWEB_CHATS_PER_MINUTE", "30"))
# Quotas (conversations/replies/quotas.py): tokens (input and output, thinking included) of the
# replies one user started since 00:00 today and since the 1st of the month, in TIME_ZONE (the
# TZ variable), and the cost of this month's replies, in QWENWEB_CURRENCY (replies of models
# priced in another currency are not counted against it: there is no exchange rate). 0 or
# unset: no limit. Users and groups override these in the admin.
QWENWEB_TOKENS_PER_DAY = int(os.environ.get("QWENWEB_TOKENS_PER_DAY", "0") or "0")
QWENWEB_TOKENS_PER_MONTH = int(os.environ.get("QWENWEB_TOKENS_PER_MONTH", "0") or "0")
try:
    QWENWEB_COST_PER_MONTH = Decimal(os.environ.get("QWENWEB_COST_PER_MONTH", "0") or "0")
except ArithmeticError:
    raise ImproperlyConfigured(
        "QWENWEB_COST_PER_MONTH must be a decimal number, e.g. 50 or 12.5 (0: no limit)."
    ) from None
QWENWEB_CURRENCY = (os.environ.get("QWENWEB_CURRENCY", "CNY") or "CNY").strip().upper()
if min(QWENWEB_TOKENS_PER_DAY, QWENWEB_TOKENS_PER_MONTH, QWENWEB_COST_PER_MONTH) < 0:
    raise ImproperlyConfigured(
        "QWENWEB_TOKENS_PER_DAY, QWENWEB_TOKENS_PER_MONTH and QWENWEB_COST_PER_MONTH must be 0 "
        "(no limit) or more."
    )
# Told to users on the sign-in page and under the chat: their conversations may be reviewed
# (the admin's review permission). Unset: this sentence, in the page's language; set: the
# text as written; empty: no notice.
_review_notice = os.environ.get("QWENWEB_REVIEW_NOTICE")
QWENWEB_REVIEW_NOTICE = (
    _(
        "Conversations on this site may be read by its administrators for review; each such "
        "read is recorded."
    )
    if _review_notice is None
    else _review_notice.strip()
)
# How long an invitation link (made in the admin's Users page) lets its person set a password.
QWENWEB_INVITE_DAYS = float(os.environ.get("QWENWEB_INVITE_DAYS", "3"))
# What one websocket may have waiting to be sent to a client that does not read (a stalled
# or hostile client) before the server drops it (qwenweb/daphne_guard.py). Well above the
# largest catch-up a page asks for on reconnect, so a slow phone is never cut off.
QWENWEB_SOCKET_BACKLOG_BYTES = int(os.environ.get("QWENWEB_SOCKET_BACKLOG_BYTES", str(8 << 20)))
