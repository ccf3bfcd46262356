"""The service's store, galleries, micro-batcher and upload decoding, below the HTTP layer.

The PostgreSQL tests run against the server named by WILDREID_TEST_POSTGRES_URL (CI starts
Debian's postgresql and sets it), else a local server with the default postgres/postgres login;
they skip when none answers. Each run works in a schema of its own, dropped afterwards.
"""
from __future__ import annotations

import io
import os
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from sqlalchemy import inspect, select, update

from service.batching import MicroBatcher, ModelRunner
from reid.errors import Conflict, InvalidInput, ReidError, RequestError, TooLarge
from service.errors import status_of
from reid.evaluation.evaluate import RerankOptions
from reid.identify.gallery import Galleries, Layout
from reid.identify.photos import decode_upload, parse_bbox
from reid.store import NewImage, Review, Store, normalise_url
from reid.store.database import SCHEMA_VERSION, meta
from service.testing import encode, noise_image, png_with_dimensions, truncated

DIM = 8
LAYOUT = lambda species: Layout("m", DIM)  # noqa: E731 - every species: model 'm'
RERANKED = lambda species: Layout("m", DIM, RerankOptions(k_reciprocal=True, k1=3, k2=2), "settings")  # noqa: E731
LOCAL_POSTGRES = "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres"


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def image(seed: int, viewpoint: str | None = None) -> NewImage:
    return NewImage(f"{seed:064x}", f"images/{seed}.jpg", "image/jpeg", 8, 8, 100, vec(seed), viewpoint=viewpoint)


def searchable(galleries: Galleries) -> dict[int, int]:
    """image id -> individual id of everything the galleries can return."""
    with galleries.lock:
        return {image_id: owner for g in galleries.by_species.values() for image_id, owner in g.owner.items()}


def truth(store: Store) -> dict[int, int]:
    _, rows = store.gallery_rows(None)
    return {r.image_id: r.individual_id for r in rows}


# ---------------------------------------------------------------------- SQLite
@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'wildreid.db'}"


def test_a_commit_whose_index_update_was_lost_is_found_after_restart(sqlite_url):
    store = Store(sqlite_url)
    galleries = Galleries(store, LAYOUT)
    galleries.rebuild()
    # the commit happens, then the process dies before the in-memory index hears of it
    made = store.enroll("Lost?", "zebra", [image(1), image(2)], "m", "k")
    restarted = Galleries(Store(sqlite_url), LAYOUT)
    restarted.rebuild()
    (match,) = restarted.search("zebra", vec(2), 1)
    assert match.individual_id == made["individual_id"] and match.score == pytest.approx(1.0)
    assert galleries.sync() == 2 and searchable(galleries) == searchable(restarted) == truth(store)
    assert galleries.sync() == 0  # nothing new


def run_curation(store: Store) -> dict:
    a = store.enroll("A", "zebra", [image(10), image(11)], "m", "k")["individual_id"]
    b = store.enroll("B", "zebra", [image(12)], "m", "k")["individual_id"]
    c = store.enroll("C", "lion", [image(13)], "m", "k")["individual_id"]
    store.add_sighting(b, [image(14)], "m", "k")
    store.merge(a, b, "k")
    store.set_deleted(c, True, "k")
    d = store.enroll("D", "zebra", [image(15)], "m", "k")["individual_id"]
    store.set_deleted(d, True, "k")
    store.set_deleted(d, False, "k")
    return {"a": a, "b": b, "c": c, "d": d}


def check_two_instances(url: str, layout=LAYOUT) -> None:
    """Two instances (own engine, own galleries) on one database: what one writes, the other finds, and
    both answer alike (re-ranked too: each keeps its own re-ranking state in step with the change feed)."""
    first, second = Store(url), Store(url)
    g1, g2 = Galleries(first, layout), Galleries(second, layout)
    g1.rebuild()
    g2.rebuild()
    ids = run_curation(first)
    g1.sync()
    g2.sync()
    assert searchable(g1) == searchable(g2) == truth(second)
    assert set(searchable(g2).values()) == {ids["a"], ids["d"]}  # B merged into A, C deleted
    assert g2.search("zebra", vec(14), 1)[0].individual_id == ids["a"]  # B's sighting found as A
    assert g2.search("lion", vec(13), 1) == []
    # and back the other way
    store_b_restore = second.set_deleted(ids["c"], False, "k")
    assert store_b_restore["seq"] == second.change_seq()
    g1.sync()
    assert g1.search("lion", vec(13), 1)[0].individual_id == ids["c"]
    g2.sync()
    for seed in range(10, 16):
        assert g1.search("zebra", vec(seed), 3) == g2.search("zebra", vec(seed), 3)
    first.close()
    second.close()


@pytest.mark.parametrize("layout", [LAYOUT, RERANKED], ids=["cosine", "reranked"])
def test_two_instances_on_one_sqlite_database(sqlite_url, layout):
    check_two_instances(sqlite_url, layout)


def check_concurrent_merges(url: str) -> None:
    store = Store(url)
    a = store.enroll("A", "zebra", [image(20)], "m", "k")["individual_id"]
    b = store.enroll("B", "zebra", [image(21)], "m", "k")["individual_id"]
    barrier, outcomes = threading.Barrier(6), []

    def merge():
        barrier.wait()
        try:
            store.merge(a, b, "k")
            outcomes.append("merged")
        except Conflict as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=merge) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["already_merged"] * 5 + ["merged"]
    assert truth(store) == {store.get_individual(a)["images"][0]["id"]: a, store.get_individual(a)["images"][1]["id"]: a}
    assert len(store.get_individual(a)["aliases"]) == 1
    with pytest.raises(InvalidInput):
        store.merge(a, a, "k")
    store.close()


def test_concurrent_merges_of_one_pair_on_sqlite(sqlite_url):
    check_concurrent_merges(sqlite_url)


def test_change_sequence_orders_concurrent_writers(sqlite_url):
    store = Store(sqlite_url)
    seqs, lock = [], threading.Lock()

    def write(n):
        for i in range(10):
            got = store.enroll(f"{n}-{i}", "zebra", [image(1000 * n + i)], "m", None)["seq"]
            with lock:
                seqs.append(got)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 41)) and store.change_seq() == 40


def test_gallery_search_is_exact_per_individual(sqlite_url):
    store = Store(sqlite_url)
    # individual 1 has many images near the query; individuals 2 and 3 one each, further away
    query = vec(0)
    near = [query + 0.01 * vec(100 + i) for i in range(80)]
    store.enroll("crowd", "zebra", [NewImage(f"{i:064x}", "p", "image/jpeg", 1, 1, 1, v / np.linalg.norm(v))
                                    for i, v in enumerate(near)], "m", None)
    store.enroll("two", "zebra", [image(2)], "m", None)
    store.enroll("three", "zebra", [image(3)], "m", None)
    galleries = Galleries(store, LAYOUT)
    galleries.rebuild()
    matches = galleries.search("zebra", query, 3)
    assert [m.individual_id for m in matches][0] == 1 and len(matches) == 3  # found past the crowd's 80 images
    expected = sorted([(float(vec(2) @ query), 2), (float(vec(3) @ query), 3)], reverse=True)
    assert [(round(m.score, 5), m.individual_id) for m in matches[1:]] == [(round(s, 5), i) for s, i in expected]
    assert len(matches[0].images) == 5


def test_images_of_another_model_are_not_searched(sqlite_url):
    store = Store(sqlite_url)
    store.enroll("old", "zebra", [image(1)], "old-model", None)
    store.enroll("new", "zebra", [image(2)], "m", None)
    galleries = Galleries(store, LAYOUT)
    galleries.rebuild()
    assert galleries.sizes() == {"zebra": 1} and galleries.foreign == 1


# ---------------------------------------------------------------------- schema versions
def set_schema_version(url: str, version: int) -> None:
    store = Store(url, create=False)
    with store.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.id == 1).values(schema_version=version))
    store.close()


def schema_version(store: Store) -> int:
    with store.read() as conn:
        return conn.execute(select(meta.c.schema_version)).scalar_one()


def make_schema_1_store(url: str) -> tuple[dict[int, int], int]:
    """A store as schema version 1 left it (images without a viewpoint column) with a few individuals;
    returns its searchable images (image id -> individual id) and its change sequence."""
    store = Store(url)
    a = store.enroll("A", "zebra", [image(1), image(2)], "m", "k")["individual_id"]
    store.enroll("B", "zebra", [image(3)], "m", "k")
    store.add_sighting(a, [image(4)], "m", "k")
    rows, seq = truth(store), store.change_seq()
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE images DROP COLUMN viewpoint")
    store.close()
    set_schema_version(url, 1)
    return rows, seq


def image_columns(store: Store) -> set[str]:
    return {column["name"] for column in inspect(store.engine).get_columns("images")}


def check_schema_1_store_is_upgraded(url: str) -> None:
    """An old store is refused by a read-only open (identify-batch), upgraded by a normal one by two
    processes at once (each its own engine), keeps its rows, and records viewpoints from then on."""
    before, seq = make_schema_1_store(url)
    with pytest.raises(ReidError, match="schema version 1, older than this wildreid's"):
        Store(url, create=False).check_schema()
    barrier, opened, failures = threading.Barrier(2), [], []

    def open_store():
        barrier.wait()
        try:
            opened.append(Store(url))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and len(opened) == 2
    store = opened[0]
    assert schema_version(store) == SCHEMA_VERSION and "viewpoint" in image_columns(store)
    assert truth(store) == before and store.change_seq() == seq  # the upgrade is no change of the gallery
    a = store.get_individual(1)
    assert [i["viewpoint"] for i in a["images"]] == [None, None, None]
    made = store.add_sighting(1, [image(5, "left")], "m", "k")
    assert store.get_image(made["image_ids"][0])["viewpoint"] == "left"
    galleries = Galleries(opened[1], LAYOUT)
    galleries.rebuild()
    (match,) = galleries.search("zebra", vec(5), 1)
    assert (match.individual_id, match.viewpoint) == (1, "left")
    Store(url, create=False).check_schema()  # read-only opens take the upgraded store
    for each in opened:
        each.close()


def test_a_schema_1_sqlite_store_is_upgraded_when_opened(sqlite_url):
    check_schema_1_store_is_upgraded(sqlite_url)


def check_schema_2_store_is_upgraded(url: str) -> None:
    """A store of schema 2 (no reviews table) gets the table, keeps its rows, and records and lists reviews."""
    store = Store(url)
    a = store.enroll("A", "zebra", [image(1)], "m", "k")["individual_id"]
    rows, seq = truth(store), store.change_seq()
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE reviews")
    store.close()
    set_schema_version(url, 2)
    with pytest.raises(ReidError, match="schema version 2, older than this wildreid's"):
        Store(url, create=False).check_schema()
    store = Store(url)
    assert schema_version(store) == SCHEMA_VERSION and "reviews" in inspect(store.engine).get_table_names()
    assert truth(store) == rows and store.change_seq() == seq
    made = store.add_sighting(a, [image(2)], "m", "k")
    first = store.record_review(Review("zebra", "confirmed", ["ab" * 32], made["image_ids"], candidate_id=a,
                                       candidate_rank=1, score=0.9, cosine=0.9, best_score=0.9, decision="match",
                                       individual_id=a, match_threshold=0.7, new_threshold=0.5), "k")
    store.record_review(Review("zebra", "rejected", ["cd" * 32], [], candidate_id=a, score=0.4, cosine=0.4), "k")
    store.record_review(Review("lion", "skipped", ["ef" * 32], []), "k")
    reviews = store.reviews_of("zebra")
    assert [(r["verdict"], r["key_name"], r["image_ids"]) for r in reviews] == [
        ("confirmed", "k", made["image_ids"]), ("rejected", "k", [])]
    assert reviews[0]["query_sha256"] == ["ab" * 32] and reviews[0]["cosine"] == pytest.approx(0.9)
    assert [r["verdict"] for r in store.reviews_of("zebra", after_id=first)] == ["rejected"]
    with pytest.raises(InvalidInput, match="unknown verdict"):
        store.record_review(Review("zebra", "maybe", [], []), "k")
    audited = [e["action"] for e in store.audit_entries(10) if e["target_type"] == "review"]
    assert audited == ["review.skipped", "review.rejected", "review.confirmed"]
    store.close()


def test_a_schema_2_sqlite_store_gets_the_reviews_table(sqlite_url):
    check_schema_2_store_is_upgraded(sqlite_url)


def check_newer_schema_is_refused(url: str) -> None:
    Store(url).close()
    set_schema_version(url, 99)
    for opening in (lambda: Store(url), lambda: Store(url, create=False).check_schema()):
        with pytest.raises(ReidError, match=f"schema version 99, newer than this wildreid knows \\(up to "
                                            f"{SCHEMA_VERSION}\\): upgrade wildreid"):
            opening()


def test_a_store_of_a_newer_schema_is_refused(sqlite_url):
    check_newer_schema_is_refused(sqlite_url)


def test_database_url_without_driver_uses_psycopg():
    assert normalise_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


# ---------------------------------------------------------------------- micro-batching
def test_micro_batcher_batches_concurrent_requests_and_keeps_order():
    sizes = []

    def forward(items):
        time.sleep(0.02)  # a slow model: requests pile up meanwhile
        sizes.append(len(items))
        return np.array([[float(x), 2.0 * x] for x in items], dtype=np.float32)

    batcher = MicroBatcher(forward, max_batch=16, window_s=0.005).start()
    results = {}

    def client(n):
        results[n] = batcher.embed_sync([n * 10 + i for i in range(n % 3 + 1)])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for n, out in results.items():
        expected = [n * 10 + i for i in range(n % 3 + 1)]
        assert out[:, 0].tolist() == expected and out[:, 1].tolist() == [2.0 * x for x in expected]
    assert sum(sizes) == sum(n % 3 + 1 for n in range(24)) and max(sizes) > 1 and max(sizes) <= 16 + 2
    assert len(sizes) < 24


def test_micro_batcher_reports_errors_and_refuses_after_close():
    def forward(items):
        if "bad" in items:
            raise ValueError("model failed")
        return np.ones((len(items), 2), dtype=np.float32)

    batcher = MicroBatcher(forward, max_batch=4, window_s=0).start()
    with pytest.raises(ValueError, match="model failed"):
        batcher.embed_sync(["bad"])
    assert batcher.embed_sync(["ok", "ok"]).shape == (2, 2)  # the worker lives on
    batcher.close()
    with pytest.raises(RuntimeError):
        batcher.embed_sync(["ok"])


def test_model_runner_equals_embed_images(tiny_checkpoint):
    from reid.embedding.embedder import Embedder

    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    runner = ModelRunner(embedder)
    images = [noise_image(i, 48 + 8 * i) for i in range(3)]
    np.testing.assert_allclose(runner.forward([runner.preprocess(x) for x in images]), embedder.embed_images(images),
                               atol=1e-6)


# ---------------------------------------------------------------------- uploads
def decode(data: bytes, **kw):
    return decode_upload(data, 0, "x", kw.get("max_pixels", 50_000_000), ("JPEG", "PNG"), kw.get("draft"))


def test_decode_applies_exif_orientation():
    array = noise_image(0, 32)[:, :20]  # 20 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif.tobytes())
    upload = decode(buffer.getvalue())
    assert (upload.width, upload.height) == (32, 20) and upload.array.shape == (20, 32, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_refuses_bad_files():
    jpeg = encode(noise_image(1, 256))
    cases = [(b"", "empty_file"), (b"GIF89a not really", "not_an_image"), (truncated(jpeg), "corrupt_image"),
             (png_with_dimensions(60_000, 60_000), "too_many_pixels"), (encode(noise_image(1), "GIF"), "unsupported_format")]
    for data, code in cases:
        with pytest.raises(RequestError) as info:
            decode(data)
        assert info.value.code == code and 400 <= status_of(info.value) < 500
    with pytest.raises(TooLarge):
        decode(encode(noise_image(2, 64)), max_pixels=64 * 63)
    drafted = decode(encode(noise_image(2, 256)), draft=64)
    assert 64 <= drafted.array.shape[1] < 256  # reduced-scale decoding stays >= draft
    assert (drafted.width, drafted.height) == (256, 256)  # the file's size is what is recorded


def test_bbox_parsing():
    assert parse_bbox("0.1, 0.2, 0.3, 0.4") == (0.1, 0.2, 0.3, 0.4) == parse_bbox("[0.1,0.2,0.3,0.4]")
    for bad in ("1,2,3", "0.5,0.5,0.6,0.1", "0,0,0,1", "a,b,c,d", "nan,0,1,1"):
        with pytest.raises(InvalidInput):
            parse_bbox(bad)


# ---------------------------------------------------------------------- PostgreSQL
def _postgres_base_url() -> str | None:
    from sqlalchemy import create_engine, text

    url = os.environ.get("WILDREID_TEST_POSTGRES_URL") or LOCAL_POSTGRES
    try:
        engine = create_engine(normalise_url(url), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means: no server to test against
        if os.environ.get("WILDREID_TEST_POSTGRES_URL"):
            pytest.fail(f"WILDREID_TEST_POSTGRES_URL is set but the server does not answer: {exc}")
        return None
    return normalise_url(url)


@pytest.fixture(scope="module")
def postgres_base():
    url = _postgres_base_url()
    if url is None:
        pytest.skip("no PostgreSQL server: set WILDREID_TEST_POSTGRES_URL (CI starts one)")
    return url


@pytest.fixture
def postgres_url(postgres_base):
    """A URL whose connections work in a fresh schema of their own."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"wildreid_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(postgres_base).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.mark.parametrize("layout", [LAYOUT, RERANKED], ids=["cosine", "reranked"])
def test_postgres_two_instances_share_one_population(postgres_url, layout):
    check_two_instances(postgres_url, layout)


def test_postgres_concurrent_merges_of_one_pair(postgres_url):
    check_concurrent_merges(postgres_url)


def test_postgres_schema_1_store_is_upgraded_when_opened(postgres_url):
    check_schema_1_store_is_upgraded(postgres_url)


def test_postgres_schema_2_store_gets_the_reviews_table(postgres_url):
    check_schema_2_store_is_upgraded(postgres_url)


def test_postgres_store_of_a_newer_schema_is_refused(postgres_url):
    check_newer_schema_is_refused(postgres_url)


def test_postgres_crash_between_commit_and_index(postgres_url):
    store = Store(postgres_url)
    made = store.enroll("Lost?", "zebra", [image(1)], "m", "k")
    restarted = Galleries(Store(postgres_url), LAYOUT)
    restarted.rebuild()
    assert restarted.search("zebra", vec(1), 1)[0].individual_id == made["individual_id"]


def test_postgres_through_the_api(postgres_url, tmp_path, tiny_checkpoint, synth_csv):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    photo = (synth_csv.parent / "images/synth_000/000.jpg").read_bytes()
    other = (synth_csv.parent / "images/synth_001/000.jpg").read_bytes()
    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, database_url=postgres_url)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        headers = {"Authorization": f"Bearer {one.app.state.service.store.create_key('pg')[1]}"}
        a = one.post("/v1/individuals", data={"name": "A", "species": "zebra"}, headers=headers,
                     files=[("images", ("a.jpg", photo, "image/jpeg"))])
        b = one.post("/v1/individuals", data={"name": "B", "species": "zebra"}, headers=headers,
                     files=[("images", ("b.jpg", other, "image/jpeg"))])
        assert a.status_code == b.status_code == 201, a.text
        # the second instance (same database, its own gallery) finds what the first enrolled
        r = two.post("/v1/identify", files=[("images", ("q.jpg", photo, "image/jpeg"))])
        assert r.status_code == 200 and r.json()["animals"][0]["candidates"][0]["individual_id"] == a.json()["id"]
        assert two.post(f"/v1/individuals/{a.json()['id']}/merge", json={"source_id": b.json()["id"]},
                        headers=headers).status_code == 200
        r = one.post("/v1/identify", files=[("images", ("q.jpg", other, "image/jpeg"))])
        assert [c["individual_id"] for c in r.json()["animals"][0]["candidates"]] == [a.json()["id"]]
        assert "postgresql" in one.get("/ready").json()["database"]
