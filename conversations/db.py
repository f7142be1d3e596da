"""Running ORM code from async code."""

from channels.db import DatabaseSyncToAsync


def db_async(function):
    """Wrap a synchronous ORM function for async callers: it runs in a pool thread, with stale
    connections closed around it (a long-lived process survives a database restart).

    Not asgiref's default thread-sensitive mode, where every database call of the process
    queues on one thread: sends, checkpoints and catch-up reads of many replies would then
    wait on each other. Each pool thread keeps its own connection (DATABASE_CONN_MAX_AGE);
    SQLite serialises writers itself (WAL, IMMEDIATE transactions, busy timeout).
    """
    return DatabaseSyncToAsync(function, thread_sensitive=False)
