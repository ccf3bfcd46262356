"""The store's database: the truth about individuals, images, sightings, keys and the audit log.

SQLAlchemy Core over SQLite (WAL, one file under the store folder) by default, or PostgreSQL by URL
so several instances can serve one population. Every write is one transaction that first bumps
the single-row change sequence (`meta.change_seq`): that row lock serialises writers, so sequence
numbers commit in order, and every image row whose visibility in the gallery changed is stamped
with the sequence of the transaction that changed it. A gallery that has applied every change up
to N brings itself up to date by reading the image rows stamped above N (see reid/identify/gallery.py).

Each image row holds its embedding (float32 bytes) and the fingerprint of the model that made
it, so the gallery is rebuilt from the database alone; the image files are content-addressed and
written before the commit that references them.

The schema's version is kept in `meta.schema_version`. Opening a store of an older version brings it
up to this one (`MIGRATIONS`, one step per version, in the transaction that holds the `meta` row);
a store of a newer version is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from sqlalchemy import (BigInteger, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table,
                        Text, and_, create_engine, event, func, insert, inspect, literal, or_, select, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from reid.errors import Conflict, InvalidInput, NotFound, ReidError

SCHEMA_VERSION = 4  # 2: images.viewpoint; 3: reviews; 4: jobs
KEY_PREFIX = "wr_"

log = logging.getLogger("wildreid.store")

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("id", Integer, primary_key=True),
    Column("change_seq", BigInteger, nullable=False),
    Column("schema_version", Integer, nullable=False),
)

individuals = Table(
    "individuals", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("species", String(100), nullable=False),
    Column("notes", Text, nullable=False, default=""),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("deleted_at", String(32)),
    Column("merged_into", Integer, ForeignKey("individuals.id")),
    Column("seq", BigInteger, nullable=False),
    Index("ix_individuals_species", "species"),
)

aliases = Table(
    "aliases", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("individual_id", Integer, ForeignKey("individuals.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("former_id", Integer, ForeignKey("individuals.id"), nullable=False),
    Column("created_at", String(32), nullable=False),
    Index("ix_aliases_individual", "individual_id"),
)

sightings = Table(
    "sightings", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("individual_id", Integer, ForeignKey("individuals.id"), nullable=False),
    Column("observed_at", String(64)),
    Column("location", String(200)),
    Column("notes", Text, nullable=False, default=""),
    Column("created_at", String(32), nullable=False),
    Column("key_name", String(200)),
    Index("ix_sightings_individual", "individual_id"),
)

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("individual_id", Integer, ForeignKey("individuals.id"), nullable=False),
    Column("enrolled_as", Integer, ForeignKey("individuals.id"), nullable=False),
    Column("sighting_id", Integer, ForeignKey("sightings.id"), nullable=False),
    Column("species", String(100), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("path", String(300), nullable=False),
    Column("media_type", String(50), nullable=False),
    Column("filename", String(300)),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("bbox", String(100)),
    Column("viewpoint", String(50)),  # the flank the photo shows (reid.data.classes.normalise_viewpoint); None: unknown
    Column("embedding", LargeBinary, nullable=False),
    Column("embedding_model", String(64), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Index("ix_images_seq", "seq"),
    Index("ix_images_individual", "individual_id"),
    Index("ix_images_sha256", "sha256"),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32)),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(32), nullable=False),
    Column("key_name", String(200)),
    Column("action", String(50), nullable=False),
    Column("target_type", String(50)),
    Column("target_id", Integer),
    Column("detail", Text, nullable=False, default="{}"),
)


# every verdict of a person on an identification (the review web app, service/web): what the model proposed,
# what the reviewer said, and who; `reid calibrate --reviews` refits a species' thresholds from them
reviews = Table(
    "reviews", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(32), nullable=False),
    Column("key_name", String(200)),
    Column("species", String(100), nullable=False),
    Column("verdict", String(20), nullable=False),  # REVIEW_VERDICTS
    Column("query_sha256", Text, nullable=False),  # JSON list: SHA-256 of each photo of the animal's query
    Column("image_ids", Text, nullable=False, default="[]"),  # JSON list: the images stored by the verdict
    Column("encounter", String(64)),  # the review app's encounter the photos were uploaded in
    Column("animal_index", Integer),
    Column("candidate_id", Integer, ForeignKey("individuals.id")),  # the candidate the verdict is about
    Column("candidate_rank", Integer),
    Column("score", Float),  # the candidate's ranking score and cosine
    Column("cosine", Float),
    Column("best_score", Float),  # the first candidate's cosine, which the thresholds were applied to
    Column("decision", String(20)),  # the service's: match, uncertain, new
    Column("individual_id", Integer, ForeignKey("individuals.id")),  # who the animal is after the verdict
    Column("model", String(64)),
    Column("match_threshold", Float),
    Column("new_threshold", Float),
    Column("thresholds_source", String(50)),
    Index("ix_reviews_species", "species"),
)

REVIEW_VERDICTS = ("confirmed", "new", "rejected", "skipped")

# background identification of many photos (the review app's batch jobs; reid/store/jobs.py): a job's row, taken
# by one instance at a time, and one row per photo, so that a job goes on where it stopped after a restart
jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", String(32), nullable=False),
    Column("key_name", String(200)),
    Column("name", String(200), nullable=False),
    Column("species", String(100)),  # None: each animal's species from the species classifier
    Column("folder", Text, nullable=False),  # the photos: an upload kept under the store, or a folder of the server
    Column("review_all", Integer, nullable=False, default=0),  # every result in the review queue, not only doubts
    Column("state", String(20), nullable=False),  # JOB_STATES
    Column("total", Integer, nullable=False),
    Column("started_at", String(32)),
    Column("finished_at", String(32)),
    Column("heartbeat_at", Float),  # seconds since the epoch; SQLite's claim (it has no row locks) goes by it
    Column("error", Text),
)

job_items = Table(
    "job_items", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("file", Text, nullable=False),  # the photo, relative to the job's folder
    Column("state", String(20), nullable=False),  # pending, done, failed
    Column("encounter", String(64)),  # the review app's encounter its animals are decided in
    Column("decisions", Text),  # JSON: each animal's decision
    Column("to_review", Integer, nullable=False, default=0),  # its animals in the review queue still undecided
    Column("error", Text),
    Index("ix_job_items_job", "job_id", "position"),
)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


def _add_image_viewpoint(conn: Connection) -> None:
    """Schema 1 -> 2: images record the flank they show. The column is looked for first, so the step
    also completes a store whose column is there already."""
    if "viewpoint" not in {column["name"] for column in inspect(conn).get_columns("images")}:
        conn.exec_driver_sql("ALTER TABLE images ADD COLUMN viewpoint VARCHAR(50)")


def _add_reviews(conn: Connection) -> None:
    """Schema 2 -> 3: the reviews table (with its index), unless it is there already."""
    reviews.create(conn, checkfirst=True)


def _add_jobs(conn: Connection) -> None:
    """Schema 3 -> 4: the jobs and job_items tables, unless they are there already."""
    jobs.create(conn, checkfirst=True)
    job_items.create(conn, checkfirst=True)


MIGRATIONS = {1: _add_image_viewpoint, 2: _add_reviews, 3: _add_jobs}  # schema version -> the step that brings a store to the next one


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


@dataclass
class NewImage:
    """An upload ready to be recorded: its file is already in the store."""
    sha256: str
    path: str
    media_type: str
    width: int
    height: int
    size_bytes: int
    embedding: np.ndarray
    filename: str | None = None
    bbox: str | None = None
    viewpoint: str | None = None


@dataclass
class Review:
    """A reviewer's verdict on one animal of an identification, as `Store.record_review` writes it."""
    species: str
    verdict: str
    query_sha256: list[str]
    image_ids: list[int]
    encounter: str | None = None
    animal_index: int | None = None
    candidate_id: int | None = None
    candidate_rank: int | None = None
    score: float | None = None
    cosine: float | None = None
    best_score: float | None = None
    decision: str | None = None
    individual_id: int | None = None
    model: str | None = None
    match_threshold: float | None = None
    new_threshold: float | None = None
    thresholds_source: str | None = None


@dataclass
class GalleryRow:
    image_id: int
    species: str
    individual_id: int
    viewpoint: str | None
    embedding: bytes
    embedding_model: str
    visible: bool


@dataclass
class Tx:
    conn: Connection
    seq: int | None  # None: a write outside the change feed (Store.write_aside)
    now: str


SQLITE_FULL = 13  # "database or disk is full"
POSTGRES_DISK_FULL = "53100"


def disk_full(exc: DBAPIError) -> bool:
    """Whether a database error says its disk (or SQLite's page limit) is full."""
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)  # Python >= 3.11; the message says it on 3.10
    if (code is not None and code & 0xFF == SQLITE_FULL) or getattr(orig, "sqlstate", None) == POSTGRES_DISK_FULL:
        return True
    return "database or disk is full" in str(orig)


def normalise_url(url: str) -> str:
    """PostgreSQL URLs without a driver use psycopg (3), the driver this project installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "<database url>"


class Store:
    def __init__(self, url: str, sqlite_synchronous: str = "FULL", create: bool = True, pool_size: int = 16):
        url = normalise_url(url)
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        try:
            if self.is_sqlite:
                path = url.split(":///", 1)[1] if ":///" in url else ""
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                                            pool_size=pool_size, max_overflow=pool_size)
                self._sqlite_events(self.engine, sqlite_synchronous)
            else:
                self.engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        except (ImportError, ValueError) as exc:
            raise ReidError(f"cannot use database '{_redact(url)}': {exc}") from None
        if create:
            self.create()

    # ------------------------------------------------------------------ engine and schema
    @staticmethod
    def _sqlite_events(engine: Engine, synchronous: str) -> None:
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin event below emits BEGIN itself
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # writers take the write lock at BEGIN: a deferred transaction upgraded later fails at once
            # with SQLITE_BUSY in WAL mode instead of waiting for the other writer
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

    def create(self) -> None:
        """Create missing tables and the change-sequence row, and bring an older schema up to this one
        (safe when several processes start at once)."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                with self.engine.connect().execution_options(write=True) as conn, conn.begin():
                    # updating the meta row locks it (on SQLite, BEGIN IMMEDIATE has locked the database): a
                    # second process opening the store waits here, then reads the version the first one left
                    version = conn.execute(update(meta).where(meta.c.id == 1)
                                           .values(schema_version=meta.c.schema_version)
                                           .returning(meta.c.schema_version)).scalar()
                    if version is None:
                        conn.execute(insert(meta).values(id=1, change_seq=0, schema_version=SCHEMA_VERSION))
                    else:
                        self._upgrade(conn, version)
                return
            except (IntegrityError, OperationalError) as exc:
                if attempt == 4:
                    raise ReidError(f"cannot open the database '{_redact(self.url)}': {exc.orig}") from None
                time.sleep(0.2 * (attempt + 1))
            except DBAPIError as exc:
                raise ReidError(f"cannot open the database '{_redact(self.url)}': {exc.orig}") from None

    def _upgrade(self, conn: Connection, version: int) -> None:
        """Bring a store of schema `version` up to SCHEMA_VERSION, in the transaction holding the meta row."""
        self.refuse_newer(version)
        if version == SCHEMA_VERSION:
            return
        for step in range(version, SCHEMA_VERSION):
            MIGRATIONS[step](conn)
        conn.execute(update(meta).where(meta.c.id == 1).values(schema_version=SCHEMA_VERSION))
        log.info("store '%s' upgraded from schema version %d to %d", _redact(self.url), version, SCHEMA_VERSION)

    def refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ReidError(f"the database '{_redact(self.url)}' holds a store of schema version {version}, newer "
                            f"than this wildreid knows (up to {SCHEMA_VERSION}): upgrade wildreid to open it")

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(meta.c.schema_version).where(meta.c.id == 1)).scalar_one())

    def check_schema(self) -> None:
        """For a store opened without `create` (read as it is, never upgraded): a ReidError unless its
        schema is this code's."""
        version = self.schema_version()
        self.refuse_newer(version)
        if version < SCHEMA_VERSION:
            raise ReidError(f"the database '{_redact(self.url)}' holds a store of schema version {version}, older "
                            f"than this wildreid's ({SCHEMA_VERSION}): start `reid serve` on it once (or run `reid "
                            "keys list --store STORE`), which upgrades it")

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.read() as conn:
                conn.execute(select(literal(1))).scalar()
            return True
        except DBAPIError:
            return False

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """One write transaction; it starts by bumping the change sequence (the writers' lock)."""
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            seq = conn.execute(update(meta).where(meta.c.id == 1).values(change_seq=meta.c.change_seq + 1)
                               .returning(meta.c.change_seq)).scalar_one()
            yield Tx(conn, int(seq), now_iso())

    @contextmanager
    def write_aside(self) -> Iterator[Tx]:
        """A write transaction outside the change feed (batch jobs' progress, not the gallery): it takes no
        change sequence, so it neither waits for the gallery's writers nor makes galleries look for changes."""
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            yield Tx(conn, None, now_iso())

    @staticmethod
    def audit(tx: Tx, key_name: str | None, action: str, target_type: str | None, target_id: int | None,
              **detail) -> None:
        tx.conn.execute(insert(audit_log).values(at=tx.now, key_name=key_name, action=action, target_type=target_type,
                                                 target_id=target_id, detail=json.dumps(detail, sort_keys=True)))

    # ------------------------------------------------------------------ change feed for the gallery
    def change_seq(self) -> int:
        """The latest committed change sequence: one plain query on a pooled connection (it runs before
        every identification, so it skips SQLAlchemy's statement machinery)."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT change_seq FROM meta WHERE id = 1")
            (seq,) = cursor.fetchone()
            cursor.close()
            return int(seq)
        finally:
            raw.close()  # back to the pool (which rolls back any transaction the driver opened)

    def gallery_rows(self, since: int | None) -> tuple[int, list[GalleryRow]]:
        """The change sequence, and the image rows stamped after `since` (all visible rows when None).

        Read in one snapshot (SQLite's transaction; REPEATABLE READ on PostgreSQL), so the rows are
        exactly those of sequences up to the one returned.
        """
        visible = and_(individuals.c.deleted_at.is_(None), individuals.c.merged_into.is_(None))
        query = (select(images.c.id, images.c.species, images.c.individual_id, images.c.viewpoint, images.c.embedding,
                        images.c.embedding_model, visible.label("visible"))
                 .select_from(images.join(individuals, images.c.individual_id == individuals.c.id)))
        query = query.where(visible) if since is None else query.where(images.c.seq > since)
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                seq = int(conn.execute(select(meta.c.change_seq).where(meta.c.id == 1)).scalar_one())
                # ordered here, not by SQL: ORDER BY images.id makes SQLite walk the whole table in id order
                # instead of the few rows the seq index finds (170 ms instead of 1 at 100,000 images)
                rows = sorted((GalleryRow(r.id, r.species, r.individual_id, r.viewpoint, r.embedding,
                                          r.embedding_model, bool(r.visible)) for r in conn.execute(query)),
                              key=lambda row: row.image_id)
        return seq, rows

    # ------------------------------------------------------------------ API keys
    def create_key(self, name: str) -> tuple[dict, str]:
        """A new key named `name`; returns its row and the secret, which is shown once and never stored."""
        name = (name or "").strip()
        if not name or len(name) > 200:
            raise InvalidInput("a key needs a name of 1 to 200 characters")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.write() as tx:
            active = tx.conn.execute(select(api_keys.c.id).where(api_keys.c.name == name,
                                                                 api_keys.c.revoked_at.is_(None))).first()
            if active:
                raise Conflict(f"an active key named '{name}' exists; revoke it first or pick another name",
                               code="key_exists")
            key_id = tx.conn.execute(insert(api_keys).values(name=name, key_hash=hash_key(secret), created_at=tx.now)
                                     .returning(api_keys.c.id)).scalar_one()
            self.audit(tx, "(command line)", "key.create", "api_key", key_id, name=name)
        return {"id": key_id, "name": name, "created_at": tx.now, "revoked_at": None}, secret

    def revoke_key(self, name: str) -> int:
        with self.write() as tx:
            ids = [r.id for r in tx.conn.execute(select(api_keys.c.id).where(api_keys.c.name == name,
                                                                            api_keys.c.revoked_at.is_(None)))]
            if not ids:
                raise NotFound(f"no active key named '{name}'", code="key_not_found")
            tx.conn.execute(update(api_keys).where(api_keys.c.id.in_(ids)).values(revoked_at=tx.now))
            for key_id in ids:
                self.audit(tx, "(command line)", "key.revoke", "api_key", key_id, name=name)
        return len(ids)

    def list_keys(self) -> list[dict]:
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(api_keys.c.id, api_keys.c.name, api_keys.c.created_at, api_keys.c.revoked_at)
                .order_by(api_keys.c.id))]

    def authenticate(self, secret: str) -> dict | None:
        with self.read() as conn:
            row = conn.execute(select(api_keys.c.id, api_keys.c.name, api_keys.c.revoked_at)
                               .where(api_keys.c.key_hash == hash_key(secret))).first()
        return dict(row._mapping) if row else None

    # ------------------------------------------------------------------ writes on individuals
    def _individual(self, conn: Connection, individual_id: int) -> dict:
        row = conn.execute(select(individuals).where(individuals.c.id == individual_id)).first()
        if row is None:
            raise NotFound(f"individual {individual_id} does not exist", code="individual_not_found")
        return dict(row._mapping)

    def _live(self, conn: Connection, individual_id: int, what: str) -> dict:
        row = self._individual(conn, individual_id)
        if row["merged_into"] is not None:
            raise Conflict(f"individual {individual_id} was merged into {row['merged_into']}; {what} "
                           f"individual {row['merged_into']} instead", code="individual_merged",
                           merged_into=row["merged_into"])
        if row["deleted_at"] is not None:
            raise Conflict(f"individual {individual_id} is deleted; restore it first "
                           f"(POST /v1/individuals/{individual_id}/restore)", code="individual_deleted")
        return row

    def require_live(self, individual_id: int, what: str) -> dict:
        """The individual, or the 404 / 409 a write on it would get (checked again inside the write)."""
        with self.read() as conn:
            return self._live(conn, individual_id, what)

    def _insert_sighting(self, tx: Tx, individual_id: int, new_images: list[NewImage], model: str,
                         key_name: str | None, observed_at: str | None, location: str | None, notes: str,
                         species: str) -> tuple[int, list[int]]:
        sighting_id = tx.conn.execute(insert(sightings).values(
            individual_id=individual_id, observed_at=observed_at, location=location, notes=notes or "",
            created_at=tx.now, key_name=key_name).returning(sightings.c.id)).scalar_one()
        image_ids = []
        for image in new_images:
            image_ids.append(tx.conn.execute(insert(images).values(
                individual_id=individual_id, enrolled_as=individual_id, sighting_id=sighting_id, species=species,
                sha256=image.sha256, path=image.path, media_type=image.media_type, filename=image.filename,
                width=image.width, height=image.height, size_bytes=image.size_bytes, bbox=image.bbox,
                viewpoint=image.viewpoint, embedding=vector_to_blob(image.embedding), embedding_model=model,
                created_at=tx.now, seq=tx.seq).returning(images.c.id)).scalar_one())
        return sighting_id, image_ids

    def enroll(self, name: str, species: str, new_images: list[NewImage], model: str, key_name: str | None,
               notes: str = "", observed_at: str | None = None, location: str | None = None) -> dict:
        if not new_images:
            raise InvalidInput("an individual needs at least one image", code="no_images")
        with self.write() as tx:
            individual_id = tx.conn.execute(insert(individuals).values(
                name=name, species=species, notes=notes or "", created_at=tx.now, updated_at=tx.now,
                seq=tx.seq).returning(individuals.c.id)).scalar_one()
            sighting_id, image_ids = self._insert_sighting(tx, individual_id, new_images, model, key_name,
                                                           observed_at, location, "", species)
            self.audit(tx, key_name, "individual.create", "individual", individual_id, name=name, species=species,
                       sighting_id=sighting_id, image_ids=image_ids)
        return {"individual_id": individual_id, "sighting_id": sighting_id, "image_ids": image_ids, "seq": tx.seq}

    def add_sighting(self, individual_id: int, new_images: list[NewImage], model: str, key_name: str | None,
                     notes: str = "", observed_at: str | None = None, location: str | None = None) -> dict:
        if not new_images:
            raise InvalidInput("a sighting needs at least one image", code="no_images")
        with self.write() as tx:
            row = self._live(tx.conn, individual_id, "add images to")
            sighting_id, image_ids = self._insert_sighting(tx, individual_id, new_images, model, key_name,
                                                           observed_at, location, notes, row["species"])
            tx.conn.execute(update(individuals).where(individuals.c.id == individual_id)
                            .values(updated_at=tx.now, seq=tx.seq))
            self.audit(tx, key_name, "sighting.create", "individual", individual_id, sighting_id=sighting_id,
                       image_ids=image_ids)
        return {"individual_id": individual_id, "sighting_id": sighting_id, "image_ids": image_ids, "seq": tx.seq}

    def update_individual(self, individual_id: int, key_name: str | None, name: str | None = None,
                          notes: str | None = None) -> dict:
        with self.write() as tx:
            row = self._individual(tx.conn, individual_id)
            if row["merged_into"] is not None:
                raise Conflict(f"individual {individual_id} was merged into {row['merged_into']}; edit that one",
                               code="individual_merged", merged_into=row["merged_into"])
            values = {k: v for k, v in {"name": name, "notes": notes}.items() if v is not None}
            if values:
                tx.conn.execute(update(individuals).where(individuals.c.id == individual_id)
                                .values(**values, updated_at=tx.now, seq=tx.seq))
                before = {k: row[k] for k in values}
                self.audit(tx, key_name, "individual.update", "individual", individual_id, before=before, after=values)
        return {"seq": tx.seq}

    def merge(self, target_id: int, source_id: int, key_name: str | None) -> dict:
        """Move every image and sighting of `source_id` to `target_id`, keep its name as an alias."""
        if target_id == source_id:
            raise InvalidInput(f"cannot merge individual {target_id} into itself", code="merge_into_self")
        with self.write() as tx:
            target = self._live(tx.conn, target_id, "merge into")
            source = self._individual(tx.conn, source_id)
            if source["merged_into"] == target_id:
                raise Conflict(f"individual {source_id} is already merged into {target_id}", code="already_merged")
            if source["merged_into"] is not None:
                raise Conflict(f"individual {source_id} was merged into {source['merged_into']}; merge that one",
                               code="individual_merged", merged_into=source["merged_into"])
            if source["deleted_at"] is not None:
                raise Conflict(f"individual {source_id} is deleted; restore it before merging it",
                               code="individual_deleted")
            if source["species"] != target["species"]:
                raise Conflict(f"cannot merge a {source['species']} ({source_id}) into a {target['species']} "
                               f"({target_id})", code="species_mismatch")
            moved = tx.conn.execute(update(images).where(images.c.individual_id == source_id)
                                    .values(individual_id=target_id, seq=tx.seq)).rowcount
            tx.conn.execute(update(sightings).where(sightings.c.individual_id == source_id)
                            .values(individual_id=target_id))
            tx.conn.execute(update(aliases).where(aliases.c.individual_id == source_id)
                            .values(individual_id=target_id))
            tx.conn.execute(insert(aliases).values(individual_id=target_id, name=source["name"], former_id=source_id,
                                                   created_at=tx.now))
            tx.conn.execute(update(individuals).where(individuals.c.id == source_id)
                            .values(merged_into=target_id, updated_at=tx.now, seq=tx.seq))
            tx.conn.execute(update(individuals).where(individuals.c.id == target_id)
                            .values(updated_at=tx.now, seq=tx.seq))
            self.audit(tx, key_name, "individual.merge", "individual", target_id, source_id=source_id,
                       source_name=source["name"], images_moved=moved)
        return {"seq": tx.seq, "images_moved": moved}

    def set_deleted(self, individual_id: int, deleted: bool, key_name: str | None) -> dict:
        """Soft delete (its images leave the gallery) or restore (they come back)."""
        with self.write() as tx:
            row = self._individual(tx.conn, individual_id)
            if row["merged_into"] is not None:
                raise Conflict(f"individual {individual_id} was merged into {row['merged_into']}",
                               code="individual_merged", merged_into=row["merged_into"])
            if deleted and row["deleted_at"] is not None:
                raise Conflict(f"individual {individual_id} is already deleted", code="already_deleted")
            if not deleted and row["deleted_at"] is None:
                raise Conflict(f"individual {individual_id} is not deleted", code="not_deleted")
            tx.conn.execute(update(individuals).where(individuals.c.id == individual_id)
                            .values(deleted_at=tx.now if deleted else None, updated_at=tx.now, seq=tx.seq))
            tx.conn.execute(update(images).where(images.c.individual_id == individual_id).values(seq=tx.seq))
            self.audit(tx, key_name, "individual.delete" if deleted else "individual.restore", "individual",
                       individual_id)
        return {"seq": tx.seq}

    # ------------------------------------------------------------------ reads
    def _image_counts(self):
        return (select(images.c.individual_id, func.count().label("n")).group_by(images.c.individual_id)
                .subquery())

    def get_individual(self, individual_id: int) -> dict:
        with self.read() as conn:
            row = self._individual(conn, individual_id)
            row["images"] = [dict(r._mapping) for r in conn.execute(
                select(images.c.id, images.c.sighting_id, images.c.sha256, images.c.width, images.c.height,
                       images.c.media_type, images.c.size_bytes, images.c.filename, images.c.bbox,
                       images.c.viewpoint, images.c.created_at, images.c.enrolled_as)
                .where(images.c.individual_id == individual_id).order_by(images.c.id))]
            row["sightings"] = [dict(r._mapping) for r in conn.execute(
                select(sightings).where(sightings.c.individual_id == individual_id).order_by(sightings.c.id))]
            by_sighting: dict[int, list[int]] = {}
            for image in row["images"]:
                by_sighting.setdefault(image["sighting_id"], []).append(image["id"])
            for sighting in row["sightings"]:
                sighting["image_ids"] = by_sighting.get(sighting["id"], [])
            row["aliases"] = [dict(r._mapping) for r in conn.execute(
                select(aliases.c.name, aliases.c.former_id, aliases.c.created_at)
                .where(aliases.c.individual_id == individual_id).order_by(aliases.c.id))]
            row["image_count"] = len(row["images"])
        return row

    def list_individuals(self, species: str | None = None, name: str | None = None, page: int = 1,
                         per_page: int = 50, include_deleted: bool = False) -> tuple[int, list[dict]]:
        counts = self._image_counts()
        where = [individuals.c.merged_into.is_(None)]
        if not include_deleted:
            where.append(individuals.c.deleted_at.is_(None))
        if species:
            where.append(individuals.c.species == species)
        if name:
            needle = name.lower()
            alias_match = select(aliases.c.individual_id).where(func.lower(aliases.c.name).contains(needle,
                                                                                                   autoescape=True))
            where.append(or_(func.lower(individuals.c.name).contains(needle, autoescape=True),
                             individuals.c.id.in_(alias_match)))
        with self.read() as conn:
            total = conn.execute(select(func.count()).select_from(individuals).where(*where)).scalar_one()
            rows = conn.execute(
                select(individuals, func.coalesce(counts.c.n, 0).label("image_count"))
                .select_from(individuals.outerjoin(counts, counts.c.individual_id == individuals.c.id))
                .where(*where).order_by(individuals.c.id).limit(per_page).offset((page - 1) * per_page))
            items = [dict(r._mapping) for r in rows]
        return int(total), items

    def get_image(self, image_id: int) -> dict:
        with self.read() as conn:
            row = conn.execute(select(images.c.id, images.c.individual_id, images.c.enrolled_as, images.c.sighting_id,
                                      images.c.species, images.c.sha256, images.c.path, images.c.media_type,
                                      images.c.filename, images.c.width, images.c.height, images.c.size_bytes,
                                      images.c.bbox, images.c.viewpoint, images.c.created_at,
                                      images.c.embedding_model)
                               .where(images.c.id == image_id)).first()
        if row is None:
            raise NotFound(f"image {image_id} does not exist", code="image_not_found")
        return dict(row._mapping)

    def species(self) -> list[str]:
        """Species with at least one individual that is neither deleted nor merged."""
        with self.read() as conn:
            return sorted(r[0] for r in conn.execute(
                select(individuals.c.species).where(individuals.c.deleted_at.is_(None),
                                                    individuals.c.merged_into.is_(None)).distinct()))

    def all_species(self) -> list[str]:
        with self.read() as conn:
            return sorted(r[0] for r in conn.execute(select(individuals.c.species).distinct()))

    def names(self, individual_ids) -> dict[int, str]:
        ids = sorted({int(i) for i in individual_ids})
        if not ids:
            return {}
        with self.read() as conn:
            return {r.id: r.name for r in conn.execute(select(individuals.c.id, individuals.c.name)
                                                       .where(individuals.c.id.in_(ids)))}

    def audit_entries(self, limit: int = 100, offset: int = 0) -> list[dict]:
        with self.read() as conn:
            rows = conn.execute(select(audit_log).order_by(audit_log.c.id.desc()).limit(limit).offset(offset))
            out = [dict(r._mapping) for r in rows]
        for row in out:
            row["detail"] = json.loads(row["detail"] or "{}")
        return out

    def audit_of(self, target_type: str, target_id: int, limit: int = 200) -> list[dict]:
        """The audit entries of one target (an individual's history), newest first."""
        with self.read() as conn:
            rows = conn.execute(select(audit_log).where(audit_log.c.target_type == target_type,
                                                        audit_log.c.target_id == target_id)
                                .order_by(audit_log.c.id.desc()).limit(limit))
            out = [dict(r._mapping) for r in rows]
        for row in out:
            row["detail"] = json.loads(row["detail"] or "{}")
        return out

    def representative_images(self, individual_ids) -> dict[int, list[dict]]:
        """Per individual, its first image of each viewpoint (flank), as {viewpoint, image_id} in viewpoint order
        (unknown last): what a list of individuals shows of each."""
        ids = sorted({int(i) for i in individual_ids})
        if not ids:
            return {}
        with self.read() as conn:
            rows = conn.execute(select(images.c.individual_id, images.c.viewpoint, func.min(images.c.id).label("first"))
                                .where(images.c.individual_id.in_(ids))
                                .group_by(images.c.individual_id, images.c.viewpoint))
            out: dict[int, list[dict]] = {}
            for row in rows:
                out.setdefault(row.individual_id, []).append({"viewpoint": row.viewpoint, "image_id": row.first})
        for flanks in out.values():
            flanks.sort(key=lambda f: (f["viewpoint"] is None, f["viewpoint"] or ""))
        return out

    def counts(self) -> dict:
        with self.read() as conn:
            return {
                "individuals": conn.execute(select(func.count()).select_from(individuals).where(
                    individuals.c.deleted_at.is_(None), individuals.c.merged_into.is_(None))).scalar_one(),
                "images": conn.execute(select(func.count()).select_from(images)).scalar_one(),
            }

    # ------------------------------------------------------------------ reviews
    def record_review(self, review: Review, key_name: str | None) -> int:
        """Store (and audit) one reviewer's verdict; returns its id."""
        if review.verdict not in REVIEW_VERDICTS:
            raise InvalidInput(f"unknown verdict '{review.verdict}': one of {', '.join(REVIEW_VERDICTS)}",
                               code="invalid_verdict")
        values = {**vars(review), "query_sha256": json.dumps(review.query_sha256),
                  "image_ids": json.dumps(review.image_ids)}
        with self.write() as tx:
            review_id = tx.conn.execute(insert(reviews).values(at=tx.now, key_name=key_name, **values)
                                        .returning(reviews.c.id)).scalar_one()
            self.audit(tx, key_name, f"review.{review.verdict}", "review", review_id, species=review.species,
                       candidate_id=review.candidate_id, individual_id=review.individual_id,
                       encounter=review.encounter, animal_index=review.animal_index)
        return review_id

    def reviews_of(self, species: str, after_id: int = 0, limit: int = 10_000) -> list[dict]:
        """The reviews of a species in the order they were made, from `after_id` on (what a threshold refit
        reads: each verdict with the scores the model gave)."""
        with self.read() as conn:
            out = [dict(r._mapping) for r in conn.execute(
                select(reviews).where(reviews.c.species == species, reviews.c.id > after_id)
                .order_by(reviews.c.id).limit(limit))]
        for row in out:
            row["query_sha256"] = json.loads(row["query_sha256"])
            row["image_ids"] = json.loads(row["image_ids"] or "[]")
        return out

    def reviewed_species(self) -> dict[str, int]:
        """The species that have reviews, with how many each."""
        with self.read() as conn:
            return {row[0]: int(row[1]) for row in conn.execute(
                select(reviews.c.species, func.count()).group_by(reviews.c.species).order_by(reviews.c.species))}

    def paths_of_photos(self, digests) -> dict[str, str]:
        """SHA-256 -> the store path (under the store folder) of the first stored image of that photo."""
        wanted, out = sorted(set(digests)), {}
        for start in range(0, len(wanted), 500):
            with self.read() as conn:
                for sha256, path in conn.execute(select(images.c.sha256, images.c.path)
                                                 .where(images.c.sha256.in_(wanted[start:start + 500]))
                                                 .order_by(images.c.id)):
                    out.setdefault(sha256, path)
        return out

    # ------------------------------------------------------------------ model upkeep
    def stale_images(self, species: str, model: str, after_id: int = 0, limit: int = 256) -> list[dict]:
        """Images of a species whose stored embedding came from another model (to be embedded again),
        by id from `after_id` on."""
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(images.c.id, images.c.path, images.c.bbox, images.c.sha256)
                .where(images.c.species == species, images.c.embedding_model != model, images.c.id > after_id)
                .order_by(images.c.id).limit(limit))]

    def referenced_paths(self, paths: list[str]) -> set[str]:
        """Those of these store-relative file paths that some image row names."""
        if not paths:
            return set()
        # files are named by their SHA-256: looked up by the indexed hash, then matched by path
        digests = sorted({Path(p).name.split(".", 1)[0] for p in paths})
        wanted = set(paths)
        with self.read() as conn:
            return {r.path for r in conn.execute(select(images.c.path).where(images.c.sha256.in_(digests))
                                                 .distinct()) if r.path in wanted}

    def set_embeddings(self, vectors: dict[int, np.ndarray], model: str) -> None:
        with self.write() as tx:
            for image_id, vector in vectors.items():
                tx.conn.execute(update(images).where(images.c.id == image_id)
                                .values(embedding=vector_to_blob(vector), embedding_model=model, seq=tx.seq))
            self.audit(tx, "(server start)", "images.reembed", "image", None, count=len(vectors), model=model)
