"""The image proxy (conversations/images.py) and the view that serves thumbnails through it.

Every fetch goes to a real HTTP server on 127.0.0.1 (tests/image_server.py), which the proxy
reaches only because the tests list it in QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS; the SSRF matrix
shows what happens without that, and for every other non-public address.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from conversations import images
from conversations.images import (
    NOT_ALLOWED,
    NOT_AN_IMAGE,
    TOO_LARGE,
    UNAVAILABLE,
    Image,
    ImageCache,
    ImageRefused,
    fetch_image,
    is_public_address,
)
from conversations.models import Message, MessageImage
from conversations.replies.service import conversation_create
from tests.image_server import CAT, png

NOT_PUBLIC = [
    "127.0.0.1", "127.8.8.8", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.127.255.254", "0.0.0.0", "224.0.0.1",
    "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "::7f00:1", "64:ff9b::a00:1", "64:ff9b::7f00:1", "64:ff9b:1::1",
    "2002:7f00:1::1", "2002:a00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "2001:db8::1",
]  # fmt: skip
PUBLIC = [
    "93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::200e",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]  # fmt: skip


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_recognised(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_recognised(address):
    assert is_public_address(address)


def _refusal(url: str, **kwargs) -> str:
    with pytest.raises(ImageRefused) as refused:
        fetch_image(url, **kwargs)
    return refused.value.reason


# -- the SSRF matrix -----------------------------------------------------------------------------


def test_loopback_is_refused_without_the_allow_setting(image_server):
    for url in (f"{image_server.base}/cat.png", f"http://localhost:{image_server.port}/cat.png"):
        assert _refusal(url) == NOT_ALLOWED, url
    assert image_server.hits == {}, "the proxy connected to a loopback server"


def test_an_allowed_host_is_fetched(image_server):
    image = fetch_image(f"{image_server.base}/cat.png", allowed_hosts=[image_server.host])
    assert image == Image(content=CAT, content_type="image/png")
    assert image_server.hosts == [image_server.host]
    # A bare host name allows every port; another port of a listed host:port does not.
    assert fetch_image(f"{image_server.base}/cat.png", allowed_hosts=["127.0.0.1"]) == image
    assert _refusal(f"{image_server.base}/cat.png", allowed_hosts=["127.0.0.1:1"]) == NOT_ALLOWED


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/cat.png",
        "http://172.16.5.4/cat.png",
        "http://192.168.0.1/cat.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://100.64.0.1/cat.png",
        "http://0.0.0.0:{port}/cat.png",
        "http://[::1]:{port}/cat.png",
        "http://[::ffff:127.0.0.1]:{port}/cat.png",
        "http://[::ffff:10.0.0.1]/cat.png",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fe80::1]/cat.png",
        "http://[fd00::1]/cat.png",
        "http://[64:ff9b::7f00:1]/cat.png",
        "http://[2002:7f00:1::1]/cat.png",
        "http://2130706433:{port}/cat.png",  # 127.0.0.1 as one number
        "http://localhost:{port}/cat.png",
        "http://127.1:{port}/cat.png",
        "http://LocalHost:{port}/cat.png",
    ],
)
def test_non_public_addresses_are_refused_before_connecting(image_server, url):
    """Even with the loopback server allowed by its address: none of these names it."""
    url = url.format(port=image_server.port)
    assert _refusal(url, allowed_hosts=[image_server.host]) == NOT_ALLOWED
    assert image_server.hits == {}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/cat.png",
        "file:///etc/passwd",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "gopher://127.0.0.1:70/",
        "//example.com/cat.png",
        "http://user:secret@127.0.0.1:{port}/cat.png",
        "http://127.0.0.1:99999/cat.png",
    ],
)
def test_only_plain_http_and_https_urls_are_fetched(image_server, url):
    url = url.format(port=image_server.port)
    assert _refusal(url, allowed_hosts=[image_server.host]) == NOT_ALLOWED
    assert image_server.hits == {}


def test_redirects_are_followed_and_every_hop_checked(image_server):
    allowed = [image_server.host]
    image = fetch_image(f"{image_server.base}/to-loopback", allowed_hosts=allowed)
    assert image.content == CAT
    assert fetch_image(f"{image_server.base}/relative", allowed_hosts=allowed).content == CAT
    for path in ("/to-localhost", "/to-private", "/to-metadata"):
        before = image_server.hits["/cat.png"]
        assert _refusal(image_server.base + path, allowed_hosts=allowed) == NOT_ALLOWED, path
        assert image_server.hits["/cat.png"] == before, "the redirect's target was fetched"


def test_a_redirect_loop_ends_after_three_redirects(image_server):
    reason = _refusal(f"{image_server.base}/loop", allowed_hosts=[image_server.host])
    assert reason == NOT_ALLOWED
    assert image_server.hits["/loop"] == 4  # the URL and three redirects


@pytest.mark.parametrize("path", ["/page.html", "/fake.png"])
def test_what_is_not_an_image_is_refused(image_server, path):
    """By its content type (text/html), and by its bytes (HTML sent as image/png)."""
    assert _refusal(image_server.base + path, allowed_hosts=[image_server.host]) == NOT_AN_IMAGE


@pytest.mark.parametrize("path", ["/huge.png", "/announced-huge.png"])
def test_an_oversize_body_is_refused(image_server, path):
    """Over 10 MB, whether announced (Content-Length) or found while reading."""
    assert _refusal(image_server.base + path, allowed_hosts=[image_server.host]) == TOO_LARGE


def test_errors_slow_answers_and_unknown_names_are_unavailable(image_server):
    allowed = [image_server.host]
    assert _refusal(f"{image_server.base}/missing.png", allowed_hosts=allowed) == UNAVAILABLE
    # The server answers after 3 s: past the deadline, so not at all.
    assert _refusal(f"{image_server.base}/slow.png", allowed_hosts=allowed, timeout=1) == (
        UNAVAILABLE
    )
    assert _refusal("http://no-such-host.invalid/cat.png") == UNAVAILABLE


@pytest.mark.parametrize("path", ["/trickle-headers.png", "/trickle-body.png"])
def test_the_deadline_covers_a_server_that_trickles_its_answer(image_server, path):
    """A server that sends a byte every 0.1 s never trips a per-read timeout; the fetch still
    ends at its deadline, whether the trickle is in the headers or the body."""
    started = time.monotonic()
    assert _refusal(image_server.base + path, allowed_hosts=[image_server.host], timeout=1) == (
        UNAVAILABLE
    )
    assert time.monotonic() - started < 2


def test_the_connection_goes_to_the_address_checked_with_the_original_host_header(image_server):
    """The name is resolved once, by the proxy, and the connection goes to that address: a
    name nobody else can resolve (.test) is fetched, so httpx never looked it up again
    (a second lookup is where DNS rebinding would slip a private address in). The server
    sees the original Host header."""
    lookups = []

    def resolver(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return ["127.0.0.1"]

    name = "images.intranet.test"
    url = f"http://{name}:{image_server.port}/cat.png"
    assert fetch_image(url, allowed_hosts=[name], resolver=resolver).content == CAT
    assert lookups == [(name, image_server.port)]
    assert image_server.hosts == [f"{name}:{image_server.port}"]


def test_a_name_is_refused_if_any_of_its_addresses_is_not_public(image_server):
    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.1"]

    assert _refusal("http://mixed.example/cat.png", resolver=resolver) == NOT_ALLOWED


# -- the cache ---------------------------------------------------------------------------------


def test_the_cache_keeps_images_by_url_and_evicts_the_least_recently_used(tmp_path):
    small, other = png(8, 8), png(9, 9, (0, 0, 255))
    cache = ImageCache(tmp_path, max_bytes=len(small) + len(other) + 10)
    cache.put("https://a.example/1.png", Image(small, "image/png"))
    cache.put("https://a.example/2.png", Image(other, "image/png"))
    stamp = time.time() - 100
    for path in tmp_path.iterdir():
        os.utime(path, (stamp, stamp))
    assert cache.get("https://a.example/1.png") == Image(small, "image/png")  # now the newest
    cache.put("https://a.example/3.png", Image(small, "image/png"))
    assert cache.get("https://a.example/2.png") is None, "the least recently used stays"
    assert cache.get("https://a.example/1.png") is not None
    assert cache.get("https://a.example/3.png") is not None
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= cache.max_bytes
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


# -- the view ----------------------------------------------------------------------------------


@pytest.fixture
def proxy_settings(settings, image_server):
    """The test image server allowed; the cache is in the test's own MEDIA_ROOT (conftest)."""
    settings.QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS = [image_server.host]
    return settings


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice")


def _chat_with_images(owner, *urls: str) -> Message:
    conversation = conversation_create(owner=owner)
    message = Message.objects.create(conversation=conversation, role="user", content="look")
    for url in urls:
        MessageImage.objects.create(message=message, url=url)
    return message


def _image_url(message: Message, index: int = 0) -> str:
    return reverse("message_image", args=[message.conversation_id, message.pk, index])


def cache_directives(response) -> dict[str, str]:
    return dict(
        (part.strip().split("=") + [""])[:2]
        for part in response["Cache-Control"].split(",")
        if part.strip()
    )


@pytest.mark.django_db
def test_the_owner_sees_the_image_and_the_second_request_comes_from_the_cache(
    client, alice, image_server, proxy_settings
):
    message = _chat_with_images(alice, f"{image_server.base}/cat.png")
    client.force_login(alice)
    first = client.get(_image_url(message))
    assert first.status_code == 200
    assert first.content == CAT
    assert first["Content-Type"] == "image/png"
    assert first["X-Qwenweb-Image"] == "fetched"
    assert first["X-Content-Type-Options"] == "nosniff"
    assert first["Content-Disposition"] == "inline"
    assert first["Content-Security-Policy"].startswith("default-src 'none'")
    directives = cache_directives(first)
    assert "private" in directives and int(directives["max-age"]) > 0
    assert "no-store" not in directives and "public" not in directives
    assert "Cookie" in first["Vary"]
    second = client.get(_image_url(message))
    assert second.content == CAT and second["X-Qwenweb-Image"] == "cached"
    assert image_server.hits["/cat.png"] == 1, "the second request reached the server"


@pytest.mark.django_db
def test_another_user_gets_404_and_a_reviewer_sees_it(
    client, alice, django_user_model, image_server, proxy_settings
):
    message = _chat_with_images(alice, f"{image_server.base}/cat.png")
    bob = django_user_model.objects.create_user("bob", password="pw-bob")
    staff = django_user_model.objects.create_user("sam", password="pw", is_staff=True)
    for outsider in (bob, staff):
        client.force_login(outsider)
        assert client.get(_image_url(message)).status_code == 404
    assert image_server.hits == {}
    rita = django_user_model.objects.create_user("rita", password="pw", is_staff=True)
    rita.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(rita)
    response = client.get(_image_url(message))
    assert response.status_code == 200 and response.content == CAT


@pytest.mark.django_db
def test_a_missing_image_or_another_chats_message_is_404(client, alice, proxy_settings):
    message = _chat_with_images(alice, "https://example.com/cat.png")
    other = _chat_with_images(alice)
    client.force_login(alice)
    assert client.get(_image_url(message, 1)).status_code == 404
    url = reverse("message_image", args=[other.conversation_id, message.pk, 0])
    assert client.get(url).status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "reason"),
    [("/page.html", NOT_AN_IMAGE), ("/fake.png", NOT_AN_IMAGE), ("/to-private", NOT_ALLOWED),
     ("/huge.png", TOO_LARGE), ("/missing.png", UNAVAILABLE)],
)  # fmt: skip
def test_what_the_proxy_refuses_is_answered_with_a_placeholder(
    client, alice, image_server, proxy_settings, path, reason
):
    message = _chat_with_images(alice, image_server.base + path)
    client.force_login(alice)
    response = client.get(_image_url(message))
    assert response.status_code == 200
    assert response["Content-Type"] == "image/svg+xml"
    assert response["X-Qwenweb-Image"] == "refused"
    assert response["X-Qwenweb-Image-Reason"] == reason
    assert response.content.startswith(b"<svg") and b"script" not in response.content
    assert response["Content-Security-Policy"].startswith("default-src 'none'")
    assert int(cache_directives(response)["max-age"]) <= 60


@pytest.mark.django_db
def test_loopback_is_refused_by_the_view_without_the_allow_setting(
    client, alice, image_server, proxy_settings
):
    proxy_settings.QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS = []
    message = _chat_with_images(alice, f"{image_server.base}/cat.png")
    client.force_login(alice)
    response = client.get(_image_url(message))
    assert response["X-Qwenweb-Image-Reason"] == NOT_ALLOWED
    assert image_server.hits == {}


@pytest.mark.django_db
def test_the_chat_export_and_admin_show_thumbnails_through_the_proxy(
    client, admin_client, alice, proxy_settings
):
    original = "https://example.com/cat.png?size=big&x=<1>"
    message = _chat_with_images(alice, original, "https://example.com/dog.jpg")
    client.force_login(alice)
    page = client.get(message.conversation.get_absolute_url())
    html = page.content.decode()
    for index in (0, 1):
        assert f'<img src="{_image_url(message, index)}"' in html
    assert 'loading="lazy" class="message__image"' in html
    assert 'href="https://example.com/cat.png?size=big&amp;x=&lt;1&gt;"' in html
    directives = [d.strip() for d in page["Content-Security-Policy"].split(";")]
    assert "img-src 'self' data:" in directives  # in whatever order the header lists them

    export = json.loads(client.get(reverse("conversation_export_json",
                                           args=[message.conversation_id])).content)  # fmt: skip
    exported = export["messages"][0]
    assert exported["images"] == [original, "https://example.com/dog.jpg"]
    assert exported["image_thumbnails"] == [
        {"url": original, "src": _image_url(message, 0)},
        {"url": "https://example.com/dog.jpg", "src": _image_url(message, 1)},
    ]

    for url in (
        f"/admin/conversations/conversation/{message.conversation_id}/change/",
        f"/admin/conversations/message/{message.pk}/change/",
    ):
        admin_html = admin_client.get(url).content.decode()
        assert f'<img src="{_image_url(message, 1)}"' in admin_html, url


@pytest.mark.django_db
def test_image_for_uses_the_configured_cache_directory(image_server, proxy_settings):
    url = f"{image_server.base}/cat.png"
    assert images.image_for(url) == (Image(CAT, "image/png"), False)
    assert images.image_for(url) == (Image(CAT, "image/png"), True)
    assert len(list((proxy_settings.MEDIA_ROOT / "image-proxy").iterdir())) == 1


@pytest.mark.django_db
def test_an_upload_beside_a_url_image_keeps_its_own_route(
    client, alice, image_server, proxy_settings
):
    """Indexes count every image of the message, uploads too: the proxy serves the URL image
    at its place, and 404s the upload's (which its own route serves)."""
    message = _chat_with_images(alice)
    client.force_login(alice)
    response = client.post(
        reverse("conversation_images", args=[message.conversation_id]),
        {"image": SimpleUploadedFile("cat.png", CAT, "image/png")},
    )
    assert response.status_code == 200, response.content
    MessageImage.objects.create(message=message, upload_id=response.json()["id"])
    MessageImage.objects.create(message=message, url=f"{image_server.base}/cat.png")
    assert client.get(_image_url(message, 0)).status_code == 404
    assert client.get(_image_url(message, 1)).content == CAT
    html = client.get(message.conversation.get_absolute_url()).content.decode()
    assert f'src="{response.json()["url"]}"' in html
    assert f'src="{_image_url(message, 1)}"' in html
    export = client.get(reverse("conversation_export_json", args=[message.conversation_id]))
    thumbnails = json.loads(export.content)["messages"][0]["image_thumbnails"]
    assert [t["src"] for t in thumbnails] == [response.json()["url"], _image_url(message, 1)]
