"""The HTTP client the DashScope client speaks through: httpx's API, aiohttp's engine or httpx's.

``DashScopeClient`` uses httpx's API (``stream``, ``post``, ``Timeout``, its exceptions).
Underneath, either httpx's own transport (httpcore) or aiohttp through httpx-aiohttp (the
transport the OpenAI SDK offers) moves the bytes. aiohttp costs about a third less CPU per
streamed token and delivers each chunk sooner under load (bench/README.md, fourth pass), so
the app uses it; httpx's stays for comparison and as a fallback.

httpx-aiohttp as published needs three fixes, made here:

* no cap on connections: every streaming reply holds one for its whole length, and aiohttp's
  default (100) would make the 101st reply wait for the first to end;
* aiohttp's exceptions become the httpx ones the client's error handling expects (a refused
  connection is ``httpx.ConnectError``, a stall ``httpx.ReadTimeout``, a connection cut
  mid-reply ``httpx.ReadError``), so a person reads the same sentence whatever the engine;
* a response abandoned mid-stream (Stop, a cancelled task) closes its connection at once, so
  DashScope stops generating, and a session dropped unclosed with its event loop logs nothing.

It also tells a caller when a request has gone out (``request_sent``): the app does its own
work on the event loop only after that, so the request is not kept waiting behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

Engine = Literal["aiohttp", "httpx"]

_CHUNK_SIZE = 64 * 1024

# Set (in its context) by code that wants to know when its requests have gone out: the event
# is set once a request's body has been written to the connection (with httpx's own engine,
# which has no such hook, just before it is sent).
request_sent: ContextVar[asyncio.Event | None] = ContextVar("request_sent", default=None)


def _mark_sent(*_args) -> None:
    event = request_sent.get()
    if event is not None:
        event.set()


async def _on_chunk_sent(*_args) -> None:
    # aiohttp writes the body in a task of its own, started from the request's context.
    _mark_sent()


def open_http_client(engine: Engine = "aiohttp") -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for DashScope streams, with no cap on connections."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    if engine == "httpx":
        return httpx.AsyncClient(
            follow_redirects=False, limits=limits, event_hooks={"request": [_sent_hook]}
        )
    if engine == "aiohttp":
        return httpx.AsyncClient(
            follow_redirects=False, transport=UncappedAiohttpTransport(limits=limits)
        )
    raise ValueError(f"unknown HTTP engine {engine!r}")


async def _sent_hook(_request: httpx.Request) -> None:
    _mark_sent()


class UncappedAiohttpTransport(AiohttpTransport):
    """httpx-aiohttp's transport with no connection cap and httpx's exception types."""

    def get_client(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0,  # no cap (aiohttp's default is 100)
            limit_per_host=0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        trace = aiohttp.TraceConfig()
        trace.on_request_chunk_sent.append(_on_chunk_sent)
        return aiohttp.ClientSession(connector=connector, trace_configs=[trace])

    def __del__(self) -> None:
        # The process-wide client lives as long as its event loop and nothing awaits its
        # aclose() (daphne has no lifespan): its session would log "Unclosed client session"
        # when collected. Close its sockets quietly instead.
        session = self.client
        if isinstance(session, aiohttp.ClientSession) and not session.closed:
            with contextlib.suppress(Exception):
                session.connector._close()  # type: ignore[union-attr]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _as_httpx_errors():
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, AiohttpResponseStream)
        response.stream = _ResponseStream(response.stream._aiohttp_response)
        return response


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection can be reused
        else:
            # Abandoned mid-stream (Stop, a cancelled task): close the connection now, so the
            # upstream sees the disconnect and stops generating. asyncio closes the socket on
            # the loop's next turn: let it, so it is closed when this returns.
            self._response.close()
            await asyncio.sleep(0)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """Raise aiohttp's exceptions (raw, or as httpx-aiohttp mapped them) as httpx's."""
    try:
        yield
    except httpx.HTTPError as exc:
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientError | TimeoutError):
            raise _httpx_error(cause) from cause
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _httpx_error(exc) from exc


def _httpx_error(exc: BaseException) -> httpx.HTTPError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, TimeoutError):  # SocketTimeoutError and the rest: nothing arrived
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS: never reached
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(message)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
        return httpx.ReadError(message)  # reached, then cut off
    return httpx.TransportError(message)
