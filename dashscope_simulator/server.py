"""A DashScope look-alike: a plain ASGI app served by uvicorn on a real loopback port.

It is the peer for the client's tests and the backend of the app's offline demo mode, so by
default it writes pleasant, deterministic markdown replies built from the request, streamed at a
human pace. Tests steer it with scenarios (errors, stalls, dropped connections, odd framing),
registered in-process or over HTTP (``/_simulator/...``) when it runs in another process.
With a ``control_token`` those control endpoints answer only requests that carry it
(``Authorization: Bearer <token>``): the offline demo runs one on a loopback port that every
local process can reach, and its scenarios would put words into anyone's chat.

Function calling. When a request offers ``tools`` (native: under ``parameters``; compatible: at
the top level), the simulated model calls them the way Qwen does, deterministically, judging by
the last user message:

* "time", "几点" or "时间" calls ``get_current_time`` with ``{}``;
* "weather" or "天气" calls ``get_current_weather`` with the place it names ("weather in
  Tokyo", "杭州天气"); a weather question that names no place gets a text answer;
* both in one question make two calls, in the order asked: in one turn when the request sets
  ``parallel_tool_calls: true``, else one per turn (the Qwen docs default it to false), each tool
  once per question;
* "loop forever" (the trigger, in the last user message) calls ``get_current_time`` (or the
  first tool offered) on every turn, results or not: for tests of a cap on rounds;
* "call a missing tool" calls ``lookup_stock_price``, a tool no request offers.

``tool_choice`` "none" turns calls off, ``{"type": "function", "function": {"name": ...}}``
forces that tool (once per question), "required" calls the first tool when nothing else would.
A call streams as the protocol does (its id and name first, then its JSON arguments in at least
two pieces), with finish reason "tool_calls"; a non-streaming answer carries the whole calls.
Call ids are ``call_`` plus a hash of the model, the question, the round and the position.
When the last turn is a ``tool`` result, the answer quotes every result since the question
whole, with its tool's name, and finishes with "stop". A ``tool`` turn without a
``tool_call_id``, or whose id no earlier assistant turn's ``tool_calls`` holds, is a 400
``InvalidParameter`` (the simulator's wording; upstream's is not documented), as is a malformed
``tools`` list. A scenario's ``reply`` still wins over all of this; its errors, stalls and
drops apply to tool calls too.

Request parameters (native: under ``parameters``; compatible: at the top level) act as upstream's:

* Out-of-range values are a 400 ``InvalidParameter`` in the words of the Model Studio
  error-code page (compatible mode: its ``{"error": {...}}`` shape, code
  ``invalid_parameter_error``): ``temperature`` [0, 2) ("Temperature should be in [0.0,
  2.0)"), ``top_p`` (0, 1], ``top_k`` >= 0, ``presence_penalty`` [-2, 2],
  ``repetition_penalty`` > 0, ``seed`` [0, 2**63 - 1], ``max_tokens`` from 1 to the model's
  maximum output (``MAX_OUTPUT_TOKENS``), ``thinking_budget`` from 1 to
  ``MAX_THINKING_BUDGET`` (the simulator's cap), ``stop`` a string or a list of one kind.
* ``stop`` (a string or a list of strings): the reply ends just before the first stop text,
  which it does not include, with finish reason "stop". It cuts a scenario's ``reply`` too,
  which is how a test makes the reply contain a known stop word; reasoning is not cut.
* ``thinking_budget``: the reasoning is at most that many simulator tokens (words).
* ``seed``: the same seed and request give the same reply; another seed, another reply.
  Without a seed a reply is what it always was.
* ``response_format`` ``{"type": "json_object"}``: a 400 unless some message contains "json"
  (any case), and a 400 with thinking on; else the reply is a JSON object, ``{"topic",
  "answer", "points", "confidence"}``, indented so it streams in pieces (a scenario's
  ``reply`` still wins, and ``max_tokens`` may cut it, as upstream).
* ``enable_search: true`` with ``search_options: {"enable_source": true}``: two or three
  deterministic sources (``{"index", "title", "url", "site_name", "icon"}``, https URLs on
  example.com/.org/.net) come with the first chunk: native in ``output.search_info.
  search_results`` (and in the whole body without streaming); compatible mode at the top level
  of the first chunk (or of the body), as ``search_info`` -- that placement is the
  simulator's choice, since upstream's compatible mode is not consistent about it. Without
  ``enable_source``, no sources. "unsafe sources" (the trigger, in the last user message)
  makes the second source hostile: a title with ``<script>alert(1)</script>``, a
  ``javascript:`` URL and icon, and a control character in its site name.

Usage counts simulator tokens (words; a tool call's argument piece is one). Output tokens
include the reasoning; a reply with reasoning also reports that part apart, as the reference
says thinking models do: native ``usage.output_tokens_details.reasoning_tokens`` (cumulative in
every chunk, like the rest), compatible ``usage.completion_tokens_details.reasoning_tokens`` (in
the usage chunk, and in a whole body).

Run it in the foreground::

    python -m dashscope_simulator --host 127.0.0.1 --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qs

import uvicorn

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KNOWN_MODELS: tuple[str, ...] = (
    "qwen-plus",
    "qwen-max",
    "qwen3-max",
    "qwen-flash",
    "qwen-turbo",
    "qwen3-vl-plus",
    "qwen3-vl-flash",
    "qwen-vl-max",
    "qwen-vl-plus",
    "qvq-max",
    "qwen3.5-plus",
    "deepseek-v3",
    "deepseek-r1",
    "kimi-k2.5",
    "qwen3-32b",
    "qwq-plus",
)
# Multimodal models that (like the real service) are also tolerated on the text endpoint.
_OMNI_MODELS = frozenset({"qwen3.5-plus", "kimi-k2.5"})
_THINKING_ONLY_MODELS = frozenset({"deepseek-r1", "qwq-plus", "qvq-max"})
_STREAM_ONLY_MODELS = frozenset({"qwq-plus", "qvq-max", "qwen3-32b"})
_NON_STREAM_THINKING_MODELS = frozenset({"qwen3-max", "qwen3.5-plus"})

ErrorPlacement = Literal["before_json", "before_sse", "first_event", "json_200", "mid_stream"]
_PLACEMENTS = ("before_json", "before_sse", "first_event", "json_200", "mid_stream")
_FRAMINGS = ("standard", "no_blank_lines", "partial_response")

log = logging.getLogger(__name__)


def _int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return int(query.get(name, [default])[0])
    except ValueError:
        return default


def is_known_model(model: str) -> bool:
    """Models the simulator serves: the catalogue above plus anything named ``sim-...``."""
    return model in KNOWN_MODELS or model.startswith("sim-")


def is_vision_model(model: str) -> bool:
    """Vision models (``vl``/``qvq`` in the name) live only on the multimodal endpoint."""
    lowered = model.lower()
    return "vl" in lowered or "qvq" in lowered


# -- scenarios --------------------------------------------------------------------------------


@dataclass
class ScenarioError:
    """An error to inject. ``where`` picks the wire shape (see the module docs of the client)."""

    status: int = 429
    code: str = "Throttling.RateQuota"
    message: str = "Requests rate limit exceeded, please try again later."
    where: ErrorPlacement = "before_json"
    after_chunks: int = 0
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.where not in _PLACEMENTS:
            raise ValueError(f"error.where must be one of {_PLACEMENTS}, got {self.where!r}")


@dataclass
class Scenario:
    """What to do with the next matching request(s).

    ``match`` selects requests whose last user message contains it (None: any request);
    ``times`` is how many requests it applies to (-1: forever). Unset fields keep the defaults.
    ``echo_authorization`` plays an upstream (or a proxy) that echoes the request's
    Authorization header: into the request id (body and ``x-request-id``), the error's code and
    message, and the reply text.
    """

    match: str | None = None
    times: int = 1
    reply: str | None = None
    tokens: int | None = None
    reasoning: str | None = None
    first_token_delay: float | None = None
    token_delay: float | None = None
    tokens_per_chunk: int | None = None
    error: ScenarioError | None = None
    stall_after_chunks: int | None = None
    stall_seconds: float = 30.0
    drop_after_chunks: int | None = None
    # A stream left open this long after its last event (a proxy that is slow to close it).
    hold_open_seconds: float = 0.0
    finish_reason: str | None = None
    framing: str = "standard"
    echo_authorization: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.error, dict):
            self.error = ScenarioError(**self.error)
        if self.framing not in _FRAMINGS:
            raise ValueError(f"framing must be one of {_FRAMINGS}, got {self.framing!r}")
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be a positive count or -1 (forever)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """Build from JSON; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown scenario field(s): {', '.join(sorted(unknown))}")
        error = data.get("error")
        if error is not None and not isinstance(error, dict):
            raise ValueError("scenario error must be an object")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def applies_to(self, last_user_text: str) -> bool:
        return self.match is None or self.match in last_user_text


@dataclass
class RecordedRequest:
    """A request as the simulator saw it; the Authorization value is never stored.

    ``outcome`` is filled in when the response ends: "completed", "error", "disconnected"
    (the client went away mid-response) or "dropped" (a scenario cut the connection).
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    authorized: bool
    body: Any
    request_id: str
    outcome: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _ConnectionDropped(Exception):
    """Raised inside the app to make uvicorn cut the connection without ending the body."""


class _QuietDrops(logging.Filter):
    """Hide uvicorn's traceback for drops the simulator did on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _ConnectionDropped)


_QUIET_DROPS = _QuietDrops()


def _install_drop_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _QUIET_DROPS not in logger.filters:
        logger.addFilter(_QUIET_DROPS)


# -- reply composition ------------------------------------------------------------------------

_TOKEN = re.compile(r"^\s+|\S+\s*")
_DEFAULT_MAX_TOKENS = 120

_LEADS = (
    "**Good question.**",
    "**Here is a short answer.**",
    "**Let me break that down.**",
    "**Happy to help with that.**",
)
_OPENERS = (
    "This is the offline simulator speaking, so treat what follows as a friendly sketch "
    "rather than expert advice.",
    "I'm a local stand-in for Qwen, so the details below are illustrative, but the shape is "
    "what a real answer would look like.",
    "Since this reply comes from the demo simulator, it is deterministic: the same question "
    "gets the same answer.",
)
_BULLETS = (
    "Start with the smallest version that works, then grow it.",
    "Write down what *done* looks like before you begin.",
    "Keep the feedback loop short: try, look, adjust.",
    "Prefer plain, boring tools you already understand.",
    "Check the edge cases: empty input, huge input, and bad input.",
    "Measure before you optimise anything.",
    "Leave a note for future you explaining **why**, not just what.",
    "Ask someone else to read it; fresh eyes catch the obvious.",
)
_FILLERS = (
    "Most of the work is in framing the problem clearly; the rest tends to follow.",
    "If anything here is unclear, ask a follow-up and I will expand on it.",
    "There is rarely one right answer, but there are usually a few clearly wrong ones.",
    "A quick experiment often settles a debate faster than a long discussion.",
    "Small, reversible steps make it easy to change course later.",
)
_CLOSERS = (
    "Hope that helps!",
    "Want me to go deeper on any of these points?",
    "Let me know how it goes.",
)
_SNIPPETS = (
    'def answer(question: str) -> str:\n    return f"A thoughtful reply to {question!r}"',
    'steps = ["understand", "try", "refine"]\nfor step in steps:\n    print(step)',
    'const reply = (q) => `Simulated answer to ${q}`;\nconsole.log(reply("hello"));',
)


def tokenize(text: str) -> list[str]:
    """Split text into simulator tokens: each word with its trailing whitespace.

    ``"".join(tokenize(text)) == text`` for any text, newlines included.
    """
    return _TOKEN.findall(text)


def _seed(*parts: str) -> int:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _quote(text: str, limit: int = 80) -> str:
    flat = " ".join(text.replace("`", "'").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _topic(text: str) -> str:
    words = text.split()[:6]
    if not words:
        return "Your message"
    topic = " ".join(words).replace("`", "'").rstrip(".,;:!?")
    return topic[:1].upper() + topic[1:]


def compose_reply(
    *,
    model: str,
    last_user: str,
    turn: int,
    images: int = 0,
    target_tokens: int | None = None,
    seed: int | None = None,
) -> str:
    """A deterministic markdown reply built from the request.

    A heading or bold lead, a paragraph quoting the user's last message, a bullet list,
    sometimes a fenced code block, and a closing line; ~60-120 tokens unless ``target_tokens``.
    A request's ``seed`` picks another (equally deterministic) reply.
    """
    seed = _seed(model, last_user, str(turn), *_seed_part(seed))
    target = target_tokens if target_tokens is not None else 60 + seed % 61
    heading = f"### {_topic(last_user)}" if seed % 2 else _LEADS[seed % len(_LEADS)]
    paragraph = f'You asked: "{_quote(last_user)}". {_OPENERS[(seed >> 3) % len(_OPENERS)]}'
    if images:
        noun = "image" if images == 1 else "images"
        paragraph += f" I can see {images} {noun} attached, though I can only pretend to look."
    start = (seed >> 5) % len(_BULLETS)
    bullets = "\n".join(f"- {_BULLETS[(start + i) % len(_BULLETS)]}" for i in range(3))
    blocks = [heading, paragraph, bullets]
    if (seed >> 7) % 3 == 0:
        snippet = _SNIPPETS[(seed >> 9) % len(_SNIPPETS)]
        language = "javascript" if snippet.startswith("const") else "python"
        blocks.append(f"```{language}\n{snippet}\n```")
    closer = _CLOSERS[(seed >> 11) % len(_CLOSERS)]
    fillers: list[str] = []

    def render() -> str:
        body = [blocks[0], " ".join([paragraph, *fillers]), *blocks[2:], closer]
        return "\n\n".join(body)

    text = render()
    while len(tokenize(text)) < target:
        fillers.append(_FILLERS[(seed + len(fillers)) % len(_FILLERS)])
        longer = render()
        if target_tokens is None and len(tokenize(longer)) > _DEFAULT_MAX_TOKENS:
            break
        text = longer
    if target_tokens is not None:
        text = "".join(tokenize(text)[:target_tokens])
    return text


def _asks_for_title(messages: list[dict[str, Any]]) -> bool:
    """A system message asking for a conversation's title, as qwenweb's title model sends."""
    return any(
        message.get("role") == "system"
        and "title for this conversation" in str(message.get("content", "")).lower()
        for message in messages
    )


def compose_title(last_user: str) -> str:
    """A chat's title: the topic of the user's message (the part before the reply excerpt),
    capitalized, at most six words (or 16 characters of text without spaces, such as Chinese)."""
    message = last_user.split("\n\n---\n", 1)[0]
    topic = _topic(message)
    if " " not in topic and len(topic) > 16:
        topic = topic[:16]
    return f"About: {topic}" if topic.isascii() else f"关于：{topic}"


def compose_reasoning(last_user: str) -> str:
    """A short, deterministic "thinking" text for thinking-mode requests."""
    return (
        f'The user wrote: "{_quote(last_user, 60)}". I should answer briefly and clearly: '
        "open with a lead, restate the question, give a few concrete points, and offer to go "
        "deeper. Keep it friendly."
    )


# -- function calling -------------------------------------------------------------------------

LOOP_FOREVER_TRIGGER = "loop forever"
MISSING_TOOL_TRIGGER = "call a missing tool"
MISSING_TOOL_NAME = "lookup_stock_price"
_TIME_WORDS = re.compile(r"\btime\b|几点|时间", re.IGNORECASE)
_WEATHER_WORDS = re.compile(r"\bweather\b|天气", re.IGNORECASE)
# "weather in Hangzhou", "the weather for New York": a place after in/at/for.
_PLACE_AFTER = re.compile(r"\b(?i:in|at|for)\s+([^\W\d_][\w'-]*(?:\s+[A-Z][\w'-]*)*)")
_NOT_PLACES = frozenset({"a", "an", "the", "my", "your", "this", "that", "today", "tomorrow"})
# "杭州天气", "今天杭州的天气": the Han characters just before 天气, less any "today".
_PLACE_BEFORE_TIANQI = re.compile(r"([\u4e00-\u9fff]{2,8}?)的?天气")
_NOT_PLACE_HAN = re.compile(r"今天|明天|昨天|现在|目前|的")


def find_location(text: str) -> str | None:
    """The place a weather question names ("weather in Tokyo", "杭州天气"), or None."""
    weather = _WEATHER_WORDS.search(text)
    tail = text[weather.end() :] if weather else ""
    for candidate in (tail, text):
        for match in _PLACE_AFTER.finditer(candidate):
            place = match.group(1).strip()
            if place.lower() not in _NOT_PLACES:
                return place.title() if place.islower() else place
    match = _PLACE_BEFORE_TIANQI.search(text)
    if match:
        place = _NOT_PLACE_HAN.sub("", match.group(1))
        if place:
            return place
    return None


def plan_tool_calls(
    last_user: str,
    offered: list[str],
    *,
    tool_choice: Any = "auto",
    parallel: bool = False,
    already_called: frozenset[str] = frozenset(),
) -> list[tuple[str, dict[str, Any]]]:
    """The calls (name, arguments) the simulated model makes next, in order; [] means it
    answers in text.

    ``offered`` are the function names in the request's ``tools``; ``already_called`` the
    names called since the last user turn (a tool is called once per question, except under
    "loop forever"); ``parallel`` is ``parallel_tool_calls`` (false by default upstream: then
    the calls come one per turn).
    """
    if not offered or tool_choice == "none":
        return []
    lowered = last_user.lower()
    forced = _forced_tool(tool_choice)
    calls: list[tuple[str, dict[str, Any]]] = []
    if LOOP_FOREVER_TRIGGER in lowered:
        name = "get_current_time" if "get_current_time" in offered else offered[0]
        return [(name, _tool_arguments(name, last_user))]
    if MISSING_TOOL_TRIGGER in lowered:
        calls = [(MISSING_TOOL_NAME, {})]
    else:
        asked = sorted(
            (match.start(), name)
            for pattern, name in (
                (_TIME_WORDS, "get_current_time"),
                (_WEATHER_WORDS, "get_current_weather"),
            )
            if name in offered and (match := pattern.search(last_user))
        )
        for _, name in asked:
            if name == "get_current_weather" and find_location(last_user) is None:
                continue  # the model would ask which city
            calls.append((name, _tool_arguments(name, last_user)))
    if forced is not None and forced in offered:
        calls = [call for call in calls if call[0] == forced] or [
            (forced, _tool_arguments(forced, last_user))
        ]
    elif tool_choice == "required" and not calls:
        calls = [(offered[0], _tool_arguments(offered[0], last_user))]
    calls = [call for call in calls if call[0] not in already_called]
    return calls if parallel else calls[:1]


def _forced_tool(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def _tool_arguments(name: str, last_user: str) -> dict[str, Any]:
    if name == "get_current_weather":
        return {"location": find_location(last_user) or "Hangzhou"}
    return {}


def compose_tool_answer(results: list[tuple[str, str]]) -> str:
    """The answer to tool results: each (tool name, result) quoted whole, so a test can see
    that the result reached the model."""
    lines = "\n".join(f"- **{name or 'a tool'}**: {content.strip()}" for name, content in results)
    return f"Here is what the tools returned:\n\n{lines}\n\nAnything else I can look up?"


def _split_arguments(arguments: str) -> list[str]:
    """The arguments' JSON in at least two pieces when it has two characters, as a model
    streams it."""
    if len(arguments) < 2:
        return [arguments]
    size = max(1, min(8, len(arguments) // 2))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _call_id(*parts: str) -> str:
    return "call_" + hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]


def _offered_tools(tools: Any) -> list[str]:
    """The function names in a request's ``tools``; a malformed list is a 400, as upstream."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _HTTPError(400, "InvalidParameter", "tools must be a list.")
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name or tool.get("type", "function") != "function":
            raise _HTTPError(
                400,
                "InvalidParameter",
                'Each tool must be {"type": "function", "function": {"name": ..., ...}}.',
            )
        names.append(name)
    return names


def _check_tool_turns(messages: list[Any]) -> dict[str, str]:
    """Every ``tool`` turn answers a call an earlier assistant turn made; returns the calls'
    names by id."""
    names: dict[str, str] = {}
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant" and isinstance(message.get("tool_calls"), list):
            for call in message["tool_calls"]:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    function = (
                        call.get("function") if isinstance(call.get("function"), dict) else {}
                    )
                    names[call["id"]] = str(function.get("name") or "")
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _HTTPError(
                    400,
                    "InvalidParameter",
                    'A message with role "tool" must have a "tool_call_id".',
                )
            if call_id not in names:
                raise _HTTPError(
                    400,
                    "InvalidParameter",
                    f'The tool_call_id "{call_id}" of a "tool" message matches no tool call '
                    "of an earlier assistant message.",
                )
    return names


def _called_since_last_user(messages: list[Any]) -> frozenset[str]:
    called: set[str] = set()
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                called.add(function["name"])
    return frozenset(called)


def _results_since_last_user(messages: list[Any], names: dict[str, str]) -> list[tuple[str, str]]:
    """(tool name, result) of every tool turn since the last user turn, in order."""
    results: list[tuple[str, str]] = []
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        if message.get("role") != "tool":
            continue
        content = _content_text(message.get("content"))[0]
        results.append((names.get(message["tool_call_id"], ""), content))
    return results[::-1]


# -- request parameters -----------------------------------------------------------------------

# The most a model writes in one reply (the reference's model table); ``max_tokens`` above it is
# a 400, as upstream. Models not listed (``sim-...``) take any positive count.
MAX_OUTPUT_TOKENS: dict[str, int] = {
    "qwen-plus": 32_768,
    "qwen-max": 8_192,
    "qwen3-max": 65_536,
    "qwen-flash": 32_768,
    "qwen-turbo": 16_384,
    "qwen3-vl-plus": 32_768,
    "qwen3-vl-flash": 32_768,
    "qwen-vl-max": 8_192,
    "qwen-vl-plus": 8_192,
    "qvq-max": 8_192,
    "qwen3.5-plus": 65_536,
    "deepseek-v3": 8_192,
    "deepseek-r1": 16_384,
    "kimi-k2.5": 32_768,
    "qwen3-32b": 16_384,
    "qwq-plus": 8_192,
}
# Upstream's cap depends on the model and is not in the reference; this is the simulator's
# (the longest reasoning the reference names, Qwen3-VL's 80K).
MAX_THINKING_BUDGET = 81_920
_MAX_SEED = 2**63 - 1

# The scenario triggers for web search (see the module docs).
UNSAFE_SOURCES_TRIGGER = "unsafe sources"
_SOURCE_SITES = (
    ("www.example.com", "Example News"),
    ("en.example.org", "Example Encyclopedia"),
    ("forum.example.net", "Example Forum"),
    ("docs.example.com", "Example Docs"),
)
_SOURCE_TITLES = ("{topic}: an overview", "{topic}, explained", "{topic}: questions and answers")


def _invalid(message: str) -> _HTTPError:
    return _HTTPError(400, "InvalidParameter", message)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_parameters(parameters: dict[str, Any], model: str) -> None:
    """Refuse out-of-range sampling parameters with a 400 ``InvalidParameter`` in upstream's
    words (the Model Studio error-code page); absent (or null) parameters are fine."""
    checks: tuple[tuple[str, Callable[[float], bool], str], ...] = (
        ("temperature", lambda v: 0 <= v < 2, "Temperature should be in [0.0, 2.0)"),
        ("top_p", lambda v: 0 < v <= 1, "Range of top_p should be (0.0, 1.0]"),
        (
            "presence_penalty",
            lambda v: -2 <= v <= 2,
            "Presence_penalty should be in [-2.0, 2.0]",
        ),
        (
            "repetition_penalty",
            lambda v: v > 0,
            "Repetition_penalty should be greater than 0.0",
        ),
    )
    for name, in_range, message in checks:
        value = parameters.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise _invalid(f"'{name}' must be Float")
        if not in_range(value):  # NaN is out of every range
            raise _invalid(message)
    top_k = _integer(parameters, "top_k")
    if top_k is not None and top_k < 0:
        raise _invalid("Parameter top_k be greater than or equal to 0")
    seed = _integer(parameters, "seed")
    if seed is not None and not 0 <= seed <= _MAX_SEED:
        raise _invalid(f"Range of seed should be [0, {_MAX_SEED}]")
    max_tokens = _integer(parameters, "max_tokens")
    ceiling = MAX_OUTPUT_TOKENS.get(model)
    if max_tokens is not None and (max_tokens < 1 or (ceiling and max_tokens > ceiling)):
        raise _invalid(f"Range of max_tokens should be [1, {ceiling or 2**31 - 1}]")
    budget = _integer(parameters, "thinking_budget")
    if budget is not None and not 0 < budget <= MAX_THINKING_BUDGET:
        raise _invalid(
            "The thinking_budget parameter must be a positive integer and not greater than "
            f"{MAX_THINKING_BUDGET}"
        )
    stop_texts(parameters.get("stop"))


def _integer(parameters: dict[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"Input should be a valid integer: parameters.{name}")
    return value


def stop_texts(stop: Any) -> list[str]:
    """The stop strings of a request's ``stop``: a string or a list of strings. Token ids (a
    list of ints, or of lists of ints) are valid but mean nothing to the simulator's words; a
    mix of kinds is a 400, as upstream."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    kinds = (
        {"str" if isinstance(s, str) else "int" if _is_token(s) else "ids" for s in stop}
        if isinstance(stop, list)
        else {"other"}
    )
    if (
        len(kinds) > 1
        or kinds & {"other"}
        or (
            "ids" in kinds and not all(isinstance(s, list) and all(map(_is_token, s)) for s in stop)
        )
    ):
        raise _invalid(
            'The "stop" parameter must be of type "str", "list[str]", "list[int]", or '
            '"list[list[int]]", and all elements within the list must be of the same type.'
        )
    return [s for s in stop if isinstance(s, str) and s]


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the first occurrence of any stop string, and whether it
    was cut."""
    found = [index for stop in stops if (index := text.find(stop)) != -1]
    if not found:
        return text, False
    return text[: min(found)], True


def json_mode(response_format: Any, messages: list[Any], *, thinking: bool) -> bool:
    """True when the request asks for a JSON object; a request that cannot have one is a 400
    in upstream's words."""
    if response_format is None:
        return False
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid(
            "Unknown format of response_format, response_format should be a dict, includes "
            "'type' and an optional key 'json_schema'. The response_format type from user is "
            f"{kind if kind is not None else response_format}."
        )
    if kind == "text":
        return False
    if thinking:
        raise _invalid("Json mode response is not supported when enable_thinking is true")
    if kind == "json_object" and not any(
        "json" in _content_text(m.get("content"))[0].lower()
        for m in messages
        if isinstance(m, dict)
    ):
        raise _invalid(
            "'messages' must contain the word 'json' in some form, to use 'response_format' "
            "of type 'json_object'."
        )
    return True


def compose_json_reply(*, model: str, last_user: str, turn: int, seed: int | None = None) -> str:
    """A deterministic JSON object for JSON mode, indented so that it streams in pieces:
    ``{"topic", "answer", "points", "confidence"}``."""
    digest = _seed(model, last_user, str(turn), "json", *_seed_part(seed))
    start = (digest >> 5) % len(_BULLETS)
    reply = {
        "topic": _topic(last_user),
        "answer": f'A simulated answer to "{_quote(last_user)}".',
        "points": [_BULLETS[(start + i) % len(_BULLETS)] for i in range(3)],
        "confidence": round(0.5 + (digest % 50) / 100, 2),
    }
    return json.dumps(reply, ensure_ascii=False, indent=2)


def _seed_part(seed: int | None) -> tuple[str, ...]:
    """What a request's ``seed`` adds to the hash a reply is built from: nothing without one,
    so replies without a seed stay what they always were."""
    return () if seed is None else (f"seed={seed}",)


def wants_sources(parameters: dict[str, Any]) -> bool:
    """``enable_search`` with ``search_options.enable_source``: the only way sources come
    back."""
    options = parameters.get("search_options")
    return parameters.get("enable_search") is True and (
        isinstance(options, dict) and options.get("enable_source") is True
    )


def compose_search_results(last_user: str) -> list[dict[str, Any]]:
    """The web sources the simulated search found for a question: 2 or 3, deterministic,
    ``{"index", "title", "url", "site_name", "icon"}`` as upstream sends them, on example
    domains. Under the "unsafe sources" trigger, one title carries a script tag, its URL and
    icon are ``javascript:`` and its site name a control character: for tests of the app's
    sanitizing."""
    digest = _seed("search", last_user)
    topic = _topic(last_user)
    slug = re.sub(r"[^a-z0-9]+", "-", topic.lower()).strip("-")[:40] or "question"
    results = []
    for i in range(2 + digest % 2):
        host, site = _SOURCE_SITES[(digest + i) % len(_SOURCE_SITES)]
        title = _SOURCE_TITLES[((digest >> 3) + i) % len(_SOURCE_TITLES)].format(topic=topic)
        path = f"{slug}-{hashlib.sha256(f'{last_user}{i}'.encode()).hexdigest()[:8]}"
        results.append(
            {
                "index": i + 1,
                "title": title,
                "url": f"https://{host}/articles/{path}",
                "site_name": site,
                "icon": f"https://{host}/favicon.ico",
            }
        )
    if UNSAFE_SOURCES_TRIGGER in last_user.lower():
        results[1:] = [
            {
                "index": 2,
                "title": "Example <script>alert(1)</script>",
                "url": "javascript:alert(1)",
                "site_name": "Evil\x07 Site",
                "icon": "javascript:alert(2)",
            }
        ]
    return results


# -- the ASGI app -----------------------------------------------------------------------------


@dataclass
class _Plan:
    """What one generation request will produce."""

    request_id: str
    protocol: Literal["native", "compatible"]
    multimodal: bool
    model: str
    stream: bool
    incremental: bool
    include_usage: bool
    reasoning_tokens: list[str]
    reply_tokens: list[str]
    finish_reason: str | None
    input_tokens: int
    first_token_delay: float
    token_delay: float
    tokens_per_chunk: int
    scenario: Scenario | None
    # Complete calls, {"id", "type", "function": {"name", "arguments"}}; streamed in pieces.
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Web sources (search_options.enable_source), sent with the first chunk; None: not asked.
    search_results: list[dict[str, Any]] | None = None

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Simulator:
    """The ASGI application. Thread-safe: tests may steer it from another thread."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        first_token_delay: float = 0.3,
        token_delay: float = 0.02,
        tokens_per_chunk: int = 1,
        control_token: str | None = None,
        max_recorded: int = 200,
    ) -> None:
        self.api_key = api_key
        self.control_token = control_token
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.tokens_per_chunk = max(1, tokens_per_chunk)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._scenarios: list[Scenario] = []
        # Only the newest requests: a demo that runs for months must not keep every message
        # ever sent (nor grow without bound), and tests look at the last few.
        self.max_recorded = max_recorded
        self._requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self.disconnected_streams = 0
        self.completed_streams = 0
        # What the model-list endpoints answer (tests list models the catalog lacks).
        self.listed_models: list[str] = list(KNOWN_MODELS)
        _install_drop_filter()

    # -- control ----------------------------------------------------------------------------

    def add_scenario(self, scenario: Scenario) -> None:
        with self._lock:
            self._scenarios.append(scenario)

    def clear_scenarios(self) -> None:
        with self._lock:
            self._scenarios.clear()

    @property
    def scenarios(self) -> list[Scenario]:
        with self._lock:
            return list(self._scenarios)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The newest generation and model-list requests (``max_recorded`` at most; control
        requests excluded)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        """Forget scenarios, recorded requests and counters."""
        with self._lock:
            self._scenarios.clear()
            self._requests.clear()
            self.disconnected_streams = 0
            self.completed_streams = 0
            self.listed_models = list(KNOWN_MODELS)

    def wait_for_outcome(self, request_id: str | None = None, timeout: float = 5.0) -> str | None:
        """Block until the request (default: the latest) has an outcome; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                candidates = [
                    r for r in self._requests if request_id is None or r.request_id == request_id
                ]
                if candidates and candidates[-1].outcome is not None:
                    return candidates[-1].outcome
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _set_outcome(self, record: RecordedRequest, outcome: str) -> None:
        with self._changed:
            record.outcome = outcome
            if outcome == "disconnected":
                self.disconnected_streams += 1
            elif outcome == "completed":
                self.completed_streams += 1
            self._changed.notify_all()

    def _take_scenario(self, last_user_text: str) -> Scenario | None:
        with self._lock:
            for scenario in self._scenarios:
                if not scenario.applies_to(last_user_text):
                    continue
                applied = dataclasses.replace(scenario)
                if scenario.times > 0:
                    scenario.times -= 1
                    if scenario.times == 0:
                        self._scenarios.remove(scenario)
                return applied
        return None

    # -- ASGI entry -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"].rstrip("/") or "/"
        method: str = scope["method"]
        body = await _read_body(receive)
        if path.startswith("/_simulator/"):
            refusal = self._control_refusal(scope)
            if refusal:
                await _send_json(send, refusal, {"error": "the control token is missing or wrong"})
                return
            await self._control(method, path, body, send)
            return
        routes = {
            "/api/v1/services/aigc/text-generation/generation": ("native", False),
            "/api/v1/services/aigc/multimodal-generation/generation": ("native", True),
            "/compatible-mode/v1/chat/completions": ("compatible", False),
        }
        if path in routes and method == "POST":
            protocol, multimodal = routes[path]
            await self._generation(scope, receive, send, body, protocol, multimodal)
        elif path in ("/api/v1/models", "/compatible-mode/v1/models") and method == "GET":
            await self._models(scope, send, body, compatible=path.startswith("/compatible"))
        else:
            await _send_json(send, 404, {"code": "NotFound", "message": f"No route {path}."})

    # -- control endpoints ------------------------------------------------------------------

    def _control_refusal(self, scope: Scope) -> int | None:
        """401 without a token, 403 with a wrong one, None when control is allowed."""
        if self.control_token is None:
            return None
        authorization = _authorization(scope)
        if not authorization:
            return 401
        expected = f"Bearer {self.control_token}".encode()
        return None if hmac.compare_digest(authorization.encode(), expected) else 403

    async def _control(self, method: str, path: str, body: bytes, send: Send) -> None:
        if path == "/_simulator/scenarios" and method == "POST":
            try:
                data = json.loads(body or b"null")
                items = data if isinstance(data, list) else [data]
                scenarios = [Scenario.from_dict(item) for item in items]
            except (ValueError, TypeError) as exc:
                await _send_json(send, 400, {"error": f"bad scenario: {exc}"})
                return
            for scenario in scenarios:
                self.add_scenario(scenario)
            await _send_json(send, 201, {"added": len(scenarios), "pending": len(self.scenarios)})
        elif path == "/_simulator/scenarios" and method == "GET":
            await _send_json(send, 200, {"scenarios": [s.to_dict() for s in self.scenarios]})
        elif path == "/_simulator/scenarios" and method == "DELETE":
            self.clear_scenarios()
            await _send_json(send, 200, {"scenarios": []})
        elif path == "/_simulator/requests" and method == "GET":
            await _send_json(send, 200, {"requests": [r.to_dict() for r in self.requests]})
        elif path == "/_simulator/requests" and method == "DELETE":
            self.clear_requests()
            await _send_json(send, 200, {"requests": []})
        elif path == "/_simulator/state" and method == "GET":
            await _send_json(send, 200, self._state())
        elif path == "/_simulator/state" and method == "DELETE":
            self.reset()
            await _send_json(send, 200, self._state())
        else:
            await _send_json(send, 404, {"error": f"no control route {method} {path}"})

    def _state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "disconnected_streams": self.disconnected_streams,
                "completed_streams": self.completed_streams,
                "pending_scenarios": len(self._scenarios),
                "requests": len(self._requests),
            }

    # -- model list -------------------------------------------------------------------------

    async def _models(self, scope: Scope, send: Send, body: bytes, *, compatible: bool) -> None:
        record = self._new_record(scope, body)
        headers = [(b"x-request-id", record.request_id.encode())]
        if not record.authorized:
            self._set_outcome(record, "error")
            protocol: Literal["native", "compatible"] = "compatible" if compatible else "native"
            payload = _error_body(protocol, "InvalidApiKey", _bad_key_message(), record.request_id)
            await _send_json(send, 401, payload, headers)
            return
        listed = list(self.listed_models)
        if compatible:
            data = [{"id": m, "object": "model", "owned_by": "simulator"} for m in listed]
            payload = {"object": "list", "data": data}
        else:
            # Paged as the SDK asks (page_no from 1, page_size 10 unless given); `model`
            # filters server-side.
            query = parse_qs(record.query)
            names = [m for m in listed if m in query.get("model", [m])]
            page_no = max(1, _int_param(query, "page_no", 1))
            page_size = max(1, min(100, _int_param(query, "page_size", 10)))
            page = names[(page_no - 1) * page_size : page_no * page_size]
            models = [
                {"model": m, "provider": "simulator", "source": "simulator", "opensource": False}
                for m in page
            ]
            payload = {
                "output": {
                    "models": models,
                    "page_no": page_no,
                    "page_size": page_size,
                    "total": len(names),
                },
                "request_id": record.request_id,
            }
        self._set_outcome(record, "completed")
        await _send_json(send, 200, payload, headers)

    def _new_record(self, scope: Scope, body: bytes) -> RecordedRequest:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        authorization = headers.pop("authorization", "")
        authorized = (
            authorization == f"Bearer {self.api_key}" if self.api_key else bool(authorization)
        )
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = body.decode("utf-8", errors="replace")
        record = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            authorized=authorized,
            body=parsed,
            request_id=str(uuid.uuid4()),
        )
        self._record(record)
        return record

    # -- generation -------------------------------------------------------------------------

    async def _generation(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        protocol: Literal["native", "compatible"],
        multimodal: bool,
    ) -> None:
        record = self._new_record(scope, body)
        request_id = record.request_id
        base_headers = [(b"x-request-id", request_id.encode())]
        authorization = _authorization(scope)
        if not record.authorized:
            self._set_outcome(record, "error")
            payload = _error_body(protocol, "InvalidApiKey", _bad_key_message(), request_id)
            await _send_json(send, 401, payload, base_headers)
            return
        try:
            plan = self._plan(record, protocol, multimodal, authorization)
        except _HTTPError as exc:
            self._set_outcome(record, "error")
            payload = _error_body(protocol, exc.code, exc.message, request_id)
            await _send_json(send, exc.status, payload, base_headers)
            return
        base_headers = [(b"x-request-id", plan.request_id.encode("latin-1"))]

        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        try:
            outcome = await self._respond(plan, send, disconnected, base_headers)
        except _ConnectionDropped:
            self._set_outcome(record, "dropped")
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._set_outcome(record, outcome)

    def _plan(
        self,
        record: RecordedRequest,
        protocol: Literal["native", "compatible"],
        multimodal: bool,
        authorization: str = "",
    ) -> _Plan:
        data = record.body
        if not isinstance(data, dict):
            raise _HTTPError(400, "InvalidParameter", "Request body must be a JSON object.")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise _HTTPError(400, "BadRequest.EmptyModel", 'Required parameter "model" missing.')
        if protocol == "native":
            messages = (data.get("input") or {}).get("messages")
            parameters = data.get("parameters") or {}
            stream = record.headers.get("x-dashscope-sse", "").lower() == "enable"
            incremental = parameters.get("incremental_output") is True
            include_usage = False
        else:
            messages = data.get("messages")
            parameters = data
            stream = data.get("stream") is True
            incremental = True
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(
                400,
                "InvalidParameter",
                'Either "prompt" or "messages" must exist and cannot both be none',
            )
        if not is_known_model(model):
            if protocol == "compatible":
                raise _HTTPError(404, "model_not_found", "Model not exist.")
            raise _HTTPError(400, "InvalidParameter", "Model not exist.")
        check_parameters(parameters, model)
        if protocol == "native":
            vision = is_vision_model(model)
            if (vision and not multimodal) or (
                multimodal and not vision and model not in _OMNI_MODELS
            ):
                raise _HTTPError(400, "InvalidParameter", "url error, check url!")
            if not multimodal and any(not isinstance(m.get("content"), str) for m in messages):
                raise _HTTPError(400, "InvalidParameter", "input content must be a string.")
        last = messages[-1]
        last_ok = last.get("role") in ("user", "tool") or (
            last.get("role") == "assistant" and last.get("partial") is True
        )
        if not last_ok:
            raise _HTTPError(
                400,
                "InternalError.Algo.InvalidParameter",
                "Role must be in [user, assistant, system, tool] and the role in last message "
                'must be in ["user","function","tool"]',
            )
        thinking = parameters.get("enable_thinking")
        thinking = thinking is True or (thinking is None and model in _THINKING_ONLY_MODELS)
        if stream is False and model in _STREAM_ONLY_MODELS:
            raise _HTTPError(
                400,
                "InvalidParameter",
                "This model only support stream mode, please enable the stream parameter to "
                "access the model.",
            )
        if thinking and not stream and model not in _NON_STREAM_THINKING_MODELS:
            raise _HTTPError(
                400,
                "InvalidParameter",
                "parameter.enable_thinking must be set to false for non-streaming calls",
            )
        if thinking and stream and not incremental:
            raise _HTTPError(
                400,
                "InvalidParameter",
                'The incremental_output parameter must be "true" when enable_thinking is true',
            )

        json_reply = json_mode(parameters.get("response_format"), messages, thinking=thinking)
        offered = _offered_tools(parameters.get("tools"))
        call_names = _check_tool_turns(messages)
        seed = parameters.get("seed")

        last_user, images, input_words = _read_messages(messages)
        # A request for a chat's title (qwenweb's title model) is answered with one and never
        # takes a scenario meant for the chat's own replies.
        titling = _asks_for_title(messages)
        scenario = None if titling else self._take_scenario(last_user)
        turn = sum(1 for m in messages if m.get("role") == "user")
        tool_calls: list[dict[str, Any]] = []
        if not (scenario and scenario.reply is not None):
            rounds = sum(
                1 for m in messages if m.get("role") == "assistant" and m.get("tool_calls")
            )
            planned = plan_tool_calls(
                last_user,
                offered,
                tool_choice=parameters.get("tool_choice", "auto"),
                parallel=parameters.get("parallel_tool_calls") is True,
                already_called=_called_since_last_user(messages),
            )
            tool_calls = [
                {
                    "id": _call_id(model, last_user, str(rounds), str(index)),
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": json.dumps(arguments, ensure_ascii=False),
                    },
                }
                for index, (name, arguments) in enumerate(planned)
            ]
        if titling:
            reply = compose_title(last_user)
        elif scenario and scenario.reply is not None:
            reply = scenario.reply
        elif tool_calls:
            reply = ""
        elif last.get("role") == "tool":
            reply = compose_tool_answer(_results_since_last_user(messages, call_names))
        elif json_reply:
            reply = compose_json_reply(model=model, last_user=last_user, turn=turn, seed=seed)
        else:
            reply = compose_reply(
                model=model,
                last_user=last_user,
                turn=turn,
                images=images,
                target_tokens=scenario.tokens if scenario else None,
                seed=seed,
            )
        if last.get("role") == "assistant" and last.get("partial") is True:
            # Partial mode: the model carries on from the text it was given. The simulator
            # carries on with the rest of the reply it would have written, when that text is
            # its beginning (a stopped or interrupted reply), else with the whole reply.
            prefix = _content_text(last.get("content"))[0]
            if prefix and reply.startswith(prefix):
                reply = reply[len(prefix) :]
        # The model stops before any stop text, a scenario's reply included (so a test picks
        # the words it stops at).
        reply, stopped = cut_at_stop(reply, stop_texts(parameters.get("stop")))
        request_id = record.request_id
        if scenario and scenario.echo_authorization:
            # The record keeps its own id: /_simulator/requests never shows the header.
            request_id = f"{record.request_id} {authorization}"
            reply += f" (Your request said: {authorization})"
            if scenario.error is not None:
                scenario.error = dataclasses.replace(
                    scenario.error,
                    code=f"{scenario.error.code}:{authorization}",
                    message=f"{scenario.error.message} (you sent {authorization})",
                )
        reply_tokens = tokenize(reply)
        reasoning = scenario.reasoning if scenario and scenario.reasoning is not None else None
        if reasoning is None and thinking:
            reasoning = compose_reasoning(last_user)
        reasoning_tokens = tokenize(reasoning) if reasoning else []
        budget = parameters.get("thinking_budget")
        if isinstance(budget, int) and thinking:
            reasoning_tokens = reasoning_tokens[:budget]
        finish_reason = "tool_calls" if tool_calls else "stop"
        if scenario and scenario.finish_reason:
            finish_reason = scenario.finish_reason
        max_tokens = parameters.get("max_tokens")
        if isinstance(max_tokens, int) and 0 < max_tokens < len(reply_tokens):
            reply_tokens = reply_tokens[:max_tokens]
            finish_reason = "length"

        def pace(name: str, default: Any) -> Any:
            value = getattr(scenario, name) if scenario else None
            return default if value is None else value

        return _Plan(
            request_id=request_id,
            protocol=protocol,
            multimodal=multimodal,
            model=model,
            stream=stream,
            incremental=incremental,
            include_usage=include_usage,
            reasoning_tokens=reasoning_tokens,
            reply_tokens=reply_tokens,
            finish_reason=None if finish_reason == "none" else finish_reason,
            input_tokens=input_words,
            first_token_delay=pace("first_token_delay", self.first_token_delay),
            token_delay=pace("token_delay", self.token_delay),
            tokens_per_chunk=max(1, pace("tokens_per_chunk", self.tokens_per_chunk)),
            scenario=scenario,
            tool_calls=tool_calls,
            search_results=compose_search_results(last_user) if wants_sources(parameters) else None,
        )

    async def _respond(
        self,
        plan: _Plan,
        send: Send,
        disconnected: asyncio.Event,
        base_headers: list[tuple[bytes, bytes]],
    ) -> str:
        scenario = plan.scenario
        error = scenario.error if scenario else None
        headers = list(base_headers)
        if error and error.retry_after is not None:
            headers.append((b"retry-after", _seconds(error.retry_after).encode()))
        if error and error.where == "before_sse":
            frame = _native_error_frame(1, error, plan.request_id)
            if plan.protocol == "compatible":
                payload = _error_body("compatible", error.code, error.message, plan.request_id)
                frame = f"data: {json.dumps(payload)}\n\n"
            await _send_raw(send, error.status, frame.encode(), "application/json", headers)
            return "error"
        if error and (error.where in ("before_json", "json_200") or not plan.stream):
            status = 200 if error.where == "json_200" else error.status
            payload = _error_body(plan.protocol, error.code, error.message, plan.request_id)
            await _send_json(send, status, payload, headers)
            return "error"
        if not plan.stream:
            return await self._respond_whole(plan, send, disconnected, headers)
        return await self._stream(plan, send, disconnected, headers)

    async def _respond_whole(
        self,
        plan: _Plan,
        send: Send,
        disconnected: asyncio.Event,
        headers: list[tuple[bytes, bytes]],
    ) -> str:
        scenario = plan.scenario
        reply_tokens = plan.reply_tokens
        finish = plan.finish_reason
        if scenario and scenario.framing == "partial_response":
            reply_tokens = reply_tokens[: max(1, len(reply_tokens) // 2)]
            finish = None
            headers = [*headers, (b"x-dashscope-partialresponse", b"true")]
        wait = plan.first_token_delay + plan.token_delay * len(reply_tokens)
        if scenario and scenario.stall_after_chunks is not None:
            wait += scenario.stall_seconds
        if await _pause(wait, disconnected):
            return "disconnected"
        reply = "".join(reply_tokens)
        reasoning = "".join(plan.reasoning_tokens)
        output_tokens = len(reply_tokens) + len(plan.reasoning_tokens)
        output_tokens += sum(1 for _ in _tool_chunks(plan))
        tool_calls = [{**call, "index": i} for i, call in enumerate(plan.tool_calls)]
        if plan.protocol == "native":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": [{"text": reply}] if plan.multimodal else reply,
            }
            if reasoning:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload: dict[str, Any] = {
                "output": {"choices": [{"finish_reason": finish or "null", "message": message}]},
                "usage": _native_usage(plan.input_tokens, output_tokens, _reasoning_count(plan)),
                "request_id": plan.request_id,
            }
            if plan.search_results is not None:
                payload["output"]["search_info"] = _search_info(plan)
        else:
            message = {"role": "assistant", "content": reply}
            if reasoning:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload = {
                "choices": [
                    {"message": message, "finish_reason": finish, "index": 0, "logprobs": None}
                ],
                "object": "chat.completion",
                "usage": _compat_usage(plan.input_tokens, output_tokens, _reasoning_count(plan)),
                "created": int(time.time()),
                "system_fingerprint": None,
                "model": plan.model,
                "id": plan.completion_id,
            }
            if plan.search_results is not None:
                payload["search_info"] = _search_info(plan)
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        if scenario and scenario.drop_after_chunks is not None:
            await _start(send, 200, "application/json", headers, length=len(body))
            await send(
                {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
            )
            raise _ConnectionDropped
        await _send_raw(send, 200, body, "application/json", headers)
        return "completed"

    async def _stream(
        self,
        plan: _Plan,
        send: Send,
        disconnected: asyncio.Event,
        headers: list[tuple[bytes, bytes]],
    ) -> str:
        scenario = plan.scenario or Scenario()
        error = scenario.error
        native = plan.protocol == "native"
        separator = "" if scenario.framing == "no_blank_lines" else "\n"
        chunks = _chunks(plan)
        frame_id = 0
        emitted_tokens = 0
        reasoning_so_far = ""
        text_so_far = ""
        arguments_so_far: dict[int, str] = {}
        content_type = "text/event-stream;charset=UTF-8"

        await _start(send, 200, content_type, headers)

        async def emit(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        sources_due = plan.search_results is not None

        def native_frame(payload: dict[str, Any]) -> str:
            nonlocal frame_id, sources_due
            frame_id += 1
            if sources_due:
                payload["output"]["search_info"] = _search_info(plan)
                sources_due = False
            data = json.dumps(payload, ensure_ascii=False)
            return f"id:{frame_id}\nevent:result\n:HTTP_STATUS/200\ndata:{data}\n{separator}"

        def compat_frame(payload: dict[str, Any]) -> str:
            nonlocal sources_due
            if sources_due and "choices" in payload:
                # Where compatible mode puts the sources is not settled upstream (the
                # reference, 11b); the simulator puts them at the top level of the first chunk.
                payload["search_info"] = _search_info(plan)
                sources_due = False
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        if error and error.where == "first_event":
            # Compatible mode too: production throttling has been seen as a native frame there.
            await emit(_native_error_frame(1, error, plan.request_id))
            return await _end(send, "error")

        for position in range(len(chunks) + 1):
            if error and error.where == "mid_stream" and error.after_chunks == position:
                if native:
                    await emit(_native_error_frame(frame_id + 1, error, plan.request_id))
                else:
                    body = _error_body("compatible", error.code, error.message, plan.request_id)
                    await emit(compat_frame(body))
                return await _end(send, "error")
            if scenario.stall_after_chunks == position and await _pause(
                scenario.stall_seconds, disconnected
            ):
                return "disconnected"
            if scenario.drop_after_chunks == position:
                raise _ConnectionDropped
            if position == len(chunks):
                break
            kind, tokens, call = chunks[position]
            delay = plan.first_token_delay if position == 0 else plan.token_delay * len(tokens)
            if await _pause(delay, disconnected):
                return "disconnected"
            piece = "".join(tokens)
            emitted_tokens += len(tokens)
            if kind == "tool":
                first = call not in arguments_so_far
                arguments_so_far[call] = arguments_so_far.get(call, "") + piece
                if native:
                    payload = self._native_chunk(
                        plan,
                        "" if plan.incremental else text_so_far,
                        "" if plan.incremental else reasoning_so_far,
                        emitted_tokens,
                    )
                    payload["output"]["choices"][0]["message"]["tool_calls"] = (
                        [_native_tool_fragment(plan, call, piece, first)]
                        if plan.incremental
                        else _calls_so_far(plan, arguments_so_far)
                    )
                    await emit(native_frame(payload))
                else:
                    if position == 0:
                        first_delta = {"content": "", "role": "assistant"}
                        await emit(compat_frame(_compat_chunk(plan, first_delta, None)))
                    delta = {"tool_calls": [_compat_tool_fragment(plan, call, piece, first)]}
                    await emit(compat_frame(_compat_chunk(plan, delta, None)))
                if disconnected.is_set():
                    return "disconnected"
                continue
            if kind == "reasoning":
                reasoning_so_far += piece
            else:
                text_so_far += piece
            if native:
                reasoning = piece if plan.incremental else reasoning_so_far
                text = piece if plan.incremental else text_so_far
                if kind == "reasoning" and plan.incremental:
                    text = ""
                if kind == "content" and plan.incremental:
                    reasoning = ""
                await emit(native_frame(self._native_chunk(plan, text, reasoning, emitted_tokens)))
            else:
                if position == 0:
                    first_delta: dict[str, Any] = {"content": "", "role": "assistant"}
                    if plan.reasoning_tokens:
                        first_delta = {
                            "content": None,
                            "role": "assistant",
                            "reasoning_content": "",
                        }
                    await emit(compat_frame(_compat_chunk(plan, first_delta, None)))
                delta: dict[str, Any] = (
                    {"content": None, "reasoning_content": piece}
                    if kind == "reasoning"
                    else {"content": piece}
                )
                if plan.reasoning_tokens and kind == "content":
                    delta["reasoning_content"] = None
                await emit(compat_frame(_compat_chunk(plan, delta, None)))
            if disconnected.is_set():
                return "disconnected"

        if plan.finish_reason is not None:
            if native:
                text = "" if plan.incremental else text_so_far
                reasoning = "" if plan.incremental else reasoning_so_far
                payload = self._native_chunk(plan, text, reasoning, emitted_tokens)
                payload["output"]["choices"][0]["finish_reason"] = plan.finish_reason
                if plan.tool_calls and not plan.incremental:
                    payload["output"]["choices"][0]["message"]["tool_calls"] = _calls_so_far(
                        plan, arguments_so_far
                    )
                await emit(native_frame(payload))
            else:
                await emit(compat_frame(_compat_chunk(plan, {"content": ""}, plan.finish_reason)))
                if plan.include_usage:
                    usage_chunk = _compat_chunk(plan, {}, None)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _compat_usage(
                        plan.input_tokens, emitted_tokens, _reasoning_count(plan, emitted_tokens)
                    )
                    await emit(compat_frame(usage_chunk))
        if not native and plan.finish_reason is not None:
            await emit("data: [DONE]\n\n")
        if scenario.hold_open_seconds and await _pause(scenario.hold_open_seconds, disconnected):
            return "disconnected"
        return await _end(send, "completed")

    def _native_chunk(
        self, plan: _Plan, text: str, reasoning: str, output_tokens: int
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "content": ([{"text": text}] if text else []) if plan.multimodal else text,
            "role": "assistant",
        }
        if plan.reasoning_tokens:
            message["reasoning_content"] = reasoning
        return {
            "output": {"choices": [{"message": message, "finish_reason": "null"}]},
            "usage": _native_usage(
                plan.input_tokens, output_tokens, _reasoning_count(plan, output_tokens)
            ),
            "request_id": plan.request_id,
        }


class _Chunk(NamedTuple):
    """One streamed chunk: reasoning or reply tokens, or a piece of a tool call's arguments."""

    kind: Literal["reasoning", "content", "tool"]
    tokens: list[str]
    call: int = -1  # a tool piece: the index of its call in plan.tool_calls


def _chunks(plan: _Plan) -> list[_Chunk]:
    size = plan.tokens_per_chunk
    chunks: list[_Chunk] = []
    for kind, tokens in (("reasoning", plan.reasoning_tokens), ("content", plan.reply_tokens)):
        chunks.extend(_Chunk(kind, tokens[i : i + size]) for i in range(0, len(tokens), size))
    chunks.extend(_tool_chunks(plan))
    return chunks


def _tool_chunks(plan: _Plan) -> list[_Chunk]:
    """Each call's arguments in pieces, one chunk each (a piece counts as one token)."""
    return [
        _Chunk("tool", [piece], index)
        for index, call in enumerate(plan.tool_calls)
        for piece in _split_arguments(call["function"]["arguments"])
    ]


def _native_tool_fragment(plan: _Plan, index: int, piece: str, first: bool) -> dict[str, Any]:
    """Native incremental: the first piece names the call; later ones repeat only the index
    (with an empty id, as Qwen does)."""
    call = plan.tool_calls[index]
    if first:
        function = {"name": call["function"]["name"], "arguments": piece}
        return {"index": index, "id": call["id"], "type": "function", "function": function}
    return {"index": index, "id": "", "type": "function", "function": {"arguments": piece}}


def _compat_tool_fragment(plan: _Plan, index: int, piece: str, first: bool) -> dict[str, Any]:
    """OpenAI-compatible: the first piece names the call; later ones carry the index alone."""
    call = plan.tool_calls[index]
    if first:
        function = {"name": call["function"]["name"], "arguments": piece}
        return {"index": index, "id": call["id"], "type": "function", "function": function}
    return {"index": index, "function": {"arguments": piece}}


def _calls_so_far(plan: _Plan, arguments: dict[int, str]) -> list[dict[str, Any]]:
    """Native non-incremental: every call begun so far, with all its arguments so far."""
    return [
        {
            "index": index,
            "id": plan.tool_calls[index]["id"],
            "type": "function",
            "function": {"name": plan.tool_calls[index]["function"]["name"], "arguments": text},
        }
        for index, text in sorted(arguments.items())
    ]


def _search_info(plan: _Plan) -> dict[str, Any]:
    return {"search_results": [dict(result) for result in plan.search_results or []]}


def _compat_chunk(plan: _Plan, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "choices": [{"delta": delta, "finish_reason": finish, "index": 0, "logprobs": None}],
        "object": "chat.completion.chunk",
        "usage": None,
        "created": int(time.time()),
        "system_fingerprint": None,
        "model": plan.model,
        "id": plan.completion_id,
    }


def _reasoning_count(plan: _Plan, emitted: int | None = None) -> int | None:
    """The reasoning tokens among the first `emitted` output tokens (all of them when None):
    reasoning streams first. None for a reply without thinking, whose usage has no field."""
    if not plan.reasoning_tokens:
        return None
    total = len(plan.reasoning_tokens)
    return total if emitted is None else min(emitted, total)


def _native_usage(
    input_tokens: int, output_tokens: int, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """Native usage. Reasoning tokens are part of output_tokens, and a thinking reply's usage
    also counts them apart (``output_tokens_details.reasoning_tokens``, cumulative like the
    rest in a stream)."""
    usage: dict[str, Any] = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if reasoning_tokens is not None:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _compat_usage(
    input_tokens: int, output_tokens: int, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """Compatible-mode usage; a thinking reply's adds
    ``completion_tokens_details.reasoning_tokens`` (part of completion_tokens)."""
    usage: dict[str, Any] = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _read_messages(messages: list[Any]) -> tuple[str, int, int]:
    """(last user text, image count, rough input token count)."""
    last_user = ""
    images = 0
    words = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        text, count = _content_text(message.get("content"))
        words += len(text.split()) + 4  # a few tokens of chat-template overhead per turn
        images += count
        if message.get("role") == "user":
            last_user = text
    return last_user, images, words


def _content_text(content: Any) -> tuple[str, int]:
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    if isinstance(content, list):
        for item in content:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("text"), str):
                texts.append(item["text"])
            if "image" in item or item.get("type") == "image_url":
                images += 1
    return "\n".join(texts), images


def _error_body(
    protocol: Literal["native", "compatible"], code: str, message: str, request_id: str
) -> dict[str, Any]:
    if protocol == "native":
        return {"code": code, "message": message, "request_id": request_id}
    compat_code = _COMPAT_CODES.get(code, code)
    kind = "invalid_request_error" if compat_code in _INVALID_REQUEST_CODES else compat_code
    return {
        "error": {"message": message, "type": kind, "param": None, "code": compat_code},
        "request_id": request_id,
    }


_COMPAT_CODES = {
    "InvalidApiKey": "invalid_api_key",
    "InvalidParameter": "invalid_parameter_error",
    "DataInspectionFailed": "data_inspection_failed",
}
_INVALID_REQUEST_CODES = frozenset(
    {"invalid_api_key", "invalid_parameter_error", "model_not_found"}
)


def _bad_key_message() -> str:
    return (
        "Invalid API-key provided. For details, see: "
        "https://help.aliyun.com/zh/model-studio/error-code#apikey-error"
    )


def _native_error_frame(frame_id: int, error: ScenarioError, request_id: str) -> str:
    data = json.dumps({"code": error.code, "message": error.message, "request_id": request_id})
    return f"id:{frame_id}\nevent:error\n:HTTP_STATUS/{error.status}\ndata:{data}\n\n"


def _authorization(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            return value.decode("latin-1")
    return ""


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# -- ASGI plumbing ----------------------------------------------------------------------------


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


async def _pause(seconds: float, disconnected: asyncio.Event) -> bool:
    """Sleep, waking early if the client goes away; True if it did."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(disconnected.wait(), seconds)
    return disconnected.is_set()


async def _start(
    send: Send,
    status: int,
    content_type: str,
    headers: list[tuple[bytes, bytes]],
    *,
    length: int | None = None,
) -> None:
    all_headers = [(b"content-type", content_type.encode()), *headers]
    if length is not None:
        all_headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})


async def _end(send: Send, outcome: str) -> str:
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return outcome


async def _send_raw(
    send: Send, status: int, body: bytes, content_type: str, headers: list[tuple[bytes, bytes]]
) -> None:
    await _start(send, status, content_type, headers, length=len(body))
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    await _send_raw(send, status, body, "application/json", headers or [])


# -- running it -------------------------------------------------------------------------------


class SimulatorServer:
    """Runs a ``Simulator`` under uvicorn in a daemon thread on a free loopback port.

    Use as a context manager, or call ``start()`` / ``stop()``. The in-process controls
    (``add_scenario``, ``requests``, ``reset`` ...) act on the same ``simulator`` object; with a
    ``control_token``, the HTTP ones (``/_simulator/...``) need ``Authorization: Bearer <token>``
    (401 without it, 403 with another). ``max_recorded`` caps the requests kept in memory.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        first_token_delay: float = 0.3,
        token_delay: float = 0.02,
        tokens_per_chunk: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        control_token: str | None = None,
        max_recorded: int = 200,
    ) -> None:
        self.simulator = Simulator(
            api_key=api_key,
            first_token_delay=first_token_delay,
            token_delay=token_delay,
            tokens_per_chunk=tokens_per_chunk,
            control_token=control_token,
            max_recorded=max_recorded,
        )
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def native_base_url(self) -> str:
        return f"{self.url}/api/v1"

    @property
    def compatible_base_url(self) -> str:
        return f"{self.url}/compatible-mode/v1"

    def start(self, timeout: float = 10.0) -> SimulatorServer:
        """Bind, serve in a background thread, and return once requests are accepted."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(
            self.simulator,
            log_level="warning",
            access_log=False,
            log_config=None,
            lifespan="off",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"dashscope-simulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("DashScope simulator failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut uvicorn down gracefully and wait for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Convenience pass-throughs to the simulator.

    def add_scenario(self, scenario: Scenario) -> None:
        self.simulator.add_scenario(scenario)

    def clear_scenarios(self) -> None:
        self.simulator.clear_scenarios()

    @property
    def listed_models(self) -> list[str]:
        return self.simulator.listed_models

    @listed_models.setter
    def listed_models(self, names: list[str]) -> None:
        self.simulator.listed_models = list(names)

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.simulator.requests

    def clear_requests(self) -> None:
        self.simulator.clear_requests()

    def reset(self) -> None:
        self.simulator.reset()

    def wait_for_outcome(self, request_id: str | None = None, timeout: float = 5.0) -> str | None:
        return self.simulator.wait_for_outcome(request_id, timeout)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dashscope_simulator",
        description="Run the DashScope simulator in the foreground.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default=None, help="reject requests without this key")
    parser.add_argument("--first-token-delay", type=float, default=0.3)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument(
        "--control-token", default=None, help="require this bearer token on /_simulator/..."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m dashscope_simulator``."""
    args = _parse_args(argv)
    app = Simulator(
        api_key=args.api_key,
        first_token_delay=args.first_token_delay,
        token_delay=args.token_delay,
        tokens_per_chunk=args.tokens_per_chunk,
        control_token=args.control_token,
    )
    base = f"http://{args.host}:{args.port}"
    print(
        f"DashScope simulator on {base}\n"
        f"  native base URL:     {base}/api/v1\n"
        f"  compatible base URL: {base}/compatible-mode/v1",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    _install_drop_filter()
    server.run()


if __name__ == "__main__":
    main()
