"""Service memory benchmark: decompression-bomb-sized uploads within the limits, from many clients at once.

Starts `python -m service serve` (uvicorn, one worker) on a free port with a fresh store and a few
enrolled individuals, then `--clients` threads each send `--requests` identify requests of
`--images` PNGs of one colour, `--size` x `--size` pixels (7000 x 7000: 47 KB each, 49 of the 50
megapixels allowed, 196 MB decoded by Pillow). Meanwhile one more client sends an ordinary
identify (one small JPEG) every `--probe-interval` s. The server's resident memory (VmRSS, from
/proc) is sampled every 20 ms: `peak_rss_above_idle_gb` is its peak minus its idle RSS before the
load, `rss_after_above_idle_gb` what is still resident once the load is over. The run passes
(`ok`) when that peak is under `--bound-gb` (3 GB: a 2-core, 24 GB machine), no answer is a 5xx,
and every ordinary identify is answered 200. The model is a random-init resnet18 at 128 px
(decoding memory does not depend on it).

    python scripts/bench_service_memory.py
    python scripts/bench_service_memory.py --clients 16 --images 1     # the issue's second case

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.checkpoint import save_random_backbone  # noqa: E402
from scripts.bench_service import Connection, multipart, percentile  # noqa: E402

GB = 1024 ** 3


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler(threading.Thread):
    """The peak resident memory of a process, sampled every `interval_s`."""

    def __init__(self, pid: int, interval_s: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval_s)


def single_colour_png(size: int, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def small_jpeg(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1, help="identify requests per client")
    parser.add_argument("--images", type=int, default=10, help="PNGs per request")
    parser.add_argument("--size", type=int, default=7000, help="side of each PNG")
    parser.add_argument("--probe-interval", type=float, default=0.5, help="seconds between ordinary identifies")
    parser.add_argument("--bound-gb", type=float, default=3.0, help="the most the peak RSS may rise above idle")
    parser.add_argument("--settings", help="JSON of further server settings (e.g. decode_budget_bytes)")
    args = parser.parse_args()

    from reid.store import Store
    from service.testing import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = save_random_backbone(tmp / "best.pt", "resnet18", 128, 32)
        settings = tmp / "settings.json"
        settings.write_text(args.settings or "{}")
        store = tmp / "store"
        _, key = Store(f"sqlite:///{store / 'wildreid.db'}").create_key("bench")
        bombs = [single_colour_png(args.size, (40 + 20 * i, 80, 120)) for i in range(args.images)]
        bomb_body = multipart({"species": "zebra"}, [("images", f"bomb{i}.png", b) for i, b in enumerate(bombs)])
        gallery = [small_jpeg(i) for i in range(8)]
        with ServerProcess(store, checkpoint, "--settings", str(settings), log=tmp / "server.log") as server:
            pid = server.process.pid
            setup = Connection(server.url)
            for i, photo in enumerate(gallery):
                body, content_type = multipart({"name": f"ind-{i}", "species": "zebra"}, [("images", "a.jpg", photo)])
                status, text = setup.request("POST", "/v1/individuals", body, {
                    "Content-Type": content_type, "Authorization": f"Bearer {key}"})
                assert status == 201, text
            probe_body = multipart({"species": "zebra"}, [("images", "q.jpg", gallery[0])])
            for _ in range(3):  # warm: the first requests load lazily built parts
                setup.request("POST", "/v1/identify", probe_body[0], {"Content-Type": probe_body[1]})
            setup.close()
            time.sleep(1.0)
            idle = rss_bytes(pid)
            sampler = RssSampler(pid)
            sampler.start()

            statuses, bomb_seconds, lock = Counter(), [], threading.Lock()
            probe_seconds, probe_statuses, done = [], Counter(), threading.Event()

            def connect() -> Connection:
                connection = Connection(server.url)
                connection.http.timeout = 1800  # requests queue for the decoding budget: slow, not failed
                return connection

            def client(index: int) -> None:
                connection = connect()
                for _ in range(args.requests):
                    started = time.perf_counter()
                    try:
                        status, _ = connection.request("POST", "/v1/identify", bomb_body[0],
                                                       {"Content-Type": bomb_body[1]})
                    except OSError as exc:
                        status = f"error: {type(exc).__name__}"
                        connection.close()
                        connection = connect()
                    with lock:
                        statuses[str(status)] += 1
                        bomb_seconds.append(time.perf_counter() - started)
                connection.close()

            def probe() -> None:
                connection = connect()
                while not done.is_set():
                    started = time.perf_counter()
                    status, _ = connection.request("POST", "/v1/identify", probe_body[0],
                                                   {"Content-Type": probe_body[1]})
                    probe_statuses[str(status)] += 1
                    probe_seconds.append(time.perf_counter() - started)
                    done.wait(args.probe_interval)
                connection.close()

            started = time.perf_counter()
            prober = threading.Thread(target=probe)
            prober.start()
            clients = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            wall = time.perf_counter() - started
            done.set()
            prober.join()
            time.sleep(1.0)
            sampler.stop.set()
            sampler.join()
            after = rss_bytes(pid)

    peak_above = (sampler.peak - idle) / GB
    server_errors = sum(n for s, n in statuses.items() if not s.isdigit() or int(s) >= 500)
    out = {
        "clients": args.clients, "requests_per_client": args.requests, "pngs_per_request": args.images,
        "png_side": args.size, "png_bytes": len(bombs[0]),
        "idle_rss_gb": round(idle / GB, 3), "peak_rss_gb": round(sampler.peak / GB, 3),
        "peak_rss_above_idle_gb": round(peak_above, 3), "rss_after_above_idle_gb": round((after - idle) / GB, 3),
        "bound_gb": args.bound_gb, "statuses": dict(statuses), "server_errors": server_errors,
        "bomb_request_s_p50": round(percentile(bomb_seconds, 50), 2),
        "bomb_request_s_max": round(max(bomb_seconds), 2), "wall_s": round(wall, 1),
        "probe_requests": sum(probe_statuses.values()), "probe_statuses": dict(probe_statuses),
        "probe_s_p50": round(percentile(probe_seconds, 50), 3), "probe_s_max": round(max(probe_seconds), 3),
    }
    out["ok"] = bool(peak_above < args.bound_gb and server_errors == 0
                     and set(probe_statuses) == {"200"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
