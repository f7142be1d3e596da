"""A conversation's messages as a tree, and the branch of it that is shown and sent.

Every message has a parent: the message before it on its branch (None for a first message).
A reply answers its parent; Regenerate adds a reply beside it (same parent), and editing a
message adds a message beside that one (same parent) with a reply of its own, so the turns
that followed the old version stay on their own branch. Messages with the same parent are
*versions* of one another, numbered 1..n in the order they were written.

`Conversation.current_message` is the leaf of the active branch: the path from the first
message down to it is what the chat shows and what DashScope is sent. Switching a version
moves the leaf under the chosen version: at each fork below it, to the version shown there
when the reader left it (`Conversation.branch_choices`), else to the newest.

A child is always written after its parent, so pks grow along every path: "the messages of
the branch before pk N" is a plain comparison, and the leaf is the branch's largest pk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from conversations.models import Conversation, Message


@dataclass(frozen=True)
class Versions:
    """Where a message stands among its versions: `index` of `count`, from 1."""

    index: int
    count: int

    @property
    def has_previous(self) -> bool:
        return self.index > 1

    @property
    def has_next(self) -> bool:
        return self.index < self.count


@dataclass
class Tree:
    """The shape of one conversation: pk -> parent pk, nothing else (cheap to load whole)."""

    parents: dict[int, int | None]

    @cached_property
    def children(self) -> dict[int | None, list[int]]:
        """parent pk -> its children's pks, oldest first (made when first asked: a request's
        history needs only a path)."""
        children: dict[int | None, list[int]] = {}
        for pk in sorted(self.parents):
            children.setdefault(self.parents[pk], []).append(pk)
        return children

    def __contains__(self, pk: object) -> bool:
        return pk in self.parents

    def path(self, leaf: int | None) -> list[int]:
        """The pks from the first message down to `leaf`, in order."""
        path = []
        while leaf is not None and leaf in self.parents:
            path.append(leaf)
            leaf = self.parents[leaf]
        path.reverse()
        return path

    def siblings(self, pk: int) -> list[int]:
        """`pk` and its other versions, oldest first."""
        return self.children.get(self.parents[pk], [])

    def versions(self, pk: int) -> Versions:
        siblings = self.siblings(pk)
        return Versions(index=siblings.index(pk) + 1, count=len(siblings))

    def leaf_under(self, pk: int, choices: dict[str, int] | None = None) -> int:
        """Down from `pk` to a leaf: at each fork to the version last seen there (`choices`,
        parent pk as text -> child pk: see remember), else to the newest."""
        choices = choices or {}
        while kids := self.children.get(pk):
            chosen = choices.get(str(pk))
            pk = chosen if chosen in kids else kids[-1]
        return pk

    def remember(self, leaf: int | None, choices: dict[str, int]) -> dict[str, int]:
        """`choices` with the forks of the branch ending at `leaf` added: which version was
        shown at each, so that coming back to it later shows what was left."""
        choices = dict(choices)
        path = self.path(leaf)
        for parent, child in zip(path, path[1:], strict=False):
            if len(self.children[parent]) > 1:
                choices[str(parent)] = child
        return choices

    def leaf(self, current: int | None) -> int | None:
        """The active branch's leaf: the conversation's current message, or (a conversation
        whose current message is unknown or gone) the newest message of all."""
        if current in self.parents:
            return current
        return max(self.parents) if self.parents else None


def load(conversation: Conversation | str) -> Tree:
    conversation_id = getattr(conversation, "pk", conversation)
    rows = Message.objects.filter(conversation_id=conversation_id).values_list("pk", "parent_id")
    return Tree(dict(rows))


def active_path(conversation: Conversation, tree: Tree | None = None) -> list[int]:
    tree = tree or load(conversation)
    return tree.path(tree.leaf(conversation.current_message_id))


def with_versions(messages: list[Message], tree: Tree) -> list[Message]:
    """Tell each message where it stands among its versions (Message.versions, for the
    switcher), without a query."""
    for message in messages:
        if message.pk in tree:
            message.versions = tree.versions(message.pk)
    return messages


def page(
    conversation: Conversation, *, before: int | None = None, size: int, leaf: int | None = None
) -> dict:
    """The active branch's last `size` messages (before pk `before`), oldest first, with their
    images and versions, and where the earlier ones begin (`earlier_before`: None when there
    are none): what the chat page shows, and what a socket sends when the branch changes.
    With `leaf`, the branch that ends there instead (a shared snapshot's). Three queries
    whatever the conversation's size."""
    from conversations.models import MessageImage

    tree = load(conversation)
    path = tree.path(leaf) if leaf is not None else active_path(conversation, tree)
    if before is not None:
        path = [pk for pk in path if pk < before]
    shown = path[-size:]
    messages = list(Message.objects.filter(pk__in=shown).order_by("pk"))
    images: dict[int, list[MessageImage]] = {}
    user_messages = [m.pk for m in messages if m.role == Message.Role.USER]
    for image in MessageImage.objects.filter(message__in=user_messages) if user_messages else ():
        images.setdefault(image.message_id, []).append(image)
    for message in messages:
        message.image_list = images.get(message.pk, [])
    return {
        "chat_messages": with_versions(messages, tree),
        "earlier_before": shown[0] if len(path) > len(shown) else None,
    }


def link_in_order(conversation: Conversation) -> None:
    """Make the conversation's messages one branch, in the order they were written, ending at
    the newest: for messages written in bulk (an import, a fixture), which Message.save does
    not place."""
    pks = list(
        Message.objects.filter(conversation=conversation)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    Message.objects.bulk_update(
        [Message(pk=pk, parent_id=parent) for parent, pk in zip(pks, pks[1:], strict=False)],
        ["parent"],
        batch_size=500,
    )
    Conversation.objects.filter(pk=conversation.pk).update(
        current_message_id=pks[-1] if pks else None
    )
    conversation.current_message_id = pks[-1] if pks else None
