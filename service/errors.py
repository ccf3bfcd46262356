"""Errors of the service and the HTTP status of every error a request can meet.

The library raises `reid.errors.RequestError` kinds (store, photos, identification); `status_of`
maps each kind to its HTTP status. Errors only HTTP knows (keys, readiness, forms) are `ApiError`s,
which carry their status themselves. The app turns all of them into `{"error": {"code", "message"}}`.
"""
from __future__ import annotations

from reid.errors import (Conflict, DiskFull, InvalidInput, NotFound, RequestError, StorageUnavailable, TooLarge,
                         UnsupportedMedia)

STATUS = {InvalidInput: 422, NotFound: 404, Conflict: 409, TooLarge: 413, UnsupportedMedia: 415, DiskFull: 507,
          StorageUnavailable: 503}


class ApiError(RequestError):
    status = 400

    def __init__(self, message: str, code: str | None = None, status: int | None = None, **details):
        super().__init__(message, code, **details)
        if status:
            self.status = status


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotReady(ApiError):
    status, code = 503, "not_ready"


def status_of(exc: RequestError) -> int:
    """The HTTP status of a request error: its own (ApiError), else its kind's."""
    if isinstance(exc, ApiError):
        return exc.status
    return next((STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS), 400)
