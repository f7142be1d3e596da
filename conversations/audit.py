"""The audit log of review reads: who read which conversations, how, when, from where.

Every read of other people's conversations through the admin goes through `audit_record`:
opening a transcript, searching message text, exporting. The entries (`AuditEntry`) are
shown on the admin's audit log page, which nobody can edit or delete from; each is also
written to the `qwenweb.audit` logger, for log shipping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from conversations.models import AuditEntry, Conversation
from qwenweb.client_address import client_ip_address

audit_log = logging.getLogger("qwenweb.audit")

# The most conversation ids one entry keeps (a search or bulk export of more says how many).
MAX_IDS = 1000


def audit_record(
    request,
    *,
    action: str,
    conversations: Iterable[Conversation],
    detail: str = "",
    query: str = "",
    format: str = "",
) -> AuditEntry:
    """Record that request.user read `conversations` (`action`: view, search or export).

    The address is the one sign-in throttling trusts (REMOTE_ADDR, or X-Forwarded-For only
    behind QWENWEB_TRUSTED_PROXY_COUNT proxies: qwenweb/client_address.py)."""
    conversations = list(conversations)
    actor = request.user
    owners = sorted({c.owner.get_username() for c in conversations})
    entry = AuditEntry.objects.create(
        actor=actor,
        actor_name=actor.get_username(),
        action=action,
        conversation_ids=[str(c.pk) for c in conversations[:MAX_IDS]],
        owners=owners[:MAX_IDS],
        detail=detail[:200],
        query=query[:200],
        format=format,
        ip_address=client_ip_address(request),
        user_agent=request.META.get("HTTP_USER_AGENT", "")[:300],
    )
    audit_log.info(
        "%s: %s %s (%s) of %s%s",
        entry.actor_name,
        action,
        ", ".join(entry.conversation_ids[:20]) or "no conversation",
        detail or format or "",
        ", ".join(owners[:20]) or "nobody",
        f", searching {query!r}" if query else "",
    )
    return entry
