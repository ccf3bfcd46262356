"""A background action repeated at an interval (the orphan sweep of the store's files)."""
from __future__ import annotations

import threading


class Periodic:
    """Calls `action` every `interval_s` seconds in a daemon thread until stopped (never when 0)."""

    def __init__(self, action, interval_s: float, name: str):
        self.action, self.interval_s = action, interval_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        if self.interval_s > 0:
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.action()
