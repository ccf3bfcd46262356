"""Who is using the review app, and whether a form really comes from it.

The API key travels in an HttpOnly, SameSite=Strict cookie (`SESSION_COOKIE`), checked against the
store on every request exactly as the API checks its `Authorization` header. Every POST must come
from a page of this server: its Origin (or Referer) must be this server, and it must carry the CSRF
token of the session, an HMAC of the session's key under a random seed kept in a second cookie
(`SEED_COOKIE`): a page of another site can neither read the cookies nor compute the token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.deps import ServiceDep
from service.errors import ApiError, Unauthorized

SESSION_COOKIE = "wildreid_session"
SEED_COOKIE = "wildreid_csrf"
FLASH_COOKIE = "wildreid_flash"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_DAYS = 30


class CrossSite(ApiError):
    status, code = 403, "cross_site_request"


@dataclass
class Visitor:
    key_name: str | None  # None: not signed in
    seed: str  # the CSRF seed of this browser
    new_seed: bool  # the seed was made for this request: the answer sets its cookie
    problem: str | None = None  # why the session cookie was not accepted (the answer clears it)
    session: str = ""  # what the CSRF token is bound to: the SHA-256 of the session's key ("" when signed out)

    @property
    def signed_in(self) -> bool:
        return self.key_name is not None

    @property
    def csrf(self) -> str:
        return csrf_token(self.seed, self.session)


def csrf_token(seed: str, session: str) -> str:
    return hmac.new(seed.encode(), f"wildreid-csrf:{session}".encode(), hashlib.sha256).hexdigest()


async def visitor(request: Request, service: ServiceDep) -> Visitor:
    """The visitor of a page: signed in when its session cookie holds a valid, unrevoked key."""
    seed = request.cookies.get(SEED_COOKIE)
    new_seed = not seed
    seed = seed or secrets.token_urlsafe(32)
    key = request.cookies.get(SESSION_COOKIE)
    if not key:
        return Visitor(None, seed, new_seed)
    row = await run_in_threadpool(service.store.authenticate, key)
    if row is None:
        return Visitor(None, seed, new_seed, "the key of your session is no longer known to this server: sign in again")
    if row["revoked_at"] is not None:
        return Visitor(None, seed, new_seed, f"the key '{row['name']}' was revoked at {row['revoked_at']}: sign in "
                                             "with another key")
    return Visitor(row["name"], seed, new_seed, session=hashlib.sha256(key.encode()).hexdigest())


VisitorDep = Annotated[Visitor, Depends(visitor)]


async def reader(service: ServiceDep, who: VisitorDep) -> Visitor:
    """A visitor allowed to read: anyone, unless the server requires keys for reads."""
    if service.settings.require_key_for_reads and not who.signed_in:
        raise Unauthorized(who.problem or "this server needs a key to show its pages: sign in with your API key",
                           code="sign_in_to_read")
    return who


ReaderDep = Annotated[Visitor, Depends(reader)]


def same_origin(request: Request) -> bool:
    """Whether a request says it comes from a page of this server (Origin, else Referer)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return (parts.scheme, parts.netloc) == (request.url.scheme, request.headers.get("host", ""))


async def checked(request: Request, who: VisitorDep) -> Visitor:
    """A POST from a page of this server carrying the session's CSRF token (else 403)."""
    if not same_origin(request):
        raise CrossSite("this form was not sent from a page of this server (its Origin header says otherwise): "
                        "open the page again and send it from there")
    form = await request.form()  # parsed already for the route's own fields: this reads the cache
    token = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if who.new_seed or not isinstance(token, str) or not hmac.compare_digest(token, who.csrf):
        raise CrossSite("this form's security token is missing or out of date (the session changed since the page "
                        "was opened): reload the page and send it again")
    return who


CheckedDep = Annotated[Visitor, Depends(checked)]


async def posted(service: ServiceDep, who: CheckedDep) -> Visitor:
    """A checked POST that only reads the store (identify): allowed as reads are."""
    return await reader(service, who)


async def writer(who: CheckedDep) -> Visitor:
    """A checked POST that changes the store: it needs a signed-in visitor."""
    if not who.signed_in:
        raise Unauthorized(who.problem or "sign in with your API key to make changes", code="sign_in_to_write")
    return who


PostedDep = Annotated[Visitor, Depends(posted)]
WriterDep = Annotated[Visitor, Depends(writer)]


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def sign_in(request: Request, response: Response, key: str) -> None:
    """The session of `key`, with a fresh CSRF seed (the tokens of earlier pages stop working)."""
    age = SESSION_DAYS * 86400
    set_cookie(request, response, SESSION_COOKIE, key, age)
    set_cookie(request, response, SEED_COOKIE, secrets.token_urlsafe(32), age)


def sign_out(request: Request, response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")
    set_cookie(request, response, SEED_COOKIE, secrets.token_urlsafe(32), SESSION_DAYS * 86400)


def keep_session(request: Request, response: Response, who: Visitor | None) -> None:
    """What every page's answer sets: the visitor's new CSRF seed; no session cookie that was refused, and no
    message that was shown."""
    if request.cookies.get(FLASH_COOKIE):
        response.delete_cookie(FLASH_COOKIE, path="/")
    if who is None:
        return
    if who.new_seed:
        set_cookie(request, response, SEED_COOKIE, who.seed, SESSION_DAYS * 86400)
    if who.problem:
        response.delete_cookie(SESSION_COOKIE, path="/")


def flash(request: Request, response: Response, message: str, kind: str = "ok") -> None:
    """A message for the next page (after a redirect), in a cookie only this server reads."""
    value = base64.urlsafe_b64encode(json.dumps({"message": message, "kind": kind}).encode()).decode()
    set_cookie(request, response, FLASH_COOKIE, value, 300)


def read_flash(request: Request) -> dict | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        message = json.loads(base64.urlsafe_b64decode(raw.encode()))
        return {"message": str(message["message"]), "kind": "error" if message.get("kind") == "error" else "ok"}
    except (ValueError, KeyError, TypeError):
        return None  # a cookie this server did not write
