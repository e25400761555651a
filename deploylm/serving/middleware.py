"""ASGI middleware: request ids, the access log, in-flight counting, and 503 while draining.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a request
counts as in flight until its last byte is sent.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

log = logging.getLogger("deploylm.serve")

_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class ServerState:
    """Counters shared by the middleware, the routes and the shutdown logic (one event loop)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.active_streams = 0
        self.idle = threading.Event()   # set when nothing is in flight (read by the shutdown thread)
        self.idle.set()
        self.stop_decoding = threading.Event()   # set when the drain is over: decodes end after their step
        self.started = int(time.time())          # unix time the server state was made (models' "created")

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


def request_id_of(scope: dict) -> str:
    return scope.get("state", {}).get("request_id", "-")


class RequestMiddleware:
    """Gives every HTTP request an id (client's X-Request-Id if sane), logs it, refuses while draining."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state
        self.lifespan: Callable[[Any], Any] | None = None   # the wrapped app's lifespan, for an outer app to run

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status: dict[str, Any] = {"code": 0}
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        if self.state.draining:
            await _unavailable(send_with_id)
        else:
            self.state.enter()
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self.state.leave()
        log.info("%s %s %s %d %.1fms", request_id, scope["method"], scope["path"], status["code"],
                 (time.perf_counter() - started) * 1000)


def _request_id(scope: dict) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _ID_RE.match(text):
                return text
    return uuid.uuid4().hex


async def _unavailable(send: Callable) -> None:
    body = json.dumps({"error": {"message": "server is shutting down: retry on another instance or later",
                                 "type": "unavailable", "param": None}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
