"""The message tree on its own (conversations/replies/branches.py): no database."""

from conversations.replies.branches import Tree, Versions


def tree() -> Tree:
    # 1 user → 2 reply → 3 user → 4 reply; 5 regenerates 4; 6 edits 3 with its reply 7;
    # 8 edits the first message (a root) with its reply 9.
    return Tree({1: None, 2: 1, 3: 2, 4: 3, 5: 3, 6: 2, 7: 6, 8: None, 9: 8})


def test_the_path_runs_from_the_first_message_to_the_leaf():
    assert tree().path(5) == [1, 2, 3, 5]
    assert tree().path(7) == [1, 2, 6, 7]
    assert tree().path(None) == []
    assert tree().path(99) == []


def test_versions_are_siblings_numbered_in_the_order_they_were_written():
    t = tree()
    assert t.siblings(4) == [4, 5]
    assert t.versions(5) == Versions(index=2, count=2)
    assert t.versions(6) == Versions(index=2, count=2)
    assert t.versions(8) == Versions(index=2, count=2), "a first message's versions are roots"
    assert t.versions(2) == Versions(index=1, count=1)
    assert not Versions(1, 2).has_previous and Versions(1, 2).has_next


def test_switching_lands_on_the_version_last_shown_else_the_newest():
    t = tree()
    assert t.leaf_under(1) == 7  # under 2, the edit (6) is newer than 3
    assert t.leaf_under(3) == 5
    assert t.leaf_under(9) == 9
    # The reader had version 1 of the last reply (4) on screen, then went elsewhere.
    choices = t.remember(4, {})
    assert choices == {"2": 3, "3": 4}
    assert t.leaf_under(1, choices) == 4
    assert t.leaf_under(1, {"2": 3, "3": 999}) == 5, "a version deleted since: the newest"


def test_the_leaf_is_the_current_message_or_else_the_newest():
    assert tree().leaf(4) == 4
    assert tree().leaf(None) == 9
    assert tree().leaf(42) == 9, "a current message deleted since"
    assert Tree({}).leaf(None) is None
