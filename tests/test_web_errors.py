"""Every error a browser meets in the review app is a page with the message in words, never the API's JSON:
an address no route has, a method a page does not take, and an upload past max_request_bytes (refused by
the body-limit middleware before it is read, where a browser without JavaScript did not check its size).
API clients, and every API path whoever asks, keep the JSON errors."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.web import wants_page

PAGE = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # what a browser sends
LIMIT = 2**20  # max_request_bytes: 1 MB


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_checkpoint):
    settings = Settings(store_dir=tmp_path_factory.mktemp("web-errors-store"), checkpoint=tiny_checkpoint,
                        max_request_bytes=LIMIT)
    with TestClient(create_app(settings), follow_redirects=False) as running:
        yield running


def is_page(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html"), response.headers
    assert "<!doctype html>" in response.text.lower() and '"error"' not in response.text
    return response.text


@pytest.mark.parametrize("path,accept,expected", [
    ("/no-such-page", "text/html", True),
    ("/individuals/abc", "text/html,*/*;q=0.8", True),
    ("/no-such-page", "application/json", False),
    ("/no-such-page", "*/*", False),
    ("/no-such-page", None, False),
    ("/v1/individuals", "text/html", False),
    ("/v1", "text/html", False),
    ("/docs", "text/html", False),
    ("/docs-assets/swagger-ui.css", "text/html", False),
    ("/openapi.json", "text/html", False),
    ("/health", "text/html", False),
    ("/ready", "text/html", False),
    ("/metrics", "text/html", False),
    ("/v1x", "text/html", True),  # a segment of its own, not a prefix
])
def test_a_page_is_wanted_by_a_browser_outside_the_api_paths(path, accept, expected):
    headers = [(b"accept", accept.encode())] if accept is not None else []
    assert wants_page({"type": "http", "path": path, "headers": [(b"host", b"testserver"), *headers]}) is expected


def test_an_unknown_address_is_a_page_for_a_browser_and_json_for_an_api_client(client):
    text = is_page(client.get("/no-such-page", headers=PAGE), 404)
    assert "That did not work" in text and "there is no page at this address" in text
    assert 'href="/individuals"' in text  # somewhere to go on from
    for accept in ("application/json", "*/*"):
        r = client.get("/no-such-page", headers={"accept": accept})
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": {"code": "not_found", "message": "Not Found"}}  # as before


def test_an_invalid_address_of_a_page_is_told_in_words(client):
    text = is_page(client.get("/individuals/abc", headers=PAGE), 422)
    assert "individual_id" in text and "valid integer" in text


def test_a_method_a_page_does_not_take_is_a_page_naming_the_allowed_ones(client):
    r = client.put("/jobs", headers=PAGE)
    assert "method not allowed" in is_page(r, 405)
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert client.put("/jobs").json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path,status,code", [
    ("/v1/no-such-thing", 404, "not_found"),
    ("/v1/individuals/abc", 422, "validation_error"),
    ("/v1/images/0", 422, "validation_error"),
    ("/docs/no-such-page", 404, "not_found"),
])
def test_api_paths_answer_json_even_to_a_browser(client, path, status, code):
    r = client.get(path, headers=PAGE)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == code


def test_an_upload_past_the_limit_is_a_page_for_a_browser_form_and_json_for_the_api(client):
    photo = ("images", ("big.jpg", b"\xff\xd8" + b"0" * (LIMIT + LIMIT // 2), "image/jpeg"))
    r = client.post("/identify", data={"species": "zebra"}, files=[photo],
                    headers={**PAGE, "referer": "http://testserver/jobs?x=1"})
    text = is_page(r, 413)
    assert "this server takes at most 1 MB in one upload" in text and "the upload is 1.5 MB" in text
    assert 'href="/jobs?x=1">Go back' in text  # back to the form it came from
    assert r.headers["connection"] == "close"
    r = client.post("/identify", data={"species": "zebra"}, files=[photo], headers=PAGE)
    assert 'href="/">Go back' in is_page(r, 413)  # no Referer: the home page
    r = client.post("/identify", data={"species": "zebra"}, files=[photo],
                    headers={**PAGE, "referer": "https://elsewhere.example//evil"})
    assert 'href="/">Go back' in is_page(r, 413)  # never a link off this server
    # the same upload from an API client, and to the API from a browser: JSON, as before
    for path, headers in (("/identify", {}), ("/v1/identify", PAGE)):
        r = client.post(path, data={"species": "zebra"}, files=[photo], headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert r.json()["error"]["message"].endswith(f"the limit is {LIMIT} bytes")


def test_a_chunked_upload_past_the_limit_is_a_page_for_a_browser_too(client):
    def body():  # no Content-Length: refused once the bytes read pass the limit
        yield b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(3):
            yield b"0" * (LIMIT // 2)

    r = client.post("/identify", content=body(),
                    headers={**PAGE, "content-type": "multipart/form-data; boundary=b"})
    assert "the upload is larger than the limit of 1 MB in one upload" in is_page(r, 413)
