import contextlib
import json
import re
from decimal import ROUND_HALF_UP, Decimal

from django import template
from django.utils.safestring import mark_safe

from conversations.rendering import render_markdown, render_settled

register = template.Library()


@register.filter
def markdown(text: str) -> str:
    """Untrusted markdown → sanitized HTML (see conversations.rendering)."""
    return mark_safe(render_markdown(text or ""))  # noqa: S308 - sanitized by nh3


@register.filter
def streaming_parts(message) -> dict:
    """A streaming reply's text as its page shows it: the blocks that have settled, formatted
    (`html`, up to character `settled`), and the block still being written (`tail`), as text;
    `code` when that block is an open code fence. A reply in JSON mode stays text until the
    end (it is shown as formatted JSON then)."""
    text = message.content or ""
    pieces = [] if getattr(message, "json_mode", False) else render_settled(text)
    settled = pieces[-1][1] if pieces else 0
    tail = text[settled:]
    return {
        "html": mark_safe("".join(html for _start, _end, html in pieces)),  # noqa: S308 - nh3
        "settled": settled,
        "tail": tail,
        "code": re.match(r" {0,3}(```|~~~)", tail) is not None,
    }


@register.filter
def tool_calls(steps) -> list[dict]:
    """A reply's tool steps (Message.tool_steps) as the calls to show, in order: each with its
    tool's name, its arguments as sent, and its result (None while it runs)."""
    shown = []
    for step in steps or ():
        results = {result.get("tool_call_id"): result for result in step.get("results", ())}
        for position, call in enumerate(step.get("calls", ())):
            function = call.get("function") or {}
            result = results.get(call.get("id")) if call.get("id") else None
            if result is None and position < len(step.get("results", ())):
                result = step["results"][position]
            shown.append({
                "name": function.get("name", ""),
                "arguments": function.get("arguments", ""),
                "result": None if result is None else result.get("content", ""),
            })  # fmt: skip
    return shown


@register.filter
def tokens_short(count: int | None) -> str:
    """A context size as people say it: 1,000,000 → 1M, 131,072 → 128K."""
    if not count:
        return ""
    if count >= 1_000_000:
        return f"{count / 1_000_000:g}M"
    return f"{round(count / 1024)}K" if count >= 1024 else str(count)


# Currencies whose sign people read at a glance; any other is written after the amount.
CURRENCY_SIGNS = {"CNY": "¥", "USD": "$", "EUR": "€", "GBP": "£", "HKD": "HK$", "SGD": "S$"}


@register.filter
def cost_text(message) -> str:
    """A reply's cost as people read it: "¥0.0031", "$1.20", "0.05 EUR"; "" without one.
    Two significant digits for a fraction of a cent, else cents: a short reply costs far less
    than one."""
    amount = getattr(message, "cost", None)
    if amount is None:
        return ""
    amount = Decimal(amount)
    places = 2 if amount >= 1 or amount == 0 else min(10, max(2, 1 - amount.adjusted()))
    text = f"{amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,f}"
    if places > 2:
        text = text.rstrip("0")
        text += "0" * max(0, 2 - len(text.partition(".")[2]))
    currency = getattr(message, "cost_currency", "") or ""
    sign = CURRENCY_SIGNS.get(currency)
    return f"{sign}{text}" if sign else f"{text} {currency}".rstrip()


@register.filter
def reply_body(message) -> str:
    """A finished reply's text as HTML: Markdown, or, for a reply written in JSON mode, its
    JSON formatted in a code block (as written, when it does not parse)."""
    if not getattr(message, "json_mode", False):
        return markdown(message.content)
    return mark_safe(render_markdown(json_block(message.content or "")))  # noqa: S308 - nh3


@register.filter
def reply_rest(message) -> str:
    """A finished reply's render after its first `message.kept` characters, which the page
    shows already as the blocks that settled while it streamed: the two together are the
    reply rendered whole (rendering.settled_blocks)."""
    return markdown((message.content or "")[message.kept :])


@register.filter
def json_code(text: str) -> str:
    """JSON (a tool call's arguments, its result) as a highlighted code block, formatted when
    it parses: the same highlighter as a reply's code."""
    return mark_safe(render_markdown(json_block(text or "")))  # noqa: S308 - sanitized by nh3


def json_block(text: str) -> str:
    """JSON text as a fenced Markdown code block, indented when it parses."""
    with contextlib.suppress(ValueError):
        text = json.dumps(json.loads(text), ensure_ascii=False, indent=2)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}json\n{text}\n{fence}"


@register.filter
def web_url(value: str) -> str:
    """An http(s) URL, or nothing: a source's link never runs script or opens another scheme."""
    value = str(value or "")
    return value if re.match(r"https?://", value, re.IGNORECASE) else ""
