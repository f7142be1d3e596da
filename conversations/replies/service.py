"""The use cases of a reply's life: create a chat, start a reply, continue, regenerate, edit,
switch versions, stop.

Views and consumers call these and stay thin: what a valid message is and the limits are in
rules.py, what DashScope is sent in prompt.py, the task that writes a reply in generation.py,
when a reply is dead in liveness.py, and what the sockets are told in events.py.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connections, transaction
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from conversations import sockets, uploads
from conversations.dashscope import ChatRequest
from conversations.db import (
    ELSEWHERE,
    again_if_disconnected,
    db_async,
    db_turn,
    drop_loop_reader,
    quiet,
)
from conversations.models import (
    Conversation,
    Message,
    MessageImage,
    ModelProfile,
    Preferences,
    SystemPrompt,
    Upload,
)
from conversations.replies import (
    branches,
    control,
    events,
    intake,
    liveness,
    options,
    prompt,
    quotas,
    rules,
)
from conversations.replies.rules import ReplyInProgress, ReplyRefused, StopUndelivered

__all__ = [  # the rules' refusals, where the use cases that raise them are
    "ReplyInProgress", "ReplyRefused", "StopUndelivered",
]  # fmt: skip

logger = logging.getLogger(__name__)

# How long a send's writes, after its request has gone out, let the other sends on their way
# go first (_launch): well under DashScope's time to a first token.
SAVE_DEFER = 0.1
# The databases on which the sends queued together on the database thread are planned and
# written together (reply_plan_together, reply_start_together). Not SQLite: its plans are
# read on the loop, and its writes run in this process, where one long trip holds up the
# loop (50 senders, paired: 4 rounds of 16 better; bench/README.md, seventeenth pass).
SENDS_TOGETHER = {"postgresql"}


@dataclass(frozen=True)
class StartedReply:
    conversation: Conversation  # as it was read under the lock: current model, prompt, title
    user_message: Message
    assistant_message: Message
    created: bool  # False when the client_message_id was seen before: no second call
    titled: bool = False  # this message gave the conversation its title
    interrupted: tuple[int, ...] = ()  # replies found dead (their process gone) on the way
    tree: dict[int, tuple] | None = None  # the chat's messages, if read with the new ones


@dataclass(frozen=True)
class Plan:
    """A send whose request is built, and checked as reply_start checks it, before its
    messages are written (reply_plan): its request goes out first, and the writes follow
    while DashScope works on the first token."""

    request: ChatRequest
    writer: uuid.UUID  # the reply's fencing token, given to it when it is written
    content: str = ""  # the message, as checked
    client_message_id: uuid.UUID | None = None


@dataclass(frozen=True)
class PlannedWrite:
    """The writes of a planned send (reply_start with its Plan's writer), as
    reply_start_together takes them; `then` is given the StartedReply."""

    conversation: Conversation
    plan: Plan
    then: Callable[[StartedReply], object]


def reply_plan(
    *,
    conversation: Conversation,
    content: object,
    client_message_id: uuid.UUID | None = None,
    image_urls: object = None,
    image_ids: object = None,
    guard=None,
    db=None,
    split: bool = False,
) -> Plan | None:
    """The request of a new message to `conversation`, built as reply_start would build it
    after writing the message, from the same checks and reads but no writes and no lock: a
    Plan, which reply_start then makes real (with the Plan's writer) once the request has
    gone out (_launch). A send's request then waits for the reads alone: on PostgreSQL one
    round trip instead of three and a commit's flush to disk; on SQLite, in this process,
    half the work (bench/README.md, thirteenth pass).

    None for anything but the plain case, which reply_start then does at once, as before:
    images, a resent frame, a reply in the way (streaming, or dead and to be marked
    interrupted), a chat whose model or prompt changed since it was read. A refusal is raised
    here as reply_start raises it.

    `db`: the connection to read with (the event loop's reader: db.loop_reader), if not this
    thread's. `split`: the _Planning instead (None as before), whose reads its caller makes
    together with other plans' (reply_plan_together)."""
    try:
        message = rules.MessageForm(
            {"content": content, "image_urls": image_urls, "image_ids": image_ids}
        ).valid()
    except ReplyRefused:
        if guard is not None:
            guard()  # an ended session is said before a refused message
        raise
    if client_message_id is None or message["image_urls"] or message["image_ids"]:
        return None
    db = db or intake.this_thread()
    planning = _Planning(db, conversation, client_message_id, message["content"], guard)
    if split:
        return planning
    return planning.conclude(intake.run_reads(db, planning.reads))


class _Planning:
    """A plan (reply_plan) in two steps: its reads (`reads`), made alone or with other plans',
    then the plan from their rows."""

    def __init__(self, db, conversation: Conversation, client_message_id, content: str, guard):
        self.db, self.conversation, self.guard = db, conversation, guard
        self.client_message_id, self.content = client_message_id, content
        self.query = rules.LoadQuery.of(
            conversation.owner_id,
            model_id=conversation.model_id,
            prompt_id=conversation.system_prompt_id,
        )
        load = (self.query.sql, self.query.params)
        self.statements = intake.read_statements(
            db, conversation.pk, client_message_id, load, False, True
        )
        self.guard_reads = guard.reads(db) if guard is not None else None
        self.reads = self.statements + (self.guard_reads or [])

    def conclude(self, results: list[list]) -> Plan | None:
        db, conversation, guard, content = self.db, self.conversation, self.guard, self.content
        statements = self.statements
        if guard is not None:
            if self.guard_reads:
                guard.check(db, *results[len(statements) :])
            else:
                guard()
        read, in_the_way, row, tree = intake.read_results(
            conversation.pk, results[: len(statements)], False, True, db
        )
        if in_the_way or (read.model_id, read.system_prompt_id) != (
            conversation.model_id,
            conversation.system_prompt_id,
        ):
            return None
        rules.check_model(read)
        rules.check_json_mentioned(read, content)
        rules.check_user_limits(read, (self.query, row))
        # The history as it will be once the message is written: the message under a pk no
        # row has, the reply to be below it (the reply itself is not needed: only its fencing
        # token, which reply_start gives it).
        tree[0] = (read.current_message_id, Message.Role.USER.value, content, None)
        for name, value in _moved_fields(read).items():
            setattr(read, name, value)
        request = prompt.build_request(conversation=read, after=0, tree=tree)
        return Plan(
            request=request,
            writer=uuid.uuid4(),
            content=content,
            client_message_id=self.client_message_id,
        )


def reply_plan_together(
    plans: list[tuple[Callable[[object], _Planning | None], str | None]],
) -> list:
    """reply_plan for several sends queued together on the database thread (db_turn's
    `batch`), each in its caller's language: on PostgreSQL the reads of all in one round trip,
    where each alone makes one of its own, and waits, on a busy process, for the interpreter's
    lock after it (bench/README.md, seventeenth pass). Each item makes its _Planning on the
    connection given (reply_plan with split=True). Returns for each: (True, its Plan or
    None), (False, its refusal), or ELSEWHERE, where reply_plan alone is left to say what
    went wrong (any other error; all of them if the reads fail)."""
    db = intake.this_thread()
    outcomes: list = [ELSEWHERE] * len(plans)
    reading: list[tuple[int, _Planning]] = []
    for n, (make, language) in enumerate(plans):
        try:
            with translation.override(language):
                planning = make(db)
        except ReplyRefused as refusal:
            outcomes[n] = (False, refusal)
            continue
        except Exception:
            continue
        if planning is None:  # not the plain case: reply_start does it at once
            outcomes[n] = (True, None)
        else:
            reading.append((n, planning))
    if not reading:
        return outcomes
    try:
        reads = [read for _n, planning in reading for read in planning.reads]
        results = intake.run_reads(db, reads)
    except DatabaseError:
        return [ELSEWHERE] * len(plans)
    at = 0
    for n, planning in reading:
        mine, at = results[at : at + len(planning.reads)], at + len(planning.reads)
        try:
            with translation.override(plans[n][1]):
                outcomes[n] = (True, planning.conclude(mine))
        except ReplyRefused as refusal:
            outcomes[n] = (False, refusal)
        except Exception:
            outcomes[n] = ELSEWHERE
    return outcomes


def conversation_configure(
    conversation: Conversation,
    *,
    model: ModelProfile | None = None,
    system_prompt: SystemPrompt | None | bool = False,
    chat_settings: dict | None = None,
) -> Conversation:
    """Save a chat's settings (options.SettingsForm.changes()): its model (None: unchanged),
    its system prompt (False: unchanged; None: none) and its other settings. They apply from
    the next message; a prompt chosen once the chat has begun is the chat's from then on."""
    fields = []
    if model is not None:
        conversation.model = model
        fields.append("model")
    if system_prompt is not False:
        conversation.system_prompt = system_prompt
        fields.append("system_prompt")
        if conversation.system_prompt_text is not None:  # the chat has begun
            conversation.system_prompt_text = system_prompt.text if system_prompt else ""
            fields.append("system_prompt_text")
    if chat_settings is not None:
        conversation.settings = chat_settings
        fields.append("settings")
    if fields:
        conversation.save(update_fields=fields)
    return conversation


def conversation_create(
    *, owner, model: ModelProfile | None = None, system_prompt: SystemPrompt | None = None
) -> Conversation:
    """A new, empty chat of `owner`'s with `model`, else the owner's default model (the
    /settings/ page), else their groups' (GroupPolicy), else the catalog's; the owner's
    default system prompt, else their groups', else the library's; and the settings of the
    owner's default preset. Each default only if the owner may use it (quotas.py: a group may
    restrict its members' models and prompts; a restricted owner's chat gets one of theirs).
    Refused (nothing created) when `model` is not the owner's to use, when no model is, or
    when the owner has created QWENWEB_CHATS_PER_MINUTE chats in the last minute."""
    if model is not None and not quotas.may_use_model(owner, model):
        raise ReplyRefused(rules.model_not_allowed(owner.pk, model))
    default_model, default_prompt = quotas.new_chat_defaults(owner)
    model = model or default_model
    if model is None:
        if ModelProfile.objects.enabled().exists():
            raise ReplyRefused(_("No model is available to you. Ask an administrator."))
        raise ReplyRefused(_("No model is enabled. Ask an administrator to enable one."))
    system_prompt = system_prompt or default_prompt
    preferences = Preferences.objects.filter(user=owner.pk).first()
    chosen = {}
    if preferences is not None and preferences.default_preset in options.PRESETS:
        chosen = dict(options.PRESETS[preferences.default_preset][1])
    fields = {"owner": owner, "model": model, "system_prompt": system_prompt, "settings": chosen}
    per_minute = settings.QWENWEB_CHATS_PER_MINUTE
    if per_minute <= 0:
        return Conversation.objects.create(**fields)
    with transaction.atomic():
        # The owner's row, locked as a send locks it (_lock): one user's new chats are counted
        # one after another, so two at the same moment, even in two processes, cannot both
        # take the last place. (SQLite runs one write transaction at a time anyway.)
        list(
            get_user_model()
            .objects.select_for_update(no_key=True)
            .filter(pk=owner.pk)
            .values_list("pk")
        )
        rules.check_chats_per_minute(owner, per_minute)
        return Conversation.objects.create(**fields)


def reply_start(
    *,
    conversation: Conversation,
    content: str,
    client_message_id: uuid.UUID | None = None,
    image_urls: object = None,
    image_ids: object = None,
    writer: uuid.UUID | None = None,
) -> StartedReply:
    """Save the user's message and an assistant placeholder before anything can fail upstream.
    The message follows the active branch's last one and becomes, with its reply, the branch's
    new end. `writer`: the reply's fencing token, if its generation has one already (a Plan's).

    A repeated client_message_id returns the messages it created the first time, so a resent
    frame (a reconnecting socket replays its queue) never starts a second call.
    """
    message = rules.MessageForm(
        {"content": content, "image_urls": image_urls, "image_ids": image_ids}
    ).valid()
    content, images = message["content"], message["image_urls"]
    try:
        with transaction.atomic():
            conversation, existing, interrupted, load = _lock_and_clear(
                conversation, client_message_id
            )
            if existing is not None:
                return existing
            rules.check_model(conversation)
            try:
                images += uploads.attach(conversation, message["image_ids"])
            except uploads.UploadRefused as refusal:
                raise ReplyRefused(str(refusal)) from None
            turn = _Turn.checked(conversation, content, images, load, client_message_id, writer)
            # The message, its reply and the chat's move in one statement, the history the
            # request is built from read back with them (intake.insert_turn).
            tree = intake.insert_turn(turn.user_message, turn.reply, conversation.pk, **turn.moved)
            return turn.written(tree, interrupted)
    except IntegrityError:
        existing = client_message_id and _existing_reply(conversation, client_message_id)
        if not existing:
            raise
        return existing


def reply_start_together(writes: list[tuple[PlannedWrite, str | None]]) -> list:
    """reply_start for several planned sends at once, each in its caller's language (the
    database thread's trips: db_turn's `batch`), in one transaction: on PostgreSQL the chats
    are read under their locks in one round trip and the turns written in another, then one
    commit, where each send alone makes three round trips and a commit's flush of its own.
    When fifty people send at once, a process's writes queued on its one thread for 300-600 ms,
    each round trip waiting for the interpreter's lock the loop held, and the replies were
    announced, and so shown, only after their first tokens (bench/README.md, seventeenth pass).

    What reply_start would do otherwise is left to it (db.ELSEWHERE: the caller runs it
    alone): a second send of an owner already in the batch (the limits count each after the
    one before), anything but the plain case under the lock (a resent frame, a reply in the
    way, a chat whose model or prompt changed since the send was planned, a chat gone), and,
    if the transaction fails (a write refused by a constraint, a lost connection…), every
    send of it: nothing of it was written. A refusal by the rules is the send's own outcome.
    Returns, for each write: (True, then(started)), (False, the refusal or error), or
    ELSEWHERE."""
    outcomes: list = [ELSEWHERE] * len(writes)
    chosen, owners = [], set()
    for n, (write, _language) in enumerate(writes):
        if write.conversation.owner_id not in owners:
            owners.add(write.conversation.owner_id)
            chosen.append(n)
    if len(chosen) < 2:
        return outcomes
    # The chats and their owners locked in the owners' order: two batches (two processes)
    # never wait for each other's rows in a circle.
    chosen.sort(key=lambda n: writes[n][0].conversation.owner_id)
    db = intake.this_thread()
    turns: dict[int, _Turn] = {}
    try:
        with transaction.atomic():
            loads, statements = {}, []
            for n in chosen:
                write = writes[n][0]
                chat = write.conversation
                loads[n] = query = rules.LoadQuery.of(
                    chat.owner_id, model_id=chat.model_id, prompt_id=chat.system_prompt_id
                )
                load = (query.sql, query.params)
                sent = write.plan.client_message_id
                statements += intake.read_statements(db, chat.pk, sent, load, True, False)
            results = intake.run_reads(db, statements)
            for at, n in enumerate(chosen):
                write, language = writes[n]
                chat, plan = write.conversation, write.plan
                try:
                    locked, in_the_way, row = intake.read_results(
                        chat.pk, results[2 * at : 2 * at + 2], True, False
                    )
                except Conversation.DoesNotExist:
                    continue
                if in_the_way or (locked.model_id, locked.system_prompt_id) != (
                    chat.model_id,
                    chat.system_prompt_id,
                ):
                    continue
                try:
                    with translation.override(language):
                        rules.check_model(locked)
                        turns[n] = _Turn.checked(
                            locked, plan.content, [], (loads[n], row), plan.client_message_id,
                            plan.writer,
                        )  # fmt: skip
                except ReplyRefused as refusal:
                    outcomes[n] = (False, refusal)
            trees = intake.insert_turns([turn.inserts() for turn in turns.values()])
            started = {
                n: turn.written(tree) for (n, turn), tree in zip(turns.items(), trees, strict=True)
            }
    except DatabaseError:
        logger.info("Sends written together failed; each is written alone", exc_info=True)
        return [ELSEWHERE] * len(writes)
    for n, reply in started.items():
        write, language = writes[n]
        try:
            with translation.override(language):
                outcomes[n] = (True, write.then(reply))
        except Exception as error:
            outcomes[n] = (False, error)
    return outcomes


@dataclass
class _Turn:
    """A new message and its reply to be written at the end of the active branch of a
    conversation read under its lock, once checked (reply_start, reply_start_together)."""

    conversation: Conversation
    user_message: Message
    reply: Message
    images: list
    titled: bool
    moved: dict

    @classmethod
    def checked(cls, conversation, content: str, images: list, load, client_message_id, writer):
        """The turn, if the rules let `content` (and `images`) be sent to the chat now
        (rules.check_model is the caller's, before anything else); else ReplyRefused."""
        rules.check_images(images, conversation.model)
        rules.check_json_mentioned(conversation, content)
        rules.check_user_limits(conversation, load)
        user_message = Message(
            conversation=conversation,
            parent_id=_leaf_id(conversation),
            role=Message.Role.USER,
            content=content,
            client_message_id=client_message_id,
        )
        titled = not conversation.title
        moved = _moved_fields(conversation, title=rules.title_from(content) if titled else "")
        reply = _reply_to_be(conversation, writer=writer)
        return cls(conversation, user_message, reply, images, titled, moved)

    def inserts(self) -> tuple:
        """The turn as intake.insert_turns takes it."""
        return self.user_message, self.reply, self.conversation.pk, self.moved

    def written(self, tree: dict, interrupted=()) -> StartedReply:
        conversation = self.conversation
        for name, value in self.moved.items():
            setattr(conversation, name, value)
        conversation.current_message_id = self.reply.pk
        self.user_message.image_list = _attach_images(self.user_message, self.images)
        self.reply.image_list = []
        return StartedReply(
            conversation,
            self.user_message,
            self.reply,
            created=True,
            titled=self.titled,
            interrupted=tuple(interrupted),
            tree=tree,
        )


def reply_regenerate(
    *,
    conversation: Conversation,
    message_id: int | None = None,
    client_message_id: uuid.UUID | None = None,
) -> StartedReply:
    """A new version of a reply (the active branch's last one, or `message_id`), written beside
    it from the same history; the earlier version is kept, and the new one is shown. Any
    finished reply may be regenerated: complete, stopped, interrupted or failed (the retry)."""
    try:
        with transaction.atomic():
            conversation, existing, interrupted, load = _lock_and_clear(
                conversation, client_message_id
            )
            if existing is not None:
                return existing
            target = conversation.messages.filter(
                pk=message_id if message_id is not None else _leaf_id(conversation),
                role=Message.Role.ASSISTANT,
            ).first()
            if target is None or target.parent_id is None:
                raise ReplyRefused(_("There is no reply to regenerate."))
            rules.check_model(conversation)
            rules.check_user_limits(conversation, load)
            reply = _new_reply(
                conversation, parent_id=target.parent_id, client_message_id=client_message_id
            )
            _move_to(conversation, reply, forked=True)
            user_message = conversation.messages.get(pk=target.parent_id)
    except IntegrityError:
        existing = client_message_id and _existing_reply(conversation, client_message_id)
        if not existing:
            raise
        return existing
    return StartedReply(
        conversation, user_message, reply, created=True, interrupted=tuple(interrupted)
    )


def reply_edit(
    *,
    conversation: Conversation,
    message_id: object,
    content: object,
    client_message_id: uuid.UUID | None = None,
) -> StartedReply:
    """A new version of one of the user's messages (with the same images), and a reply to it.
    The turns that followed the earlier version stay on their own branch; the new one is
    shown."""
    content = rules.MessageForm({"content": content}, with_images=False).valid()["content"]
    try:
        with transaction.atomic():
            conversation, existing, interrupted, load = _lock_and_clear(
                conversation, client_message_id
            )
            if existing is not None:
                return existing
            original = (
                conversation.messages.filter(pk=message_id, role=Message.Role.USER).first()
                if type(message_id) is int
                else None
            )
            if original is None:
                raise ReplyRefused(_("That message cannot be edited: it is not in this chat."))
            rules.check_model(conversation)
            rules.check_user_limits(conversation, load)
            user_message, assistant_message = _new_turn(
                conversation,
                parent_id=original.parent_id,
                content=content,
                images=[image.upload or image.url for image in original.images.all()],
                client_message_id=client_message_id,
            )
            _move_to(conversation, assistant_message, forked=True)
    except IntegrityError:
        existing = client_message_id and _existing_reply(conversation, client_message_id)
        if not existing:
            raise
        return existing
    return StartedReply(
        conversation,
        user_message,
        assistant_message,
        created=True,
        interrupted=tuple(interrupted),
    )


def branch_switch(*, conversation: Conversation, message_id: int, step: int) -> int:
    """Show the version `step` (-1 or +1) away from message `message_id`: the active branch
    then ends at the newest leaf under that version, and stays so on reload. Returns the new
    leaf. Refused while a reply is being written (the page would lose sight of it)."""
    with transaction.atomic():
        conversation = _lock(conversation)
        if conversation.messages.filter(status=Message.Status.STREAMING).exists():
            raise ReplyInProgress(
                _("A reply is still being written. Wait for it or press Stop, then switch.")
            )
        tree = branches.load(conversation)
        if message_id not in tree:
            raise Message.DoesNotExist
        siblings = tree.siblings(message_id)
        position = siblings.index(message_id) + step
        if not 0 <= position < len(siblings):
            raise ReplyRefused(_("There is no other version that way."))
        leaf = tree.leaf_under(siblings[position], conversation.branch_choices)
        Conversation.objects.filter(pk=conversation.pk).update(
            current_message_id=leaf,
            branch_choices=tree.remember(leaf, conversation.branch_choices),
        )
        conversation.current_message_id = leaf
    return leaf


def _lock_and_clear(
    conversation: Conversation, client_message_id: uuid.UUID | None
) -> tuple[Conversation, StartedReply | None, list[int], tuple]:
    """Lock the conversation and read it afresh (two tabs sending at once cannot both start a
    reply; the model or title may have changed since the socket opened), then, before a new
    reply: the reply this client_message_id started already (a resent frame), if any; else
    the replies found dead (their process gone, now interrupted), and the owner's load for
    rules.check_user_limits. Refused while a live reply is being written. One round trip
    (intake.read_under_lock), two when the chat's model or prompt changed since `conversation`
    was read (whether the owner may use them is part of the load)."""
    query = rules.LoadQuery.of(
        conversation.owner_id,
        model_id=conversation.model_id,
        prompt_id=conversation.system_prompt_id,
    )
    locked, in_the_way, row = intake.read_under_lock(
        conversation.pk, client_message_id, (query.sql, query.params)
    )
    if (locked.model_id, locked.system_prompt_id) != (
        conversation.model_id,
        conversation.system_prompt_id,
    ):
        query = rules.LoadQuery.of(
            locked.owner_id, model_id=locked.model_id, prompt_id=locked.system_prompt_id
        )
        row = query.read()
    conversation = locked
    streaming = []
    for sent_id, status, updated_at, pk in in_the_way:
        if client_message_id is not None and sent_id == client_message_id:
            return conversation, _existing_reply(conversation, client_message_id), [], None
        if status == Message.Status.STREAMING:
            streaming.append((pk, updated_at))
    interrupted = _interrupt_dead(conversation, streaming)
    if len(interrupted) < len(streaming):
        raise ReplyInProgress(
            _("A reply is still being written. Wait for it or press Stop, then send.")
        )
    # Replies just found dead were counted as streaming only if their heartbeat was recent,
    # which it was not (the load counts live replies alone).
    return conversation, None, interrupted, (query, row)


def _leaf_id(conversation: Conversation) -> int | None:
    """The last message of the active branch (read under the conversation's lock). None in a
    new chat, or one whose current message an admin deleted: a message sent then starts a
    branch of its own beside the first message, and the earlier ones stay a version away."""
    return conversation.current_message_id


def _new_turn(
    conversation: Conversation,
    *,
    parent_id: int | None,
    content: str,
    images: list[str | Upload],
    client_message_id: uuid.UUID | None,
) -> tuple[Message, Message]:
    user_message = _create_message(
        conversation=conversation,
        parent_id=parent_id,
        role=Message.Role.USER,
        content=content,
        client_message_id=client_message_id,
    )
    user_message.image_list = _attach_images(user_message, images)
    return user_message, _new_reply(conversation, parent_id=user_message.pk)


def _attach_images(message: Message, images: list[str | Upload]) -> list[MessageImage]:
    if not images:
        return []
    return MessageImage.objects.bulk_create(
        [
            MessageImage(message=message, upload=image)
            if isinstance(image, Upload)
            else MessageImage(message=message, url=image)
            for image in images
        ]
    )


def _reply_to_be(
    conversation: Conversation,
    *,
    parent_id: int | None = None,
    client_message_id: uuid.UUID | None = None,
    writer: uuid.UUID | None = None,
) -> Message:
    """A reply to be written by a new generation (not saved yet)."""
    return Message(
        conversation=conversation,
        parent_id=parent_id,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=conversation.model.name,
        writer=writer or uuid.uuid4(),
        client_message_id=client_message_id,
        json_mode=options.json_mode(conversation.settings or {}, conversation.model),
    )


def _new_reply(
    conversation: Conversation, *, parent_id: int, client_message_id: uuid.UUID | None = None
) -> Message:
    reply = _reply_to_be(conversation, parent_id=parent_id, client_message_id=client_message_id)
    reply.placed = True  # its parent is chosen (Message.save)
    reply.save(force_insert=True)
    reply.image_list = []
    return reply


def _create_message(**fields) -> Message:
    message = Message(**fields)
    message.placed = True  # its parent is chosen (Message.save)
    message.save(force_insert=True)
    return message


def _moved_fields(conversation: Conversation, *, title: str = "") -> dict:
    """What a new end of the active branch changes in its conversation, but the end itself
    (current_message_id) and the versions shown: the chat becomes the user's latest, takes
    its prompt's text with its first message, and its title, if given."""
    fields = {"updated_at": timezone.now()}
    if conversation.system_prompt_text is None:
        # The chat's first message: its prompt's text is the chat's from now on (editing
        # the library rewrites no history).
        prompt = conversation.system_prompt
        fields["system_prompt_text"] = prompt.text if prompt else ""
    if title:
        fields["title"] = title
    return fields


def _move_to(
    conversation: Conversation, leaf: Message, *, title: str = "", forked: bool = False
) -> None:
    """Make `leaf` the end of the active branch (and the chat the user's latest). After a
    fork (a regenerate, an edit), the versions it shows are remembered (branch_choices), so
    that switching away and back shows them again."""
    fields = {"current_message_id": leaf.pk, **_moved_fields(conversation, title=title)}
    if forked:
        tree = branches.load(conversation)
        fields["branch_choices"] = tree.remember(leaf.pk, conversation.branch_choices)
    intake.move_conversation(conversation.pk, **fields)
    for name, value in fields.items():
        setattr(conversation, name, value)


def _lock(conversation: Conversation) -> Conversation:
    """The conversation read afresh, locked until the transaction ends, with its owner's row:
    one user's new replies start one at a time, so the per-user limits count every one of
    them, whichever process it started in."""
    return intake.lock_conversation(conversation.pk)


def _interrupt_dead(conversation: Conversation, streaming: list[tuple[int, object]]) -> list[int]:
    """Of these streaming replies (pk, updated_at), mark those whose heartbeat stopped as
    interrupted; returns their pks."""
    cutoff = liveness.stale_cutoff()
    dead = [pk for pk, updated_at in streaming if updated_at < cutoff]
    if not dead:
        return []
    return liveness.mark_interrupted(conversation.messages.filter(pk__in=dead), saved_before=cutoff)


def _existing_reply(conversation: Conversation, client_message_id: uuid.UUID):
    """What a client_message_id started: a message and its reply (a send, an edit), or a
    reply (a regenerate: the id is the reply's)."""
    sent = conversation.messages.filter(client_message_id=client_message_id).first()
    if sent is None:
        return None
    if sent.role == Message.Role.ASSISTANT:
        user_message = conversation.messages.filter(pk=sent.parent_id).first()
        return StartedReply(conversation, user_message, sent, created=False)
    reply = sent.children.filter(role=Message.Role.ASSISTANT).order_by("pk").first()
    return StartedReply(conversation, sent, reply, created=False)


async def areply_start(
    *,
    conversation: Conversation,
    content: object,
    client_message_id: uuid.UUID | None = None,
    image_urls: object = None,
    image_ids: object = None,
    together: bool = False,
    guard=None,
) -> StartedReply:
    """Save the message, tell every open socket, and start the reply in its own task: its
    request goes out once the message is checked, and the message is written while DashScope
    works on the first token (reply_plan)."""
    arguments = {
        "conversation": conversation,
        "content": content,
        "client_message_id": client_message_id,
        "image_urls": image_urls,
        "image_ids": image_ids,
    }
    return await _launch(
        conversation,
        lambda writer=None: reply_start(**arguments, writer=writer),
        plan=lambda guard=None, db=None, split=False: reply_plan(
            **arguments, guard=guard, db=db, split=split
        ),
        together=together,
        guard=guard,
    )


async def areply_regenerate(
    *,
    conversation: Conversation,
    message_id: int | None = None,
    client_message_id: uuid.UUID | None = None,
    together: bool = False,
    guard=None,
) -> StartedReply:
    """Write a new version of a reply (reply_regenerate) and show it on every open socket."""
    return await _launch(
        conversation,
        lambda: reply_regenerate(
            conversation=conversation, message_id=message_id, client_message_id=client_message_id
        ),
        branched=True,
        together=together,
        guard=guard,
    )


async def areply_edit(
    *,
    conversation: Conversation,
    message_id: object,
    content: object,
    client_message_id: uuid.UUID | None = None,
    together: bool = False,
    guard=None,
) -> StartedReply:
    """Save a new version of a message (reply_edit), show the new branch on every open
    socket, and start its reply."""
    return await _launch(
        conversation,
        lambda: reply_edit(
            conversation=conversation,
            message_id=message_id,
            content=content,
            client_message_id=client_message_id,
        ),
        branched=True,
        together=together,
        guard=guard,
    )


async def _launch(
    conversation: Conversation,
    save,
    *,
    branched: bool = False,
    together: bool = False,
    plan=None,
    guard=None,
) -> StartedReply:
    """Run `save` (a use case above: it writes the messages and returns a StartedReply) and
    build the request in one trip to the database thread, then start the reply. Sockets are
    told of the new messages (Created), or, when they begin a new branch, to show the branch
    (Branched). `together`: the trip may be shared with the other sends queued for the
    thread (db_turn); for callers outside any request (the websocket consumer), not
    for a view, whose sync middleware may be holding the thread the trip needs.

    With `plan` (reply_plan), the first trip only checks and reads: its request goes out,
    and a second trip runs `save(writer=…)`. Its messages are written before anything from
    DashScope is used (the reply waits for them: Generation.adopt); if the write is refused
    or fails, the request is dropped unanswered and the caller gets the refusal or error as
    before; if what was written asks for another request than the one sent (the chat
    changed between the trips), that one is dropped and the right one sent. On PostgreSQL,
    the plans of the sends queued together for the database thread are read together, and
    their writes made together (SENDS_TOGETHER: reply_plan_together, reply_start_together).

    `guard`: a check that must pass before anything else is done (the socket's session:
    socket_auth.SessionGuard), made in the first trip to the database thread: its reads go
    with the plan's (reply_plan), or it runs before the work. What it raises is raised here;
    once passed it is free, so each trip may run it."""
    from conversations.upstream import get_client

    def guarded(function):
        if guard is None:
            return function

        def call():
            guard()
            return function()

        return call

    def prepare(started: StartedReply) -> tuple[StartedReply, ChatRequest | None, list[dict]]:
        if not started.created:
            return started, None, []
        request = prompt.build_request(
            conversation=started.conversation,
            reply_to=started.assistant_message,
            tree=started.tree,
        )
        messages = [started.user_message.as_event(), started.assistant_message.as_event()]
        return started, request, messages

    def planned_or_not() -> Plan | None:
        try:
            # The guard's reads go with the plan's (reply_plan), or it runs on its own.
            return again_if_disconnected(lambda: plan(guard=guard))()
        except ReplyRefused:
            raise
        except Exception:  # the old path may yet work (and says so if not)
            logger.warning("Planning a send in %s failed", conversation.pk, exc_info=True)
            return None

    def planned_here(reader) -> Plan | None | object:
        # On the event loop, with its SQLite reader (db.loop_reader): the same reads, and
        # the thread's way (ELSEWHERE) for anything they cannot do there.
        try:
            return plan(guard=guard, db=reader)
        except ReplyRefused:
            raise
        except SynchronousOnlyOperation:  # a check that needs the ORM (the guard's own)
            return ELSEWHERE
        except DatabaseError:  # the file replaced, its schema changed…: another reader
            logger.warning("Planning a send in %s failed", conversation.pk, exc_info=True)
            drop_loop_reader()
            return ELSEWHERE
        except Exception:
            logger.warning("Planning a send in %s failed", conversation.pk, exc_info=True)
            return ELSEWHERE

    early = None
    if plan is not None:
        planning = db_turn(
            planned_or_not,
            together=together,
            sends=True,
            here=planned_here,
            batch=_together(reply_plan_together, lambda db: plan(guard=guard, db=db, split=True)),
        )
        async with planning as planned:
            if planned is not None:
                early = _generation(
                    conversation, planned.request, get_client(), writer=planned.writer
                )
                try:
                    await early.launch()
                except BaseException:  # the caller cancelled (a view's client gone, shutdown)
                    early.abandon()
                    raise
    if early is None:
        async with db_turn(guarded(lambda: prepare(save())), together=together) as (
            started,
            request,
            messages,
        ):
            generation = await _start(conversation, started, request, messages, branched=branched)
    else:
        try:
            # The writes wait for the sends still being checked to have their requests out,
            # and after a burst a little longer, for those of the server's other processes
            # (SAVE_DEFER at most: DashScope takes longer to the first token, and the reply
            # waits for its writes before it shows anything).
            await quiet(SAVE_DEFER, linger=True)
            written = db_turn(
                lambda: prepare(save(writer=early.writer)),
                together=together,
                counted=False,
                sends=True,
                batch=_together(reply_start_together, PlannedWrite(conversation, planned, prepare)),
            )
            async with written as (started, request, messages):
                if started.created and request == early.request:
                    generation = await _start(
                        conversation, started, request, messages, branched=branched, early=early
                    )
                else:
                    early.abandon()
                    generation = await _start(
                        conversation, started, request, messages, branched=branched
                    )
        finally:
            early.abandon()  # unless adopted: then nothing
    if generation is not None:
        await generation.announced()
    return started


def _together(runner, item):
    """db_turn's `batch` for a send's plan or writes: made together with the others queued
    with it, on the databases where that pays (SENDS_TOGETHER)."""
    if connections[DEFAULT_DB_ALIAS].vendor not in SENDS_TOGETHER:
        return None
    return runner, item


def _generation(conversation, request: ChatRequest, client, **fields):
    from conversations.replies.generation import Generation

    return Generation(
        conversation_id=str(conversation.id), request=request, client=client, **fields
    )


async def _start(
    conversation: Conversation,
    started: StartedReply,
    request: ChatRequest | None,
    messages: list[dict],
    *,
    branched: bool,
    early=None,
):
    """Start the reply `started` created (none if it was a resent frame's), or give it to the
    generation whose request went out before it was written (`early`); returns the reply's
    generation once its request is out."""
    from conversations.upstream import get_client

    for message_id in started.interrupted:  # rare: after a crash, before the new reply
        await announce_finished(conversation.id, message_id)
    if not started.created:
        return None
    conversation = started.conversation
    if branched:
        event = events.Branched(message_id=started.assistant_message.pk)
    else:
        event = events.Created(
            messages=messages, title=conversation.title if started.titled else ""
        )

    async def announce() -> None:
        await sockets.broadcast(conversation.id, event.as_message())

    reply = started.assistant_message
    known = {
        "message_id": reply.pk,
        "created_at": reply.created_at,
        "owner_id": conversation.owner_id,
        "title": conversation.display_title,
        "retitle": started.titled,
    }
    if early is not None and early.adopt(announce=announce, **known):
        return early
    generation = _generation(conversation, request, get_client(), writer=reply.writer, **known)
    # Until its request has gone out: the database thread saves the next sends after that
    # (db_turn).
    await generation.launch(announce=announce)
    return generation


def reply_continue(*, conversation: Conversation, message_id: int | None = None) -> StartedReply:
    """Reopen the conversation's last reply, if it was cut short, to be carried on from its
    text (Message.can_continue), or written again from the start (Message.can_retry: nothing
    saved, or no partial mode for its model). The StartedReply's message has its text so far:
    none when it is written again. With `message_id` (the reply whose button was pressed), a
    page that is behind cannot carry on or rewrite a newer reply it has not seen."""
    with transaction.atomic():
        conversation = _lock(conversation)
        interrupted = liveness.mark_interrupted(conversation.messages.all())
        if conversation.messages.filter(status=Message.Status.STREAMING).exists():
            raise ReplyInProgress(
                _("A reply is still being written. Wait for it or press Stop, then send.")
            )
        reply = conversation.messages.filter(pk=_leaf_id(conversation)).first()
        if (
            reply is None
            or not (reply.can_continue or reply.can_retry)
            or (message_id is not None and reply.pk != message_id)
        ):
            raise ReplyRefused(_("There is no cut-off reply to continue."))
        rules.check_model(conversation)
        rules.check_user_limits(conversation)
        fields = {}
        # Carried on only by a model with partial mode (the chat's model may have changed
        # since): otherwise written again from the start.
        if not (reply.can_continue and conversation.model.partial_mode):
            fields = {"content": "", "reasoning": "", "request_id": "", "tool_steps": [],
                      "input_tokens": None, "output_tokens": None, "reasoning_tokens": None,
                      "cost": None, "cost_currency": ""}  # fmt: skip
        conversation.messages.filter(pk=reply.pk).update(
            status=Message.Status.STREAMING,
            writer=uuid.uuid4(),  # an earlier generation of this reply can write no more
            model=conversation.model.name,
            finish_reason="",
            error_code="",
            error_message="",
            completed_at=None,
            updated_at=timezone.now(),
            **fields,
        )
        reply.refresh_from_db()
        user_message = conversation.messages.filter(pk=reply.parent_id).first()
    return StartedReply(
        conversation, user_message, reply, created=True, interrupted=tuple(interrupted)
    )


async def areply_continue(
    *, conversation: Conversation, message_id: int | None = None
) -> StartedReply:
    """Carry on a reply that was cut short, appending to the same message (or write it again
    in place, when it has no text to carry on from)."""
    from conversations.replies.generation import Generation
    from conversations.upstream import get_client

    continued = await db_async(reply_continue)(conversation=conversation, message_id=message_id)
    for message_id in continued.interrupted:
        await announce_finished(conversation.id, message_id)
    reply = continued.assistant_message
    request = await db_async(prompt.build_request)(
        conversation=continued.conversation, reply_to=reply, partial=bool(reply.content)
    )

    async def announce() -> None:
        await sockets.broadcast(conversation.id, events.Continued(message_id=reply.pk).as_message())

    # A generation of this reply may still run somewhere (taken for dead by a sweep while the
    # database was away): it stops, and its saves change nothing now (Message.writer).
    retire = events.Retire(message_id=reply.pk, writer=str(reply.writer))
    try:
        await control.ask(conversation.id, retire)
    except Exception:
        logger.warning("Retiring earlier generations of reply %s failed", reply.pk, exc_info=True)

    generation = Generation(
        message_id=reply.pk,
        writer=reply.writer,
        conversation_id=str(conversation.id),
        request=request,
        client=get_client(),
        text=reply.content,
        reasoning=reply.reasoning,
        published=len(reply.content),
        reasoning_published=len(reply.reasoning),
        earlier_input_tokens=reply.input_tokens or 0,
        earlier_output_tokens=reply.output_tokens or 0,
        earlier_reasoning_tokens=reply.reasoning_tokens or 0,
        earlier_cost=reply.cost,
        earlier_cost_currency=reply.cost_currency,
        created_at=reply.created_at,
        owner_id=continued.conversation.owner_id,
        title=continued.conversation.display_title,
    )
    await generation.start(announce=announce)
    return continued


async def areply_stop(*, conversation: Conversation) -> list[int]:
    """Ask the conversation's running reply to stop, in whichever process it runs (every
    process hears the replies' control group: control.py). Returns the replies asked;
    raises StopUndelivered when the channel layer could not carry the request to one (it
    runs on)."""
    message_ids = await db_async(
        lambda: list(
            conversation.messages.filter(status=Message.Status.STREAMING).values_list(
                "pk", flat=True
            )
        )
    )()
    from conversations.replies import generation

    undelivered = False
    for message_id in message_ids:
        local = generation.running(message_id)
        if local is not None:  # this process's: no need of Redis to stop it
            local.stop()
            continue
        try:
            await control.ask(conversation.id, events.Stop(message_id=message_id))
        except Exception:
            logger.warning("Asking reply %s to stop failed", message_id, exc_info=True)
            undelivered = True
    if undelivered:
        raise StopUndelivered(
            _("Stop did not reach the reply: this server is out of touch with the others for "
              "a moment. Press Stop again shortly.")
        )  # fmt: skip
    return message_ids


async def areply_abandon(*, conversation: Conversation, message_id: int) -> bool:
    """Mark a streaming reply that no generation answers for as `interrupted` (its last
    checkpoint of text is kept) and tell every socket. False when it is alive or over."""
    from conversations.replies import generation

    if generation.running(message_id) is not None:
        return False

    def mark() -> list[int]:
        after = timezone.now() - timedelta(seconds=liveness.ABANDON_AFTER_SECONDS)
        return liveness.mark_interrupted(
            conversation.messages.filter(pk=message_id), saved_before=after
        )

    if not await db_async(mark)():
        return False
    await announce_finished(conversation.id, message_id)
    return True


async def announce_finished(conversation_id, message_id: int) -> None:
    await sockets.broadcast(conversation_id, events.Finished(message_id=message_id).as_message())
