"""FastAPI dependencies: the running service, and API-key authentication."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, AsyncIterator

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.budget import Lease
from service.core import Service
from service.errors import Forbidden, NotReady, Unauthorized

# only for the OpenAPI schema ("Authorize" in /docs): the header is checked below, with clearer errors.
# Reads name their own scheme, and /ready another, so that the app can state them optional in the
# schema where they are (service/app.py, optional_keys_in_schema)
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="an API key from `reid keys create`")
read_scheme = HTTPBearer(auto_error=False, scheme_name="ReadKey",
                         description="an API key, needed for reads when the server requires keys for reads")
optional_scheme = HTTPBearer(auto_error=False, scheme_name="OptionalKey",
                             description="an API key, optional: with one, more details are answered")


@dataclass
class Caller:
    key_id: int | None
    key_name: str | None


async def get_service(request: Request) -> Service:  # async: a plain def would cost a threadpool hop per request
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the service is starting or stopping")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def authenticate(request: Request, service: Service, required: bool) -> Caller:
    """The caller of a request by its API key (401 when `required` and none is sent; a key sent anyway
    must be valid)."""
    header = request.headers.get("authorization")
    if header is None:
        if required:
            raise Unauthorized("this request needs an API key: send 'Authorization: Bearer KEY' "
                               "(create one with `reid keys create --store DIR --name NAME`)", code="missing_key")
        return Caller(None, None)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer KEY'", code="malformed_authorization")
    row = await run_in_threadpool(service.store.authenticate, token)
    if row is None:
        raise Unauthorized("unknown API key", code="invalid_key")
    if row["revoked_at"] is not None:
        raise Forbidden(f"API key '{row['name']}' was revoked at {row['revoked_at']}", code="revoked_key")
    return Caller(row["id"], row["name"])


async def reader(request: Request, service: ServiceDep, _doc=Depends(read_scheme)) -> Caller:
    """A key is needed for reads only with require_key_for_reads; a key sent anyway must be valid."""
    return await authenticate(request, service, service.settings.require_key_for_reads)


async def writer(request: Request, service: ServiceDep, _doc=Depends(bearer_scheme)) -> Caller:
    return await authenticate(request, service, True)


ReaderDep = Annotated[Caller, Depends(reader)]
WriterDep = Annotated[Caller, Depends(writer)]


async def decode_lease(service: ServiceDep) -> AsyncIterator[Lease]:
    """The request's share of the decoding memory budget, handed back when the request ends."""
    lease = service.decode_budget.lease()
    try:
        yield lease
    finally:
        lease.close()


LeaseDep = Annotated[Lease, Depends(decode_lease)]
