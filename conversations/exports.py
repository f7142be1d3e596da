"""A conversation as plain data, for the JSON export (users' own, and the admin's)."""

from conversations.models import Conversation


def conversation_data(conversation: Conversation) -> dict:
    """Everything a person needs to keep or audit a conversation; never any secret."""
    return {
        "id": str(conversation.id),
        "owner": conversation.owner.get_username(),
        "title": conversation.title,
        "model": conversation.model.name,
        "system_prompt": conversation.system_prompt.text if conversation.system_prompt else "",
        "created_at": conversation.created_at.isoformat(),
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "reasoning": m.reasoning,
                "status": m.status,
                "model": m.model,
                "finish_reason": m.finish_reason,
                "usage": {"input_tokens": m.input_tokens, "output_tokens": m.output_tokens},
                "request_id": m.request_id,
                "error": {"code": m.error_code, "message": m.error_message}
                if m.error_code
                else None,
                "images": [image.url for image in m.images.all()],
                "created_at": m.created_at.isoformat(),
            }
            for m in conversation.messages.prefetch_related("images")
        ],
    }
