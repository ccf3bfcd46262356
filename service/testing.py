"""Helpers for testing and benchmarking the service: a real server process, crafted uploads."""
from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode(array: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of an encoded image, as an interrupted upload leaves it."""
    return data[: max(16, int(len(data) * keep))]


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The error of an answer that must be `status` with `{"error": {"code": code, "message": ...}}`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def png_with_dimensions(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (how a decompression bomb announces itself)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


class ServerProcess:
    """`python -m service serve ...` in a subprocess on a free port; `kill()` sends SIGKILL."""

    def __init__(self, store: Path, checkpoint: Path, *extra: str, port: int | None = None, env: dict | None = None,
                 log: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "service", "serve", "--store", str(store), "--checkpoint", str(checkpoint),
                     "--port", str(self.port), "--log-level", "warning", *extra]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        import httpx

        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} before answering"
                                   + (f"; see {self.log}" if self.log else ""))
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not become ready within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, as a crash or the OOM killer does it."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ThreadedServer:
    """An app served by uvicorn in a thread of this process (for tests that need real HTTP/1.1
    connections but also the app's objects, e.g. to inject a fault)."""

    def __init__(self, app, **config):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))
        self.thread = None

    def __enter__(self) -> "ThreadedServer":
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the threaded server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
