"""The store's image files: content-addressed atomic writes, integrity (each file is the SHA-256 its
rows name) and orphan sweeps.

Files are content-addressed (STORE/images/ab/<sha256>.ext) and written before the commit that
references them, so a request that fails or is killed between the two leaves an orphan: a file no
image row names. `sweep_orphans` removes those older than a grace period (longer than any request
takes between its write and its commit; `store_file` refreshes the time of a file it finds already
there, so an old orphan uploaded again is not swept under the new row), and temporary files of
writes cut short.

`FileIntegrity` remembers the stored files found corrupt (overwritten, truncated, unreadable) when
served or embedded again, for /ready and the metrics, until the same photo is uploaded again and
`store_file` replaces them.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from reid.errors import DiskFull, RequestError, StorageUnavailable
from reid.io import atomic_path

log = logging.getLogger("wildreid.store")

HASH_CHUNK = 1024 * 1024
SWEEP_BATCH = 500  # files looked up in the database per query


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


MISSING = "the file is missing"


def file_problem(path: Path, sha256: str) -> str | None:
    """Why the stored file at `path` is not the photo of this SHA-256 (None: it is)."""
    try:
        actual = file_sha256(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or exc})"
    if actual != sha256:
        return f"its SHA-256 is {actual}, not the {sha256} recorded (changed on disk)"
    return None


class FileIntegrity:
    """The stored files known to be corrupt: relative path -> what is wrong (thread-safe)."""

    def __init__(self, on_change=None):
        self._corrupt: dict[str, str] = {}
        self._lock = threading.Lock()
        self._on_change = on_change  # called with the number of corrupt files whenever it changes

    def check(self, store_dir: Path, relpath: str, sha256: str, image_id: int | None = None) -> str | None:
        """Hash the stored file; a mismatch is logged and remembered. Returns the problem, None when intact."""
        problem = file_problem(store_dir / relpath, sha256)
        if problem is None:
            self.intact(relpath)
        else:
            log.error("stored image file %s%s is corrupt: %s; upload the photo again to replace it", relpath,
                      f" (image {image_id})" if image_id is not None else "", problem)
            self._set(relpath, problem)
        return problem

    def intact(self, relpath: str) -> None:
        """The file at `relpath` is known good again (verified, or written afresh by `store_file`)."""
        with self._lock:
            if self._corrupt.pop(relpath, None) is None:
                return
            count = len(self._corrupt)
        log.warning("stored image file %s is intact again (the photo was uploaded again)", relpath)
        if self._on_change:
            self._on_change(count)

    def _set(self, relpath: str, problem: str) -> None:
        with self._lock:
            self._corrupt[relpath] = problem
            count = len(self._corrupt)
        if self._on_change:
            self._on_change(count)

    def corrupt(self) -> dict[str, str]:
        with self._lock:
            return dict(self._corrupt)


@dataclass
class SweepResult:
    orphans: int = 0    # image files no row names, removed
    temporary: int = 0  # temporary files of cut-short writes, removed


def sweep_orphans(images_dir: Path, store_relative: str, referenced, grace_s: float,
                  now: float | None = None) -> SweepResult:
    """Remove the files under `images_dir` that no image row names and that are older than `grace_s`.

    `referenced(paths)` answers which of a batch of store-relative paths some row names (the
    database is the truth); paths are `store_relative/ab/name`."""
    result, cutoff = SweepResult(), (time.time() if now is None else now) - grace_s
    batch: list[tuple[str, Path]] = []

    def flush() -> None:
        named = referenced([relpath for relpath, _ in batch])
        for relpath, path in batch:
            # older still: a request that stored this photo again meanwhile has refreshed its time
            if relpath not in named and _older(path, cutoff) and _unlink(path):
                result.orphans += 1
        batch.clear()

    for path in sorted(images_dir.glob("*/*")):
        if not _older(path, cutoff):
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            result.temporary += _unlink(path)
            continue
        batch.append((f"{store_relative}/{path.parent.name}/{path.name}", path))
        if len(batch) >= SWEEP_BATCH:
            flush()
    if batch:
        flush()
    return result


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except OSError:
        return False  # removed meanwhile


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def store_file(store_dir: Path, relpath: str, data: bytes, sha256: str) -> str:
    """Write a photo's bytes at its content address `relpath` (under `store_dir`); return `relpath`.

    A file already there is kept when it is this photo (its SHA-256 checked: a file changed on disk
    is replaced) and its time refreshed, so that the orphan sweep does not take it before the row
    that names it commits. A full disk is a DiskFull and any other failing write a
    StorageUnavailable; the temporary file of a write cut short is removed, so nothing half-written
    is left."""
    path = store_dir / relpath
    try:
        problem = file_problem(path, sha256)
        if problem is None:
            os.utime(path)
        else:
            if problem != MISSING:
                log.warning("replacing stored image file %s: %s", relpath, problem)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            _fsync_dir(path.parent)
    except OSError as exc:
        raise file_write_error(exc, relpath) from None
    return relpath


def file_write_error(exc: OSError, relpath: str) -> RequestError:
    if exc.errno in DISK_FULL:
        return DiskFull("the disk of the image store is full: the photo could not be stored and nothing "
                        "was recorded; free disk space and send the request again")
    return StorageUnavailable(f"the image store could not write {relpath} ({exc.strerror or exc}); nothing was "
                              "recorded, try again")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
