"""Batch identification jobs in the store: many photos identified in the background, one photo at a time,
taken by one instance only, and carried on where they stopped after a restart.

A job is a row of `jobs` and one row of `job_items` per photo. An instance takes the oldest job that is
queued, or running with a heartbeat older than `stale_s` (its instance died), in one transaction that
selects it `FOR UPDATE SKIP LOCKED`: on PostgreSQL a second instance skips the row while the first one
claims it, and then sees it running with a fresh heartbeat (SQLite serialises the claims by its write
lock). The runner beats while it works; each photo's outcome is written when it is done, so a restarted
job identifies only the photos still pending.

Items whose animals need a person (decisions `uncertain` and `new`, or every identified one when the job
asks for it) form the job's review queue: `to_review` counts its animals still undecided.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import and_, case, func, insert, or_, select, update

from reid.errors import Conflict, InvalidInput, NotFound
from reid.store.database import Store, job_items, jobs

QUEUED_DECISIONS = ("uncertain", "new")  # what a person looks at, unless the job reviews every result
MAX_JOB_PHOTOS = 100_000


@dataclass
class Claimed:
    """A job an instance has taken: its row's values when it was claimed."""
    id: int
    name: str
    species: str | None
    folder: str
    review_all: bool
    key_name: str | None
    total: int


class JobQueue:
    def __init__(self, store: Store, stale_s: float = 60.0):
        self.store, self.stale_s = store, float(stale_s)

    # ------------------------------------------------------------------ create and read
    def create(self, name: str, folder: str, files: list[str], species: str | None, review_all: bool,
               key_name: str | None) -> int:
        """A queued job over `files` (paths relative to `folder`), in their order; returns its id."""
        if not files:
            raise InvalidInput(f"no JPEG or PNG photos in {name}: nothing to identify", code="no_images")
        if len(files) > MAX_JOB_PHOTOS:
            raise InvalidInput(f"{len(files)} photos in {name}; a job takes at most {MAX_JOB_PHOTOS}: split the "
                               "folder", code="too_many_photos")
        with self.store.write_aside() as tx:
            job_id = tx.conn.execute(insert(jobs).values(
                created_at=tx.now, key_name=key_name, name=name[:200], species=species, folder=folder,
                review_all=int(review_all), state="queued", total=len(files)).returning(jobs.c.id)).scalar_one()
            tx.conn.execute(insert(job_items), [{"job_id": job_id, "position": i, "file": f, "state": "pending",
                                                 "to_review": 0} for i, f in enumerate(files)])
            self.store.audit(tx, key_name, "job.create", "job", job_id, photos=len(files), species=species)
        return job_id

    def _counts(self):
        return (select(job_items.c.job_id,
                       func.sum(case((job_items.c.state == "done", 1), else_=0)).label("done"),
                       func.sum(case((job_items.c.state == "failed", 1), else_=0)).label("failed"),
                       func.sum(job_items.c.to_review).label("to_review"))
                .group_by(job_items.c.job_id).subquery())

    def _jobs(self, where, limit: int, offset: int = 0) -> list[dict]:
        counts = self._counts()
        query = (select(jobs, func.coalesce(counts.c.done, 0).label("done"),
                        func.coalesce(counts.c.failed, 0).label("failed"),
                        func.coalesce(counts.c.to_review, 0).label("to_review"))
                 .select_from(jobs.outerjoin(counts, counts.c.job_id == jobs.c.id))
                 .where(where).order_by(jobs.c.id.desc()).limit(limit).offset(offset))
        with self.store.read() as conn:
            out = [dict(r._mapping) for r in conn.execute(query)]
        for job in out:
            job["review_all"] = bool(job["review_all"])
            job["processed"] = int(job["done"]) + int(job["failed"])
        return out

    def get(self, job_id: int) -> dict:
        found = self._jobs(jobs.c.id == job_id, 1)
        if not found:
            raise NotFound(f"there is no job {job_id}", code="job_not_found")
        return found[0]

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        return self._jobs(jobs.c.id > 0, limit, offset)

    def items(self, job_id: int, after_position: int = -1, limit: int = 1000) -> list[dict]:
        """A job's photos in order, from `after_position` on, with what became of each."""
        with self.store.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                select(job_items).where(job_items.c.job_id == job_id, job_items.c.position > after_position)
                .order_by(job_items.c.position).limit(limit))]
        for row in rows:
            row["decisions"] = json.loads(row["decisions"]) if row["decisions"] else []
        return rows

    def next_to_review(self, job_id: int, after_position: int = -1) -> dict | None:
        """The first photo of the job's review queue after `after_position` (then from the start), or None."""
        def first(where):
            with self.store.read() as conn:
                row = conn.execute(select(job_items).where(job_items.c.job_id == job_id, job_items.c.to_review > 0,
                                                           where).order_by(job_items.c.position).limit(1)).first()
            return dict(row._mapping) if row else None
        return first(job_items.c.position > after_position) or first(job_items.c.position <= after_position)

    # ------------------------------------------------------------------ the runner's side
    def claim(self) -> Claimed | None:
        """Take the oldest job that is queued, or running with a stale heartbeat; None when there is none."""
        now = time.time()
        claimable = or_(jobs.c.state == "queued",
                        and_(jobs.c.state == "running", or_(jobs.c.heartbeat_at.is_(None),
                                                           jobs.c.heartbeat_at < now - self.stale_s)))
        # looked for first in a read: every idle instance asks every job_poll_s, and a write transaction
        # would take SQLite's one write lock from the enrollments each time
        with self.store.read() as conn:
            if conn.execute(select(jobs.c.id).where(claimable).limit(1)).first() is None:
                return None
        with self.store.write_aside() as tx:
            row = tx.conn.execute(select(jobs).where(claimable).order_by(jobs.c.id).limit(1)
                                  .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            tx.conn.execute(update(jobs).where(jobs.c.id == row.id).values(
                state="running", heartbeat_at=now, started_at=row.started_at or tx.now))
        return Claimed(row.id, row.name, row.species, row.folder, bool(row.review_all), row.key_name, row.total)

    def beat(self, job_id: int) -> str:
        """Renew the claim on a running job; returns its state (the runner stops when it was cancelled)."""
        with self.store.write_aside() as tx:
            tx.conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running")
                            .values(heartbeat_at=time.time()))
            return tx.conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar_one()

    def pending(self, job_id: int, limit: int = 64) -> list[dict]:
        with self.store.read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(job_items.c.id, job_items.c.position, job_items.c.file)
                .where(job_items.c.job_id == job_id, job_items.c.state == "pending")
                .order_by(job_items.c.position).limit(limit))]

    def item_done(self, item_id: int, encounter: str | None, decisions: list[str], to_review: int,
                  error: str | None = None) -> None:
        """Record what became of one photo: its encounter and decisions, or why it failed."""
        with self.store.write_aside() as tx:
            tx.conn.execute(update(job_items).where(job_items.c.id == item_id).values(
                state="failed" if error else "done", encounter=encounter, decisions=json.dumps(decisions),
                to_review=to_review, error=error))

    def set_to_review(self, item_id: int, to_review: int) -> None:
        with self.store.write_aside() as tx:
            tx.conn.execute(update(job_items).where(job_items.c.id == item_id).values(to_review=to_review))

    def finish(self, job_id: int, error: str | None = None) -> None:
        """A running job ends: done, or failed with `error` (a cancelled one stays cancelled)."""
        with self.store.write_aside() as tx:
            tx.conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running").values(
                state="failed" if error else "done", error=error, finished_at=tx.now, heartbeat_at=None))

    def cancel(self, job_id: int, key_name: str | None) -> None:
        job = self.get(job_id)
        if job["state"] not in ("queued", "running"):
            raise Conflict(f"job {job_id} is {job['state']} already", code="job_finished")
        with self.store.write_aside() as tx:
            tx.conn.execute(update(jobs).where(jobs.c.id == job_id).values(state="cancelled", finished_at=tx.now))
            self.store.audit(tx, key_name, "job.cancel", "job", job_id)


def review_count(decisions: list[str], review_all: bool) -> int:
    """How many of a photo's animals (by decision) go to the review queue."""
    identified = [d for d in decisions if d in ("match", "uncertain", "new")]
    return len(identified) if review_all else sum(d in QUEUED_DECISIONS for d in identified)
