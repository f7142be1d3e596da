"""Two things daphne's websockets lack, added where daphne runs the app.

1. **A bound on what a slow reader costs.** daphne (4.2) writes each frame into Twisted's
   transport, which keeps whatever the client has not read, without limit: a client that
   stops reading while the server keeps sending (a long reply, or catch-up answers) makes the
   process hold it all, and keeps holding it after the client left. Here every websocket
   registers a streaming producer on its transport; Twisted pauses it once the transport's
   buffer passes its bufferSize (64 KiB), and from then on the socket stops reading from the
   client too (as daphne's HTTP channel did) and what the app sends is counted; past
   `settings.QWENWEB_SOCKET_BACKLOG_BYTES` the connection is dropped. daphne then tells the
   app (`websocket.disconnect`), the consumer cleans up, and a page that was merely slow
   catches up from the database when htmx reconnects.
2. **Close reasons.** ASGI's `websocket.close` may carry a `reason`; daphne drops it. It is
   passed on here, so a client sees why its socket was closed, not only a number.
3. **A close handshake that has time to finish.** autobahn waits `closeHandshakeTimeout` (1 s)
   for the client's answer to the server's close frame, then aborts the connection; but its
   timers are quantized down to whole seconds (txaio's batched timer, `int(now + delay)`), so
   the wait was anywhere from 0 to 1 s: most server-side closes ended in a reset instead of a
   clean close, and when the abort came before Twisted had flushed its buffer, the close frame
   (code and reason) never left and the client saw a bare reset (1006 in a browser). The wait
   is CLOSE_HANDSHAKE_SECONDS here (so at least that less one second).

Installed by qwenweb/asgi.py. Under another ASGI server nothing here runs (uvicorn's
websockets library applies backpressure of its own).
"""

from __future__ import annotations

import logging

from zope.interface import implementer

logger = logging.getLogger("qwenweb.sockets")

# A close frame's reason is at most 123 bytes (RFC 6455, 5.5: 125 less the code's two).
MAX_REASON_BYTES = 123

# How long the server waits for the client's answer to its close frame before dropping the
# connection (see 3. above; autobahn's own is 1 s, which its timers make 0-1 s).
CLOSE_HANDSHAKE_SECONDS = 5


def close_reason(text: str) -> str:
    """`text` cut to what a close frame can carry, on a character boundary."""
    data = text.encode()[:MAX_REASON_BYTES]
    return data.decode(errors="ignore")


def install(backlog_limit: int) -> bool:
    """Patch daphne's websocket protocol (once). False when daphne is not importable."""
    try:
        from daphne.ws_protocol import WebSocketProtocol
        from twisted.internet.interfaces import IPushProducer
    except ImportError:  # pragma: no cover - daphne is a requirement
        return False
    if getattr(WebSocketProtocol, "_qwenweb_guarded", False):
        return True

    @implementer(IPushProducer)
    class Backlog:
        """Told by the transport when its buffer is full (paused) and empty again."""

        def __init__(self, protocol) -> None:
            self.protocol = protocol
            self.paused = False
            self.queued = 0  # bytes sent while paused
            self.dropped = False

        def pauseProducing(self) -> None:
            self.paused = True
            # Read no more from a client that does not read: its requests wait in its own
            # buffers, not in this process.
            self.protocol.transport.pauseProducing()

        def resumeProducing(self) -> None:
            self.paused = False
            self.queued = 0
            if not self.dropped:
                self.protocol.transport.resumeProducing()

        def stopProducing(self) -> None:
            self.paused = False

    original_on_open = WebSocketProtocol.onOpen
    original_server_send = WebSocketProtocol.serverSend
    original_handle_reply = WebSocketProtocol.handle_reply

    def onOpen(self) -> None:
        original_on_open(self)
        self.closeHandshakeTimeout = CLOSE_HANDSHAKE_SECONDS
        transport = self.transport
        backlog = Backlog(self)
        # daphne's HTTP channel registered itself on this transport before the upgrade and
        # never let go; the websocket takes its place.
        try:
            transport.unregisterProducer()
            transport.registerProducer(backlog, True)
        except Exception:
            logger.warning("No bound on what this websocket may queue", exc_info=True)
            return
        self._qwenweb_backlog = backlog

    def serverSend(self, content, binary=False) -> None:
        backlog = getattr(self, "_qwenweb_backlog", None)
        if backlog is not None:
            if backlog.dropped:
                return
            if backlog.paused:
                backlog.queued += len(content) if binary else len(content.encode())
                if backlog.queued > backlog_limit:
                    backlog.dropped = True
                    logger.info(
                        "Closed a websocket whose client stopped reading (%s: over %s bytes "
                        "waiting to be sent)",
                        self.client_addr, backlog_limit,
                    )  # fmt: skip
                    self.dropConnection(abort=True)
                    return
        if self.state != self.STATE_OPEN and self.state != self.STATE_CONNECTING:
            # The client is going (its close frame arrived first): a closing tab is normal,
            # and autobahn would raise Disconnected into the app for each late frame.
            logger.debug("A socket of %s closed while a frame was on its way", self.client_addr)
            return
        original_server_send(self, content, binary)

    def handle_reply(self, message) -> None:
        if (
            message.get("type") == "websocket.close"
            and message.get("reason")
            and self.state == self.STATE_OPEN
        ):
            code = message.get("code") or 1000
            self.sendClose(code=code, reason=close_reason(str(message["reason"])))
            return
        original_handle_reply(self, message)

    WebSocketProtocol.onOpen = onOpen
    WebSocketProtocol.serverSend = serverSend
    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._qwenweb_guarded = True
    return True
