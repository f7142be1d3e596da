"""Shared fixtures: the DashScope simulator on a real loopback port, logged-in websockets,
and a real daphne server for browser tests."""

from __future__ import annotations

import importlib
import os

import pytest

from conversations.upstream import reset_clients
from dashscope_simulator import SimulatorServer
from tests.dashscope_fixtures import *  # noqa: F403
from tests.image_server import image_server  # noqa: F401 - a fixture
from tests.live_server import *  # noqa: F403

APP_API_KEY = "sk-app-test-4f2a9c"
IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="session", autouse=True)
def _asgi_application_loaded():
    """Import the ASGI application once, first: its django.setup() applies settings.LOGGING,
    which would otherwise replace pytest's log capture in the middle of whichever test
    opens the first socket."""
    import qwenweb.asgi  # noqa: F401


@pytest.fixture(scope="session")
def app_simulator():
    """The simulator the app talks to in tests: fast, but slow enough to see a reply grow."""
    with SimulatorServer(api_key=APP_API_KEY, first_token_delay=0.05, token_delay=0.004) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _catalog(request):
    """Transactional tests flush the tables the data migration seeded: seed them again."""
    marker = request.node.get_closest_marker("django_db")
    if marker is None:
        return
    request.getfixturevalue("django_db_blocker")
    if marker.kwargs.get("transaction") or (marker.args and marker.args[0]):
        seed = importlib.import_module("conversations.migrations.0002_seed_catalog").seed
        enable_tools = importlib.import_module("conversations.migrations.0005_tools").enable_tools
        capabilities = importlib.import_module(
            "conversations.migrations.0006_capabilities_and_settings"
        ).seed_capabilities
        from django.apps import apps

        with request.getfixturevalue("django_db_blocker").unblock():
            seed(apps, None)
            enable_tools(apps, None)
            capabilities(apps, None)


@pytest.fixture(autouse=True)
def _dashscope_settings(request, settings):
    """Point the app at the test simulator (never the demo one, never the network)."""
    if "app_simulator" not in request.fixturenames and not request.node.get_closest_marker(
        "django_db"
    ):
        yield
        return
    sim = request.getfixturevalue("app_simulator")
    sim.reset()
    settings.DASHSCOPE_API_KEY = APP_API_KEY
    settings.DASHSCOPE_BASE_URL = sim.native_base_url
    settings.DASHSCOPE_COMPATIBLE_BASE_URL = sim.compatible_base_url
    settings.QWENWEB_FRAME_INTERVAL = 0.03
    reset_clients()
    yield
    reset_clients()


@pytest.fixture(autouse=True)
def _no_title_model(settings):
    """Chats keep their first-line titles in tests: the title model's extra request would
    interleave with the ones a test watches. tests/test_titles.py switches it on."""
    settings.QWENWEB_TITLE_MODEL = ""


@pytest.fixture(autouse=True)
def _media_root(settings, tmp_path_factory):
    """Uploaded images go to a temporary directory, never the checkout's var/."""
    settings.MEDIA_ROOT = tmp_path_factory.mktemp("media")


@pytest.fixture
def alice(db):
    """A user of the app (a module that needs another password defines its own)."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("alice", password="pw")


@pytest.fixture
def alice_client(client, alice):
    """Django's test client, signed in as alice."""
    client.force_login(alice)
    return client
