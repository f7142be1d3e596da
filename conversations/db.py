"""Running ORM code from async code."""

from functools import cache

from channels.db import DatabaseSyncToAsync
from django.conf import settings


@cache
def _one_thread() -> bool:
    # SQLite has one writer at a time: threads contending for its lock sleep in its busy
    # handler (1, 2, 5, 10… ms), which costs more than queueing on one thread.
    return settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")


def db_async(function):
    """Wrap a synchronous ORM function for async callers, with stale connections closed around
    it (a long-lived process survives a database restart).

    On PostgreSQL it runs in a pool thread, not asgiref's default thread-sensitive mode where
    every database call of the process queues on one thread: sends, checkpoints and catch-up
    reads of many replies would wait on each other. Each pool thread keeps its own connection
    (DATABASE_CONN_MAX_AGE). On SQLite it queues on the one thread, as its writes do anyway.
    """

    def call(*args, **kwargs):
        return DatabaseSyncToAsync(function, thread_sensitive=_one_thread())(*args, **kwargs)

    return call
