"""Body size limits per route, enforced before any handler reads a byte.

FastAPI reads and parses a JSON body before it runs a route's dependencies (its credential checks), so a
stranger's 300 MB report would be in memory before it is refused. `BodyLimits` sits in front of the app:
a declared Content-Length over the route's limit is answered 413 at once, and a body streamed past it is
cut off with 413 as soon as it goes over. Routes without a limit pass untouched (the OIP endpoint
counts its own bodies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class RouteLimit:
    pattern: re.Pattern[str]  # matched against the path
    max_bytes: int


class BodyLimits:
    """ASGI middleware: the first limit whose pattern matches a request's path bounds its body."""

    def __init__(self, app: ASGIApp, limits: Sequence[RouteLimit]):
        self.app, self.limits = app, list(limits)

    def _limit(self, path: str) -> int | None:
        return next((rule.max_bytes for rule in self.limits if rule.pattern.match(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit)
        seen, over, started = 0, False, False

        async def counted() -> Message:
            # Past the limit the app is told the client went away: it stops reading, whatever it was doing
            # with the body (parsing JSON, spooling a multipart upload to disk), and its answer is dropped.
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _refuse(send, limit)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"error": f"the body is larger than this route takes ({limit} bytes)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
