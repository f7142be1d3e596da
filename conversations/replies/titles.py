"""A chat's title, written by a cheap model after its first reply.

The first message gives a chat its title at once (its first line, rules.title_from). When the
chat's first reply has finished, QWENWEB_TITLE_MODEL (default qwen-flash; empty switches this
off) is asked for a short title in the user's language, in a task of its own: the reply is
never delayed by it. The answer replaces the first-line title only if that is still the title
(a chat the user renamed meanwhile keeps its name), and the chat's open pages are told. Any
failure (no answer within TITLE_TIMEOUT, an error, an empty answer) leaves the first-line
title, and is logged, not shown: the chat has a title either way.
"""

from __future__ import annotations

import asyncio
import logging
import re

from django.conf import settings

from conversations import sockets
from conversations.dashscope import ChatMessage, ChatRequest
from conversations.db import db_async
from conversations.models import Conversation
from conversations.replies import events
from conversations.replies.rules import TITLE_LENGTH

logger = logging.getLogger(__name__)

TITLE_TIMEOUT = 15.0
INSTRUCTION = (
    "Write a title for this conversation: at most six words, in the language of the user's "
    "message, with no quotes, no Markdown and no full stop at the end. Answer with the title "
    "only."
)
# The tasks writing titles now: asyncio keeps only weak references to tasks.
_writing: set[asyncio.Task] = set()


def start(*, conversation_id, message: str, reply: str, first_line_title: str) -> None:
    """Write the chat's title in the background (see the module's docstring)."""
    if not settings.QWENWEB_TITLE_MODEL or not message.strip():
        return
    task = asyncio.create_task(
        write(
            conversation_id=conversation_id,
            message=message,
            reply=reply,
            first_line_title=first_line_title,
        )
    )
    _writing.add(task)
    task.add_done_callback(_writing.discard)


def request_for(message: str, reply: str) -> ChatRequest:
    return ChatRequest(
        model=settings.QWENWEB_TITLE_MODEL,
        messages=[
            ChatMessage(role="system", content=INSTRUCTION),
            ChatMessage(role="user", content=f"{message[:2000]}\n\n---\n{reply[:1000]}"),
        ],
        parameters={"max_tokens": 40},
    )


def clean(text: str) -> str:
    """The model's answer as a title: one line, without quotes, Markdown or a final stop."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = re.sub(r"^(?:#+\s*|title\s*[:：]\s*|标题\s*[:：]\s*)+", "", line.strip(), flags=re.I)
    line = line.strip(" \"'“”‘’「」『』*_`").rstrip("。.!！?？")
    line = " ".join(line.split())
    if len(line) > TITLE_LENGTH:
        line = line[: TITLE_LENGTH - 1].rstrip() + "…"
    return line


async def write(*, conversation_id, message: str, reply: str, first_line_title: str) -> bool:
    """Ask for a title and keep it if the chat still has its first-line title; True if the
    title changed."""
    from conversations.upstream import get_client

    try:
        async with asyncio.timeout(TITLE_TIMEOUT):
            completion = await get_client().chat(request_for(message, reply))
        title = clean(completion.text)
        if not title or title == first_line_title:
            return False
        if not await _replace(conversation_id, first_line_title, title):
            return False  # renamed meanwhile (or deleted): the user's name stays
        await sockets.broadcast(conversation_id, events.Titled(title=title).as_message())
        return True
    except Exception as exc:
        logger.info("No model-written title for %s (%s): keeping its first line", conversation_id,
                    type(exc).__name__)  # fmt: skip
        return False


@db_async
def _replace(conversation_id, old: str, new: str) -> bool:
    """Set the title to `new` if it is still `old`, in one statement (no lost rename)."""
    return bool(Conversation.objects.filter(pk=conversation_id, title=old).update(title=new))
