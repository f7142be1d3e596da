"""A chat's settings (conversations/replies/options.py, POST /c/<uuid>/settings/): validated on
the server, saved on the conversation, restored on reload, sent as the reference names them in
both protocols, and refused for a model without the capability."""

from __future__ import annotations

import html
import json
import re

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from conversations.models import Conversation, Message, ModelProfile, SystemPrompt
from conversations.replies import options, prompt
from conversations.replies.service import conversation_create
from tests.ws_support import (
    Transcript,
    assistant_reply,
    open_chat,
    receive_until,
    send_frame,
    wait_for_status,
)

EVERY_SETTING = {
    "temperature": "0.7",
    "top_p": "0.8",
    "top_k": "20",
    "max_tokens": "1024",
    "seed": "42",
    "stop": "END\r\nSTOP HERE",
    "presence_penalty": "0.5",
    "repetition_penalty": "1.05",
    "enable_search": "on",
    "enable_thinking": "off",
    "json_output": "on",
}
EXPECTED_PARAMETERS = {
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "max_tokens": 1024,
    "seed": 42,
    "stop": ["END", "STOP HERE"],
    "presence_penalty": 0.5,
    "repetition_penalty": 1.05,
    "enable_search": True,
    "search_options": {"enable_source": True},
    "enable_thinking": False,
    "response_format": {"type": "json_object"},
}
OUT_OF_RANGE = [
    ("temperature", "2"),
    ("temperature", "-0.1"),
    ("temperature", "warm"),
    ("temperature", "nan"),
    ("top_p", "0"),
    ("top_p", "1.01"),
    ("top_k", "-1"),
    ("top_k", "2.5"),
    ("max_tokens", "0"),
    ("max_tokens", "32769"),  # Qwen-Plus writes at most 32,768
    ("seed", "-1"),
    ("seed", str(2**31)),
    ("stop", "a\nb\nc\nd\ne"),
    ("stop", "x" * 101),
    ("presence_penalty", "2.5"),
    ("presence_penalty", "-3"),
    ("repetition_penalty", "0"),
    ("enable_search", "maybe"),
    ("thinking_budget", "0"),
    ("system_prompt", "999999"),
    ("system_prompt", "abc"),
]


def post_settings(client, conversation, data, **headers):
    return client.post(f"/c/{conversation.id}/settings/", data, headers=headers)


@pytest.fixture
def chat(alice):
    return conversation_create(owner=alice)


@pytest.mark.django_db
def test_every_setting_is_saved_restored_on_reload_and_exported(alice_client, chat):
    response = post_settings(alice_client, chat, {**EVERY_SETTING, "open": "1"})
    assert response.status_code == 200
    assert "The next message uses these settings." in response.content.decode()
    chat.refresh_from_db()
    assert chat.settings == {
        "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 1024, "seed": 42,
        "stop": ["END", "STOP HERE"], "presence_penalty": 0.5, "repetition_penalty": 1.05,
        "enable_search": True, "enable_thinking": False, "json_output": True,
    }  # fmt: skip
    page = html.unescape(alice_client.get(f"/c/{chat.id}/").content.decode())
    assert (
        'name="temperature" id="settings-temperature" min="0" max="1.99" step="0.01" '
        'value="0.7"' in page
    )
    assert "END\nSTOP HERE</textarea>" in page
    assert 'id="settings-enable_search" checked' in page
    assert 'id="settings-json_output" checked' in page
    assert 'id="settings-enable_thinking" checked' not in page
    # The header says what is on: search, and JSON output with its condition.
    assert 'data-in-effect="search"' in page and 'data-in-effect="thinking"' not in page
    assert "JSON output: mention JSON in your message" in page
    export = json.loads(alice_client.get(f"/c/{chat.id}/export.json").content)
    assert export["settings"] == chat.settings


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_an_invalid_value_is_an_error_beside_its_field_and_changes_nothing(
    alice_client, chat, name, value
):
    post_settings(alice_client, chat, {"temperature": "0.5"})
    chat.refresh_from_db()
    before = (chat.settings, chat.system_prompt_id, chat.model_id)
    response = post_settings(
        alice_client, chat, {"top_k": "5", name: value, "open": "1"}, HX_Request="true"
    )
    assert response.status_code == 400
    page = response.content.decode()
    assert f'id="error-{name}"' in page, "the error is shown beside its field"
    chat.refresh_from_db()
    assert (chat.settings, chat.system_prompt_id, chat.model_id) == before
    assert "top_k" not in chat.settings, "nothing of an invalid post is saved"


@pytest.mark.django_db
def test_a_field_left_out_is_left_as_it_is_and_an_empty_one_goes_back_to_the_default(
    alice_client, chat
):
    post_settings(alice_client, chat, {"temperature": "0.3", "seed": "7"})
    post_settings(alice_client, chat, {"seed": ""})
    chat.refresh_from_db()
    assert chat.settings == {"temperature": 0.3}
    for value in ("on", "1", "true", "yes"):
        post_settings(alice_client, chat, {"enable_search": value})
        chat.refresh_from_db()
        assert chat.settings["enable_search"] is True, value
    # The panel posts a hidden "off" before each checkbox: the last value counts.
    post_settings(alice_client, chat, {"enable_search": ["off"]})
    chat.refresh_from_db()
    assert chat.settings["enable_search"] is False
    post_settings(alice_client, chat, {"enable_search": ["off", "on"]})
    chat.refresh_from_db()
    assert chat.settings["enable_search"] is True


@pytest.mark.django_db
def test_presets_fill_the_docs_values(alice_client, chat):
    expected = {
        "creative": (0.9, 0.95), "code": (0.2, 0.8), "factual": (0.1, 0.7),
        "translation": (0.3, 0.8),
    }  # fmt: skip
    for preset, (temperature, top_p) in expected.items():
        response = post_settings(alice_client, chat, {"preset": preset, "open": "1"})
        assert response.status_code == 200
        chat.refresh_from_db()
        assert (chat.settings["temperature"], chat.settings["top_p"]) == (temperature, top_p)
        assert f'data-preset="{preset}" aria-pressed="true"' in response.content.decode()
    # A value posted beside the preset wins over it.
    post_settings(alice_client, chat, {"preset": "code", "temperature": "0.4"})
    chat.refresh_from_db()
    assert (chat.settings["temperature"], chat.settings["top_p"]) == (0.4, 0.8)
    assert post_settings(alice_client, chat, {"preset": "poetry"}).status_code == 400


@pytest.mark.django_db
def test_a_capability_the_model_lacks_is_refused_on_the_server(alice_client, alice):
    deepseek = ModelProfile.objects.get(name="deepseek-v3")
    chat = conversation_create(owner=alice, model=deepseek)
    for name in ("enable_search", "enable_thinking", "json_output"):
        response = post_settings(alice_client, chat, {name: "on", "open": "1"})
        assert response.status_code == 400, name
        assert f'id="error-{name}"' in response.content.decode()
    assert post_settings(alice_client, chat, {"thinking_budget": "500"}).status_code == 400
    # The panel offers none of them for this model.
    page = alice_client.get(f"/c/{chat.id}/").content.decode()
    assert 'name="enable_search"' not in page and 'name="json_output"' not in page
    assert 'name="enable_thinking"' not in page
    # A model that always thinks cannot be told not to.
    chat.model = ModelProfile.objects.get(name="deepseek-r1")
    chat.save()
    response = post_settings(alice_client, chat, {"enable_thinking": "off"})
    assert response.status_code == 400
    assert "always thinks" in html.unescape(response.content.decode())
    # JSON mode and thinking do not go together.
    chat.model = ModelProfile.objects.get(name="qwen-plus")
    chat.save()
    response = post_settings(alice_client, chat, {"enable_thinking": "on", "json_output": "on"})
    assert response.status_code == 400
    chat.refresh_from_db()
    assert chat.settings == {}


@pytest.mark.django_db
def test_switching_to_a_model_without_a_capability_drops_it_and_says_so(alice_client, chat):
    post_settings(alice_client, chat, {"enable_search": "on", "temperature": "0.5"})
    response = post_settings(alice_client, chat, {"model": "deepseek-v3"}, HX_Request="true")
    assert response.status_code == 200
    chat.refresh_from_db()
    assert chat.model.name == "deepseek-v3"
    assert chat.settings == {"temperature": 0.5}
    assert "DeepSeek-V3 cannot search the web." in response.content.decode()


@pytest.mark.django_db
def test_the_model_is_chosen_by_its_dashscope_name_or_its_pk(alice_client, chat):
    assert post_settings(alice_client, chat, {"model": "qwen3-vl-plus"}).status_code == 200
    chat.refresh_from_db()
    assert chat.model.name == "qwen3-vl-plus"
    qwen_max = ModelProfile.objects.get(name="qwen-max")
    assert post_settings(alice_client, chat, {"model": str(qwen_max.pk)}).status_code == 200
    chat.refresh_from_db()
    assert chat.model == qwen_max
    assert post_settings(alice_client, chat, {"model": "qwen-vl-max"}).status_code == 400, (
        "disabled in the catalog"
    )


@pytest.mark.django_db
def test_the_model_picker_shows_each_models_capabilities_and_context(alice_client, chat):
    page = alice_client.get(f"/c/{chat.id}/").content.decode()
    assert 'data-model="qwen3-vl-plus" data-capabilities="vision thinking "' in page
    assert "Qwen3-VL-Plus (vision) · 256K · Vision · Thinking</option>" in page
    assert "Qwen-Plus · 1M · Thinking · Tools · Web search · JSON</option>" in page
    assert 'id="model-capabilities"' in page and "1M context" in page
    assert "Always thinks" in page  # DeepSeek-R1


@pytest.mark.django_db
def test_the_system_prompt_is_snapshotted_at_the_first_message(alice_client, alice):
    library = SystemPrompt.objects.create(name="Pirate", text="Talk like a pirate.")
    chat = conversation_create(owner=alice)
    response = post_settings(alice_client, chat, {"system_prompt": str(library.pk)})
    assert response.status_code == 200
    chat.refresh_from_db()
    assert chat.system_prompt == library and chat.system_prompt_text is None
    assert 'id="system-prompt-name"' in alice_client.get(f"/c/{chat.id}/").content.decode()
    # Edited before the first message: the chat is sent the new text.
    library.text = "Talk like a pirate, matey."
    library.save()
    from conversations.replies import service

    started = service.reply_start(conversation=chat, content="Hello")
    chat.refresh_from_db()
    assert chat.system_prompt_text == "Talk like a pirate, matey."
    # Edited after: the chat keeps what it was sent.
    library.text = "Talk like a robot."
    library.save()
    Message.objects.filter(pk=started.assistant_message.pk).update(status="complete")
    reply = service.reply_start(conversation=chat, content="Again").assistant_message
    request = prompt.build_request(
        conversation=Conversation.objects.get(pk=chat.pk), reply_to=reply
    )
    assert request.messages[0].content == "Talk like a pirate, matey."
    # Choosing a prompt (or none) once the chat has begun applies from the next message.
    post_settings(alice_client, chat, {"system_prompt": ""})
    chat.refresh_from_db()
    assert chat.system_prompt is None and chat.system_prompt_text == ""
    request = prompt.build_request(conversation=chat, reply_to=reply)
    assert request.messages[0].role == "user"


@pytest.mark.django_db
def test_json_output_without_the_word_json_is_refused_before_anything_is_sent(alice, chat):
    from conversations.replies import service

    chat.settings = {"json_output": True}
    chat.save()
    with pytest.raises(service.ReplyRefused, match="mention JSON in your message"):
        service.reply_start(conversation=chat, content="List three fruits.")
    assert not chat.messages.exists()
    assert service.reply_start(conversation=chat, content="List three fruits as json.").created


def test_parameters_never_carry_a_capability_the_model_lacks():
    deepseek = ModelProfile(name="deepseek-v3", label="DeepSeek-V3", max_output_tokens=8192)
    chosen = {"enable_search": True, "enable_thinking": True, "thinking_budget": 300,
              "json_output": True, "max_tokens": 20000, "temperature": 0.2}  # fmt: skip
    assert options.parameters(chosen, deepseek) == {"temperature": 0.2, "max_tokens": 8192}
    always = ModelProfile(name="qwq-plus", thinking="always")
    assert options.parameters({"thinking_budget": 300}, always) == {"thinking_budget": 300}
    hybrid = ModelProfile(name="qwen-plus", thinking="switchable", json_output=True)
    assert options.parameters({"enable_thinking": True, "thinking_budget": 300}, hybrid) == {
        "enable_thinking": True, "thinking_budget": 300,
    }  # fmt: skip
    assert options.parameters({"thinking_budget": 300}, hybrid) == {}, "not thinking: no budget"
    assert options.parameters({"json_output": True}, hybrid) == {
        "response_format": {"type": "json_object"}
    }


# -- against the simulator, over the socket ------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_every_setting_reaches_dashscope_as_the_reference_names_it(app_simulator, protocol):
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(protocol=protocol)
    owner, conversation, ws = await open_chat()
    client = Client()
    await sync_to_async(client.force_login)(owner)
    response = await sync_to_async(post_settings)(client, conversation, EVERY_SETTING)
    assert response.status_code == 200
    await ws.send_to(text_data=send_frame("Name three fruits, as JSON."))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "streaming" in t.status.values())
    reply = await wait_for_status((await assistant_reply(conversation)).pk, {"complete", "error"})
    await ws.disconnect()
    body = app_simulator.requests[-1].body
    sent = body["parameters"] if protocol == "native" else body
    assert {name: sent.get(name) for name in EXPECTED_PARAMETERS} == EXPECTED_PARAMETERS
    if protocol == "native":
        assert "temperature" not in body, "native parameters go under `parameters`"
    assert reply.status in {"complete", "error"}


async def ask(ws, conversation, question: str) -> Message:
    """Send `question` on the socket; the reply, once finished."""
    before = await assistant_reply(conversation)
    await ws.send_to(text_data=send_frame(question))
    transcript = Transcript()
    await receive_until(
        ws, transcript, lambda t: any(pk != getattr(before, "pk", None) for pk in t.status)
    )
    reply = await assistant_reply(conversation)
    return await wait_for_status(reply.pk, {"complete", "error"})


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_setting_changed_mid_chat_applies_from_the_next_message(app_simulator):
    owner, conversation, ws = await open_chat()
    client = Client()
    await sync_to_async(client.force_login)(owner)
    assert (await ask(ws, conversation, "First question")).status == "complete"
    await sync_to_async(post_settings)(client, conversation, {"temperature": "1.3"})
    assert (await ask(ws, conversation, "Second question")).status == "complete"
    await ws.disconnect()
    before, after = app_simulator.requests[-2:]
    assert "temperature" not in before.body["parameters"]
    assert after.body["parameters"]["temperature"] == 1.3


# -- what a reply made with them shows ------------------------------------------------------------


@pytest.mark.django_db
def test_a_json_mode_reply_shows_as_formatted_json_in_a_code_block(alice_client, chat):
    Message.objects.create(conversation=chat, role="user", content="Fruits as JSON")
    Message.objects.create(
        conversation=chat, role="assistant", json_mode=True,
        content='{"fruits": ["apple", "pear"], "note": "<b>```</b>"}',
    )  # fmt: skip
    Message.objects.create(conversation=chat, role="user", content="again")
    Message.objects.create(
        conversation=chat, role="assistant", json_mode=True, content='{"cut off": ['
    )
    page = re.sub(r"</?span[^>]*>", "", alice_client.get(f"/c/{chat.id}/").content.decode())
    assert 'data-json><pre data-lang="json"><code>{\n  "fruits": [\n    "apple",\n' in page
    assert "&lt;b&gt;```&lt;/b&gt;" in page and "<b>```" not in page, "escaped, fence intact"
    assert '<pre data-lang="json"><code>{"cut off": [\n</code></pre>' in page, "as written"


@pytest.mark.django_db
def test_sources_are_listed_as_plain_safe_links_and_exported(alice_client, chat):
    Message.objects.create(conversation=chat, role="user", content="News?")
    Message.objects.create(
        conversation=chat,
        role="assistant",
        content="Here is the news.",
        sources=[
            {"index": 1, "title": "Example <script>alert(1)</script>",
             "url": "https://example.com/a?x=1&y=2", "site_name": "Example"},
            {"index": 2, "title": "Bad", "url": "javascript:alert(1)", "site_name": ""},
        ],
    )  # fmt: skip
    page = alice_client.get(f"/c/{chat.id}/").content.decode()
    assert 'data-sources="2"' in page
    assert (
        '<a href="https://example.com/a?x=1&amp;y=2" rel="noopener noreferrer nofollow" '
        'target="_blank">Example &lt;script&gt;alert(1)&lt;/script&gt;</a>' in page
    )
    assert "javascript:" not in page
    assert "<script>alert" not in page
    markdown = alice_client.get(f"/c/{chat.id}/export.md").content.decode()
    assert "1. [Example <script>alert(1)</script>](<https://example.com/a?x=1&y=2>)" in markdown
    assert "2. Bad" in markdown and "javascript:" not in markdown
    export = json.loads(alice_client.get(f"/c/{chat.id}/export.json").content)
    assert export["messages"][1]["sources"][0]["site_name"] == "Example"


@pytest.mark.django_db
def test_thinking_is_folded_in_the_markdown_export_and_the_admin(alice_client, chat, admin_client):
    Message.objects.create(conversation=chat, role="user", content="Why?")
    Message.objects.create(
        conversation=chat, role="assistant", content="Because.", reasoning="Let me <think>."
    )
    markdown = alice_client.get(f"/c/{chat.id}/export.md").content.decode()
    assert "<details><summary>Thinking</summary>\n\nLet me <think>.\n\n</details>" in markdown
    assert markdown.index("Let me") < markdown.index("Because.")
    page = admin_client.get(f"/admin/conversations/conversation/{chat.id}/change/")
    text = page.content.decode()
    assert '<details class="admin-thinking"><summary>Thinking (15 characters)</summary>' in text
    assert "Let me &lt;think&gt;." in text


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_web_search_lists_its_sources_under_the_reply_safely(app_simulator, protocol):
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(protocol=protocol)
    owner, conversation, ws = await open_chat()
    client = Client()
    await sync_to_async(client.force_login)(owner)
    await sync_to_async(post_settings)(client, conversation, {"enable_search": "on"})
    reply = await ask(ws, conversation, "Latest news on unsafe sources please")
    await ws.disconnect()
    assert reply.status == "complete"
    sent = app_simulator.requests[-1].body
    sent = sent["parameters"] if protocol == "native" else sent
    assert sent["search_options"] == {"enable_source": True}
    assert len(reply.sources) >= 2
    assert all(set(source) <= {"index", "title", "url", "site_name"} for source in reply.sources)
    assert all(not source["url"].startswith("javascript") for source in reply.sources)
    page = (await sync_to_async(client.get)(f"/c/{conversation.id}/")).content.decode()
    assert f'data-sources="{len(reply.sources)}"' in page
    assert "javascript:" not in page and "<script>alert" not in page
    assert "&lt;script&gt;" in page, "the unsafe title is shown as text"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_json_output_gives_a_json_reply_shown_formatted(app_simulator):
    owner, conversation, ws = await open_chat()
    client = Client()
    await sync_to_async(client.force_login)(owner)
    await sync_to_async(post_settings)(client, conversation, {"json_output": "on"})
    reply = await ask(ws, conversation, "Give me three fruits in JSON")
    await ws.disconnect()
    assert reply.status == "complete" and reply.json_mode
    parsed = json.loads(reply.content)
    assert isinstance(parsed, dict)
    page = (await sync_to_async(client.get)(f"/c/{conversation.id}/")).content.decode()
    page = re.sub(r"</?span[^>]*>", "", page)
    body = f'id="message-{reply.pk}-body" class="message__body markdown" data-json>'
    assert body + '<pre data-lang="json"><code>{\n' in page


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_think_with_a_budget_reaches_dashscope_and_the_reasoning_is_kept_apart(
    app_simulator, protocol
):
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(protocol=protocol)
    owner, conversation, ws = await open_chat()
    client = Client()
    await sync_to_async(client.force_login)(owner)
    await sync_to_async(post_settings)(
        client, conversation, {"enable_thinking": ["off", "on"], "thinking_budget": "40"}
    )
    reply = await ask(ws, conversation, "Why is the sky blue?")
    await ws.disconnect()
    body = app_simulator.requests[-1].body
    sent = body["parameters"] if protocol == "native" else body
    assert (sent["enable_thinking"], sent["thinking_budget"]) == (True, 40)
    assert reply.status == "complete" and reply.reasoning and reply.content
    assert reply.reasoning not in reply.content, "saved apart from the answer"
    page = (await sync_to_async(client.get)(f"/c/{conversation.id}/")).content.decode()
    assert '<details class="message__reasoning">' in page, "folded once finished"
