"""What one socket has shown, on its own (conversations/replies/follow.py): no websocket."""

import pytest

from conversations.models import Message
from conversations.replies import follow
from conversations.replies.branches import Versions
from conversations.replies.follow import GAP, Follow, HelloThrottle


def reply(pk: int, content: str = "", reasoning: str = "", **fields) -> Message:
    return Message(pk=pk, role="assistant", content=content, reasoning=reasoning, **fields)


def test_each_character_is_shown_once_and_the_pk_only_when_the_target_changes():
    f = Follow()
    f.follow(reply(7, "Hel"))
    assert f.delta(7, 0, "Hello", "text", now=0) == "+7:lo", "only what the page lacks"
    assert f.delta(7, 5, " world", "text", now=0) == "+: world", "same reply: no pk"
    assert f.delta(7, 3, "lo wor", "text", now=0) is None, "all of it shown already"
    f.follow(reply(9))
    assert f.delta(9, 0, "Hi", "text", now=0) == "+9:Hi"
    assert f.delta(7, 11, "!", "text", now=0) == "+7:!"


def test_thinking_is_counted_apart_and_sent_in_its_own_frames():
    f = Follow()
    f.follow(reply(7, "", "Let me"))
    assert f.delta(7, 6, " think", "reasoning", now=0) == "~7: think"
    assert f.delta(7, 0, "Answer", "text", now=0) == "+7:Answer", "the text's own count"
    assert f.delta(7, 12, ".", "reasoning", now=0) == "~:."


def test_a_gap_asks_for_a_snapshot_and_nothing_is_shown_until_it_comes():
    f = Follow()
    f.follow(reply(7, "abc"))
    assert f.delta(7, 10, "xyz", "text", now=0) is GAP
    assert f.awaiting(7) and not f.in_step(7)
    assert not f.await_snapshot(7), "waiting already: nothing more to ask"
    snapshot = reply(7, "abcdefghijxyz")
    f.follow(snapshot)
    assert f.in_step(7)
    assert f.delta(7, 10, "xyz!", "text", now=0) == "+7:!"


def test_a_reply_it_does_not_follow_is_asked_for_once_unless_forced():
    f = Follow()
    assert not f.follows(3)
    assert f.await_snapshot(3)
    assert f.follows(3) and f.awaiting(3)
    f.follow(reply(3, "done so far"))
    assert not f.await_snapshot(3), "followed and in step"
    assert f.await_snapshot(3, force=True) and f.awaiting(3)


def test_an_announcement_after_the_snapshot_request_keeps_what_is_known():
    f = Follow()
    f.await_snapshot(5)
    f.follow(reply(5, "Hello"), unless_followed=True)
    assert f.awaiting(5), "the snapshot on its way says where the reply stands"
    f.follow(reply(6, "Hi"), unless_followed=True)
    assert f.delta(6, 0, "Hi there", "text", now=0) == "+6: there"


def test_an_ended_reply_is_no_longer_followed():
    f = Follow()
    f.follow(reply(7, "x"))
    f.end(7)
    assert not f.follows(7) and not f.in_step(7)
    assert f.following() == []


def test_a_reply_gone_quiet_is_reported_once_per_interval():
    f = Follow()
    f.follow(reply(1))
    f.follow(reply(2))
    assert f.quiet(now=100, after=10) == [], "first seen now"
    f.delta(2, 0, "x", "text", now=105)
    assert f.quiet(now=110, after=10) == [1], "2 was heard of 5 s ago"
    assert f.quiet(now=115, after=10) == [2]
    assert f.quiet(now=116, after=10) == [], "asked about again only after another interval"
    f.end(1)
    assert f.quiet(now=200, after=10) == [2]
    assert f.following() == [2]


def test_the_page_remembers_places_among_versions_for_a_rendering_that_lacks_them():
    f = Follow()
    shown = reply(4)
    shown.versions = Versions(index=2, count=2)
    f.put_on_page([shown, reply(5)])
    assert f.on_page(4) and f.on_page(5) and f.page() == {4, 5}
    ended = reply(4, "The end.")  # from the generation, which knows nothing of versions
    assert ended.versions is None
    f.put_on_page([ended])
    assert ended.versions == Versions(index=2, count=2)
    f.clear_page()
    assert not f.on_page(4) and f.page() == frozenset()


def test_hellos_are_answered_at_once_then_once_per_interval_with_the_latest():
    hellos = HelloThrottle(interval=1.0)
    assert hellos.offer(([1], 10), now=50.0) == 0, "the first at once"
    assert hellos.offer(([2], 11), now=50.25) == pytest.approx(0.75)
    assert hellos.offer(([3], 12), now=50.5) is None, "one answer is scheduled already"
    assert hellos.take(now=51.0) == ([3], 12), "the latest arguments"
    assert hellos.offer(([4], 13), now=52.5) == 0


def test_a_hellos_arguments_are_cleaned():
    assert follow.hello_request([3, 3, "4", None, 5.0, True, 6], 9) == ([3, 6], 9)
    assert follow.hello_request(list(range(100)), "9") == (list(range(20)), None)
    assert follow.hello_request("1,2", None) == ([], None)
