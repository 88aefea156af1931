"""Baselines for `make bench`, on the same server stack as the service (uvicorn, Starlette).

* `POST /post`: a bare endpoint that parses the JSON body and answers; no storage.
* `GET /naive`: the hand-rolled broadcaster this service replaces: an asyncio.Queue per
  subscriber, each message serialised per subscriber; `POST /naive` publishes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app() -> Starlette:
    subscribers: set[asyncio.Queue[dict[str, object]]] = set()
    counter = 0

    async def post(request: Request) -> Response:
        body = json.loads(await request.body())
        return JSONResponse({"ok": True, "progress": body.get("progress")})

    async def publish(request: Request) -> Response:
        nonlocal counter
        body = json.loads(await request.body())
        counter += 1
        for q in subscribers:
            q.put_nowait({"id": counter, "data": body})
        return JSONResponse({"event_id": counter})

    async def stream(request: Request) -> Response:
        q: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        subscribers.add(q)

        async def frames() -> AsyncIterator[dict[str, object]]:
            try:
                while True:
                    item = await q.get()
                    yield {"id": str(item["id"]), "event": "progress", "data": json.dumps(item)}
            finally:
                subscribers.discard(q)

        return EventSourceResponse(frames(), ping=15, sep="\n")

    return Starlette(routes=[
        Route("/post", post, methods=["POST"]),
        Route("/naive", publish, methods=["POST"]),
        Route("/naive", stream, methods=["GET"]),
    ])
