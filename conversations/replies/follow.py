"""What one socket has shown of a conversation, and how it catches up on what it has not.

A reply's text reaches a page as deltas, each carrying its offset (conversations/sockets.py);
a socket turns them into lean frames (`+<pk>:<text>`, `~<pk>:<text>` for the model's
thinking). To send each character exactly once it keeps, per reply it follows, how far the
page shows it, or None while a snapshot that says where the reply stands is on its way (after
a gap, a reconnect, or the announcement of a reply running elsewhere). It also keeps which
messages are on the page and their places among their versions, when each followed reply was
last heard of (one gone quiet is looked up: its end may have been lost with the channel
layer), and when the page's last hello was answered.

`Follow` and `HelloThrottle` do no I/O: the consumer asks them what to do, does it, and the
rules are unit-tested without a websocket (tests/test_follow.py). The queries at the end are
the reads a socket catches up with.
"""

from __future__ import annotations

from conversations.db import db_async
from conversations.models import Conversation, Message
from conversations.replies import branches

# At most this many messages are sent to a page catching up (the rest are a reload away).
MAX_CATCH_UP_MESSAGES = 100
# A hello names the replies a page shows as streaming: a page has one or two.
MAX_HELLO_IDS = 20


class Gap:
    """A delta starts beyond what the page shows: frames went missing (a full channel drops
    messages), so the socket asks for a snapshot instead of showing it."""

    def __repr__(self) -> str:
        return "GAP"


GAP = Gap()


class Follow:
    def __init__(self) -> None:
        # message pk -> characters of its text shown, or None while awaiting a snapshot.
        self._text: dict[int, int | None] = {}
        self._reasoning: dict[int, int] = {}  # the same for the model's thinking
        self._last_target: dict[str, int] = {}  # where the last lean frame of a kind went
        self._on_page: set[int] = set()
        self._versions: dict[int, object] = {}  # messages' places among their versions
        self._heard: dict[int, float] = {}  # pk -> when the socket last had word of it

    # -- the replies it follows -----------------------------------------------------------------

    def following(self) -> list[int]:
        return list(self._text)

    def follows(self, pk: int) -> bool:
        return pk in self._text

    def in_step(self, pk: int) -> bool:
        """Followed, and not waiting for a snapshot: a delta can be shown."""
        return self._text.get(pk) is not None

    def awaiting(self, pk: int) -> bool:
        return pk in self._text and self._text[pk] is None

    def await_snapshot(self, pk: int, *, force: bool = False) -> bool:
        """Wait for a snapshot of `pk`; False (nothing to ask) when it is followed already,
        unless `force` (a gap, or a page that needs the reply again)."""
        if not force and pk in self._text:
            return False
        self._text[pk] = None
        return True

    def follow(self, message: Message, *, unless_followed: bool = False) -> None:
        """Follow `message` from the text the page shows of it now. `unless_followed`: keep
        what is known already (an announcement arriving after the reply's first deltas, or
        while its snapshot is on its way)."""
        if unless_followed and message.pk in self._text:
            return
        self._text[message.pk] = len(message.content)
        self._reasoning[message.pk] = len(message.reasoning)

    def shown(self, pk: int) -> int | None:
        """How many characters of the reply's text the page has, if it is in step."""
        return self._text.get(pk)

    def end(self, pk: int) -> None:
        """The reply ended (or is gone): its deltas are no longer shown."""
        self._text.pop(pk, None)
        self._reasoning.pop(pk, None)
        self._heard.pop(pk, None)

    def delta(self, pk: int, offset: int, text: str, part: str | None, now: float):
        """The frame that shows what the page lacks of this delta; None when the page has
        it all already; GAP when the delta starts beyond the page (the reply then awaits a
        snapshot). Call only for a reply `in_step`."""
        self._heard[pk] = now
        thinking = part == "reasoning"
        counts = self._reasoning if thinking else self._text
        shown = counts.get(pk) or 0
        end = offset + len(text)
        if end <= shown:
            return None
        if offset > shown:
            self._text[pk] = None
            return GAP
        counts[pk] = end
        marker = "~" if thinking else "+"
        # The pk only when it changes: most frames are `+:<text>`, a few bytes saved on each
        # of a reply's hundreds of frames.
        target = "" if self._last_target.get(marker) == pk else str(pk)
        self._last_target[marker] = pk
        return f"{marker}{target}:{text[shown - offset :]}"

    def quiet(self, now: float, after: float) -> list[int]:
        """Followed replies not heard of for `after` seconds; each counts as heard now (asked
        about again only after another `after`)."""
        for pk in [pk for pk in self._heard if pk not in self._text]:
            del self._heard[pk]
        gone_quiet = []
        for pk in self._text:
            if now - self._heard.setdefault(pk, now) >= after:
                self._heard[pk] = now
                gone_quiet.append(pk)
        return gone_quiet

    # -- the page ---------------------------------------------------------------------------------

    def put_on_page(self, messages: list[Message]) -> None:
        """Note what is on the page, and carry each message's place among its versions over
        to a later rendering that does not know it (a reply's end comes from its generation,
        which does not)."""
        for message in messages:
            self._on_page.add(message.pk)
            if message.versions is not None:
                self._versions[message.pk] = message.versions
            elif message.pk in self._versions:
                message.versions = self._versions[message.pk]

    def on_page(self, pk: int) -> bool:
        return pk in self._on_page

    def page(self) -> frozenset[int]:
        return frozenset(self._on_page)

    def clear_page(self) -> None:
        """The page's messages are about to be replaced (another branch shown)."""
        self._on_page = set()


class HelloThrottle:
    """A page sends one hello per (re)connect, and each answer may render many messages: the
    first is answered at once, more within `interval` once at its end, with the latest
    arguments."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._answered_at = float("-inf")
        self._waiting: tuple | None = None

    def offer(self, request: tuple, now: float) -> float | None:
        """0: answer `request` now. A positive delay: answer `take()` after it. None: an
        answer is already scheduled, and will answer this request instead."""
        if self._waiting is not None:
            self._waiting = request
            return None
        wait = self._answered_at + self.interval - now
        if wait <= 0:
            self._answered_at = now
            return 0.0
        self._waiting = request
        return wait

    def take(self, now: float) -> tuple:
        request, self._waiting = self._waiting, None
        self._answered_at = now
        return request


def hello_request(streaming: object, last: object) -> tuple[list[int], int | None]:
    """A hello's arguments, cleaned: at most MAX_HELLO_IDS reply pks (repeats once), and the
    newest message the page has."""
    ids = []
    if isinstance(streaming, list):
        ids = list(dict.fromkeys(value for value in streaming if type(value) is int))
    return ids[:MAX_HELLO_IDS], last if type(last) is int else None


# -- the reads a socket catches up with ------------------------------------------------------------
# db_async rather than the ORM's a… methods: see conversations/db.py.


@db_async
def message(conversation: Conversation, pk: int) -> Message | None:
    found = conversation.messages.filter(pk=pk).prefetch_related("images").first()
    if found is not None:
        branches.with_versions([found], branches.load(conversation))
    return found


@db_async
def messages_after(conversation: Conversation, pk: int, exclude) -> list[Message] | None:
    """The active branch's messages after `pk`, the newest a page has, but those in
    `exclude`; None when `pk` is not on the active branch (the page shows another one)."""
    conversation.refresh_from_db(fields=["current_message"])
    tree = branches.load(conversation)
    path = branches.active_path(conversation, tree)
    if pk and pk not in path and pk in tree:
        return None
    after = [p for p in path if p > pk and p not in exclude][:MAX_CATCH_UP_MESSAGES]
    found = list(
        conversation.messages.filter(pk__in=after).prefetch_related("images").order_by("pk")
    )
    return branches.with_versions(found, tree)


@db_async
def branch_page(conversation: Conversation) -> dict:
    """What a reload would show: the active branch's newest messages, with their versions."""
    conversation.refresh_from_db(fields=["current_message"])
    return branches.page(conversation, size=MAX_CATCH_UP_MESSAGES)


@db_async
def streaming_ids(conversation: Conversation) -> list[int]:
    return list(
        conversation.messages.filter(status=Message.Status.STREAMING).values_list("pk", flat=True)
    )
