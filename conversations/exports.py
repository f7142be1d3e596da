"""A conversation as plain data, for the JSON export (users' own, and the admin's)."""

from decimal import Decimal

from django.urls import reverse

from conversations.models import Conversation, Message, MessageImage
from conversations.replies import branches


def conversation_data(conversation: Conversation) -> dict:
    """Everything a person needs to keep or audit a conversation; never any secret.
    `messages` is the branch shown in the chat; `all_messages` every version of every message,
    each naming its `parent_id` (the message it follows), so the tree can be rebuilt."""
    every = list(conversation.messages.prefetch_related("images"))
    tree = branches.Tree({m.pk: m.parent_id for m in every})
    active = set(branches.active_path(conversation, tree))
    data = [_message_data(m) for m in every]
    return {
        "id": str(conversation.id),
        "owner": conversation.owner.get_username(),
        "title": conversation.title,
        "model": conversation.model.name,
        "system_prompt": conversation.prompt_text,
        "system_prompt_name": conversation.system_prompt.name if conversation.system_prompt else "",
        "settings": conversation.settings,
        "created_at": conversation.created_at.isoformat(),
        "messages": [item for item in data if item["id"] in active],
        "all_messages": data,
    }


def _message_data(m: Message) -> dict:
    return {
        "id": m.pk,
        "parent_id": m.parent_id,
        "role": m.role,
        "content": m.content,
        "reasoning": m.reasoning,
        "tool_steps": m.tool_steps,
        "sources": m.sources,
        "json_mode": m.json_mode,
        "rating": m.rating,
        "rating_comment": m.rating_comment,
        "status": m.status,
        "model": m.model,
        "finish_reason": m.finish_reason,
        "usage": {
            "input_tokens": m.input_tokens,
            "output_tokens": m.output_tokens,
            "reasoning_tokens": m.reasoning_tokens,  # the thinking part of output_tokens
        },
        # At the model's prices when the reply was saved; None without prices (or usage).
        "cost": cost_data(m),
        "request_id": m.request_id,
        "error": {"code": m.error_code, "message": m.error_message} if m.error_code else None,
        # An uploaded image as the URL the app serves it from (to its owner and reviewers).
        "images": [_image_url(m, image) for image in m.images.all()],
        # Each image as the chat shows it: its URL, and the path of its thumbnail (a URL
        # image's through the image proxy; an upload's is its own URL).
        "image_thumbnails": [
            {"url": _image_url(m, image), "src": thumbnail_src(m, n, image)}
            for n, image in enumerate(m.images.all())
        ],
        "created_at": m.created_at.isoformat(),
    }


def cost_data(message: Message) -> dict | None:
    """A reply's cost as {"amount": "<decimal>", "currency": "CNY"}: the amount as a string,
    exact, without trailing zeros (a float would round it)."""
    if message.cost is None:
        return None
    return {"amount": decimal_text(message.cost), "currency": message.cost_currency}


def decimal_text(value: Decimal) -> str:
    """1.2300 -> "1.23", 0E-10 -> "0": plain notation, never an exponent."""
    text = format(Decimal(value), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _image_url(message: Message, image: MessageImage) -> str:
    if image.upload_id:
        return reverse("conversation_image", args=[message.conversation_id, image.upload_id])
    return image.url


def thumbnail_src(message: Message, index: int, image: MessageImage) -> str:
    """Where a page loads the `index`-th image of `message` from: an upload from its own URL,
    a URL image through the image proxy (conversations/images.py)."""
    if image.upload_id:
        return _image_url(message, image)
    return reverse("message_image", args=[message.conversation_id, message.pk, index])


def active_messages(conversation: Conversation) -> list[Message]:
    """The branch shown in the chat, oldest first (the Markdown export)."""
    path = branches.active_path(conversation)
    return list(conversation.messages.filter(pk__in=path).order_by("pk"))
