"""The service as it runs: `python -m service serve` (uvicorn) in a subprocess, killed with SIGKILL
in the middle of a burst of concurrent enrollments, then restarted on the same store; and the
`serve` / `keys` commands."""
from __future__ import annotations

import argparse
import hashlib
import json
import queue
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from service.__main__ import main as service_main
from service.commands import register
from service.testing import ServerProcess

WORKERS = 8
KILL_AFTER = 14  # answered enrollments before the SIGKILL


def create_key(store, name, capsys) -> str:
    capsys.readouterr()
    assert service_main(["keys", "create", "--store", str(store), "--name", name]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def photos(synth_csv) -> list[bytes]:
    table = pd.read_csv(synth_csv)
    return [(synth_csv.parent / p).read_bytes() for p in table["path"]]


def test_sigkill_during_concurrent_enrollments_loses_no_answered_one(tmp_path, tiny_checkpoint, photos, capsys):
    store = tmp_path / "store"
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"max_request_bytes": 4 * 1024 * 1024, "max_upload_bytes": 1024 * 1024}))
    key = create_key(store, "field-team", capsys)
    assert key.startswith("wr_")
    headers = {"Authorization": f"Bearer {key}"}
    server = ServerProcess(store, tiny_checkpoint, "--settings", str(settings_file), log=tmp_path / "server.log")
    server.start()
    jobs: queue.Queue = queue.Queue()
    for n, photo in enumerate(photos):  # 48 distinct photos, one individual each
        jobs.put((f"ind-{n:02d}", photo))
    answered, failed, lock = {}, [], threading.Lock()
    enough = threading.Event()

    def worker():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while True:
                try:
                    name, photo = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    r = client.post("/v1/individuals", data={"name": name, "species": "zebra"}, headers=headers,
                                    files=[("images", (f"{name}.jpg", photo, "image/jpeg"))])
                except httpx.HTTPError:
                    with lock:
                        failed.append(name)  # killed mid-request: no answer, so no promise
                    continue
                assert r.status_code == 201, r.text
                with lock:
                    answered[name] = (r.json()["id"], photo)
                    if len(answered) >= KILL_AFTER:
                        enough.set()

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(120), "the burst did not get going"
        server.kill()  # SIGKILL while the other workers' requests are in flight
        for t in threads:
            t.join(60)
    finally:
        server.kill()
    assert len(answered) >= KILL_AFTER and failed, (len(answered), failed)

    with ServerProcess(store, tiny_checkpoint, "--settings", str(settings_file), log=tmp_path / "server.log") as again:
        client = httpx.Client(base_url=again.url, timeout=30)
        # every enrollment answered 201 is there, whole, and found at rank 1 by its own photo
        for name, (individual_id, photo) in answered.items():
            got = client.get(f"/v1/individuals/{individual_id}").json()
            assert got["name"] == name and got["image_count"] == 1
            assert got["images"][0]["sha256"] == hashlib.sha256(photo).hexdigest()
            r = client.post("/v1/identify", data={"species": "zebra"},
                            files=[("images", ("q.jpg", photo, "image/jpeg"))])
            best = r.json()["animals"][0]["candidates"][0]
            assert best["individual_id"] == individual_id and best["score"] == pytest.approx(1.0, abs=1e-5)
        # nothing half-written: each stored individual (answered or not) has its image, its file and its audit entry
        listed = client.get("/v1/individuals", params={"per_page": 200}).json()
        assert listed["total"] >= len(answered)
        audit = client.get("/v1/audit", params={"limit": 1000}, headers=headers).json()
        created = {e["target_id"] for e in audit if e["action"] == "individual.create"}
        for item in listed["items"]:
            assert item["image_count"] == 1 and item["name"].startswith("ind-") and item["id"] in created
            detail = client.get(f"/v1/individuals/{item['id']}").json()
            file = client.get(detail["images"][0]["file_url"])
            assert file.status_code == 200 and hashlib.sha256(file.content).hexdigest() == detail["images"][0]["sha256"]
        assert client.get("/ready").json()["galleries"] == {"zebra": listed["total"]}

        # a chunked upload (no Content-Length) past the request limit is cut off with 413
        def chunks():
            yield (b'--x\r\nContent-Disposition: form-data; name="images"; filename="big.jpg"\r\n'
                   b"Content-Type: image/jpeg\r\n\r\n")
            for _ in range(8):
                yield b"\0" * (1024 * 1024)

        r = client.post("/v1/identify", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # a revoked key: 403; no key: 401
        capsys.readouterr()
        assert service_main(["keys", "revoke", "--store", str(store), "--name", "field-team"]) == 0
        r = client.post("/v1/individuals", data={"name": "late", "species": "zebra"}, headers=headers,
                        files=[("images", ("x.jpg", photos[0], "image/jpeg"))])
        assert r.status_code == 403 and r.json()["error"]["code"] == "revoked_key"
        r = client.delete(f"/v1/individuals/{listed['items'][0]['id']}")
        assert r.status_code == 401
        assert client.get("/health").json()["status"] == "ok"
        client.close()


def test_keys_commands(tmp_path, capsys):
    store = tmp_path / "store"
    key = create_key(store, "alice", capsys)
    assert service_main(["keys", "create", "--store", str(store), "--name", "alice"]) == 2  # one active per name
    assert "active key named 'alice'" in capsys.readouterr().err
    assert service_main(["keys", "list", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing and key not in listing
    assert service_main(["keys", "revoke", "--store", str(store), "--name", "alice"]) == 0
    assert service_main(["keys", "revoke", "--store", str(store), "--name", "alice"]) == 2
    assert service_main(["keys", "list", "--store", str(store)]) == 0
    assert "revoked" in capsys.readouterr().out


def test_register_adds_serve_and_keys_to_a_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="reid")
    commands = register(parser.add_subparsers(dest="command", required=True))
    assert set(commands) == {"serve", "keys"}
    args = parser.parse_args(["serve", "--store", "s", "--checkpoint", "c.pt", "--port", "9000", "--workers", "2",
                              "--database-url", "postgresql://u@h/db", "--require-key-for-reads"])
    assert (args.port, args.workers, args.host, args.require_key_for_reads) == (9000, 2, "127.0.0.1", True)
    args = parser.parse_args(["keys", "create", "--store", "s", "--name", "n"])
    assert args.keys_command == "create"


def test_serve_refuses_a_bad_checkpoint_with_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert service_main(["serve", "--store", str(tmp_path / "s"), "--checkpoint", str(bad)]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert service_main(["serve", "--store", str(tmp_path / "s"), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_serve_checks_every_model_file_before_starting(tmp_path, tiny_checkpoint, capsys):
    store = str(tmp_path / "s")
    assert service_main(["serve", "--store", store]) == 2
    assert "--checkpoint CKPT (every species), --routes FILE" in capsys.readouterr().err
    routes = tmp_path / "routes.yaml"
    routes.write_text("species:\n  zebra: missing.pt\n")
    assert service_main(["serve", "--store", store, "--routes", str(routes)]) == 2
    err = capsys.readouterr().err
    assert "species.zebra.checkpoint" in err and "not found" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    routes.write_text(f"species:\n  zebra: {tiny_checkpoint}\n  lion: bad.pt\n")
    assert service_main(["serve", "--store", store, "--routes", str(routes)]) == 2
    assert "unreadable" in capsys.readouterr().err
    routes.write_text(f"species:\n  zebra: {tiny_checkpoint}\n")
    assert service_main(["serve", "--store", store, "--routes", str(routes), "--detector",
                         str(tmp_path / "md.pt")]) == 2
    assert "--detector: file" in capsys.readouterr().err


def identify_all(url: str, photos: list[bytes]) -> list:
    with httpx.Client(base_url=url, timeout=30) as client:
        out = []
        for photo in photos:
            r = client.post("/v1/identify", data={"species": "zebra", "top_k": "5"},
                            files=[("images", ("q.jpg", photo, "image/jpeg"))])
            assert r.status_code == 200, r.text
            animal = r.json()["animals"][0]
            out.append((animal["decision"], animal["rerank"]["describe"],
                        [(c["individual_id"], c["score"], c["cosine"]) for c in animal["candidates"]]))
        return out


def wait_for_file(folder: Path, pattern: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(folder.glob(pattern)):
        assert time.monotonic() < deadline, f"no {pattern} in {folder} after {timeout_s} s"
        time.sleep(0.05)


def test_sigkill_during_a_burst_leaves_a_reranking_state_equal_to_one_built_from_the_store(tmp_path, tiny_checkpoint,
                                                                                             photos, capsys):
    """Re-ranking on: enrollments and merges, snapshots every half second, a SIGKILL mid-burst. The restart
    loads the last snapshot and applies what the store holds beyond it; its answers equal those of a start
    that builds the state from the store alone."""
    from reid.rerank import OnlineKReciprocal
    from reid.store import Store

    store = tmp_path / "store"
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"rerank": "settings", "rerank_k1": 4, "rerank_k2": 2,
                                         "rerank_snapshot_interval_s": 0.5}))
    headers = {"Authorization": f"Bearer {create_key(store, 'field-team', capsys)}"}
    server = ServerProcess(store, tiny_checkpoint, "--settings", str(settings_file), log=tmp_path / "server.log")
    server.start()
    answered: list[int] = []
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for n, photo in enumerate(photos[:20]):
                r = client.post("/v1/individuals", data={"name": f"ind-{n:02d}", "species": "zebra"}, headers=headers,
                                files=[("images", (f"{n}.jpg", photo, "image/jpeg"))])
                answered.append(r.json()["id"])
                if n % 7 == 6:  # merges in the burst: images change owner, the state keeps them
                    client.post(f"/v1/individuals/{answered[-1]}/merge", json={"source_id": answered[-2]},
                                headers=headers)
                if n == 8:  # a fast machine can run the whole burst inside one snapshot interval
                    wait_for_file(store / "cache" / "rerank", "rerank-*.npz")
                if n == 15:
                    server.kill()  # SIGKILL: the last snapshot is older than the store
                    break
    except httpx.HTTPError:
        pass
    finally:
        server.kill()
    (snapshot,) = (store / "cache" / "rerank").glob("rerank-*.npz")
    stored = Store(f"sqlite:///{store / 'wildreid.db'}", create=False)
    assert len(OnlineKReciprocal.load(snapshot)) < len(stored.gallery_rows(None)[1])  # the restart has work to do
    stored.close()

    with ServerProcess(store, tiny_checkpoint, "--settings", str(settings_file), log=tmp_path / "server.log") as again:
        restored = identify_all(again.url, photos[:20])
    for path in (store / "cache" / "rerank").glob("*"):
        path.unlink()
    with ServerProcess(store, tiny_checkpoint, "--settings", str(settings_file), log=tmp_path / "server.log") as fresh:
        built = identify_all(fresh.url, photos[:20])
    assert restored == built
    assert all(describe.startswith("k-reciprocal k1=4 k2=2") for _, describe, _ in built)
