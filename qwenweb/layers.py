"""The channel layer of a single process (no REDIS_URL): Channels' in-memory layer, with its
housekeeping made cheap.

Channels' InMemoryChannelLayer walks every channel and every group membership on each
receive and group_send, to drop expired messages (older than `expiry`, 60 s) and memberships
(older than `group_expiry`, a day). With a few hundred sockets open, each holding a receive,
that walk ran on every frame of the layer: 10% of the process's time while 50 people sent at
once (bench/README.md). Expiry is measured in tens of seconds, so walking at most once a
second keeps it as exact as anyone can tell.
"""

import time

from channels.layers import InMemoryChannelLayer as ChannelsInMemoryChannelLayer

CLEAN_INTERVAL = 1.0  # seconds between walks


class InMemoryChannelLayer(ChannelsInMemoryChannelLayer):
    _cleaned_at = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned_at >= CLEAN_INTERVAL:
            self._cleaned_at = now
            super()._clean_expired()
