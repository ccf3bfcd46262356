"""ASGI middleware: request-body limits of size and time (before any parsing) and request metrics."""
from __future__ import annotations

import asyncio
import json
import time

from service.metrics import Metrics


async def send_error(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    """The body is refused while it is read: the error to answer instead of the handler's."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BodyLimitMiddleware:
    """Refuse a request body past `max_bytes` with 413: at once by its Content-Length, else (chunked
    uploads) as soon as the bytes read pass the limit; and one that arrives too slowly with 408: no
    bytes for `idle_timeout_s`, or not complete within `deadline_s` (a client declaring 1,000 bytes
    and sending 9 would otherwise hold its connection forever). Nothing of such a request reaches a
    handler's write: the handler fails while reading the body, and its answer is replaced."""

    def __init__(self, app, max_bytes: int, idle_timeout_s: float = 30.0, deadline_s: float = 600.0):
        self.app, self.max_bytes = app, max_bytes
        self.idle_timeout_s, self.deadline_s = idle_timeout_s, deadline_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(send, 400, "bad_content_length", "the Content-Length header is not a number")
            if declared > self.max_bytes:
                return await send_error(send, 413, "request_too_large",
                                        f"the request body is {declared} bytes; the limit is {self.max_bytes} bytes")
        state = {"read": 0, "refused": None, "started": False, "done": False}
        deadline = time.monotonic() + self.deadline_s

        async def guarded_receive():
            if state["done"]:
                return await receive()  # the body is in: what follows is the wait for a disconnect
            wait = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                state["refused"] = _Refused(408, "request_timeout", "the request body stopped arriving (no data for "
                                            f"{self.idle_timeout_s:g} s, or not complete within {self.deadline_s:g} "
                                            "s); send it again")
                raise state["refused"] from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["read"] > self.max_bytes:
                    state["refused"] = _Refused(413, "request_too_large", "the request body is larger than the "
                                                f"limit of {self.max_bytes} bytes")
                    raise state["refused"]
            return message

        async def guarded_send(message):
            if state["refused"]:
                return  # the refusal below answers instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise
        refused = state["refused"]
        if refused and not state["started"]:
            await send_error(send, refused.status, refused.code, refused.message)


class MetricsMiddleware:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - started)
