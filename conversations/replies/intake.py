"""The statements every new reply runs before its request goes out, as SQL.

A send waits for these (P1 in bench/README.md): the conversation read under its lock, the
replies in the way, the conversation moved to its new last message, and the tree and history
the request is built from. Built from querysets, each cost 0.1–0.4 ms of Python on every send
to compile and convert, several times its round trip to the database; on SQLite, where every
send queues for the one database thread, that is what ten or fifty people sending at once wait
for. So they are written out here, with table and column names from the models and every value
a parameter, and what they return converted as the ORM would.

On PostgreSQL each statement is a round trip to another process (0.2–0.5 ms on this 2-CPU
machine, more than its work), so a send makes as few as the checks allow: BEGIN; one statement
reading the conversation under its lock with its model and prompt, the replies in the way and
the owner's limits and load (`read_under_lock`, prepared); one statement writing the message,
its reply and the conversation's move and reading the tree back (`insert_turn`); COMMIT.
SQLite runs in this process: there the same statements go one after the other.
"""

from __future__ import annotations

import sqlite3
import uuid
import weakref
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache, lru_cache

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.sqlite3.base import FORMAT_QMARK_REGEX
from django.utils import timezone

from conversations.models import Conversation, Message, ModelProfile, SystemPrompt

_conversations = Conversation._meta.db_table
_messages = Message._meta.db_table
_profiles = ModelProfile._meta.db_table
_prompts = SystemPrompt._meta.db_table


def this_thread() -> object:
    """This thread's database connection itself. Each attribute read through
    django.db.connection finds it again (a context-local lookup): a send reads some seventy."""
    return connections[DEFAULT_DB_ALIAS]


class _SQLiteStatements:
    """Django's SQLite cursor without its work on every statement: it turns the text's `%s`
    into sqlite3's `?` each time (a regex over the text: 0.05 ms for the load statement's
    3.9 KB, as long as the statement's own run) and goes through four layers of calls; here
    the text is turned once a process and the statement goes to the sqlite3 cursor itself,
    with Django's checks and error translation kept (a send's save: 0.1 ms less)."""

    __slots__ = ("db", "cursor")

    def __init__(self, db, cursor) -> None:
        self.db, self.cursor = db, cursor

    def execute(self, sql: str, params) -> None:
        self.db.validate_no_broken_transaction()
        with self.db.wrap_database_errors:
            sqlite3.Cursor.execute(self.cursor, _qmark(sql), params)

    def fetchall(self) -> list:
        with self.db.wrap_database_errors:
            return self.cursor.fetchall()

    def fetchone(self):
        with self.db.wrap_database_errors:
            return self.cursor.fetchone()

    @property
    def lastrowid(self) -> int:
        return self.cursor.lastrowid

    @property
    def rowcount(self) -> int:
        return self.cursor.rowcount


@lru_cache(maxsize=512)  # the texts are few: one per statement and set of NULL columns
def _qmark(sql: str) -> str:
    return FORMAT_QMARK_REGEX.sub("?", sql).replace("%%", "%")


@contextmanager
def _cursor(db):
    """A cursor on `db` (this thread's connection) for this module's statements: on SQLite
    the lean one above, unless something watches the queries (a debug log, an execute
    wrapper: the tests' query counts), which then see them as usual. The event loop's own
    reader (db.loop_reader) has only the lean one: Django's cursors refuse to run on a loop."""
    if getattr(db, "on_loop", False):
        cursor = db.connection.cursor()
        try:
            yield _SQLiteStatements(db, cursor)
        finally:
            cursor.close()
        return
    with db.cursor() as cursor:
        if db.vendor == "sqlite" and not db.queries_logged and not db.execute_wrappers:
            yield _SQLiteStatements(db, cursor.cursor)
        else:
            yield cursor


def _column(model, name: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(name).column)


def _param(model, name: str, value, db=connection):
    """`value` as the database takes it for the field (a UUID as hex text on SQLite, …)."""
    return model._meta.get_field(name).get_db_prep_save(value, db)


def read_moment(value) -> datetime:
    """A datetime column as read: text in UTC on SQLite, a datetime elsewhere."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return value


def read_uuid(value) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    return uuid.UUID(value)


_conversation_fields = list(Conversation._meta.concrete_fields)
_profile_fields = list(ModelProfile._meta.concrete_fields)
_prompt_fields = list(SystemPrompt._meta.concrete_fields)


@cache
def _lock_statement(vendor: str, lock: bool = True) -> tuple[str, dict]:
    """The lock's SQL and the converters of its columns, made once per database kind: built
    per send, they cost more than the statement's round trip. Without `lock`, a plain read of
    the same row (service.reply_plan)."""
    ops = connection.ops
    columns = ", ".join(
        [f"c.{ops.quote_name(f.column)}" for f in _conversation_fields]
        + [f"m.{ops.quote_name(f.column)}" for f in _profile_fields]
        + [f"sp.{ops.quote_name(f.column)}" for f in _prompt_fields]
    )
    sql = f"SELECT {columns} FROM {_conversations} c JOIN {_profiles} m ON m.id = c.model_id"
    locking = lock and connection.features.has_select_for_update_of
    if locking:
        user_table = Conversation._meta.get_field("owner").related_model._meta.db_table
        sql += f" JOIN {user_table} u ON u.id = c.owner_id"
    sql += f" LEFT JOIN {_prompts} sp ON sp.id = c.system_prompt_id WHERE c.id = %s"
    if locking:
        sql += " FOR NO KEY UPDATE OF c, u"
    compiler = ops.compiler("SQLCompiler")(Conversation.objects.none().query, connection, None)
    fields = _conversation_fields + _profile_fields + _prompt_fields
    converters = compiler.get_converters([f.get_col(f.model._meta.db_table) for f in fields])
    return sql, converters


def _locked(conversation_id, rows: list, lock: bool = True, db=None) -> Conversation:
    """The lock statement's row as a Conversation with its model and prompt, converted as a
    queryset would (SQLite's text datetimes and UUIDs, JSON, booleans…)."""
    if not rows:
        raise Conversation.DoesNotExist(f"conversation {conversation_id}")
    db = db or this_thread()
    _sql, converters = _lock_statement(db.vendor, lock)
    row = list(rows[0])
    for at, (converter_list, expression) in converters.items():
        for converter in converter_list:
            row[at] = converter(row[at], expression, db)
    split, prompt_at = len(_conversation_fields), len(_conversation_fields) + len(_profile_fields)
    conversation = Conversation.from_db(
        db.alias, [f.attname for f in _conversation_fields], row[:split]
    )
    conversation.model = ModelProfile.from_db(
        db.alias, [f.attname for f in _profile_fields], row[split:prompt_at]
    )
    conversation.system_prompt = (
        SystemPrompt.from_db(db.alias, [f.attname for f in _prompt_fields], row[prompt_at:])
        if conversation.system_prompt_id is not None
        else None
    )
    return conversation


def lock_conversation(conversation_id) -> Conversation:
    """The conversation read afresh, locked until the transaction ends, with its owner's row
    (PostgreSQL; SQLite's transactions are serialised whole), its model and its system
    prompt, in one statement. Raises Conversation.DoesNotExist if it is gone."""
    db = this_thread()
    sql, _converters = _lock_statement(db.vendor)
    with _cursor(db) as cursor:
        cursor.execute(sql, [_param(Conversation, "id", conversation_id)])
        return _locked(conversation_id, cursor.fetchall())


@cache
def _way_statement(load_sql: str) -> str:
    """The replies in the way (being written, or made by this client_message_id: a resent
    frame; NULL matches nothing), none usually, joined to the one row of the owner's load
    (rules._load_sql: two texts)."""
    sent = _column(Message, "client_message_id")
    way = (
        f"SELECT {sent} AS way_sent, status AS way_status, updated_at AS way_at, id AS way_id "
        f"FROM {_messages} WHERE conversation_id = %s AND (status = %s OR {sent} = %s)"
    )
    return f"SELECT w.*, l.* FROM ({load_sql}) l LEFT JOIN ({way}) w ON 1 = 1"


def read_under_lock(
    conversation_id,
    client_message_id: uuid.UUID | None,
    load: tuple[str, list],
    *,
    lock: bool = True,
    with_tree: bool = False,
) -> tuple[Conversation, list[tuple], tuple] | tuple[Conversation, list[tuple], tuple, dict]:
    """What a new reply is checked against: the conversation read afresh and locked until the
    transaction ends, with its owner's row (PostgreSQL; SQLite's transactions are serialised
    whole), its model and its system prompt; the replies in the way ((client_message_id,
    status, updated_at, pk) of those being written, and of the message this client_message_id
    made, if any); and the row of `load` (rules.LoadQuery: the owner's limits and load).
    Raises Conversation.DoesNotExist if the chat is gone.

    Two statements, the second read after the lock is held (on PostgreSQL a statement sees
    what was committed when it began: one statement waiting for the lock would count the
    owner's replies as they were before the send it waited for). On PostgreSQL they go out
    together with the transaction's BEGIN, in one round trip (psycopg's pipeline mode), the
    second prepared.

    Without `lock`, the same reads with no lock taken, and `with_tree` adds the chat's tree
    (as message_tree reads it) as a fourth value, in the same round trip on PostgreSQL: what
    a send's request is built from before its messages are written (service.reply_plan)."""
    db = this_thread()
    statements = read_statements(db, conversation_id, client_message_id, load, lock, with_tree)
    return read_results(conversation_id, run_reads(db, statements), lock, with_tree)


def read_statements(db, conversation_id, client_message_id, load, lock: bool, with_tree: bool):
    """read_under_lock's statements, as (sql, params, prepare), for run_reads."""
    lock_sql, _converters = _lock_statement(db.vendor, lock)
    lock_params = [_param(Conversation, "id", conversation_id, db)]
    load_sql, load_params = load
    way_sql = _way_statement(load_sql)
    way_params = [
        *load_params,
        _param(Message, "conversation", conversation_id, db),
        Message.Status.STREAMING.value,
        _param(Message, "client_message_id", client_message_id, db),
    ]
    statements = [(lock_sql, lock_params, True), (way_sql, way_params, True)]
    if with_tree:
        statements.append((_tree_statement, [lock_params[0]], True))
    return statements


def run_reads(db, statements: list[tuple[str, list, bool]]) -> list[list]:
    """The rows of each (sql, params, prepare) statement: on PostgreSQL in one round trip
    (_pipelined), on SQLite one after the other (on the event loop's reader, in a read
    transaction of their own: the database thread may commit between them)."""
    if db.vendor == "postgresql":
        return _pipelined(*statements)
    results = []
    on_loop = getattr(db, "on_loop", False)
    with _cursor(db) as cursor:
        if on_loop:
            cursor.execute("BEGIN", ())
        try:
            for sql, params, _prepare in statements:
                cursor.execute(sql, params)
                results.append(cursor.fetchall())
        finally:
            if on_loop:
                db.connection.rollback()  # a read transaction: nothing to keep
    return results


def read_results(conversation_id, results: list[list], lock: bool, with_tree: bool, db=None):
    """read_under_lock's values from the rows of read_statements' statements."""
    locked_rows, rows = results[0], results[1]
    conversation = _locked(conversation_id, locked_rows, lock, db)
    found = [
        (read_uuid(sent), status, read_moment(at), pk)
        for sent, status, at, pk, *_load in rows
        if pk is not None
    ]
    if with_tree:
        tree = {pk: row for pk, *row in results[2]}
        return conversation, found, tuple(rows[0][4:]), tree
    return conversation, found, tuple(rows[0][4:])


def _raw_postgresql():
    """The psycopg connection under Django's, with statement preparation on for those that
    ask: Django sets psycopg's threshold to None (never prepare), and psycopg then ignores
    prepare=True as well. A threshold no statement reaches prepares only those that ask
    (Django's own cursors bind on the client and cannot prepare).

    And each statement prepared is planned once for the connection (its generic plan), not
    at every send: PostgreSQL's own choice kept planning the owner's limits and load afresh
    at each send (its plan for the parameters at hand looks cheaper than the generic one),
    1.5-2 ms of the server's time a send, four times their run (bench/README.md, fifteenth
    pass). This setting concerns prepared statements only, which on this connection are
    this module's and socket_auth's. It is set outside any transaction (a rollback would undo
    it), the first time the connection is used outside one."""
    from psycopg import pq

    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None:
        raw.prepare_threshold = 2**31 - 1
    if (
        raw not in _planned_once
        and raw.autocommit
        and raw.info.transaction_status == pq.TransactionStatus.IDLE
    ):
        raw.execute("SET plan_cache_mode = force_generic_plan")
        _planned_once.add(raw)
    return raw


_planned_once: weakref.WeakSet = weakref.WeakSet()


def _pipelined(*statements: tuple[str, list, bool]) -> list[list]:
    """The rows of each (sql, params, prepare) statement, sent together in one round trip
    (psycopg's pipeline mode; with the transaction's BEGIN when one is pending), run one after
    the other by the server. Server-binding cursors on Django's connection, inside its
    transaction; they do not show in Django's query log. Their errors are Django's, as a
    Django cursor's are (a lost connection marked so: db._with_kept_connection replaces it)."""
    import psycopg

    with connection.wrap_database_errors:
        raw = _raw_postgresql()
        cursors = [psycopg.Cursor(raw) for _ in statements]
        try:
            with raw.pipeline():
                for cursor, (sql, params, prepare) in zip(cursors, statements, strict=True):
                    cursor.execute(sql, params, prepare=prepare)
            return [cursor.fetchall() for cursor in cursors]
        finally:
            for cursor in cursors:
                cursor.close()


def move_conversation(conversation_id, **fields) -> None:
    """Update these fields of the conversation (an UPDATE of one row, no model instance)."""
    assignments = ", ".join(f"{_column(Conversation, name)} = %s" for name in fields)
    db = this_thread()
    params = [_param(Conversation, name, value, db) for name, value in fields.items()]
    with _cursor(db) as cursor:
        cursor.execute(
            f"UPDATE {_conversations} SET {assignments} WHERE id = %s",
            [*params, _param(Conversation, "id", conversation_id)],
        )


@cache
def _reply_update(vendor: str, names: tuple[str, ...], writer: bool, status: bool) -> str:
    """update_reply's statement, made once per database kind and set of fields."""
    columns = ", ".join(f"{_column(Message, name)} = %s" for name in names)
    sql = f"UPDATE {_messages} SET {columns} WHERE id = %s"
    if writer:
        sql += f" AND {_column(Message, 'writer')} = %s"
    if status:
        sql += " AND status = %s"
    return sql


def update_reply(message_id, writer: uuid.UUID | None, fields: dict, status: str | None = None):
    """Write these fields of a reply, with the values the ORM's update would write, if it is
    still `writer`'s (None: whoever's) and, with `status`, still in it; returns the rows
    written (1, or 0: the reply is another generation's now, or gone). A streaming reply's
    checkpoint and its end, every two seconds of every reply on the database thread: the
    ORM's update took 0.3-0.4 ms a checkpoint there, this 0.05 (bench/README.md)."""
    db = this_thread()
    sql = _reply_update(db.vendor, tuple(fields), writer is not None, status is not None)
    params = [_param(Message, name, value, db) for name, value in fields.items()]
    params.append(message_id)
    if writer is not None:
        params.append(_param(Message, "writer", writer, db))
    if status is not None:
        params.append(status)
    with _cursor(db) as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


_insert_fields = [f for f in Message._meta.local_concrete_fields if f is not Message._meta.pk]


@cache
def _insert_columns(vendor: str) -> str:
    return ", ".join(connection.ops.quote_name(f.column) for f in _insert_fields)


_tree_columns = f"id, parent_id, role, content, {_column(Message, 'tool_steps')}"
_tree_statement = f"SELECT {_tree_columns} FROM {_messages} WHERE conversation_id = %s"


def insert_turn(
    user_message: Message, reply: Message, conversation_id, **fields
) -> dict[int, tuple]:
    """Insert a user's message and its reply (unsaved Messages; the reply's parent is the
    message), make the reply the conversation's current message with `fields` set too, and
    return the conversation's tree as message_tree does, new messages included. The values
    are those Django's insert would write (each field's pre_save and database form), without
    Model.save's machinery, which cost more than the statements. On PostgreSQL one statement
    (two inserts and an update as data-modifying CTEs, and the tree read back), where
    Model.save and move_conversation make three round trips and the request's history a
    fourth; on SQLite, in this process, the same four statements one after the other."""
    db = this_thread()
    if db.vendor != "postgresql":
        return _insert_turn_sqlite(db, user_message, reply, conversation_id, fields)
    sql, params = _turn_statement(db, user_message, reply, conversation_id, fields)
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return _turn_inserted(db, rows, user_message, reply)


def insert_turns(turns: list[tuple[Message, Message, object, dict]]) -> list[dict[int, tuple]]:
    """insert_turn for each (user_message, reply, conversation_id, fields), in the
    transaction under way: on PostgreSQL their statements go together in one round trip
    (service.reply_start_together), on SQLite one after the other."""
    db = this_thread()
    if not turns:
        return []
    if db.vendor != "postgresql":
        return [insert_turn(user, reply, chat, **fields) for user, reply, chat, fields in turns]
    statements = [(*_turn_statement(db, *turn), False) for turn in turns]
    return [
        _turn_inserted(db, rows, user_message, reply)
        for rows, (user_message, reply, _chat, _fields) in zip(
            run_reads(db, statements), turns, strict=True
        )
    ]


def _values(db, message: Message, parent: str | None = None) -> tuple[str, list]:
    # NULL written as such: a new message leaves most of its columns empty, and with fewer
    # than 50 parameters psycopg keeps the statement's parsed form between sends rather than
    # parsing it again (0.15 ms a send).
    placeholders, params = [], []
    for field in _insert_fields:
        if parent and field.attname == "parent_id":
            placeholders.append(parent)
            continue
        value = field.get_db_prep_save(field.pre_save(message, True), db)
        if value is None:
            placeholders.append("NULL")
        else:
            placeholders.append("%s")
            params.append(value)
    return ", ".join(placeholders), params


def _moves(db, conversation_id, fields: dict) -> tuple[str, list, object]:
    assignments = "".join(f", {_column(Conversation, name)} = %s" for name in fields)
    moved = [_param(Conversation, name, value, db) for name, value in fields.items()]
    return assignments, moved, _param(Conversation, "id", conversation_id, db)


def _insert_turn_sqlite(db, user_message, reply, conversation_id, fields) -> dict[int, tuple]:
    columns = _insert_columns(db.vendor)
    assignments, moved, chat = _moves(db, conversation_id, fields)
    tree = {}
    with _cursor(db) as cursor:
        for message in (user_message, reply):
            if message is reply:
                reply.parent_id = user_message.pk
            placeholders, params = _values(db, message)
            # lastrowid, not RETURNING: SQLite has RETURNING from 3.35 only, and Django runs
            # on older ones (Debian 11 ships 3.34).
            cursor.execute(f"INSERT INTO {_messages} ({columns}) VALUES ({placeholders})", params)
            message.pk = cursor.lastrowid
            message._state.adding = False
            message._state.db = db.alias
        reply.parent_id = user_message.pk
        cursor.execute(
            f"UPDATE {_conversations} SET current_message_id = %s{assignments} WHERE id = %s",
            [reply.pk, *moved, chat],
        )
        cursor.execute(_tree_statement, [_param(Message, "conversation", conversation_id, db)])
        for pk, *row in cursor.fetchall():
            tree[pk] = row
    return tree


def _turn_statement(db, user_message, reply, conversation_id, fields) -> tuple[str, list]:
    """insert_turn's one statement on PostgreSQL, and its parameters."""
    columns = _insert_columns(db.vendor)
    assignments, moved, chat = _moves(db, conversation_id, fields)
    user_values, user_params = _values(db, user_message)
    reply_values, reply_params = _values(db, reply, parent="(SELECT id FROM u)")
    sql = (
        f"WITH u AS (INSERT INTO {_messages} ({columns}) VALUES ({user_values}) "
        f"RETURNING {_tree_columns}), "
        f"a AS (INSERT INTO {_messages} ({columns}) VALUES ({reply_values}) "
        f"RETURNING {_tree_columns}), "
        f"c AS (UPDATE {_conversations} SET current_message_id = (SELECT id FROM a)"
        f"{assignments} WHERE id = %s) "
        f"SELECT 1, * FROM u UNION ALL SELECT 2, * FROM a "
        f"UNION ALL SELECT 0, {_tree_columns} FROM {_messages} WHERE conversation_id = %s"
    )
    params = [
        *user_params,
        *reply_params,
        *moved,
        chat,
        _param(Message, "conversation", conversation_id, db),
    ]
    return sql, params


def _turn_inserted(db, rows: list, user_message: Message, reply: Message) -> dict[int, tuple]:
    """The tree _turn_statement's rows give, the new messages' pks set."""
    tree = {}
    for new, pk, *row in rows:
        tree[pk] = row
        message = user_message if new == 1 else reply if new == 2 else None
        if message is not None:
            message.pk = pk
            message._state.adding = False
            message._state.db = db.alias
    reply.parent_id = user_message.pk
    return tree


def message_tree(conversation_id) -> dict[int, tuple]:
    """Every message of the conversation as pk -> (parent_id, role, content, tool_steps), the
    last as the JSON text the database keeps (decode it with `tool_steps`)."""
    db = this_thread()
    with _cursor(db) as cursor:
        cursor.execute(_tree_statement, [_param(Message, "conversation", conversation_id, db)])
        return {pk: row for pk, *row in cursor.fetchall()}


_tool_steps_field = Message._meta.get_field("tool_steps")


def tool_steps(value) -> list[dict]:
    """A tool_steps column as read, decoded as the ORM would. Most messages have none: those
    are not decoded (a request's history reads every message of its branch)."""
    if not value or value == "[]":
        return []
    return _tool_steps_field.from_db_value(value, None, connection)
