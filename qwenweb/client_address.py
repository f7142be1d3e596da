"""The client's address as the server can trust it (sign-in throttling, django-axes)."""

from __future__ import annotations

import ipaddress

from django.conf import settings


def client_ip_address(request) -> str | None:
    """The client's address for sign-in throttling.

    Without trusted proxies, REMOTE_ADDR. Behind N trusted proxies, the N-th X-Forwarded-For
    entry from the right: the address the outermost trusted proxy saw. Entries further left
    are whatever the client wrote, so they are never used; a request with fewer entries than
    proxies (it did not come through them all) or an entry that is no address counts under
    REMOTE_ADDR.
    """
    remote = request.META.get("REMOTE_ADDR") or None
    count = settings.QWENWEB_TRUSTED_PROXY_COUNT
    if count <= 0:
        return remote
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    hops = [hop for hop in hops if hop]
    if len(hops) < count:
        return remote
    hop = hops[-count]
    if hop.startswith("[") and "]" in hop:  # [2001:db8::1]:443
        hop = hop[1 : hop.index("]")]
    elif hop.count(":") == 1:  # 203.0.113.7:443
        hop = hop.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return remote
