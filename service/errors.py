"""Errors of the service: each carries its HTTP status and a stable machine-readable code.

They subclass `reid.errors.ReidError`, so the store and commands raise them for a user's mistake
and the CLI prints them like any other; the app turns them into `{"error": {"code", "message"}}`.
"""
from __future__ import annotations

from reid.errors import ReidError


class ApiError(ReidError):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, status: int | None = None, **details):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.details = details or None


class InvalidInput(ApiError):
    status, code = 422, "invalid_input"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMedia(ApiError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotReady(ApiError):
    status, code = 503, "not_ready"


class InsufficientStorage(ApiError):
    """The disk under the image files or the database is full: nothing of the request was kept."""
    status, code = 507, "disk_full"


class StorageUnavailable(ApiError):
    status, code = 503, "storage_unavailable"
