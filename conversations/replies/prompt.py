"""History → request: what DashScope is sent for a reply.

The system prompt, then the reply's own branch of the conversation (other versions are not
part of what it answers), trimmed from the oldest turn to fit the model's context window, with
images for a vision model, the tools for a model that may call them (and the rounds of calls
earlier replies made, as the docs send them back); with `partial`, the reply's text so far for
DashScope's partial mode.
"""

from __future__ import annotations

from conversations import uploads
from conversations.dashscope import ChatMessage, ChatRequest
from conversations.models import Conversation, Message, MessageImage, Upload
from conversations.replies import branches, intake, options, tools

# Room kept free in the context window for the reply itself when trimming history.
DEFAULT_OUTPUT_RESERVE = 8192


def estimate_tokens(text: str) -> int:
    """A cautious token estimate: CJK text runs near one token per character."""
    return len(text) // 2 + 1


def build_request(
    *,
    conversation: Conversation,
    reply_to: Message | None = None,
    partial: bool = False,
    tree: dict[int, tuple] | None = None,
    after: int | None = None,
) -> ChatRequest:
    """The DashScope request for the reply `reply_to`: system prompt, then the history before
    it, trimmed from the oldest turn to fit the model's context window. With `partial`, the
    reply's text so far goes last, marked for DashScope's partial mode: the model carries on
    from it. `tree` is the chat's messages as intake.message_tree reads them, if the caller
    read them already. Without `reply_to`, the request of a reply to be written below the
    message `after` (service.reply_plan)."""
    profile = conversation.model
    # One read of the whole tree, as plain values (a long chat costs its rows, not a model
    # instance per message), then the reply's own branch only: other versions are not part
    # of what it answers.
    rows = tree if tree is not None else intake.message_tree(conversation.pk)
    parent_id = reply_to.parent_id if reply_to is not None else after
    path = branches.Tree({pk: row[0] for pk, row in rows.items()}).path(parent_id)
    history = [
        (pk, role, content, intake.tool_steps(steps))
        for pk in path
        for _parent, role, content, steps in (rows[pk],)
        if role != Message.Role.SYSTEM
    ]
    images = _images([pk for pk, role, *_ in history if role == Message.Role.USER], profile)
    turns: list[ChatMessage] = []
    for pk, role, content, tool_steps in history:
        if role == Message.Role.ASSISTANT and not content:
            continue  # a reply that failed before writing anything has nothing to recall
        if role == Message.Role.ASSISTANT and tool_steps:
            turns.extend(reply_turns(content, tool_steps))
            continue
        turns.append(ChatMessage(role=role, content=content, images=images.get(pk, [])))
    if partial:
        turns.append(ChatMessage(role="assistant", content=reply_to.content, partial=True))

    system = conversation.prompt_text
    budget = profile.context_limit - (profile.max_output_tokens or DEFAULT_OUTPUT_RESERVE)
    budget -= estimate_tokens(system) if system else 0
    kept: list[ChatMessage] = []
    for turn in reversed(turns):
        cost = estimate_tokens(turn.content) + 1000 * len(turn.images)
        if turn.tool_calls:
            cost += sum(estimate_tokens(c["function"]["arguments"]) + 10 for c in turn.tool_calls)
        if kept and cost > budget:
            break
        kept.append(turn)
        budget -= cost
    kept.reverse()
    # A history cut mid-exchange must still start with the user's turn.
    while len(kept) > 1 and kept[0].role != Message.Role.USER:
        kept.pop(0)

    messages = [ChatMessage(role="system", content=system)] if system else []
    messages.extend(_inline_uploads(kept))
    parameters = dict(profile.parameters or {})
    parameters.update(options.parameters(conversation.settings or {}, profile))
    if profile.max_output_tokens and "max_tokens" not in parameters:
        parameters["max_tokens"] = profile.max_output_tokens
    if profile.tools and not partial and "tools" not in parameters:
        parameters["tools"] = tools.definitions()
        # Several calls in one turn when a question needs them (the default is one a turn).
        parameters.setdefault("parallel_tool_calls", True)
    return ChatRequest(
        model=profile.name,
        messages=messages,
        endpoint=profile.endpoint,
        protocol=profile.protocol,
        parameters=parameters,
    )


# An upload stands as this until the history is trimmed: only the turns kept read their files.
UPLOAD_REF = "upload:"


def _images(user_messages: list[int], profile) -> dict[int, list[str]]:
    """The images of these user messages, for a vision model (none for another): each
    message's, in order, as URLs, an upload as `upload:<pk>` (see `_inline_uploads`)."""
    if not profile.accepts_images or not user_messages:
        return {}
    found: dict[int, list[str]] = {}
    rows = (
        MessageImage.objects.filter(message__in=user_messages)
        .order_by("pk")
        .values_list("message_id", "url", "upload_id")
    )
    for message_id, url, upload_id in rows:
        found.setdefault(message_id, []).append(url or f"{UPLOAD_REF}{upload_id}")
    return found


def _inline_uploads(turns: list[ChatMessage]) -> list[ChatMessage]:
    """The turns with each `upload:<pk>` replaced by the upload as a data: URL. Called on the
    turns kept after trimming: a long chat's old images are never read from disk."""
    wanted = {
        int(image.removeprefix(UPLOAD_REF))
        for turn in turns
        for image in turn.images
        if image.startswith(UPLOAD_REF)
    }
    if not wanted:
        return turns
    found = Upload.objects.in_bulk(wanted)
    for turn in turns:
        turn.images = [
            uploads.data_url(found[int(image.removeprefix(UPLOAD_REF))])
            if image.startswith(UPLOAD_REF)
            else image
            for image in turn.images
        ]
    return turns


def step_turns(text: str, step: dict) -> list[ChatMessage]:
    """One round of function calling as the docs send it back: the assistant's turn with its
    calls (and the text it wrote before them), then a `tool` turn per result."""
    return [
        ChatMessage(role="assistant", content=text, tool_calls=step["calls"]),
        *(
            ChatMessage(role="tool", content=result["content"], tool_call_id=result["tool_call_id"])
            for result in step["results"]
        ),
    ]


def reply_turns(content: str, steps: list[dict]) -> list[ChatMessage]:
    """A saved reply that called tools, as the turns it was written in: each round's text and
    calls, the results, then the answer. A round cut short (its results missing: stopped or
    interrupted mid-round) is left out, since a call without its result is refused."""
    turns: list[ChatMessage] = []
    start = 0
    for step in steps:
        if len(step["results"]) < len(step["calls"]):
            break
        turns.extend(step_turns(content[start : step["end"]], step))
        start = step["end"]
    turns.append(ChatMessage(role="assistant", content=content[start:]))
    return turns
