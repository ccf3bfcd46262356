"""ASGI middleware: request-body limits of size and time (before any parsing) and request metrics."""
from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from service.metrics import Metrics

# the refusal of a browser's form (the review app's pages), without JavaScript to have checked its size
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Not sent · wildreid review</title><link rel="stylesheet" href="/static/app.css"></head>
<body><main><h1>That was not sent</h1>
<p class="message error" role="alert">{message}</p>
<p><a href="{back}">Go back</a> · <a href="/">Identify</a> · <a href="/individuals">Individuals</a></p>
</main></body></html>
"""


def megabytes(size: int) -> str:
    return f"{size / 2**20:.3g} MB"


async def send_error(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await _send(send, status, b"application/json", body)


async def send_page(send, scope, status: int, message: str) -> None:
    """A small page with the message and a link back to the page the form was on (its Referer's path)."""
    referer = next((v for k, v in scope.get("headers", ()) if k == b"referer"), b"").decode("latin-1")
    parts = urlsplit(referer)
    back = parts.path + (f"?{parts.query}" if parts.query else "")
    if not back.startswith("/") or back.startswith("//") or "\\" in back:
        back = "/"
    body = PAGE.format(message=html.escape(message), back=html.escape(back)).encode()
    await _send(send, status, b"text/html; charset=utf-8", body)


async def _send(send, status: int, content_type: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    """The body is refused while it is read: the error to answer instead of the handler's (`words`: for
    a page, when they differ from the API's message)."""

    def __init__(self, status: int, code: str, message: str, words: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.words = status, code, message, words or message


class BodyLimitMiddleware:
    """Refuse a request body past `max_bytes` with 413: at once by its Content-Length, else (chunked
    uploads) as soon as the bytes read pass the limit; and one that arrives too slowly with 408: no
    bytes for `idle_timeout_s`, or not complete within `deadline_s` (a client declaring 1,000 bytes
    and sending 9 would otherwise hold its connection forever). Nothing of such a request reaches a
    handler's write: the handler fails while reading the body, and its answer is replaced. The refusal
    is JSON, or a small page where `page_for(scope)` (a browser's form to the review app)."""

    def __init__(self, app, max_bytes: int, idle_timeout_s: float = 30.0, deadline_s: float = 600.0,
                 page_for: Callable[[dict], bool] | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.idle_timeout_s, self.deadline_s = idle_timeout_s, deadline_s
        self.page_for = page_for

    async def refuse(self, scope, send, refused: _Refused) -> None:
        if self.page_for is not None and self.page_for(scope):
            return await send_page(send, scope, refused.status, refused.words)
        await send_error(send, refused.status, refused.code, refused.message)

    def too_large(self, declared: int) -> _Refused:
        return _Refused(413, "request_too_large", f"the request body is {declared} bytes; the limit is "
                        f"{self.max_bytes} bytes", f"the upload is {megabytes(declared)}; this server takes at most "
                        f"{megabytes(self.max_bytes)} in one upload: send fewer or smaller photos (or split the zip)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self.refuse(scope, send, _Refused(400, "bad_content_length",
                                                               "the Content-Length header is not a number"))
            if declared > self.max_bytes:
                return await self.refuse(scope, send, self.too_large(declared))
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
                                                f"limit of {self.max_bytes} bytes", "the upload is larger than the "
                                                f"limit of {megabytes(self.max_bytes)} in one upload: send fewer or "
                                                "smaller photos (or split the zip)")
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
            await self.refuse(scope, send, refused)


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
