"""One writer per run folder: `reid train` / `reid cv` hold a lock on `RUN/.lock` while they write.

Two processes resuming the same run would interleave their checkpoints, metrics and summaries; the
second one is refused at once with a message instead. The lock is an OS file lock (filelock), so it
goes away with its process, even one killed with SIGKILL: a crashed run never leaves a stale lock.
Under torchrun only the main process, the only one that writes, takes it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from reid.errors import ReidError
from reid.train import distributed

LOCK_NAME = ".lock"


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder`'s lock for the block, or raise ReidError at once when another process holds it."""
    if not distributed.init().is_main:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ReidError(f"'{folder}' is being written by another process (a `reid train` or `reid cv` on the same "
                        "--out holds its lock): wait for it to end, or stop it, before resuming; two writers "
                        "would mix their checkpoints") from None
    try:
        yield
    finally:
        lock.release()
