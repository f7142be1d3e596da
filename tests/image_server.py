"""A tiny image server on 127.0.0.1 for the image proxy's tests: a real PNG, things that are
not images, an oversize body, redirects, a slow answer; it counts every request and keeps the
Host header each one sent."""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

__all__ = ["CAT", "ImageServer", "image_server", "png", "serve_images"]


def png(width: int = 64, height: int = 48, rgb: tuple[int, int, int] = (214, 92, 40)) -> bytes:
    """A real PNG of one colour, that a browser decodes."""
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


CAT = png()
HTML = b"<!doctype html><html><body><script>alert(1)</script></body></html>"
OVERSIZE = 11 * 1024 * 1024


@dataclass
class ImageServer:
    base: str  # http://127.0.0.1:<port>
    port: int
    hits: Counter = field(default_factory=Counter)
    hosts: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve_images() -> Iterator[ImageServer]:
    server_state: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state: ImageServer = server_state["state"]
            path = self.path.split("?")[0]
            state.hits[path] += 1
            state.hosts.append(self.headers.get("Host", ""))
            port = state.port
            redirects = {
                "/to-loopback": f"http://127.0.0.1:{port}/cat.png",
                "/to-localhost": f"http://localhost:{port}/cat.png",
                "/to-private": "http://10.0.0.1/cat.png",
                "/to-metadata": "http://169.254.169.254/latest/meta-data/",
                "/loop": "/loop",
                "/relative": "/cat.png",
            }
            if path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/cat.png":
                self._send(CAT, "image/png")
            elif path == "/page.html":
                self._send(HTML, "text/html; charset=utf-8")
            elif path == "/fake.png":
                self._send(HTML, "image/png")
            elif path == "/huge.png":
                # No Content-Length: the proxy must stop reading of its own accord.
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(CAT[:16])
                block = b"\0" * 65536
                with contextlib.suppress(OSError):
                    for _ in range(OVERSIZE // len(block) + 1):
                        self.wfile.write(block)
            elif path == "/announced-huge.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(OVERSIZE))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(CAT)
            elif path in ("/trickle-headers.png", "/trickle-body.png"):
                # A byte every 0.1 s: every read answers well within any read timeout, so
                # only a deadline over the whole fetch stops it (about 8 s in all).
                head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Pad: " + b"a" * 40
                body = CAT
                if path == "/trickle-headers.png":
                    head += b"\r\n" + b"X-More: " + b"b" * 40
                    trickled, rest = head, b""
                else:
                    head += f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    trickled, rest = body, head
                with contextlib.suppress(OSError):
                    self.wfile.write(rest)
                    self.wfile.flush()
                    for byte in trickled:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.1)
                    if path == "/trickle-headers.png":
                        self.wfile.write(f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
                        self.wfile.write(body)
            elif path == "/slow.png":
                time.sleep(3)
                with contextlib.suppress(OSError):
                    self._send(CAT, "image/png")
            else:
                self._send(b"not found", "text/plain", status=404)

        def _send(self, body: bytes, content_type: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    state = ImageServer(base=f"http://127.0.0.1:{port}", port=port)
    server_state["state"] = state
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    with serve_images() as state:
        yield state
