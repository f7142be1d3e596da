"""What DashScope is sent for a reply (conversations/replies/prompt.py): the system prompt as
the chat keeps it, the reply's own branch, trimmed to the model's context, images for a vision
model, the tools, and the chat's settings as parameters."""

import pytest
from django.contrib.auth import get_user_model

from conversations.models import Message, MessageImage, ModelProfile, SystemPrompt
from conversations.replies import prompt, service, tools

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return get_user_model().objects.create_user("dora", password="pw")


def add(conversation, role, content, **fields):
    return Message.objects.create(conversation=conversation, role=role, content=content, **fields)


def test_request_has_system_prompt_then_history_ending_with_the_user(user):
    conversation = service.conversation_create(owner=user)
    add(conversation, "user", "first")
    add(conversation, "assistant", "first answer")
    add(conversation, "user", "second")
    placeholder = add(conversation, "assistant", "", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=placeholder)
    assert request.model == "qwen-plus"
    assert request.endpoint == "text"
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", SystemPrompt.objects.get(is_default=True).text),
        ("user", "first"),
        ("assistant", "first answer"),
        ("user", "second"),
    ]


def test_failed_empty_replies_are_left_out(user):
    conversation = service.conversation_create(owner=user)
    add(conversation, "user", "first")
    add(conversation, "assistant", "", status="error")
    add(conversation, "user", "again")
    placeholder = add(conversation, "assistant", "", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=placeholder)
    assert [m.role for m in request.messages][1:] == ["user", "user"]


def test_history_is_trimmed_from_the_oldest_turn_to_fit_the_context(user):
    profile = ModelProfile.objects.get(name="qwen-plus")
    profile.context_limit, profile.max_output_tokens = 1000, 100
    profile.save()
    conversation = service.conversation_create(owner=user, model=profile)
    add(conversation, "user", "old " * 300)
    add(conversation, "assistant", "old answer " * 100)
    add(conversation, "user", "recent question")
    placeholder = add(conversation, "assistant", "", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=placeholder)
    contents = [m.content for m in request.messages if m.role != "system"]
    assert contents == ["recent question"]
    assert request.parameters["max_tokens"] == 100


def test_multimodal_model_sends_image_urls(user):
    profile = ModelProfile.objects.get(name="qwen3-vl-plus")
    conversation = service.conversation_create(owner=user, model=profile)
    question = add(conversation, "user", "What is this?")
    MessageImage.objects.create(message=question, url="https://example.com/cat.png")
    placeholder = add(conversation, "assistant", "", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=placeholder)
    assert request.endpoint == "multimodal"
    assert request.messages[-1].images == ["https://example.com/cat.png"]


def test_only_the_uploads_of_the_turns_kept_are_read(user):
    """Uploads go inline (base64), so each costs its file: a long chat's old images, trimmed
    away, are never read. Their files are gone here, and the request is built regardless."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from conversations import uploads
    from tests.image_server import png

    profile = ModelProfile.objects.get(name="qwen3-vl-plus")
    profile.context_limit, profile.max_output_tokens = 3000, 100
    profile.save()
    conversation = service.conversation_create(owner=user, model=profile)
    saved = []
    for n in range(4):
        question = add(conversation, "user", f"picture {n}")
        image = png(8, 8, (n * 40, 0, 0))
        upload = uploads.save_upload(conversation, SimpleUploadedFile("p.png", image))
        MessageImage.objects.create(message=question, upload=upload)
        saved.append(upload)
        if n < 3:
            add(conversation, "assistant", f"answer {n}")
    for upload in saved[:2]:
        upload.file.storage.delete(upload.file.name)
    placeholder = add(conversation, "assistant", "", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=placeholder)
    turns = [m for m in request.messages if m.role != "system"]
    # An image is counted as 1,000 tokens: two fit beside the prompt, not three.
    assert [m.content for m in turns] == ["picture 2", "answer 2", "picture 3"]
    assert turns[0].images == [uploads.data_url(saved[2])]
    assert turns[2].images == [uploads.data_url(saved[3])]
    assert turns[2].images[0].startswith("data:image/png;base64,")


def test_tools_are_offered_only_to_a_model_with_tools_and_never_in_partial_mode(user):
    conversation = service.conversation_create(owner=user)
    add(conversation, "user", "What time is it?")
    reply = add(conversation, "assistant", "It is", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=reply)
    assert request.parameters["tools"] == tools.definitions()
    assert request.parameters["parallel_tool_calls"] is True
    partial = prompt.build_request(conversation=conversation, reply_to=reply, partial=True)
    assert "tools" not in partial.parameters
    assert (partial.messages[-1].role, partial.messages[-1].content) == ("assistant", "It is")
    assert partial.messages[-1].partial
    conversation.model = ModelProfile.objects.get(name="deepseek-v3")
    assert "tools" not in prompt.build_request(conversation=conversation, reply_to=reply).parameters


def test_the_admins_parameters_come_first_and_the_chats_settings_win(user):
    profile = ModelProfile.objects.get(name="qwen-plus")
    profile.parameters = {"temperature": 0.5, "top_p": 0.9}
    profile.save()
    conversation = service.conversation_create(owner=user, model=profile)
    conversation.settings = {"temperature": 1.1, "stop": ["END"]}
    add(conversation, "user", "Hi")
    reply = add(conversation, "assistant", "", status="streaming")
    parameters = prompt.build_request(conversation=conversation, reply_to=reply).parameters
    assert (parameters["temperature"], parameters["top_p"], parameters["stop"]) == (
        1.1,
        0.9,
        ["END"],
    )


def test_only_the_replys_own_branch_is_sent(user):
    conversation = service.conversation_create(owner=user)
    question = add(conversation, "user", "Q")
    add(conversation, "assistant", "first version", parent_id=question.pk)
    second = add(conversation, "assistant", "", status="streaming", parent_id=question.pk)
    request = prompt.build_request(conversation=conversation, reply_to=second)
    assert [m.content for m in request.messages if m.role != "system"] == ["Q"]


def test_no_system_message_when_the_chat_has_no_prompt(user):
    conversation = service.conversation_create(owner=user)
    conversation.system_prompt = None
    add(conversation, "user", "Hi")
    reply = add(conversation, "assistant", "", status="streaming")
    request = prompt.build_request(conversation=conversation, reply_to=reply)
    assert [m.role for m in request.messages] == ["user"]
    assert SystemPrompt.objects.exists()
