"""Running ORM code from async code."""

from functools import cache

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import connections


@cache
def _one_thread() -> bool:
    # SQLite has one writer at a time: threads contending for its lock sleep in its busy
    # handler (1, 2, 5, 10… ms), which costs more than queueing on one thread.
    return settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")


def _with_kept_connection(function, *args, **kwargs):
    """Call `function`, reusing this thread's connection unless an error left it broken.

    These threads are few and long-lived (one on SQLite, the default executor's on
    PostgreSQL), so their connections are kept whatever DATABASE_CONN_MAX_AGE says: opening
    one per call (a PostgreSQL backend; an SQLite handle and its WAL pragmas) cost more than
    the queries (bench/README.md). A connection that failed is checked, and replaced if the
    database went away and came back.
    """
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            if connection.is_usable():
                connection.errors_occurred = False
            else:
                connection.close()
    return function(*args, **kwargs)


def db_async(function):
    """Wrap a synchronous ORM function for async callers.

    On PostgreSQL it runs in a pool thread, not asgiref's default thread-sensitive mode where
    every database call of the process queues on one thread: sends, checkpoints and catch-up
    reads of many replies would wait on each other. On SQLite it queues on one thread, as its
    writes do anyway.
    """

    def call(*args, **kwargs):
        run = SyncToAsync(_with_kept_connection, thread_sensitive=_one_thread())
        return run(function, *args, **kwargs)

    return call
