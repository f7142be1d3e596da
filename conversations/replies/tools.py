"""The tools a reply may call (function calling), and running one call.

``definitions(names)`` is the ``tools`` list for a request; ``run(call)`` runs one call the
model made and returns the text to send back in a ``tool`` turn. ``run`` never raises: a bad
call (unknown tool, arguments that are not JSON, a tool that fails or hangs) becomes a result
that says so, which the model can read and answer the user about.

Tools are plain synchronous functions taking keyword arguments and returning text; they run in
threads of their own, so a slow one blocks neither the event loop nor the threads Django and
httpx share.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)

# A tool that hangs keeps its thread after its call has timed out (a thread cannot be killed),
# so tools get their own pool: a few hung ones must not starve asyncio's default executor.
_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="qwenweb-tool")
# What the model sees of a call's bad arguments, at most.
_QUOTED_ARGUMENTS = 200


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it is for, and its arguments as a JSON
    schema (what the model reads), and the function that does it."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]

    def definition(self) -> dict[str, Any]:
        """The tool as a request's ``tools`` list spells it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def get_current_time(timezone: str | None = None) -> str:
    """The time now, ``YYYY-MM-DD HH:MM:SS`` and the zone's name, in an IANA zone (the
    server's ``TIME_ZONE`` by default)."""
    name = timezone or settings.TIME_ZONE
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name such as Asia/Shanghai"
        ) from None
    return f"{datetime.now(zone):%Y-%m-%d %H:%M:%S} {name}"


def get_current_weather(location: str) -> str:
    """The weather at ``location``, from the function ``QWENWEB_WEATHER_PROVIDER`` names.

    Without one, the docs' stand-in answer, labelled so that neither the model nor the user
    takes it for a forecast.
    """
    provider = settings.QWENWEB_WEATHER_PROVIDER
    if provider:
        return import_string(provider)(location)
    return f"(example data: no weather provider is configured) {location} is rainy today"


REGISTRY: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            name="get_current_time",
            # The docs' definition, plus the optional zone.
            description="Useful when you want to know the current time.",
            parameters={
                "type": "object",
                "properties": {
                    "timezone": {
                        "type": "string",
                        "description": "An IANA time zone name, e.g. Asia/Shanghai or "
                        "Europe/Berlin. Leave it out for the server's local time.",
                    }
                },
            },
            function=get_current_time,
        ),
        Tool(
            name="get_current_weather",
            description="Useful when you want to look up the weather in a given city.",
            parameters={
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "A city or district, e.g. Beijing, Hangzhou, Yuhang.",
                    }
                },
                "required": ["location"],
            },
            function=get_current_weather,
        ),
    )
}


def definitions(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The ``tools`` list for a request offering ``names`` (every registered tool if None).

    An unknown name is a programming error, so it raises ``KeyError``.
    """
    chosen = REGISTRY if names is None else names
    return [REGISTRY[name].definition() for name in chosen]


async def run(call: dict[str, Any], timeout: float | None = None) -> str:  # noqa: ASYNC109 (a late tool is a result, not a cancellation)
    """Run one tool call, ``{"id", "type": "function", "function": {"name", "arguments"}}``,
    and return its result as text for the ``tool`` turn.

    Never raises: an unknown tool, arguments that are not a JSON object, a tool that raises
    (``"Error: <ExceptionType>: <message>"``) or one still running after ``timeout`` seconds
    (default ``QWENWEB_TOOL_TIMEOUT``) each give a result saying so. Cancelling the caller
    still cancels the wait (the tool's thread runs on to its end, unwatched).
    """
    if timeout is None:
        timeout = settings.QWENWEB_TOOL_TIMEOUT
    function = call.get("function") if isinstance(call, dict) else None
    function = function if isinstance(function, dict) else {}
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    tool = REGISTRY.get(name)
    if tool is None:
        known = ", ".join(REGISTRY)
        return f"Error: there is no tool named {name!r}. The tools are: {known}."
    raw = function.get("arguments")
    raw = raw if isinstance(raw, str) else ""
    try:
        # Qwen sends "" (not "{}") for a call without arguments.
        arguments = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return (
            f"Error: the arguments for {name} were not valid JSON: {raw[:_QUOTED_ARGUMENTS]!r}. "
            "Send them as a JSON object."
        )
    if not isinstance(arguments, dict):
        return f"Error: the arguments for {name} must be a JSON object, not {raw[:80]!r}."
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(_executor, functools.partial(tool.function, **arguments))
    try:
        result = await asyncio.wait_for(work, timeout)
    except TimeoutError:
        logger.warning("Tool %s gave no answer within %g s", name, timeout)
        return f"Error: {name} took too long (no answer within {timeout:g} seconds)."
    except Exception as exc:
        logger.info("Tool %s failed: %s: %s", name, type(exc).__name__, exc)
        return f"Error: {type(exc).__name__}: {exc}"
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)
