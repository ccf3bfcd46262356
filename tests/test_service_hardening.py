"""The service under hostile and clumsy input (issue 12): every request gets a clear 4xx, never a 500,
and the connection stays usable after an error.

One app (a random-init tiny model, SQLite store) serves the module through FastAPI's TestClient;
the keep-alive test runs the same kind of app in a real uvicorn server.
"""
from __future__ import annotations

import errno
import io
import select
import socket
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.protocol import HeaderTimeoutProtocol
from service.testing import ThreadedServer, assert_error, encode, noise_image

MB = 1024 * 1024
PHOTO = encode(noise_image(0))


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_checkpoint):
    store = tmp_path_factory.mktemp("hardening-store")
    with TestClient(create_app(Settings(store_dir=store, checkpoint=tiny_checkpoint))) as client:
        yield client


@pytest.fixture(scope="module")
def auth(client) -> dict:
    return {"Authorization": f"Bearer {client.app.state.service.store.create_key('hardening')[1]}"}


@pytest.fixture(scope="module")
def victim(client, auth) -> dict:
    return enroll(client, auth, "Victim", "zebra", PHOTO)


def enroll(client, auth, name, species, photo, expect=201, **data):
    r = client.post("/v1/individuals", data={"name": name, "species": species, **data},
                    files=[("images", ("p.jpg", photo, "image/jpeg"))], headers=auth)
    assert r.status_code == expect, r.text
    return r.json()


def counts(client) -> tuple:
    service = client.app.state.service
    return service.store.change_seq(), service.store.counts()


# ---------------------------------------------------------------------- finding 1: detections JSON
HOSTILE_DETECTIONS = {
    "deeply nested": "[" * 5000 + "]" * 5000,
    "huge integer": "[" + "1" * 5000 + "]",
    "huge integer conf": '[{"category": "1", "conf": ' + "9" * 5000 + ', "bbox": [0, 0, 1, 1]}]',
    "infinite conf": '[{"category": "1", "conf": 1e999, "bbox": [0, 0, 1, 1]}]',
    "NaN bbox": '[{"category": "1", "conf": 0.9, "bbox": [NaN, 0, 1, 1]}]',
    "nested in an object": '[{"category": "1", "conf": 0.9, "bbox": ' + "[" * 3000 + "]" * 3000 + "}]",
}


@pytest.mark.parametrize("case", list(HOSTILE_DETECTIONS))
def test_hostile_detections_json_is_a_422_on_every_form(client, auth, victim, case):
    text = HOSTILE_DETECTIONS[case]
    image = [("images", ("p.jpg", PHOTO, "image/jpeg"))]
    before = counts(client)
    assert_error(client.post("/v1/identify", data={"species": "zebra", "detections": text}, files=image), 422,
                 "invalid_detections")
    assert_error(client.post("/v1/individuals", data={"name": "X", "species": "zebra", "detections": text},
                             files=image, headers=auth), 422, "invalid_detections")
    assert_error(client.post(f"/v1/individuals/{victim['id']}/images", data={"detections": text}, files=image,
                             headers=auth), 422, "invalid_detections")
    assert counts(client) == before


# ---------------------------------------------------------------------- findings 2 and 3: bounded integers
@pytest.mark.parametrize("source_id", [10**30, 2**63, 2**31, -(2**63) - 1, 0, True, False, 1.0, "1", None])
def test_merge_source_id_must_be_a_32_bit_positive_integer(client, auth, victim, source_id):
    other = enroll(client, auth, "Other", "zebra", encode(noise_image(1)))
    before = counts(client)
    assert_error(client.post(f"/v1/individuals/{other['id']}/merge", json={"source_id": source_id}, headers=auth),
                 422, "validation_error")
    assert counts(client) == before
    assert client.get(f"/v1/individuals/{victim['id']}").json()["merged_into"] is None


def test_merge_body_of_huge_or_deep_json_is_a_4xx(client, auth, victim):
    for body in ['{"source_id": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000]:
        r = client.post(f"/v1/individuals/{victim['id']}/merge", content=body,
                        headers={**auth, "content-type": "application/json"})
        error = assert_error(r, r.status_code)
        assert r.status_code in (400, 422) and "multipart" not in error["message"], error


@pytest.mark.parametrize("params", [{"offset": 2**63}, {"offset": 2**31}, {"offset": -1}, {"offset": "9" * 5000},
                                    {"limit": 2**63}, {"limit": True}])
def test_audit_offset_and_limit_are_bounded(client, auth, params):
    assert_error(client.get("/v1/audit", params=params, headers=auth), 422, "validation_error")


@pytest.mark.parametrize("path", ["/v1/individuals/9223372036854775808", "/v1/images/9223372036854775808",
                                  "/v1/images/9223372036854775808/file", "/v1/individuals/true",
                                  "/v1/individuals/0", "/v1/individuals/-1"])
def test_ids_in_paths_are_bounded(client, path):
    assert_error(client.get(path), 422, "validation_error")


@pytest.mark.parametrize("params", [{"page": 2**63}, {"per_page": 2**63}, {"page": "1" * 5000}])
def test_list_pages_are_bounded(client, params):
    assert_error(client.get("/v1/individuals", params=params), 422)


def test_top_k_of_a_huge_number_is_a_422(client, victim):
    for top_k in ["9" * 5000, str(2**63), "true"]:
        r = client.post("/v1/identify", data={"species": "zebra", "top_k": top_k},
                        files=[("images", ("p.jpg", PHOTO, "image/jpeg"))])
        assert r.status_code == 422, r.text


# ---------------------------------------------------------------------- finding 10: text fields, messages, schema
def multipart(fields: dict[str, bytes], photo: bytes = PHOTO) -> tuple[bytes, str]:
    """A multipart body built by hand, so that field values can hold any bytes."""
    boundary = "wildreidboundary"
    parts = [b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="' + name.encode()
             + b'"\r\n\r\n' + value + b"\r\n" for name, value in fields.items()]
    parts.append(b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="images"; '
                 b'filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + photo + b"\r\n")
    return b"".join(parts) + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def test_invalid_utf8_in_a_form_field_is_refused_not_stored_as_mojibake(client, auth):
    before = counts(client)
    body, content_type = multipart({"name": b"Zebr\xe9 \xff", "species": b"zebra"})
    error = assert_error(client.post("/v1/individuals", content=body, headers={**auth, "content-type": content_type}),
                         400, "invalid_form")
    assert "UTF-8" in error["message"] and "name" in error["message"]
    assert counts(client) == before
    # valid UTF-8 of the same letters is taken as written
    body, content_type = multipart({"name": "Zebré".encode(), "species": b"zebra"})
    r = client.post("/v1/individuals", content=body, headers={**auth, "content-type": content_type})
    assert r.status_code == 201 and r.json()["name"] == "Zebré", r.text


@pytest.mark.parametrize("field", ["name", "notes", "location", "observed_at"])
def test_nul_and_control_characters_are_refused_in_text_fields(client, auth, victim, field):
    before = counts(client)
    data = {"name": "Nul", "species": "zebra", field: "bad\x00value"}
    assert_error(client.post("/v1/individuals", data=data, files=[("images", ("p.jpg", PHOTO, "image/jpeg"))],
                             headers=auth), 422, "validation_error")
    if field in ("name", "notes"):
        assert_error(client.patch(f"/v1/individuals/{victim['id']}", json={field: "a\x00b"}, headers=auth), 422,
                     "validation_error")
    assert counts(client) == before
    # notes may hold line breaks and tabs
    r = client.patch(f"/v1/individuals/{victim['id']}", json={"notes": "line one\n\tline two"}, headers=auth)
    assert r.status_code == 200, r.text


def test_unparseable_json_on_patch_says_json_not_multipart(client, auth, victim):
    for body in [b"{not json", b"\xff\xfe", b"[" * 100_000]:
        r = client.patch(f"/v1/individuals/{victim['id']}", content=body,
                         headers={**auth, "content-type": "application/json"})
        error = assert_error(r, r.status_code)
        assert r.status_code in (400, 422) and "multipart" not in error["message"] and "JSON" in error["message"], \
            error


def test_patch_null_fields_are_refused_as_the_schema_says(client, auth, victim):
    assert_error(client.patch(f"/v1/individuals/{victim['id']}", json={"name": None}, headers=auth), 422)
    assert_error(client.patch(f"/v1/individuals/{victim['id']}", json={}, headers=auth), 422)


def test_openapi_schema_states_what_the_server_enforces(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def form(path: str) -> dict:
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        return components[ref.rsplit("/", 1)[1]]

    enroll_form = form("/v1/individuals")
    assert enroll_form["properties"]["species"]["pattern"]
    assert enroll_form["properties"]["images"]["minItems"] == 1
    assert enroll_form["properties"]["name"]["pattern"]
    assert form("/v1/identify")["properties"]["images"]["minItems"] == 1
    assert form("/v1/individuals/{individual_id}/images")["properties"]["images"]["minItems"] == 1
    patch = components["IndividualPatch"]
    assert patch["minProperties"] == 1
    assert patch["properties"]["name"]["type"] == "string"  # not nullable: null is refused
    merge = components["MergeRequest"]["properties"]["source_id"]
    assert merge["minimum"] == 1 and merge["maximum"] == 2**31 - 1
    audit = {p["name"]: p["schema"] for p in schema["paths"]["/v1/audit"]["get"]["parameters"]}
    assert audit["offset"]["maximum"] == 2**31 - 1


@pytest.mark.parametrize("path, allowed", [("/v1/individuals/1", {"GET", "PATCH", "DELETE"}),
                                           ("/v1/individuals", {"GET", "POST"}),
                                           ("/v1/identify", {"POST"})])
def test_options_and_wrong_methods_get_the_full_allow_header(client, path, allowed):
    for method in ("OPTIONS", "PUT"):
        r = client.request(method, path)
        assert_error(r, 405, "method_not_allowed")
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed


# ---------------------------------------------------------------------- keep-alive after errors
def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_errors_keep_the_connection_alive_and_a_500_says_it_closes(tmp_path, tiny_checkpoint, monkeypatch):
    app = create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))
    with ThreadedServer(app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        deep = ("[" * 5000 + "]" * 5000).encode()
        body, content_type = multipart({"species": b"zebra", "detections": deep})
        request = (f"POST /v1/identify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        status, headers, _ = _exchange(sock, request)
        assert status in (404, 409, 422) and headers.get("connection") != "close"
        status, _, _ = _exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200  # the same connection still serves
        # an unexpected failure (none is known) is a 500 that says the connection closes
        monkeypatch.setattr(type(app.state.service.store), "audit_entries",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
        key = app.state.service.store.create_key("k")[1]
        status, headers, body = _exchange(sock, f"GET /v1/audit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
                                                f"\r\n\r\n".encode())
        assert status == 500 and headers.get("connection") == "close" and b"internal_error" in body


# ---------------------------------------------------------------------- finding 4: a full disk
def files_on_disk(client) -> list[str]:
    """Every file under the image store, temporary ones included."""
    images = client.app.state.service.settings.images_dir
    return sorted(str(p.relative_to(images)) for p in images.rglob("*") if p.is_file())


def test_a_full_disk_under_the_image_files_is_a_507_and_leaves_nothing_half_written(client, auth, victim,
                                                                                    monkeypatch):
    images = client.app.state.service.settings.images_dir
    write_bytes = Path.write_bytes

    def disk_full_halfway(path: Path, data: bytes) -> int:
        if images not in path.parents:
            return write_bytes(path, data)
        write_bytes(path, data[: len(data) // 2])  # what fitted before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", disk_full_halfway)
    before, on_disk = counts(client), files_on_disk(client)
    photo = encode(noise_image(40))
    error = assert_error(client.post("/v1/individuals", data={"name": "Full", "species": "zebra"},
                                     files=[("images", ("p.jpg", photo, "image/jpeg"))], headers=auth), 507,
                         "disk_full")
    assert "disk" in error["message"] and "full" in error["message"]
    assert_error(client.post(f"/v1/individuals/{victim['id']}/images",
                             files=[("images", ("p.jpg", photo, "image/jpeg"))], headers=auth), 507, "disk_full")
    assert counts(client) == before and files_on_disk(client) == on_disk  # no row, no file, no temporary file
    monkeypatch.setattr(Path, "write_bytes", write_bytes)  # space freed: the same request now succeeds
    enroll(client, auth, "Full", "zebra", photo)


def test_a_full_disk_under_the_database_is_a_507_not_busy(tmp_path, tiny_checkpoint):
    from sqlalchemy import event

    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))) as client:
        store = client.app.state.service.store
        headers = {"Authorization": f"Bearer {store.create_key('k')[1]}"}
        enroll(client, headers, "First", "zebra", PHOTO)

        def no_more_pages(dbapi_conn, _record):  # SQLite answers SQLITE_FULL as on a full disk
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

        store.engine.dispose()
        event.listen(store.engine, "connect", no_more_pages)
        before = counts(client)
        notes = "n" * 9000  # more than the free space left in the database's pages
        error = assert_error(client.post("/v1/individuals", data={"name": "Second", "species": "zebra",
                                                                   "notes": notes},
                                         files=[("images", ("p.jpg", encode(noise_image(41)), "image/jpeg"))],
                                         headers=headers), 507, "disk_full")
        assert "database" in error["message"] and "full" in error["message"]
        assert counts(client) == before
        event.remove(store.engine, "connect", no_more_pages)
        store.engine.dispose()
        enroll(client, headers, "Second", "zebra", encode(noise_image(41)))


# ---------------------------------------------------------------------- finding 6: corrupt stored files
def stored_path(client, image_id: int) -> Path:
    service = client.app.state.service
    return service.settings.store_dir / service.store.get_image(image_id)["path"]


def metric(client, name: str) -> float:
    line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_a_corrupt_stored_file_is_not_served_is_reported_and_is_replaced_by_the_same_photo(tmp_path,
                                                                                           tiny_checkpoint):
    photo = encode(noise_image(50))
    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))) as client:
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
        image = enroll(client, headers, "Stored", "zebra", photo)["images"][0]
        path = stored_path(client, image["id"])
        path.write_bytes(bytes(len(photo)))  # overwritten in place, same size
        error = assert_error(client.get(image["file_url"]), 404, "image_file_corrupt")
        assert "SHA-256" in error["message"] and "upload the photo again" in error["message"]
        ready = client.get("/ready").json()
        assert ready["corrupt_files"] == 1 and any("corrupt" in w for w in ready["warnings"])
        assert metric(client, "wildreid_corrupt_image_files") == 1
        # the same photo uploaded again (another sighting) replaces the file
        r = client.post(f"/v1/individuals/{image_id_owner(client, image['id'])}/images", headers=headers,
                        files=[("images", ("again.jpg", photo, "image/jpeg"))])
        assert r.status_code == 201, r.text
        assert path.read_bytes() == photo
        served = client.get(image["file_url"])
        assert served.status_code == 200 and served.content == photo
        assert served.headers["etag"] == f'"{image["sha256"]}"'
        assert client.get("/ready").json()["corrupt_files"] == 0
        assert metric(client, "wildreid_corrupt_image_files") == 0
        path.unlink()  # gone altogether: 404 that says missing
        assert_error(client.get(image["file_url"]), 404, "image_file_missing")


def image_id_owner(client, image_id: int) -> int:
    return client.app.state.service.store.get_image(image_id)["individual_id"]


def test_reembedding_skips_a_corrupt_file_with_a_warning_and_starts(tmp_path, tiny_checkpoint, caplog):
    from tests.conftest import write_checkpoint

    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))) as client:
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
        kept = enroll(client, headers, "Kept", "zebra", encode(noise_image(60)))
        broken = enroll(client, headers, "Broken", "zebra", encode(noise_image(61)))
        path = stored_path(client, broken["images"][0]["id"])
    path.write_bytes(path.read_bytes()[:100])  # truncated on disk
    other = write_checkpoint(tmp_path / "other.pt", seed=7)
    with caplog.at_level("WARNING", logger="wildreid.service"), \
            TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=other))) as client:
        ready = client.get("/ready").json()
        assert ready["status"] == "ready" and ready["galleries"] == {"zebra": 1}
        assert ready["corrupt_files"] == 1 and ready["foreign_images"] == 1
        result = client.post("/v1/identify", data={"species": "zebra"},
                             files=[("images", ("q.jpg", encode(noise_image(60)), "image/jpeg"))]).json()
        assert result["animals"][0]["candidates"][0]["individual_id"] == kept["id"]
    assert "could not be embedded again" in caplog.text and "is corrupt" in caplog.text


# ---------------------------------------------------------------------- finding 7: orphan files
def orphan(images: Path, seed: int, age_s: float, name: str | None = None) -> Path:
    """A file under the image store that no row names, `age_s` seconds old."""
    import hashlib
    import os
    import time

    data = encode(noise_image(seed))
    digest = hashlib.sha256(data).hexdigest()
    path = images / digest[:2] / (name or f"{digest}.jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_orphan_files_are_swept_at_start_and_periodically_after_a_grace_period(tmp_path, tiny_checkpoint):
    import os
    import time

    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, orphan_grace_s=600,
                        orphan_sweep_interval_s=0.2)
    images = settings.images_dir
    at_start = orphan(images, 70, age_s=3600)
    with TestClient(create_app(settings)) as client:
        assert not at_start.exists()  # swept at start
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
        image = enroll(client, headers, "Named", "zebra", encode(noise_image(71)))["images"][0]
        named = stored_path(client, image["id"])
        os.utime(named, (time.time() - 3600,) * 2)
        old, recent = orphan(images, 72, age_s=3600), orphan(images, 73, age_s=10)
        temporary = orphan(images, 74, age_s=3600, name=".x.jpg.abc.tmp")
        # an old orphan whose photo is uploaded again gets a fresh time, so it is not swept under its new row
        again = orphan(images, 75, age_s=3600)
        enroll(client, headers, "Again", "zebra", encode(noise_image(75)))
        deadline = time.monotonic() + 20
        while (old.exists() or temporary.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not old.exists() and not temporary.exists()
        assert named.exists() and recent.exists() and again.exists()
        assert metric(client, "wildreid_orphan_files_removed_total") == 2  # at start, then periodically
        assert client.get(image["file_url"]).status_code == 200


# ---------------------------------------------------------------------- finding 8: keyless reads
def test_require_key_for_reads_covers_ready_details_and_metrics(tmp_path, tiny_checkpoint):
    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, require_key_for_reads=True)
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('reader')[1]}"}
        enroll(client, headers, "Secret", "okapi", PHOTO)
        r = client.get("/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready"}  # enough for a load balancer
        assert "okapi" not in r.text and str(tmp_path) not in r.text
        full = client.get("/ready", headers=headers).json()
        assert full["galleries"] == {"okapi": 1} and full["models"]
        assert_error(client.get("/ready", headers={"Authorization": "Bearer wr_wrong"}), 401, "invalid_key")
        assert_error(client.get("/metrics"), 401, "missing_key")
        metrics = client.get("/metrics", headers=headers)
        assert metrics.status_code == 200 and 'wildreid_gallery_images{species="okapi"} 1.0' in metrics.text


# ---------------------------------------------------------------------- finding 9: slow clients
class QuickHeaderTimeout(HeaderTimeoutProtocol):
    header_timeout_s = 0.5


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_bodies_and_slow_headers_are_cut_off_with_408(tmp_path, tiny_checkpoint):
    import time

    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, body_idle_timeout_s=0.5, body_deadline_s=2)
    with ThreadedServer(create_app(settings), http=QuickHeaderTimeout) as server:
        address = ("127.0.0.1", server.port)
        with socket.create_connection(address, timeout=20) as sock:  # declares 1,000 bytes, sends 9
            started = time.monotonic()
            sock.sendall(b"POST /v1/identify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 1000\r\n\r\n--b\r\nabcd")
            answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer
            assert b"connection: close" in answer.lower() and time.monotonic() - started < 10
        with socket.create_connection(address, timeout=20) as sock:  # a trickle: under the idle timeout, past the deadline
            started = time.monotonic()
            sock.sendall(b"POST /v1/identify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b'Content-Length: 10000\r\n\r\n--b\r\nContent-Disposition: form-data; name="images"; '
                         b'filename="a.jpg"\r\n\r\n')
            while not select.select([sock], [], [], 0.2)[0] and time.monotonic() - started < 8:
                sock.sendall(b"x")  # a byte every 0.2 s until the server answers
            assert b"408" in _answer(sock) and time.monotonic() - started < 8
        for partial in (b"GET /health HTTP/1.1\r\nHost: x\r\n", b""):  # headers never complete; nothing at all
            with socket.create_connection(address, timeout=20) as sock:
                started = time.monotonic()
                sock.sendall(partial)
                answer = _answer(sock)
                assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5, answer
        with socket.create_connection(address, timeout=20) as sock:  # a prompt client is served as before
            status, _, _ = _exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200


# ---------------------------------------------------------------------- finding 5: decoding memory
def single_colour(size: int, fmt: str) -> bytes:
    """A photo-sized image of one colour: a few KB as PNG, size x size x 4 bytes decoded by Pillow."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return single_colour(4000, "PNG")


def test_a_whole_photo_is_kept_small_and_its_decode_reserved_then_handed_back(bomb_png):
    from service.budget import MemoryBudget
    from reid.identify.photos import decode_upload

    budget = MemoryBudget(200 * MB, 100 * MB, wait_s=5)
    lease = budget.lease()
    upload = decode_upload(bomb_png, 0, "bomb.png", 50_000_000, ("PNG",), draft_size=128, kept_pixels=12_000_000,
                           lease=lease)
    assert (upload.width, upload.height) == (4000, 4000)  # the file's own size is recorded
    assert 128 <= min(upload.array.shape[:2]) < 256 and upload.array.dtype == np.uint8
    assert upload.array[0, 0].tolist() == [120, 80, 40]
    assert budget.used == lease.held == upload.array.nbytes  # only what is kept stays reserved
    lease.close()
    assert budget.used == 0
    cropped = decode_upload(bomb_png, 0, "bomb.png", 50_000_000, ("PNG",), kept_pixels=1_000_000)
    assert cropped.array.shape[0] * cropped.array.shape[1] <= 1_000_000 and cropped.array.shape[0] >= 990


def test_the_decoding_budget_bounds_concurrent_decodes_and_refuses_what_never_fits():
    import threading
    import time

    from service.budget import DecodingBusy, MemoryBudget
    from reid.errors import TooLarge

    budget = MemoryBudget(100, 60, wait_s=10)
    peak, lock = [0], threading.Lock()

    def decode(keep_bytes: int) -> None:
        lease = budget.lease()
        with lease.decoding(40, "photo") as keep:
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.05)
            keep(keep_bytes)
        lease.close()

    threads = [threading.Thread(target=decode, args=(k % 3,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.used == 0  # two decodes at a time at most: 3 x 40 > 100
    lease = budget.lease()
    with pytest.raises(TooLarge, match="request_decode_budget_bytes"):
        with lease.decoding(61, "images[0]"):
            pass
    budget.wait_s = 0.2
    with budget.lease().decoding(60, "a") as keep:
        with pytest.raises(DecodingBusy, match="decode_budget_bytes"):
            with budget.lease().decoding(50, "b"):
                pass
        keep(0)
    assert budget.used == 0


def test_a_photo_past_the_request_decoding_budget_is_a_413_naming_it_and_jpeg_is_decoded_smaller(
        tmp_path, tiny_checkpoint, bomb_png):
    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, decode_budget_bytes=48 * MB,
                        request_decode_budget_bytes=32 * MB)
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
        enroll(client, headers, "Small", "zebra", PHOTO)
        error = assert_error(client.post("/v1/identify", data={"species": "zebra"},
                                         files=[("images", ("bomb.png", bomb_png, "image/png"))]), 413,
                             "decode_budget")
        assert "request_decode_budget_bytes" in error["message"] and "bomb.png" in error["message"]
        jpeg = single_colour(4000, "JPEG")  # decoded at 1/8 scale: well within the budget
        r = client.post("/v1/identify", data={"species": "zebra"}, files=[("images", ("big.jpg", jpeg, "image/jpeg"))])
        assert r.status_code == 200, r.text
        r = client.post("/v1/identify", data={"species": "zebra", "bbox": "0.25,0.25,0.5,0.5"},
                        files=[("images", ("big.jpg", jpeg, "image/jpeg"))])
        assert r.status_code == 200, r.text  # cut from a bounded decode
        assert metric(client, "wildreid_decode_budget_bytes_in_use") == 0  # handed back after each request


def test_query_parameters_an_operation_does_not_take_are_refused(client, auth):
    error = assert_error(client.get("/v1/individuals", params={"per_pge": 2}), 422, "unknown_parameter")
    assert "per_pge" in error["message"] and "per_page" in error["message"]
    assert_error(client.get("/v1/audit", params={"": 0}, headers=auth), 422, "unknown_parameter")
    assert client.get("/v1/individuals", params={"per_page": 2}).status_code == 200
