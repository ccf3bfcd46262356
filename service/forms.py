"""Multipart forms whose text fields must be valid in their charset (UTF-8 unless the request says otherwise).

Starlette decodes a form field that is not valid in its charset as Latin-1, silently: a name sent
as invalid UTF-8 would be stored as mojibake. The routes of this API parse their forms with
`StrictMultiPartParser` first (FastAPI then reuses the parsed form), which refuses such a field
with a 400 that names it.
"""
from __future__ import annotations

from fastapi import Request, params
from fastapi.routing import APIRoute
from starlette.formparsers import MultiPartException, MultiPartParser

from service.errors import ApiError

FORM_CONTENT_TYPE = "multipart/form-data"


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


class StrictFormRoute(APIRoute):
    """An APIRoute whose multipart text fields are checked against their charset before validation."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if not (self.body_field and isinstance(self.body_field.field_info, params.Form)):
            return handler

        async def strict_handler(request: Request):
            await parse_strict_form(request)
            return await handler(request)

        return strict_handler
