"""The statements every new reply runs before its request goes out, as SQL.

A send waits for these (P1 in bench/README.md): the conversation read under its lock, the
replies in the way, the conversation moved to its new last message, and the tree and history
the request is built from. Built from querysets, each cost 0.1–0.4 ms of Python on every send
to compile and convert, several times its round trip to the database; on SQLite, where every
send queues for the one database thread, that is what ten or fifty people sending at once wait
for. So they are written out here, with table and column names from the models and every value
a parameter, and what they return converted as the ORM would. The other statements of a send
(the inserts, the limits) stay where they are: the inserts go through Model.save, the limits
are SQL already (rules.LoadQuery), and read in the statement that finds the replies in the
way.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import cache

from django.db import connection
from django.utils import timezone

from conversations.models import Conversation, Message, ModelProfile

_conversations = Conversation._meta.db_table
_messages = Message._meta.db_table
_profiles = ModelProfile._meta.db_table


def _column(model, name: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(name).column)


def _param(model, name: str, value):
    """`value` as the database takes it for the field (a UUID as hex text on SQLite, …)."""
    return model._meta.get_field(name).get_db_prep_save(value, connection)


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


@cache
def _lock_statement(vendor: str) -> tuple[str, list]:
    """The lock's SQL and the converters of its columns, made once per database kind: built
    per send, they cost more than the statement's round trip."""
    ops = connection.ops
    columns = ", ".join(
        [f"c.{ops.quote_name(f.column)}" for f in _conversation_fields]
        + [f"m.{ops.quote_name(f.column)}" for f in _profile_fields]
    )
    sql = f"SELECT {columns} FROM {_conversations} c JOIN {_profiles} m ON m.id = c.model_id"
    if connection.features.has_select_for_update_of:
        user_table = Conversation._meta.get_field("owner").related_model._meta.db_table
        sql += (
            f" JOIN {user_table} u ON u.id = c.owner_id WHERE c.id = %s FOR NO KEY UPDATE OF c, u"
        )
    else:
        sql += " WHERE c.id = %s"
    compiler = ops.compiler("SQLCompiler")(Conversation.objects.none().query, connection, None)
    fields = _conversation_fields + _profile_fields
    converters = compiler.get_converters([f.get_col(f.model._meta.db_table) for f in fields])
    return sql, converters


def lock_conversation(conversation_id) -> Conversation:
    """The conversation read afresh, locked until the transaction ends, with its owner's row
    (PostgreSQL; SQLite's transactions are serialised whole), and its model, in one
    statement. Raises Conversation.DoesNotExist if it is gone."""
    sql, converters = _lock_statement(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(sql, [_param(Conversation, "id", conversation_id)])
        row = cursor.fetchone()
    if row is None:
        raise Conversation.DoesNotExist(f"conversation {conversation_id}")
    # Converted as a queryset would (SQLite's text datetimes and UUIDs, JSON, booleans…).
    row = list(row)
    for at, (converter_list, expression) in converters.items():
        for converter in converter_list:
            row[at] = converter(row[at], expression, connection)
    split = len(_conversation_fields)
    conversation = Conversation.from_db(
        connection.alias, [f.attname for f in _conversation_fields], row[:split]
    )
    conversation.model = ModelProfile.from_db(
        connection.alias, [f.attname for f in _profile_fields], row[split:]
    )
    return conversation


def in_the_way(
    conversation_id, client_message_id: uuid.UUID | None, load: tuple[str, list] | None = None
) -> tuple[list[tuple], tuple | None]:
    """(client_message_id, status, updated_at, pk) of the conversation's replies being written,
    and of the message this client_message_id made, if any; with `load` (rules.user_load_sql:
    one row of the owner's load), that row too, read by the same statement."""
    sent = _column(Message, "client_message_id")
    sql = (
        f"SELECT {sent}, status, updated_at, id FROM {_messages} "
        "WHERE conversation_id = %s AND (status = %s"
    )
    params = [_param(Message, "conversation", conversation_id), Message.Status.STREAMING.value]
    if client_message_id is not None:
        sql += f" OR {sent} = %s"
        params.append(_param(Message, "client_message_id", client_message_id))
    sql += ")"
    if load is not None:
        # A one-row subquery, joined to the replies in the way (none, usually).
        load_sql, load_params = load
        sql = f"SELECT w.*, l.* FROM ({load_sql}) l LEFT JOIN ({sql}) w ON 1 = 1"
        params = [*load_params, *params]
    rows = _prepared(sql, params) if load is not None else None
    if rows is None:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
    found = [
        (read_uuid(sent), status, read_moment(at), pk)
        for sent, status, at, pk, *_load in rows
        if pk is not None
    ]
    return found, (tuple(rows[0][4:]) if load is not None else None)


def _prepared(sql: str, params: list) -> list | None:
    """The rows of `sql` run as a prepared statement, on PostgreSQL (None elsewhere: run it as
    any other). The limits' statement (rules.LoadQuery) resolves every limit and allowlist of
    the user's groups: PostgreSQL took 1–3 ms to plan it and 0.1–0.3 ms to run it, on every send
    (prepared: 3.3 -> 1.7–2.0 ms a send, bench/README.md).
    Its text is made once a process, so it is planned once a connection. Django's cursors
    bind parameters on the client (the text differs with every value), so this one goes
    through a server-binding cursor on the same connection, inside the same transaction; it
    does not show in Django's query log."""
    if connection.vendor != "postgresql":
        return None
    import psycopg

    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params, prepare=True)
        return cursor.fetchall()


def move_conversation(conversation_id, **fields) -> None:
    """Update these fields of the conversation (an UPDATE of one row, no model instance)."""
    assignments = ", ".join(f"{_column(Conversation, name)} = %s" for name in fields)
    params = [_param(Conversation, name, value) for name, value in fields.items()]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_conversations} SET {assignments} WHERE id = %s",
            [*params, _param(Conversation, "id", conversation_id)],
        )


def message_tree(conversation_id) -> dict[int, tuple]:
    """Every message of the conversation as pk -> (parent_id, role, content, tool_steps), the
    last as the JSON text the database keeps (decode it with `tool_steps`)."""
    tool_steps = _column(Message, "tool_steps")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, parent_id, role, content, {tool_steps} FROM {_messages} "
            "WHERE conversation_id = %s",
            [_param(Message, "conversation", conversation_id)],
        )
        return {pk: row for pk, *row in cursor.fetchall()}


_tool_steps_field = Message._meta.get_field("tool_steps")


def tool_steps(value) -> list[dict]:
    """A tool_steps column as read, decoded as the ORM would."""
    return _tool_steps_field.from_db_value(value, None, connection)
