"""Names on the channel layer, in one place (ASCII letters, digits, '-', '_', '.')."""

import hashlib


def group(conversation_id) -> str:
    """Every socket open on the conversation listens here for messages, deltas and endings."""
    return f"conv-{conversation_id}"


def control_group(conversation_id) -> str:
    """The conversation's running generation listens here for stop and catch-up requests."""
    return f"conv-{conversation_id}.control"


def user_group(user_id) -> str:
    """Every socket of the user, in any process, listens here for the end of its session
    ("session.ended": a logout, a password change, the account disabled or deleted)."""
    return f"user-{user_id}"


def session_tag(session_key: str) -> str:
    """Names a session in events without carrying its key, a credential, over the channel
    layer (Redis)."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]
