"""Routes as strict about their query and form text as the models are about their fields.

Starlette decodes a form field that is not valid in its charset as Latin-1, silently: a name sent
as invalid UTF-8 would be stored as mojibake. The routes of this API parse their forms with
`StrictMultiPartParser` first (FastAPI then reuses the parsed form), which refuses such a field
with a 400 that names it. And FastAPI ignores query parameters an operation does not take (a
misspelt `per_pge` would silently list the first page): they are refused with a 422 naming them.
Uploaded files are read in chunks and refused as soon as they pass the size limit (`read_upload`).
"""
from __future__ import annotations

from fastapi import Request, UploadFile, params
from fastapi.routing import APIRoute
from starlette.formparsers import MultiPartException, MultiPartParser

from reid.errors import TooLarge
from service.errors import ApiError

FORM_CONTENT_TYPE = "multipart/form-data"
READ_CHUNK = 1024 * 1024


class InvalidFormText(MultiPartException):
    pass


class StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode(self._charset)  # decoded again by the parser: this only checks
            except UnicodeDecodeError as exc:
                charset = "UTF-8" if self._charset == "utf-8" else self._charset
                raise InvalidFormText(f"form field '{part.field_name}' is not valid {charset} text (byte "
                                      f"{exc.start}: {part.data[exc.start:exc.start + 1]!r})") from None
        super().on_part_end()


async def parse_strict_form(request: Request) -> None:
    """Parse a multipart request's form now, strictly; the request keeps it for FastAPI's own `form()`."""
    content_type = request.headers.get("content-type", "")
    if request._form is not None or not content_type.lower().startswith(FORM_CONTENT_TYPE):
        return
    try:
        request._form = await StrictMultiPartParser(request.headers, request.stream()).parse()
    except InvalidFormText as exc:
        raise ApiError(exc.message, code="invalid_form") from None
    except MultiPartException as exc:
        raise ApiError(f"the request body is not valid multipart/form-data: {exc.message}",
                       code="invalid_form") from None


def query_names(dependant) -> set[str]:
    """The query parameters an operation takes, its dependencies' included."""
    return {field.alias for field in dependant.query_params} | {
        name for dependency in dependant.dependencies for name in query_names(dependency)}


class StrictRoute(APIRoute):
    """An APIRoute that refuses query parameters it does not take, and checks multipart text fields
    against their charset before validation."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        takes_form = bool(self.body_field and isinstance(self.body_field.field_info, params.Form))
        known = query_names(self.dependant)

        async def strict_handler(request: Request):
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                taken = ", ".join(sorted(known)) or "none"
                raise ApiError(f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this operation takes: "
                               f"{taken}", code="unknown_parameter", status=422)
            if takes_form:
                await parse_strict_form(request)
            return await handler(request)

        return strict_handler


async def read_upload(file: UploadFile, index: int, max_bytes: int) -> bytes:
    """The bytes of one uploaded file, refused as soon as it passes `max_bytes`."""
    label = f"images[{index}]" + (f" ('{file.filename}')" if file.filename else "")
    size = getattr(file, "size", None)
    if size is not None and size > max_bytes:
        raise TooLarge(f"{label} is {size} bytes; the limit is {max_bytes} bytes", code="file_too_large")
    chunks, total = [], 0
    while True:
        chunk = await file.read(READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"{label} is larger than the limit of {max_bytes} bytes", code="file_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
