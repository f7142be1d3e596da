"""The floor of the relay for bench/load.py: daphne and the project's DashScope client alone.

A bare ASGI application served by daphne, with no Django, database, channel layer, session or
template: a websocket `send` frame starts a stream from the simulator through
``conversations.dashscope.DashScopeClient`` (the app's own client), and the text goes back
coalesced the way the app does it (the first delta at once, then at most one frame per
interval, the last one as soon as the stream ends) in the same lean frames, ``+<id>:<text>``,
ended by a fragment carrying ``data-role="assistant" data-status="complete"``. What the app
costs above these figures is what Django, the database, the channel layer and the rendering
add; what this costs is the floor of the stack itself on this machine.

    python -m daphne -b 127.0.0.1 -p PORT floor_relay:application   (cwd bench/)

Environment: FLOOR_BASE_URL (the simulator's native ``/api/v1`` URL), FLOOR_API_KEY,
FLOOR_FRAME_INTERVAL (default 0.04, as QWENWEB_FRAME_INTERVAL), FLOOR_HTTP_ENGINE (aiohttp or
httpx, as DASHSCOPE_HTTP_ENGINE). ``GET /healthz`` answers 200;
``GET /texts?ids=1,2`` returns ``{id: [text, status]}`` for the bench's delivery check.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from pathlib import Path
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conversations.dashscope import (  # noqa: E402
    ChatMessage,
    ChatRequest,
    DashScopeClient,
    DashScopeConfig,
    Finish,
    TextDelta,
)

FRAME_INTERVAL = float(os.environ.get("FLOOR_FRAME_INTERVAL", "0.04"))
_ids = itertools.count(1 + os.getpid() * 1_000_000)  # unique across the bench's processes
_texts: dict[int, tuple[str, str]] = {}
_client: DashScopeClient | None = None
_background: set[asyncio.Task] = set()


def client() -> DashScopeClient:
    global _client
    if _client is None:
        config = DashScopeConfig.from_values(
            api_key=os.environ["FLOOR_API_KEY"], base_url=os.environ["FLOOR_BASE_URL"]
        )
        _client = DashScopeClient(config, engine=os.environ.get("FLOOR_HTTP_ENGINE", "aiohttp"))
    return _client


async def relay(send, reply_id: int, content: str) -> None:
    """Stream one reply to the socket: first delta at once, then one frame per interval."""
    request = ChatRequest(model="qwen-plus", messages=[ChatMessage(role="user", content=content)])
    text, published, status = "", 0, "complete"
    dirty, done, finished = asyncio.Event(), False, asyncio.Event()

    async def consume() -> None:
        nonlocal text
        async for event in client().stream_chat(request):
            if isinstance(event, TextDelta):
                text += event.text
                dirty.set()
            elif isinstance(event, Finish):
                finished.set()

    upstream = asyncio.create_task(consume())
    upstream.add_done_callback(lambda _t: dirty.set())
    marker = f"+{reply_id}:"
    last_word = asyncio.ensure_future(finished.wait())
    while True:
        await dirty.wait()
        dirty.clear()
        done = upstream.done()
        if published < len(text):
            await send({"type": "websocket.send", "text": marker + text[published:]})
            published, marker = len(text), "+:"
        if done:
            break
        # Coalesce, but send the last frame as soon as the stream's last event has come (as
        # the app does).
        await asyncio.wait({upstream, last_word}, timeout=FRAME_INTERVAL)
    last_word.cancel()
    if upstream.exception() is not None:
        status = "error"
    _texts[reply_id] = (text, status)
    end = f'<article data-role="assistant" data-status="{status}"></article>'
    await send({"type": "websocket.send", "text": end})


async def websocket(scope, receive, send) -> None:
    tasks: set[asyncio.Task] = set()
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            data = json.loads(message.get("text") or "{}")
            if data.get("type") == "send":
                task = asyncio.create_task(relay(send, next(_ids), data.get("content", "")))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        elif message["type"] == "websocket.disconnect":
            for task in tasks:
                task.cancel()
            return


async def http(scope, receive, send) -> None:
    path = scope["path"]
    if path == "/healthz":
        body, status = b'{"ok": true}', 200
    elif path == "/texts":
        query = parse_qs(scope.get("query_string", b"").decode())
        ids = [int(x) for x in query.get("ids", [""])[0].split(",") if x]
        body, status = json.dumps({i: _texts[i] for i in ids if i in _texts}).encode(), 200
    else:
        body, status = b"not found", 404
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def application(scope, receive, send) -> None:
    if scope["type"] == "websocket":
        await websocket(scope, receive, send)
    elif scope["type"] == "http":
        await http(scope, receive, send)
    elif scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
