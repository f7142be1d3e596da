"""Images uploaded into a chat (conversations/uploads.py): checked by their content, kept on
disk, served only to their owner and reviewers, sent to DashScope as data URLs."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

from conversations.models import Conversation, Message, MessageImage, ModelProfile, Upload
from conversations.replies.service import conversation_create
from tests.ws_support import (
    Transcript,
    assistant_reply,
    open_chat,
    receive_until,
    wait_for_status,
)


def image_bytes(kind: str = "PNG", size=(40, 30), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=kind)
    return buffer.getvalue()


def upload(client, chat, content: bytes, name="photo.png", content_type="image/png"):
    return client.post(
        f"/c/{chat.id}/images/", {"image": SimpleUploadedFile(name, content, content_type)}
    )


@pytest.fixture
def chat(alice):
    return conversation_create(owner=alice, model=ModelProfile.objects.get(name="qwen3-vl-plus"))


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "content_type"), [
    ("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif"),
])  # fmt: skip
def test_each_image_kind_is_kept_and_served_to_its_owner(alice_client, chat, kind, content_type):
    content = image_bytes(kind)
    response = upload(alice_client, chat, content, name="x.bin", content_type="text/plain")
    assert response.status_code == 200, response.content
    data = response.json()
    assert data["url"] == f"/c/{chat.id}/images/{data['id']}/"
    assert (data["width"], data["height"]) == (40, 30)
    kept = Upload.objects.get(pk=data["id"])
    assert kept.content_type == content_type and kept.size == len(content)
    assert "x.bin" not in kept.file.name, "the name on disk is the app's own"
    served = alice_client.get(data["url"])
    assert served.status_code == 200
    assert served["Content-Type"] == content_type
    assert served["X-Content-Type-Options"] == "nosniff"
    assert served["Content-Security-Policy"] == "default-src 'none'"
    assert b"".join(served.streaming_content) == content


@pytest.mark.django_db
def test_anything_but_an_image_is_refused_whatever_its_name_says(alice_client, chat, settings):
    png = image_bytes()
    cases = {
        "html named .png": (b"<html><script>alert(1)</script></html>", "a.png", "image/png"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>', "a.svg",
                "image/svg+xml"),
        "truncated png": (png[: len(png) // 2], "a.png", "image/png"),
        # verify() checks only a PNG's data; these decode only in part.
        "truncated jpeg": (_noise("JPEG")[:-4000], "a.jpg", "image/jpeg"),
        "truncated gif": (_noise("GIF")[:-4000], "a.gif", "image/gif"),
        "bmp": (image_bytes("BMP"), "a.bmp", "image/bmp"),
        "empty": (b"", "a.png", "image/png"),
    }  # fmt: skip
    for label, (content, name, content_type) in cases.items():
        response = upload(alice_client, chat, content, name, content_type)
        assert response.status_code == 400, label
        assert response.json()["error"] == "That file is not a PNG, JPEG, WebP or GIF image.", label
    settings.QWENWEB_MAX_UPLOAD_BYTES = len(png) - 1
    response = upload(alice_client, chat, png)
    assert response.status_code == 400 and "at most" in response.json()["error"]
    assert alice_client.post(f"/c/{chat.id}/images/", {}).status_code == 400
    assert not Upload.objects.exists()


def _noise(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(buffer, format=kind)
    return buffer.getvalue()


@pytest.mark.django_db
def test_an_animation_counts_the_pixels_of_every_frame(alice_client, chat):
    """A 51 KB GIF of thirteen 2000×2000 frames decodes to 52 million pixels: too many."""
    frames = [Image.new("P", (2000, 2000), n) for n in range(13)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    response = upload(alice_client, chat, buffer.getvalue(), "a.gif", "image/gif")
    assert response.status_code == 400
    assert response.json()["error"] == "That image has too many pixels."
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:3])
    assert upload(alice_client, chat, buffer.getvalue(), "a.gif", "image/gif").status_code == 200


@pytest.mark.django_db
def test_only_the_owner_and_reviewers_see_an_upload(alice_client, chat):
    data = upload(alice_client, chat, image_bytes()).json()
    bob = get_user_model().objects.create_user("bob", password="pw")
    bobs = Client()
    bobs.force_login(bob)
    assert bobs.get(data["url"]).status_code == 404
    assert upload(bobs, chat, image_bytes()).status_code == 404, "not his chat to upload into"
    assert Client().get(data["url"]).status_code == 302, "a login first"
    reviewer = get_user_model().objects.create_user("rita", password="pw", is_staff=True)
    reviewer.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    reviewers = Client()
    reviewers.force_login(reviewer)
    assert reviewers.get(data["url"]).status_code == 200
    other_chat = conversation_create(owner=get_user_model().objects.get(username="alice"))
    assert alice_client.get(f"/c/{other_chat.id}/images/{data['id']}/").status_code == 404


@pytest.mark.django_db
def test_a_deleted_chat_takes_its_files_with_it(alice_client, chat):
    data = upload(alice_client, chat, image_bytes()).json()
    path = Path(Upload.objects.get(pk=data["id"]).file.path)
    assert path.read_bytes() == image_bytes()
    Conversation.objects.filter(pk=chat.pk).delete()
    assert not path.exists()


@pytest.mark.django_db
def test_a_user_holds_a_bounded_number_of_unsent_uploads_over_all_chats(alice, alice_client, chat):
    """The bound is the user's, not a chat's: twenty unsent in one chat, and a new chat takes
    none either. Another user is not affected. Removing one (×) makes room."""
    from conversations import uploads

    sent = [upload(alice_client, chat, image_bytes()).json() for _ in range(uploads.MAX_PENDING)]
    another = conversation_create(owner=alice, model=chat.model)
    response = upload(alice_client, another, image_bytes())
    assert response.status_code == 400
    assert "20 images added to chats but not sent" in response.json()["error"]
    assert Upload.objects.count() == uploads.MAX_PENDING
    bob = get_user_model().objects.create_user("bob", password="pw")
    bobs = Client()
    bobs.force_login(bob)
    bobs_chat = conversation_create(owner=bob, model=chat.model)
    assert upload(bobs, bobs_chat, image_bytes()).status_code == 200
    assert alice_client.delete(sent[0]["url"]).status_code == 204
    assert upload(alice_client, another, image_bytes()).status_code == 200


@pytest.mark.django_db
def test_an_upload_not_sent_for_a_day_is_removed_with_its_file(alice, alice_client, chat):
    from datetime import timedelta

    from django.utils import timezone

    from conversations import uploads

    old = [upload(alice_client, chat, image_bytes()).json() for _ in range(uploads.MAX_PENDING)]
    paths = [Path(Upload.objects.get(pk=data["id"]).file.path) for data in old]
    Upload.objects.update(created_at=timezone.now() - timedelta(days=1, minutes=1))
    assert upload(alice_client, chat, image_bytes()).status_code == 200
    assert Upload.objects.count() == 1
    assert not any(path.exists() for path in paths)


@pytest.mark.django_db
def test_removing_an_upload_takes_only_an_unsent_one_of_ones_own(alice, alice_client, chat):
    data = upload(alice_client, chat, image_bytes()).json()
    path = Path(Upload.objects.get(pk=data["id"]).file.path)
    bob = get_user_model().objects.create_user("bob", password="pw")
    bobs = Client()
    bobs.force_login(bob)
    assert bobs.delete(data["url"]).status_code == 404
    question = Message.objects.create(conversation=chat, role="user", content="this")
    MessageImage.objects.create(message=question, upload_id=data["id"])
    assert alice_client.delete(data["url"]).status_code == 404, "a sent image stays"
    assert path.exists()
    MessageImage.objects.all().delete()
    assert Client().delete(data["url"]).status_code == 302, "a login first"
    assert alice_client.delete(data["url"]).status_code == 204
    assert not path.exists() and not Upload.objects.exists()
    assert alice_client.get(data["url"]).status_code == 404


# -- sent with a message, against the simulator ---------------------------------------------------


async def send_with_images(ws, conversation, text: str, **extra) -> Transcript:
    await ws.send_to(text_data=json.dumps({"type": "send", "content": text, **extra}))
    transcript = Transcript()
    await receive_until(
        ws, transcript, lambda t: bool(t.status) or any('class="notice"' in f for f in t.frames)
    )
    return transcript


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("protocol", ["native", "compatible"])
async def test_an_uploaded_image_reaches_dashscope_as_a_data_url(app_simulator, protocol):
    await ModelProfile.objects.filter(name="qwen3-vl-plus").aupdate(protocol=protocol)
    owner, conversation, ws = await open_chat("qwen3-vl-plus")
    client = Client()
    await sync_to_async(client.force_login)(owner)
    content = image_bytes("JPEG")
    data = (await sync_to_async(upload)(client, conversation, content, "cat.jpg")).json()
    await send_with_images(
        ws, conversation, "What is this?", image_ids=[str(data["id"])],
        image_urls="https://example.com/dog.png",
    )  # fmt: skip
    reply = await wait_for_status((await assistant_reply(conversation)).pk, {"complete"})
    await ws.disconnect()
    body = app_simulator.requests[-1].body
    messages = body["input"]["messages"] if protocol == "native" else body["messages"]
    sent = json.dumps(messages[-1])
    expected = "data:image/jpeg;base64," + base64.b64encode(content).decode()
    assert expected in sent and "https://example.com/dog.png" in sent
    question = await Message.objects.aget(pk=reply.parent_id)
    kinds = [
        (image.url, image.upload_id)
        async for image in MessageImage.objects.filter(message=question).order_by("id")
    ]
    assert kinds == [("https://example.com/dog.png", None), ("", data["id"])]
    exported = await sync_to_async(client.get)(f"/c/{conversation.id}/export.json")
    export = json.loads(exported.content)
    assert export["messages"][-2]["images"] == ["https://example.com/dog.png", data["url"]]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_images_to_a_model_without_vision_or_from_another_chat_are_refused(app_simulator):
    owner, conversation, ws = await open_chat("qwen-plus")
    client = Client()
    await sync_to_async(client.force_login)(owner)
    data = (await sync_to_async(upload)(client, conversation, image_bytes())).json()
    transcript = await send_with_images(ws, conversation, "Look", image_ids=[data["id"]])
    assert any("cannot see images" in frame for frame in transcript.frames)
    vision = await sync_to_async(conversation_create)(
        owner=owner, model=await ModelProfile.objects.aget(name="qwen3-vl-plus")
    )
    await ws.disconnect()
    from tests.ws_support import connect

    ws, connected, _code = await connect(owner, vision)
    assert connected
    transcript = await send_with_images(ws, vision, "Look", image_ids=[data["id"]])
    assert any("An image you added is gone" in frame for frame in transcript.frames)
    # An id no database holds is answered the same way, and the socket stays open.
    transcript = await send_with_images(ws, vision, "Look", image_ids=[2**70])
    assert any("An image you added is gone" in frame for frame in transcript.frames)
    await ws.disconnect()
    assert not await Message.objects.filter(content="Look").aexists()
    assert app_simulator.requests == []
