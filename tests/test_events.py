"""The channel-layer events (conversations/replies/events.py): each type's message is exactly
what processes of the previous release send and expect, so a rolling restart, with old and
new processes side by side, loses nothing."""

from __future__ import annotations

import msgpack

from conversations.replies import events


def test_every_event_is_the_message_the_previous_release_carried():
    assert events.Created(messages=[{"pk": 1}], title="Hi").as_message() == {
        "type": "conversation.created", "messages": [{"pk": 1}], "title": "Hi",
    }  # fmt: skip
    assert events.Continued(message_id=7).as_message() == {
        "type": "conversation.continued", "message_id": 7,
    }  # fmt: skip
    assert events.Branched(message_id=7).as_message() == {
        "type": "conversation.branched", "message_id": 7,
    }  # fmt: skip
    assert events.Branched().as_message() == {"type": "conversation.branched"}
    assert events.ToolSteps(message_id=7, steps=[{"end": 0}]).as_message() == {
        "type": "conversation.tools", "message_id": 7, "steps": [{"end": 0}],
    }  # fmt: skip
    assert events.Delta(message_id=7, part="text", offset=3, text="abc").as_message() == {
        "type": "conversation.delta", "message_id": 7, "part": "text", "offset": 3,
        "text": "abc",
    }  # fmt: skip
    # Without the message, no "message" key: a socket then reads the reply from the database.
    assert events.Finished(message_id=7).as_message() == {
        "type": "conversation.finished", "message_id": 7,
    }  # fmt: skip
    assert events.Finished(message_id=7, message={"pk": 7}).as_message()["message"] == {"pk": 7}
    assert events.Snapshot(message_id=7, text="so far").as_message() == {
        "type": "conversation.snapshot", "message_id": 7, "text": "so far", "reasoning": "",
    }  # fmt: skip
    assert events.SessionEnded(session="").as_message() == {"type": "session.ended", "session": ""}
    assert events.Stop(message_id=7).as_message() == {"type": "generation.stop", "message_id": 7}
    assert events.Sync(message_id=7, reply_channel="c!1", process="p").as_message() == {
        "type": "generation.sync", "message_id": 7, "reply_channel": "c!1", "process": "p",
    }  # fmt: skip
    assert events.Watch(message_id=7, process="p").as_message() == {
        "type": "generation.watch", "message_id": 7, "process": "p",
    }  # fmt: skip
    assert events.Retire(message_id=7, writer="w").as_message() == {
        "type": "generation.retire", "message_id": 7, "writer": "w",
    }  # fmt: skip


def test_every_event_survives_the_redis_layer_packing():
    """channels-redis packs messages with msgpack: plain values only."""
    for event in [
        events.Created(messages=[{"pk": 1, "content": "é"}]),
        events.Delta(message_id=1, part="reasoning", offset=0, text="…"),
        events.Finished(message_id=1, message={"pk": 1, "input_tokens": None}),
    ]:
        message = event.as_message()
        assert msgpack.unpackb(msgpack.packb(message)) == message


def test_group_names_are_what_the_layer_accepts():
    import re

    for name in [events.group("0f8a-11"), events.control_group("0f8a-11"), events.user_group(5)]:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,99}", name)
    assert len(events.session_tag("a" * 32)) == 32
    assert events.session_tag("k1") != events.session_tag("k2")


def test_an_event_keeps_what_it_was_made_with():
    """A generation goes on adding to its tool steps after it has announced them; an event
    already on its way shows the steps as they were."""
    steps = [{"end": 4, "calls": [{"id": "call_1", "function": {"name": "get_current_time"}}]}]
    message = events.ToolSteps(message_id=7, steps=steps).as_message()
    steps[0]["calls"].append({"id": "call_2"})
    steps[0]["results"] = []
    steps.append({"end": 9, "calls": []})
    assert message == {
        "type": "conversation.tools",
        "message_id": 7,
        "steps": [
            {"end": 4, "calls": [{"id": "call_1", "function": {"name": "get_current_time"}}]}
        ],
    }
