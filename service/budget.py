"""A memory budget for decoding photos: process-wide, and per request.

A small file can decode to a huge array (a 7000 x 7000 single-colour PNG is 47 KB and 196 MB
decoded), so the bytes a decode needs are reserved before it starts: `Lease.reserve` waits until
the process-wide budget has room (which bounds concurrent decoding), and refuses with 413 what
no budget could ever hold, naming the limit. The bytes of what a request keeps (its decoded,
reduced photos) stay reserved until the request ends (`Lease.close`); the rest of a decode's
reservation is handed back as soon as the decode is done.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from reid.errors import TooLarge
from service.errors import ApiError

MB = 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_ALLOCATION = 4 * MB


def return_large_frees_to_the_os() -> bool:
    """Make glibc serve allocations of 4 MB and more (Pillow's 16 MB image blocks) by mmap, always.

    By default glibc raises that threshold after such a block is freed, so later blocks come from
    its per-thread arenas, which keep freed memory: with many threads decoding, resident memory
    grew to about three times what the budget let decode at once. A fixed threshold hands each
    block back to the system when it is freed. Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION))
    except (OSError, AttributeError):
        return False


class DecodingBusy(ApiError):
    status, code = 503, "decoding_busy"


def megabytes(nbytes: int) -> str:
    return f"{nbytes / MB:.0f} MB"


class MemoryBudget:
    def __init__(self, total_bytes: int, per_request_bytes: int, wait_s: float,
                 on_change: Callable[[int], None] | None = None):
        self.total, self.per_request, self.wait_s = total_bytes, per_request_bytes, wait_s
        self.used = 0
        self._cond = threading.Condition()
        self._waiting: list[_Waiter] = []  # in arrival order
        self._on_change = on_change  # called with the bytes in use whenever they change

    def lease(self) -> "Lease":
        return Lease(self)

    def _take(self, nbytes: int, what: str) -> None:
        """Reserve `nbytes`, waiting for room: first come, first served, except that a reservation that
        fits beside the first waiter's (a small photo) need not wait behind it."""
        deadline = time.monotonic() + self.wait_s
        me = _Waiter(nbytes)
        with self._cond:
            self._waiting.append(me)
            try:
                while not self._fits(me):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodingBusy(f"the server is decoding other photos: {what} needs {megabytes(nbytes)} "
                                           f"of its decoding budget of {megabytes(self.total)} "
                                           f"(decode_budget_bytes), which stayed in use for {self.wait_s:g} s; "
                                           "try again")
                    self._cond.wait(remaining)
                self.used += nbytes
                used = self.used
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()  # the next waiter may be first now
        if self._on_change:
            self._on_change(used)

    def _fits(self, me: "_Waiter") -> bool:
        first = self._waiting[0]
        return self.used + me.nbytes + (0 if first is me else first.nbytes) <= self.total

    def _give(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._cond:
            self.used -= nbytes
            used = self.used
            self._cond.notify_all()
        if self._on_change:
            self._on_change(used)


class _Waiter:
    """A reservation waiting for room (compared by identity)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


class Lease:
    """One request's share of the budget (thread-safe: its photos may be decoded in several threads)."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0
        self._lock = threading.Lock()

    def allowance(self) -> int:
        """The most one more decode of this request may take."""
        return min(self.budget.per_request - self.held, self.budget.total)

    def check(self, nbytes: int, what: str) -> None:
        """413 when `nbytes` more could never fit this request's budget or the process's."""
        budget = self.budget
        if self.held + nbytes > budget.per_request:
            raise TooLarge(f"{what} needs {megabytes(nbytes)} to decode; with the request's other photos "
                                  f"({megabytes(self.held)}) that is past the per-request decoding budget of "
                                  f"{megabytes(budget.per_request)} (request_decode_budget_bytes): send fewer or "
                                  "smaller photos, or JPEGs (decoded at a reduced scale)", code="decode_budget")
        if nbytes > budget.total:
            raise TooLarge(f"{what} needs {megabytes(nbytes)} to decode, more than the server's decoding "
                                  f"budget of {megabytes(budget.total)} (decode_budget_bytes)", code="decode_budget")

    @contextmanager
    def decoding(self, nbytes: int, what: str) -> Iterator[Callable[[int], None]]:
        """Hold `nbytes` while decoding; the body calls `keep(k)` with the bytes it keeps past the decode
        (held until `close`), and the rest is handed back when it ends."""
        self.check(nbytes, what)
        self.budget._take(nbytes, what)
        kept = {"bytes": 0}

        def keep(k: int) -> None:
            kept["bytes"] = min(int(k), nbytes)

        try:
            yield keep
        finally:
            with self._lock:
                self.held += kept["bytes"]
            self.budget._give(nbytes - kept["bytes"])

    def close(self) -> None:
        with self._lock:
            held, self.held = self.held, 0
        self.budget._give(held)
