"""Requests to the replies being written, in whichever process runs them: one subscription a
process, not one a reply.

Every server process (each event loop of it) listens on one channel-layer group,
events.CONTROL_GROUP, from its first reply on, and hands each request that arrives there
(events.Stop, Sync, Watch, Retire: each names its reply by message_id) to the generation of
that reply if it runs here (generation.running), which acts on it (Generation.on_request).
Requests for a reply that does not run here are dropped: another process runs it, or none.

Until the fifteenth pass of bench/README.md every reply subscribed a channel of its own and
joined its conversation's control group before its announcement, and left both at its end:
four Redis commands a reply, each behind the others on the layer's one connection, which at
fifty sends at once held announcements, and so first tokens, up to 100 ms. Requests still go
to the conversation's control group too (ask), where the replies of processes still on an
earlier version listen while a rolling restart runs both.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref

from channels.layers import InMemoryChannelLayer, get_channel_layer

from conversations.replies import events

logger = logging.getLogger(__name__)


class _Listener:
    """This event loop's subscription to the control group, and the task reading it."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self.subscribing: asyncio.Future | None = None
        self.task: asyncio.Task | None = None

    @property
    def listening(self) -> bool:
        return self.task is not None and not self.task.done()

    async def ready(self) -> None:
        if self.listening:
            return
        if self.subscribing is None or self.subscribing.done():
            # Its own context: the listener serves every reply, not the first one's request.
            self.subscribing = asyncio.get_running_loop().create_task(
                self._subscribe(), context=contextvars.Context()
            )
        # Shielded: a reply cancelled while waiting leaves the subscription to the others.
        await asyncio.shield(self.subscribing)

    async def _subscribe(self) -> None:
        channel = await self.layer.new_channel()
        await self.layer.group_add(events.CONTROL_GROUP, channel)
        self.task = asyncio.get_running_loop().create_task(
            self._receive(channel), name="reply-control", context=contextvars.Context()
        )

    async def _receive(self, channel: str) -> None:
        from conversations.replies.generation import running

        while True:
            try:
                message = await self.layer.receive(channel)
                generation = running(message.get("message_id"))
                if generation is not None:
                    await generation.on_request(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("The replies' control channel failed", exc_info=True)
                await asyncio.sleep(1)


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = (
    weakref.WeakKeyDictionary()
)


async def listening(layer=None) -> None:
    """Return once this process hears the control group (at once but for its first reply);
    raises what the channel layer raised if it cannot subscribe (Redis away: the next reply
    tries again)."""
    loop = asyncio.get_running_loop()
    listener = _listeners.get(loop)
    if listener is None:
        listener = _listeners[loop] = _Listener(layer or get_channel_layer())
    await listener.ready()


async def ask(conversation_id, request: events.Event) -> None:
    """Send `request` to the generation of the reply it names, in whichever process it runs
    (all of them hear it). Raises what the channel layer raised."""
    layer = get_channel_layer()
    message = request.as_message()
    await layer.group_send(events.CONTROL_GROUP, message)
    if not isinstance(layer, InMemoryChannelLayer):  # one process: no earlier version about
        await layer.group_send(events.control_group(conversation_id), message)
