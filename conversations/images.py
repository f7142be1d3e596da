"""The image proxy: fetches a message's image URL for its thumbnail, safely, and keeps a copy.

A chat shows URL images through the app's own origin (the CSP says `img-src 'self' data:`), so
no reader's browser ever contacts a third-party host. That makes this server the one that
fetches, and a fetcher that any user can point at any URL is a door into the server's network
(SSRF). So `fetch_image`:

- takes only http(s) URLs, without credentials;
- resolves the host once and refuses if any address it resolves to is not public (loopback,
  private, link-local and cloud metadata, CGNAT, multicast, reserved, unspecified, IPv6 ULA
  and link-local, and IPv4 addresses embedded in IPv6: mapped, compatible, NAT64, 6to4;
  Teredo is refused outright), unless the host is in QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS;
- connects to the address it checked, never to a second lookup of the name (DNS rebinding),
  sending the original Host header and, for https, the original name as SNI, against which
  the certificate is verified;
- follows at most MAX_REDIRECTS redirects itself, checking every hop the same way;
- reads at most MAX_BYTES, with a connect timeout of CONNECT_TIMEOUT and a deadline of
  TOTAL_TIMEOUT for the whole fetch (lookups, redirects, and every read and write on the
  socket, so a server that trickles its headers a byte at a time is cut off too);
- accepts only an image content type (PNG, JPEG, WebP, GIF) whose bytes are one, by content.

Everything else raises `ImageRefused`, whose `reason` the view turns into a placeholder.
What was fetched is kept on disk (`ImageCache`, in MEDIA_ROOT/image-proxy/), keyed by a hash of
the URL.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

MAX_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 3
CONNECT_TIMEOUT = 3.0
TOTAL_TIMEOUT = 10.0
USER_AGENT = "qwenweb-image-proxy/1"

# The types served, by the file's first bytes: what the bytes are decides, not what the
# server said (it must also have said one of them).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}

# Why a fetch was refused; the view sends it in X-Qwenweb-Image-Reason.
NOT_ALLOWED = "not-allowed"  # scheme, credentials, address, too many redirects
NOT_AN_IMAGE = "not-an-image"  # content type or bytes
TOO_LARGE = "too-large"
UNAVAILABLE = "unavailable"  # no answer, a timeout, an error status, a name that resolves not

REDIRECT_STATUSES = {301, 302, 303, 307, 308}

# IPv6 ranges that carry an IPv4 address in their last 32 bits, which is what gets reached.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class ImageRefused(Exception):
    """The URL was not fetched, or what it answered is not served; `reason` says which."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Image:
    content: bytes
    content_type: str


Resolver = Callable[[str, int], list[str]]


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is on the public internet: not loopback, private, link-local
    (169.254.169.254, the cloud metadata service, among them), CGNAT, multicast, reserved or
    unspecified; an IPv4 address inside an IPv6 one is judged as the IPv4 address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None or ip in IPV4_COMPATIBLE or ip in NAT64_LOCAL:
            return False
        if ip in NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolves `host` to (getaddrinfo: /etc/hosts, DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


# getaddrinfo has no timeout of its own: a lookup runs here so the fetch can stop waiting.
_lookups = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-dns")


def _resolve(resolver: Resolver, host: str, port: int, remaining: float) -> list[str]:
    future = _lookups.submit(resolver, host, port)
    try:
        return future.result(timeout=max(remaining, 0.01))
    except concurrent.futures.TimeoutError:
        raise ImageRefused(UNAVAILABLE, f"looking up {host} took too long") from None
    except OSError as exc:
        raise ImageRefused(UNAVAILABLE, f"{host} does not resolve ({exc})") from None


def _host_allowed(host: str, port: int, allowed_hosts: Iterable[str]) -> bool:
    """`host` or `host:port` is listed (IPv6 literals in brackets, as in a URL)."""
    host = host.lower().rstrip(".")
    shown = f"[{host}]" if ":" in host else host
    for entry in allowed_hosts:
        entry = entry.strip().lower()
        if entry in (shown, f"{shown}:{port}"):
            return True
    return False


@dataclass(frozen=True)
class _Target:
    url: str  # as the next hop names it
    host: str  # the name (or literal) in the URL, without brackets
    port: int
    scheme: str
    address: str  # the checked address the connection goes to


def _check_url(
    url: str, *, allowed_hosts: Iterable[str], resolver: Resolver, remaining: float
) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageRefused(NOT_ALLOWED, f"not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ImageRefused(NOT_ALLOWED, "only http(s) URLs with a host are fetched")
    if parts.username is not None or parts.password is not None:
        raise ImageRefused(NOT_ALLOWED, "URLs with credentials are not fetched")
    host = parts.hostname
    port = port or (443 if scheme == "https" else 80)
    allowed = _host_allowed(host, port, allowed_hosts)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = _resolve(resolver, host, port, remaining)
    if not addresses:
        raise ImageRefused(UNAVAILABLE, f"{host} does not resolve")
    if not allowed:
        # All of them, not the first: a name with one public and one private address could
        # be answered by either.
        for address in addresses:
            if not is_public_address(address.split("%")[0]):
                raise ImageRefused(NOT_ALLOWED, f"{host} resolves to a non-public address")
    return _Target(url=url, host=host, port=port, scheme=scheme, address=addresses[0])


def _pinned_request(client: httpx.Client, target: _Target) -> httpx.Request:
    """A GET for `target.url` whose connection goes to the checked address: the URL carries
    the address, and the Host header and the TLS server name (SNI, and the name the
    certificate must match) the original host."""
    url = httpx.URL(target.url)
    default_port = 443 if target.scheme == "https" else 80
    shown = f"[{target.host}]" if ":" in target.host else target.host
    host_header = shown if target.port == default_port else f"{shown}:{target.port}"
    extensions = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    return client.build_request(
        "GET",
        url.copy_with(host=target.address.split("%")[0], port=target.port),
        headers={"Host": host_header, "Accept": ", ".join(IMAGE_TYPES), "Accept-Encoding":
                 "identity", "User-Agent": USER_AGENT},
        extensions=extensions,
    )  # fmt: skip


def sniff_image_type(head: bytes) -> str | None:
    """The image type the bytes are, by their magic numbers, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _declared_type(response: httpx.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _read_body(response: httpx.Response, deadline: float) -> bytes:
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_BYTES:
        raise ImageRefused(TOO_LARGE, f"{length} bytes announced")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Asked for identity; a compressed body could expand without bound.
        raise ImageRefused(NOT_AN_IMAGE, f"sent with Content-Encoding {encoding}")
    chunks, size = [], 0
    for chunk in response.iter_raw():
        size += len(chunk)
        if size > MAX_BYTES:
            raise ImageRefused(TOO_LARGE, f"more than {MAX_BYTES} bytes")
        if time.monotonic() > deadline:
            raise ImageRefused(UNAVAILABLE, "the fetch took too long")
        chunks.append(chunk)
    return b"".join(chunks)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most until the fetch's deadline.
    httpx's timeouts are per operation: a server that sends a byte at a time resets them on
    every byte, headers included, so without this a fetch could last as long as it likes."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float):
        self._stream = stream
        self._deadline = deadline

    def _timeout(self, timeout: float | None, error: type[Exception]) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise error("the fetch's deadline has passed")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        stream = self._stream.start_tls(
            ssl_context, server_hostname, self._timeout(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    """httpcore's own socket backend, with every connection under one deadline."""

    def __init__(self, deadline: float):
        self._deadline = deadline

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise httpcore.ConnectTimeout("the fetch's deadline has passed")
        timeout = remaining if timeout is None else min(timeout, remaining)
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)


def _client(deadline: float) -> httpx.Client:
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx has no public way to hand httpcore a network backend; the pool's attribute is
    # httpcore's (pinned in requirements.txt); the trickle tests fail if it stops working.
    if not isinstance(getattr(transport._pool, "_network_backend", None), httpcore.SyncBackend):
        raise RuntimeError("httpcore's pool no longer keeps its network backend here")
    transport._pool._network_backend = _DeadlineBackend(deadline)
    return httpx.Client(transport=transport, follow_redirects=False, trust_env=False)


def fetch_image(
    url: str,
    *,
    allowed_hosts: Iterable[str] = (),
    resolver: Resolver = system_resolver,
    timeout: float = TOTAL_TIMEOUT,
) -> Image:
    """Fetch the image at `url` under the rules in the module's docstring, or raise
    ImageRefused. Synchronous (a view's thread); never called on an event loop."""
    allowed_hosts = list(allowed_hosts)
    deadline = time.monotonic() + timeout
    for _hop in range(MAX_REDIRECTS + 1):
        # A client for each hop: its pool is keyed by address, so a connection (and the
        # certificate checked for one name) is never reused for another host.
        with _client(deadline) as client:
            remaining = deadline - time.monotonic()
            target = _check_url(
                url, allowed_hosts=allowed_hosts, resolver=resolver, remaining=remaining
            )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageRefused(UNAVAILABLE, "the fetch took too long")
            try:
                request = _pinned_request(client, target)
            except (httpx.InvalidURL, ValueError) as exc:
                raise ImageRefused(NOT_ALLOWED, f"not a URL httpx takes ({exc})") from None
            request.extensions["timeout"] = httpx.Timeout(
                remaining, connect=min(CONNECT_TIMEOUT, remaining)
            ).as_dict()
            try:
                response = client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise ImageRefused(UNAVAILABLE, f"{type(exc).__name__}") from None
            try:
                if response.status_code in REDIRECT_STATUSES:
                    location = response.headers.get("Location", "")
                    if not location:
                        raise ImageRefused(UNAVAILABLE, "a redirect without a Location")
                    url = urljoin(target.url, location)
                    continue
                if response.status_code != 200:
                    raise ImageRefused(UNAVAILABLE, f"HTTP {response.status_code}")
                if _declared_type(response) not in IMAGE_TYPES:
                    raise ImageRefused(NOT_AN_IMAGE, f"Content-Type {_declared_type(response)}")
                try:
                    content = _read_body(response, deadline)
                except httpx.HTTPError as exc:
                    raise ImageRefused(UNAVAILABLE, f"{type(exc).__name__}") from None
            finally:
                response.close()
            content_type = sniff_image_type(content[:16])
            if content_type is None:
                raise ImageRefused(NOT_AN_IMAGE, "the bytes are not a PNG, JPEG, WebP or GIF")
            return Image(content=content, content_type=content_type)
    raise ImageRefused(NOT_ALLOWED, f"more than {MAX_REDIRECTS} redirects")


class ImageCache:
    """Fetched images on disk, one file per URL (`<sha256 of the URL>.<png|jpg|webp|gif>`),
    at most `max_bytes` in all: writing one that goes past it removes the least recently used
    (by modification time, which a hit refreshes) until the rest fit."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _stem(self, url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()

    def get(self, url: str) -> Image | None:
        stem = self._stem(url)
        for content_type, extension in EXTENSIONS.items():
            path = self.directory / f"{stem}.{extension}"
            try:
                content = path.read_bytes()
            except OSError:
                continue
            with contextlib.suppress(OSError):
                os.utime(path)
            return Image(content=content, content_type=content_type)
        return None

    def put(self, url: str, image: Image) -> None:
        """Keep `image` for `url`; a cache that cannot be written (a full or read-only disk)
        only costs the next reader a fetch."""
        if len(image.content) > self.max_bytes:
            return
        path = self.directory / f"{self._stem(url)}.{EXTENSIONS[image.content_type]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a reader never sees half a file.
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".part")
        except OSError:
            return
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(image.content)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return
        self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        entries = []
        with contextlib.suppress(OSError), os.scandir(self.directory) as found:
            for entry in found:
                with contextlib.suppress(OSError):
                    if entry.is_file() and not entry.name.endswith(".part"):
                        stat = entry.stat()
                        entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _mtime, size, _path in entries)
        for _mtime, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == str(keep):
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= size


def image_for(url: str) -> tuple[Image, bool]:
    """The image at `url` from the cache, else fetched (and kept); (image, whether it came
    from the cache). Raises ImageRefused. Configured by the QWENWEB_IMAGE_* settings."""
    from django.conf import settings

    directory = Path(settings.MEDIA_ROOT) / "image-proxy"
    cache = ImageCache(directory, settings.QWENWEB_IMAGE_CACHE_BYTES)
    image = cache.get(url)
    if image is not None:
        return image, True
    image = fetch_image(url, allowed_hosts=settings.QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS)
    cache.put(url, image)
    return image, False
