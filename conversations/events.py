"""Names on the channel layer, in one place (ASCII letters, digits, '-', '_', '.')."""


def group(conversation_id) -> str:
    """Every socket open on the conversation listens here for messages, deltas and endings."""
    return f"conv-{conversation_id}"


def control_group(conversation_id) -> str:
    """The conversation's running generation listens here for stop and catch-up requests."""
    return f"conv-{conversation_id}.control"
