"""An httpx client for DashScope chat generation, native and OpenAI-compatible.

Streams come out as typed events (``TextDelta`` ... ``Finish``); every failure comes out as a
``DashScopeError`` subclass. Requests that fail before the first event is yielded are retried with
backoff; once text has reached the caller, nothing is retried, so no one ever sees a reply
restart or duplicate.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import replace
from typing import Any

import httpx

from .config import DashScopeConfig
from .errors import DashScopeError, DashScopeTimeoutError, TransportError, classify
from .sanitize import (
    OutputCleaner,
    clean_metadata,
    clean_search_results,
    redact_key,
    strip_controls,
)
from .sse import DONE, RawData, SSEFrame, aiter_frames, parse_frames
from .tools import ToolCallAccumulator
from .transport import Engine, open_http_client
from .types import (
    ChatMessage,
    ChatRequest,
    Completion,
    Finish,
    ReasoningDelta,
    SearchResults,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
)

Sleep = Callable[[float], Awaitable[Any]]

_NATIVE_PATHS = {
    "text": "/services/aigc/text-generation/generation",
    "multimodal": "/services/aigc/multimodal-generation/generation",
}
_USER_AGENT = "qwenweb-dashscope/1.0 (httpx)"
_MAX_ERROR_BODY = 64 * 1024
# The model list is read 100 at a time, at most this many pages (a runaway `total` must not
# keep the admin waiting).
_MODEL_PAGE_SIZE = 100
_MAX_MODEL_PAGES = 20
# How long the rest of a native stream is read after its last event (its body's end, read to
# keep the connection): a gateway slow to close it costs the connection, not the reply.
FINISHED_BODY_WAIT = 1.0


class DashScopeClient:
    """Calls DashScope chat models.

    Pass a shared ``httpx.AsyncClient`` as ``http`` to reuse one connection pool per process;
    otherwise the client owns one, moved by ``engine`` (aiohttp or httpx's own, see
    ``transport.py``), and ``aclose`` closes it. ``sleep`` is the backoff sleeper (tests
    inject a recorder).
    """

    def __init__(
        self,
        config: DashScopeConfig,
        *,
        http: httpx.AsyncClient | None = None,
        engine: Engine = "aiohttp",
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._config = config
        self._owns_http = http is None
        self._http = http if http is not None else open_http_client(engine)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"DashScopeClient(native_base_url={self._config.native_base_url!r})"

    async def __aenter__(self) -> DashScopeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream a reply as events; ``Finish`` is always last. On a native stream it comes
        with the event that carries the finish reason, not when the body ends after it.

        Usage is yielded once, with the final cumulative figures, just before ``Finish`` (when the
        server reported any). Errors before the first event are retried up to
        ``config.max_retries`` times if retryable; after that they raise. Closing the generator
        (``aclose()``) or cancelling the task closes the HTTP response at once.
        """
        attempt = 0
        while True:
            started = False
            try:
                async with aclosing(self._stream_once(request)) as events:
                    async for event in events:
                        started = True
                        yield event
                return
            except DashScopeError as error:
                if started or not self._may_retry(error, attempt):
                    raise
                delay = self._retry_delay(attempt, error.retry_after)
            await self._sleep(delay)
            attempt += 1

    async def chat(self, request: ChatRequest) -> Completion:
        """Generate a whole reply in one non-streaming call (retried like stream admission)."""
        attempt = 0
        while True:
            try:
                return await self._chat_once(request)
            except DashScopeError as error:
                if not self._may_retry(error, attempt):
                    raise
                delay = self._retry_delay(attempt, error.retry_after)
            await self._sleep(delay)
            attempt += 1

    async def list_models(self) -> list[str]:
        """The ids of the models the account may call: the native model list, every page
        (``GET /api/v1/models?page_no=N&page_size=100``), in the order DashScope gives them.
        Retried like a non-streaming call; a failure raises a ``DashScopeError``."""
        names: list[str] = []
        for page_no in range(1, _MAX_MODEL_PAGES + 1):
            payload = await self._get_json(
                f"{self._config.native_base_url}/models",
                {"page_no": page_no, "page_size": _MODEL_PAGE_SIZE},
            )
            output = payload.get("output") if isinstance(payload.get("output"), dict) else {}
            listed = output.get("models") if isinstance(output.get("models"), list) else []
            for item in listed:
                name = item.get("model") if isinstance(item, dict) else None
                if isinstance(name, str) and name.strip() and name not in names:
                    names.append(strip_controls(name.strip())[:100])
            total = _int(output.get("total"))
            if not listed or total is None or page_no * _MODEL_PAGE_SIZE >= total:
                break
        return names

    async def _get_json(self, url: str, params: dict[str, Any]) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                return await self._get_json_once(url, params)
            except DashScopeError as error:
                if not self._may_retry(error, attempt):
                    raise
                delay = self._retry_delay(attempt, error.retry_after)
            await self._sleep(delay)
            attempt += 1

    async def _get_json_once(self, url: str, params: dict[str, Any]) -> dict[str, Any]:
        headers = {
            "Authorization": f"Bearer {self._config.api_key}",
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        errors = _ErrorFactory(self._config.api_key)
        response, text = await self._exchange(
            "GET", url, errors, read_timeout=self._config.stall_timeout, params=params,
            headers=headers,
        )  # fmt: skip
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise errors.from_body(502, text)
        parts = _payload_error(payload, "", None, response.status_code)
        if parts is not None:
            code, message, request_id, status = parts
            raise errors.build(status or 400, code, message, request_id)
        return payload

    # -- one attempt ------------------------------------------------------------------------

    async def _exchange(
        self, method: str, url: str, errors: _ErrorFactory, *, read_timeout: float, **kwargs
    ) -> tuple[httpx.Response, str]:
        """One request that is not streamed, and its body as text; a failure (the transport,
        a timeout, an error status) raised as the DashScopeError a person can act on."""
        timeout = httpx.Timeout(
            connect=self._config.connect_timeout,
            read=read_timeout,
            write=self._config.stall_timeout,
            pool=self._config.stall_timeout,
        )
        try:
            response = await self._http.request(method, url, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise errors.timeout(exc, self._config) from exc
        except httpx.RequestError as exc:
            raise errors.transport(exc) from exc
        errors.observe(response)
        text = response.text
        if not response.is_success:
            raise errors.from_body(response.status_code, text)
        return response, text

    async def _stream_once(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        url, body, headers = self._build(request, stream=True)
        timeout = httpx.Timeout(
            connect=self._config.connect_timeout,
            read=self._config.stall_timeout,
            write=self._config.stall_timeout,
            pool=self._config.stall_timeout,
        )
        errors = _ErrorFactory(self._config.api_key)
        try:
            async with self._http.stream(
                "POST", url, json=body, headers=headers, timeout=timeout
            ) as response:
                errors.observe(response)
                if not response.is_success:
                    raise errors.from_body(response.status_code, await _read_text(response))
                state = _StreamState(
                    errors=errors,
                    api_key=self._config.api_key,
                    http_status=response.status_code,
                    header_request_id=response.headers.get("x-request-id"),
                    incremental=_is_incremental(request),
                )
                finished = False
                content_type = response.headers.get("content-type", "").lower()
                if "event-stream" not in content_type and "json" in content_type:
                    # Some gateways answer with one JSON document even when asked to stream.
                    await response.aread()
                    for event in state.feed_document(response.text):
                        yield event
                else:
                    async with aclosing(aiter_frames(response)) as frames:
                        async for frame in frames:
                            for event in state.feed_frame(frame):
                                yield event
                            if state.done:
                                break
                            if state.last_said:
                                # A native stream's last event (it carries the finish
                                # reason): the reply is whole now, whenever its body ends.
                                finished = True
                                for event in state.finish():
                                    yield event
                                await _drain(frames)
                                break
                if not finished:
                    for event in state.finish():
                        yield event
        except httpx.TimeoutException as exc:
            raise errors.timeout(exc, self._config) from exc
        except httpx.RequestError as exc:
            raise errors.transport(exc) from exc

    async def _chat_once(self, request: ChatRequest) -> Completion:
        url, body, headers = self._build(request, stream=False)
        errors = _ErrorFactory(self._config.api_key)
        response, text = await self._exchange(
            "POST", url, errors, read_timeout=self._config.request_timeout, json=body,
            headers=headers,
        )  # fmt: skip
        state = _StreamState(
            errors=errors,
            api_key=self._config.api_key,
            http_status=response.status_code,
            header_request_id=response.headers.get("x-request-id"),
            incremental=True,
        )
        reply: list[str] = []
        reasoning: list[str] = []
        tool_calls = ToolCallAccumulator()
        finish: Finish | None = None
        usage: Usage | None = None
        search_results: list[dict[str, Any]] = []
        for event in [*state.feed_document(text), *state.finish()]:
            if tool_calls.add(event):
                continue
            if isinstance(event, TextDelta):
                reply.append(event.text)
            elif isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, SearchResults):
                search_results = event.results
            elif isinstance(event, Finish):
                finish = event
        partial = response.headers.get("x-dashscope-partialresponse", "").lower() == "true"
        return Completion(
            text="".join(reply),
            reasoning="".join(reasoning),
            finish_reason=finish.reason if finish else None,
            usage=usage,
            request_id=finish.request_id if finish else state.request_id,
            partial_response=partial,
            tool_calls=tool_calls.calls,
            search_results=search_results,
        )

    # -- request building -------------------------------------------------------------------

    def _build(
        self, request: ChatRequest, *, stream: bool
    ) -> tuple[str, dict[str, Any], dict[str, str]]:
        headers = {
            "Authorization": f"Bearer {self._config.api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": _USER_AGENT,
        }
        if request.protocol == "compatible":
            url = f"{self._config.compatible_base_url}/chat/completions"
            body: dict[str, Any] = {
                "model": request.model,
                "messages": [_compatible_message(m) for m in request.messages],
                "stream": stream,
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            body.update(request.parameters)
            return url, body, headers

        try:
            path = _NATIVE_PATHS[request.endpoint]
        except KeyError:
            raise ValueError(f"unknown DashScope endpoint {request.endpoint!r}") from None
        multimodal = request.endpoint == "multimodal"
        parameters: dict[str, Any] = {"result_format": "message"}
        if stream:
            headers["X-DashScope-SSE"] = "enable"
            parameters["incremental_output"] = True
        parameters.update(request.parameters)
        body = {
            "model": request.model,
            "input": {"messages": [_native_message(m, multimodal) for m in request.messages]},
            "parameters": parameters,
        }
        return f"{self._config.native_base_url}{path}", body, headers

    # -- retry policy -----------------------------------------------------------------------

    def _may_retry(self, error: DashScopeError, attempt: int) -> bool:
        return error.retryable and attempt < self._config.max_retries

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        cap = self._config.backoff_cap
        if retry_after is not None:
            return min(max(retry_after, 0.0), cap)
        delay = min(self._config.backoff_base * 2**attempt, cap)
        return delay + random.uniform(0, delay * 0.25)


# -- messages ---------------------------------------------------------------------------------


def _native_message(message: ChatMessage, multimodal: bool) -> dict[str, Any]:
    if multimodal:
        content: Any = [{"image": url} for url in message.images]
        content.append({"text": message.content})
    else:
        if message.images:
            raise ValueError(
                "images need the multimodal endpoint (ChatRequest.endpoint='multimodal')"
            )
        content = message.content
    return _with_extras({"role": message.role, "content": content}, message)


def _compatible_message(message: ChatMessage) -> dict[str, Any]:
    content: Any = message.content
    if message.images:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in message.images]
        content.append({"type": "text", "text": message.content})
    return _with_extras({"role": message.role, "content": content}, message)


def _with_extras(payload: dict[str, Any], message: ChatMessage) -> dict[str, Any]:
    """The fields both protocols spell alike: prefix continuation and function calling."""
    if message.partial:
        payload["partial"] = True
    if message.tool_calls:
        payload["tool_calls"] = [dict(call) for call in message.tool_calls]
    if message.tool_call_id:
        payload["tool_call_id"] = message.tool_call_id
    return payload


def _is_incremental(request: ChatRequest) -> bool:
    if request.protocol == "compatible":
        return True
    return request.parameters.get("incremental_output", True) is not False


# -- response parsing -------------------------------------------------------------------------


class _StreamState:
    """Turns decoded payloads into events and remembers what the final events need.

    Every string in an event has been through ``sanitize``: metadata (request id, finish
    reason, tool call ids and names) is cleaned of anything shaped like a key, model output
    of the configured key (see ``OutputCleaner`` for why only that one).
    """

    def __init__(
        self,
        *,
        errors: _ErrorFactory,
        api_key: str,
        http_status: int,
        header_request_id: str | None,
        incremental: bool,
    ) -> None:
        self._errors = errors
        self._api_key = api_key
        self._text_cleaner = OutputCleaner(api_key)
        self._reasoning_cleaner = OutputCleaner(api_key)
        self._http_status = http_status
        self._header_request_id = header_request_id
        self._incremental = incremental
        self._body_request_id: str | None = None
        self._completion_id: str | None = None
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        # Non-incremental native streams repeat the whole text (and each tool call's arguments);
        # these hold what was sent so far.
        self._text_so_far = ""
        self._reasoning_so_far = ""
        self._arguments_so_far: dict[int, str] = {}
        self._sources_seen = False
        self.done = False
        self.last_said = False  # a native payload with a finish reason: nothing more follows

    @property
    def request_id(self) -> str | None:
        raw = self._body_request_id or self._header_request_id or self._completion_id
        return clean_metadata(raw, self._api_key)

    def feed_frame(self, frame: SSEFrame) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for payload in frame.payloads():
            if payload == DONE:
                self.done = True
                break
            events.extend(self._feed_payload(payload, frame.event, frame.status))
        return events

    def feed_document(self, text: str) -> list[StreamEvent]:
        """A whole body: one JSON document, or SSE text that was labelled otherwise."""
        try:
            payload = json.loads(text)
        except ValueError:
            events: list[StreamEvent] = []
            for frame in parse_frames(text):
                events.extend(self.feed_frame(frame))
                if self.done:
                    break
            return events
        return self._feed_payload(payload, "", None)

    def finish(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if reasoning := self._reasoning_cleaner.flush():
            events.append(ReasoningDelta(reasoning))
        if text := self._text_cleaner.flush():
            events.append(TextDelta(text))
        if self._usage is not None:
            events.append(self._usage)
        events.append(Finish(self._finish_reason, self.request_id))
        return events

    def _feed_payload(self, payload: Any, event: str, status: int | None) -> list[StreamEvent]:
        error = _payload_error(payload, event, status, self._http_status)
        if error is not None:
            code, message, request_id, logical_status = error
            raise self._errors.build(logical_status, code, message, request_id or self.request_id)
        if not isinstance(payload, dict):
            return []  # stray non-JSON line in a healthy stream
        if isinstance(payload.get("request_id"), str):
            self._body_request_id = payload["request_id"]
        if isinstance(payload.get("id"), str):
            self._completion_id = payload["id"]
        usage = _usage(payload.get("usage"))
        if usage is not None:
            self._usage = usage
        events = self._search_events(payload)
        if isinstance(payload.get("output"), dict):
            return events + self._native_events(payload["output"])
        choices = payload.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta") or choice.get("message") or {}
            self._note_finish(choice.get("finish_reason"))
            return events + self._message_events(delta, incremental=True)
        return events

    def _search_events(self, payload: dict[str, Any]) -> list[StreamEvent]:
        """``SearchResults`` from the first payload that lists sources in ``search_info``
        (native: under ``output``; compatible: where the simulator puts it, the top level),
        then never again; nothing if none of them survives cleaning."""
        if self._sources_seen:
            return []
        output = payload.get("output")
        for holder in (output if isinstance(output, dict) else {}, payload):
            info = holder.get("search_info")
            if isinstance(info, dict) and isinstance(info.get("search_results"), list):
                self._sources_seen = True
                results = clean_search_results(info["search_results"], self._api_key)
                return [SearchResults(results)] if results else []
        return []

    def _native_events(self, output: dict[str, Any]) -> list[StreamEvent]:
        choices = output.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            self.last_said = self._note_finish(choice.get("finish_reason"))
            return self._message_events(choice.get("message") or {}, incremental=self._incremental)
        # result_format "text" (older models): output.text + output.finish_reason.
        self._note_finish(output.get("finish_reason"))
        return self._message_events({"content": output.get("text")}, incremental=self._incremental)

    def _message_events(self, message: dict[str, Any], *, incremental: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        reasoning = _flatten(message.get("reasoning_content"))
        content = _flatten(message.get("content"))
        if not incremental:
            reasoning, self._reasoning_so_far = _suffix(self._reasoning_so_far, reasoning)
            content, self._text_so_far = _suffix(self._text_so_far, content)
        reasoning = self._reasoning_cleaner.feed(reasoning)
        content = self._text_cleaner.feed(content)
        if reasoning:
            events.append(ReasoningDelta(reasoning))
        if content:
            events.append(TextDelta(content))
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, call in enumerate(tool_calls):
                if not isinstance(call, dict):
                    continue
                delta = _tool_call_delta(call, position, self._api_key)
                if not incremental:
                    seen = delta.index in self._arguments_so_far
                    previous = self._arguments_so_far.get(delta.index, "")
                    arguments, self._arguments_so_far[delta.index] = _suffix(
                        previous, delta.arguments
                    )
                    if seen and not arguments:
                        continue  # the same call repeated, nothing new
                    delta = replace(delta, arguments=arguments)
                events.append(delta)
        return events

    def _note_finish(self, reason: Any) -> bool:
        """Keep a finish reason, if this is one; whether it was."""
        if isinstance(reason, str) and reason and reason != "null":
            self._finish_reason = clean_metadata(reason, self._api_key)
            return True
        return False


def _suffix(previous: str, current: str) -> tuple[str, str]:
    """New text in a cumulative chunk, and the new cumulative text."""
    if not current:
        return "", previous
    if current.startswith(previous):
        return current[len(previous) :], current
    return current, previous + current


def _flatten(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                parts.append(item["text"])
        return "".join(parts)
    return ""


def _tool_call_delta(call: dict[str, Any], position: int, api_key: str) -> ToolCallDelta:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    index = call.get("index")
    arguments = function.get("arguments")
    return ToolCallDelta(
        index=index if isinstance(index, int) else position,
        id=clean_metadata(_str_or_none(call.get("id")), api_key) or None,
        name=clean_metadata(_str_or_none(function.get("name")), api_key) or None,
        # Arguments are model output, like the reply: only the configured key goes.
        arguments=redact_key(strip_controls(arguments), api_key)
        if isinstance(arguments, str)
        else "",
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    input_tokens = _int(raw.get("input_tokens", raw.get("prompt_tokens")))
    output_tokens = _int(raw.get("output_tokens", raw.get("completion_tokens")))
    if input_tokens is None and output_tokens is None:
        return None
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    total = _int(raw.get("total_tokens"))
    details = raw.get("output_tokens_details", raw.get("completion_tokens_details"))
    reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    return Usage(
        input_tokens,
        output_tokens,
        total if total is not None else input_tokens + output_tokens,
        reasoning_tokens=reasoning or 0,
    )


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


_ErrorParts = tuple[str | None, str, str | None, int | None]


def _payload_error(
    payload: Any, event: str, frame_status: int | None, http_status: int
) -> _ErrorParts | None:
    """(code, message, request_id, status) if this payload reports an error, else None."""
    flagged = event == "error" or (frame_status is not None and frame_status >= 400)
    fallback_status = http_status if http_status >= 400 else None
    status = frame_status if frame_status is not None and frame_status >= 400 else fallback_status
    if isinstance(payload, RawData) or not isinstance(payload, dict):
        if not flagged:
            return None
        text = payload.text if isinstance(payload, RawData) else json.dumps(payload)
        return None, text, None, status
    request_id = payload.get("request_id") if isinstance(payload.get("request_id"), str) else None
    error = payload.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = error.get("message")
        request_id = request_id or error.get("request_id")
    elif isinstance(error, str) and error:
        code, message = None, error
    elif flagged or _is_business_error(payload):
        code, message = payload.get("code"), payload.get("message")
    else:
        return None
    if status is None:
        status = _int(payload.get("status_code"))
    return (
        str(code) if code else None,
        str(message) if message else "",
        str(request_id) if request_id else None,
        status,
    )


def _is_business_error(payload: dict[str, Any]) -> bool:
    """A top-level ``code`` without any output: the gateway's error shape, even under HTTP 200."""
    return bool(payload.get("code")) and "output" not in payload and "choices" not in payload


class _ErrorFactory:
    """Builds errors for one attempt: adds retry hints from headers, and cleans every string
    that came from the upstream (``clean_metadata``) before it goes into an error."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key
        self._retry_after: float | None = None
        self._should_retry: bool | None = None
        self._request_id: str | None = None

    def observe(self, response: httpx.Response) -> None:
        self._retry_after = _retry_after(response.headers)
        self._request_id = clean_metadata(response.headers.get("x-request-id"), self._api_key)
        should_retry = response.headers.get("x-should-retry", "").lower()
        if should_retry in ("true", "false"):
            self._should_retry = should_retry == "true"

    def build(
        self, status: int | None, code: str | None, message: str, request_id: str | None
    ) -> DashScopeError:
        error = classify(
            status,
            clean_metadata(code, self._api_key),
            clean_metadata(message, self._api_key) or "",
            clean_metadata(request_id, self._api_key) or self._request_id,
            self._retry_after,
        )
        if self._should_retry is not None:
            error.retryable = self._should_retry
        return error

    def from_body(self, status: int, text: str) -> DashScopeError:
        """An error from a non-2xx body: JSON first, then SSE ``data:`` lines, then raw text."""
        candidates: list[tuple[Any, str, int | None]] = []
        try:
            candidates.append((json.loads(text), "", None))
        except ValueError:
            for frame in parse_frames(text):
                candidates.extend(
                    (payload, frame.event, frame.status) for payload in frame.payloads()
                )
        for payload, event, frame_status in candidates:
            parts = _payload_error(payload, event, frame_status, status)
            if parts is not None and (parts[0] or parts[1]):
                code, message, request_id, _ = parts
                return self.build(status, code, message, request_id)
        snippet = " ".join(text.split())[:200]
        message = f"HTTP {status} from DashScope" + (f": {snippet}" if snippet else "")
        return self.build(status, None, message, None)

    def timeout(self, exc: httpx.TimeoutException, config: DashScopeConfig) -> DashScopeError:
        if isinstance(exc, httpx.ConnectTimeout):
            message = f"Could not connect to DashScope within {config.connect_timeout:g} s."
        elif isinstance(exc, httpx.PoolTimeout):
            message = "Timed out waiting for a free connection to DashScope."
        else:
            message = f"DashScope sent nothing for {config.stall_timeout:g} s; the stream stalled."
        return DashScopeTimeoutError(message, request_id=self._request_id)

    def transport(self, exc: httpx.RequestError) -> DashScopeError:
        detail = clean_metadata(str(exc), self._api_key) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            message = f"Could not connect to DashScope: {detail}"
        else:
            message = f"Connection to DashScope failed: {detail}"
        return TransportError(message, request_id=self._request_id)


def _retry_after(headers: httpx.Headers) -> float | None:
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return float(raw_ms) / 1000
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _drain(frames: AsyncIterator[SSEFrame]) -> None:
    """Read the rest of a stream whose last event has come, to its end (the connection is
    then kept), for at most FINISHED_BODY_WAIT seconds. Nothing in it counts any more: the
    reply has ended, and a failure or a slow end only costs the connection."""
    with suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(FINISHED_BODY_WAIT):
            async for _frame in frames:
                pass


async def _read_text(response: httpx.Response) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_ERROR_BODY:
            break
    return b"".join(chunks).decode(response.encoding or "utf-8", errors="replace")
