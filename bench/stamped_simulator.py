"""The DashScope simulator in its own process, with wall-clock stamps for the load bench.

The same ``Simulator`` the app's offline demo and tests use, served by uvicorn as
``python -m dashscope_simulator`` serves it, plus one thing: for every generation
request it notes when the request arrived (before its body was read) and when each body chunk
of the response was handed to the server (one SSE event per token at tokens_per_chunk=1), with
``time.time()`` so ``bench/load.py`` can compare them with its own clock on the same machine.

    python bench/stamped_simulator.py --port P [--first-token-delay 0.3 --token-delay 0.02]

Extra control endpoints: ``GET /_bench/timings`` (``{tag: {"arrival": t, "chunks": [t, ...]}}``,
tag = the ``[tag]`` in the last user message, else the request id) and
``DELETE /_bench/timings``. Everything else, ``/_simulator/...`` included, is the simulator's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402

from dashscope_simulator.server import Simulator, _install_drop_filter  # noqa: E402

TAG = re.compile(r"\[([A-Za-z0-9_.-]+)\]")


class StampedSimulator(Simulator):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.timings: dict[str, dict] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope["bench_arrival"] = time.time()
            path = scope["path"].rstrip("/")
            if path == "/_bench/timings":
                while (await receive()).get("more_body"):
                    pass
                if scope["method"] == "DELETE":
                    self.timings = {}
                body = json.dumps(self.timings).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await super().__call__(scope, receive, send)

    async def _generation(self, scope, receive, send, body, protocol, multimodal) -> None:
        tag = None
        try:
            data = json.loads(body)
            messages = (data.get("input") or {}).get("messages") or data.get("messages") or []
            last = messages[-1].get("content") if messages else ""
            match = TAG.search(last if isinstance(last, str) else json.dumps(last))
            tag = match.group(1) if match else None
        except (ValueError, AttributeError, TypeError):
            pass
        chunks: list[float] = []
        key = tag or f"untagged-{len(self.timings)}"
        if key in self.timings:
            # A later request quoting the tagged message (the chat's title, written by a cheap
            # model once the first reply is done) must not replace the reply's stamps.
            key = f"{key}-again-{len(self.timings)}"
        self.timings[key] = {
            "arrival": scope["bench_arrival"],
            "chunks": chunks,
        }

        async def stamped_send(message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(time.time())
            await send(message)

        await super()._generation(scope, receive, stamped_send, body, protocol, multimodal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--first-token-delay", type=float, default=0.3)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    args = parser.parse_args()
    app = StampedSimulator(
        api_key=args.api_key,
        first_token_delay=args.first_token_delay,
        token_delay=args.token_delay,
        tokens_per_chunk=args.tokens_per_chunk,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", access_log=False,
        lifespan="off", timeout_graceful_shutdown=1, backlog=4096,
    )  # fmt: skip
    _install_drop_filter()
    print(f"stamped simulator on http://{args.host}:{args.port}", flush=True)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
