"""rules.MessageForm: one validation for a message, whether it comes from the home page's form
or a socket's frame."""

import uuid

import pytest
from django.http import QueryDict

from conversations.models import ModelProfile
from conversations.replies.rules import MessageForm, ReplyRefused


def test_a_form_post_and_a_socket_frame_are_cleaned_alike():
    post = QueryDict(mutable=True)
    post.update(
        {"content": "\n  look at this\n", "image_urls": "https://e.com/a.png https://e.com/b.png"}
    )
    frame = {
        "content": "\n  look at this\n",
        "image_urls": ["https://e.com/a.png", "https://e.com/b.png"],
    }
    assert (
        MessageForm(post).valid()
        == MessageForm(frame).valid()
        == {
            "content": "  look at this",
            "image_urls": ["https://e.com/a.png", "https://e.com/b.png"],
            "image_ids": [],
            "client_message_id": None,
        }
    )
    # The uploads a send names: numbers from a socket, their digits from a form.
    assert MessageForm({"content": "x", "image_ids": [3, "4", 3]}).valid()["image_ids"] == [3, 4]
    assert MessageForm({"content": "x", "image_ids": "7"}).valid()["image_ids"] == [7]
    refused = MessageForm({"content": "x", "image_ids": ["abc"]})
    assert not refused.is_valid() and "is gone" in str(refused.refusal())
    too_many = MessageForm(
        {"content": "x", "image_urls": "https://e.com/a.png", "image_ids": [1, 2, 3, 4]}
    )
    assert not too_many.is_valid() and "At most 4 images" in str(too_many.refusal())


@pytest.mark.parametrize(
    "data, sentence",
    [
        ({"content": "   "}, "Type a message first."),
        ({"content": 42}, "Type a message first."),
        ({"content": "hi", "image_urls": "ftp://e.com/a.png"}, "is not an image URL"),
        ({"content": "hi", "image_urls": {"a": 1}}, "Image URLs must be text"),
    ],
)
def test_a_bad_message_is_refused_with_the_sentence_beside_its_field(data, sentence):
    form = MessageForm(data)
    assert not form.is_valid()
    with pytest.raises(ReplyRefused, match=sentence):
        form.valid()


@pytest.mark.django_db
def test_images_for_a_model_that_cannot_see_are_refused():
    text_model = ModelProfile.objects.get(name="qwen-plus")
    form = MessageForm({"content": "hi", "image_urls": "https://e.com/a.png"}, model=text_model)
    assert "cannot see images" in str(form.refusal()) and not form.is_valid()
    vision = ModelProfile.objects.filter(endpoint="multimodal").first()
    assert MessageForm(
        {"content": "hi", "image_urls": "https://e.com/a.png"}, model=vision
    ).is_valid()


def test_the_client_message_id_is_kept_or_else_none():
    sent = uuid.uuid4()
    assert (
        MessageForm({"content": "x", "client_message_id": str(sent)}).valid()["client_message_id"]
        == sent
    )
    assert (
        MessageForm({"content": "x", "client_message_id": "nope"}).valid()["client_message_id"]
        is None
    )


def test_a_frames_ids_are_read_leniently_and_invalid_ones_count_as_none():
    import uuid

    from conversations.replies import rules

    assert rules.clean_message_id(12) == 12
    assert rules.clean_message_id("12") == 12, "htmx's ws-send sends fields as text"
    # A number no database column holds is no id either (it would overflow the query).
    for bad in ("12a", "-3", "", None, 1.5, "9" * 19, [1], 0, -3, 2**63, 2**70, True):
        assert rules.clean_message_id(bad) is None, bad
    value = uuid.uuid4()
    assert rules.clean_client_message_id(str(value)) == value
    assert rules.clean_client_message_id("not-a-uuid") is None
    assert rules.clean_client_message_id(None) is None
