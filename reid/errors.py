"""Errors a user can fix: the CLI prints their message, never a traceback.

`RequestError` and its kinds are what the store and the identification core raise for a request
that cannot be done as asked (a missing individual, a photo too large, a full disk). Each has a
stable machine-readable `code` and optional `details`; the service maps each kind to its HTTP
status (service/errors.py), the command line prints the message.
"""


class ReidError(Exception):
    """Base class for errors caused by user input (data, config, files)."""


class DataError(ReidError):
    """A data table, image file or folder is unusable; the message names the file, row and fix."""


class ConfigError(ReidError):
    """A configuration file or --set override is invalid."""


class RequestError(ReidError):
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, **details):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or None


class InvalidInput(RequestError):
    code = "invalid_input"


class NotFound(RequestError):
    code = "not_found"


class Conflict(RequestError):
    code = "conflict"


class TooLarge(RequestError):
    """A file, photo or request beyond a configured limit (the message names the limit)."""
    code = "payload_too_large"


class UnsupportedMedia(RequestError):
    code = "unsupported_media_type"


class DiskFull(RequestError):
    """The disk under the image files or the database is full: nothing of the request was kept."""
    code = "disk_full"


class StorageUnavailable(RequestError):
    """A write to the store failed for another reason; nothing was recorded and a retry may work."""
    code = "storage_unavailable"
