"""Service benchmark: identify latency and throughput under concurrent clients, against offline embedding.

Starts `python -m service serve` (uvicorn, one worker) on a free port with a fresh store, enrolls a
gallery of synthetic individuals (concurrently: enroll throughput), then sends identify requests
(one photo each) from 1, 8 and 32 client threads (keep-alive http.client connections posting
prebuilt bodies: see `Connection`), and measures the offline `Embedder.embed_images` throughput of
the same model and TTA on the same decoded photos, in batches of the server's batch size.
`throughput_ratio` = identify throughput at 32 clients / offline throughput (the share of the
model's speed the service delivers; target >= 0.8). The model
is a random-init resnet18 at 128 px by default (speed does not depend on the weights), or --checkpoint.
The clients run on the same machine and take some of its CPU.

`--gallery-images N` first fills the store with N more images (clustered synthetic vectors stamped
with the server's model, 5 per individual), and `--rerank` serves with k-reciprocal re-ranking
(k1 20, k2 6, the top 100 images re-ranked); its state is built here once and saved as the
snapshot the server loads at start, as a server that has run before would.

    python scripts/bench_service.py
    python scripts/bench_service.py --checkpoint runs/x/best.pt --tta hflip
    python scripts/bench_service.py --gallery-images 100000 --rerank

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.checkpoint import save_random_backbone  # noqa: E402
from reid.data.dataset import read_image  # noqa: E402
from reid.data.synth import make_synthetic_dataset  # noqa: E402


def multipart(fields: dict, files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = "wildreid-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for field, filename, blob in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + blob + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection (http.client) that posts prebuilt bodies.

    The clients run on the server's cores, so every millisecond of client CPU is taken from the
    service being measured: an httpx.Client spent ~0.7 ms of CPU per identify request (of ~15 ms
    in all), http.client a fraction of that. The server's work is unchanged: it still parses the
    multipart body and answers the full JSON, which is read to the end here.
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
                ) -> tuple[int, bytes]:
        self.http.request(method, path, body, headers or {})
        response = self.http.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.http.close()


def run_clients(url: str, clients: int, requests: int, make_request, server_pid: int | None = None) -> dict:
    """`requests` calls spread over `clients` threads, each with its own connection.

    `make_request(connection, n)` returns (status, body) of the n-th request."""
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))
    counter_lock = threading.Lock()

    # connected before the clock starts
    connections = [Connection(url) for _ in range(clients)]
    for connection in connections:
        connection.request("GET", "/health")

    def client(index):
        connection = connections[index]
        while True:
            with counter_lock:
                n = next(counter, None)
            if n is None:
                return
            started = time.perf_counter()
            status, body = make_request(connection, n)
            elapsed = time.perf_counter() - started
            with lock:
                if status in (200, 201):
                    latencies.append(elapsed)
                else:
                    errors.append(f"{status} {body[:200]!r}")

    import resource

    server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
    own = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    for connection in connections:
        connection.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    out = {"clients": clients, "requests": requests, "p50_ms": round(percentile(latencies, 50) * 1000, 1),
           "p99_ms": round(percentile(latencies, 99) * 1000, 1), "req_per_s": round(requests / wall, 1),
           "client_cpu_ms_per_req": round((after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime)
                                          / requests * 1000, 2)}
    if server_pid:
        out["server_cpu_ms_per_req"] = round((cpu_seconds(server_pid) - server_cpu) / requests * 1000, 2)
    return out


def offline_img_per_s(checkpoint: Path, tta: str, arrays: list[np.ndarray], batch_size: int, rounds: int) -> float:
    """`embed_images` throughput in batches of `batch_size`: the best of the main thread and a worker thread.

    (On a busy 2-core machine torch's 2-thread OpenMP team can run several times slower in the main
    thread than in another one; the server embeds in a worker thread. The faster is the fair bar.)
    """
    from reid.embedding.embedder import Embedder

    embedder = Embedder.from_checkpoint(checkpoint, tta=tta, batch_size=batch_size, num_workers=0)

    def measure(out: list) -> None:
        embedder.embed_images(arrays[:batch_size])  # warm-up
        done, started = 0, time.perf_counter()
        for _ in range(rounds):
            for i in range(0, len(arrays), batch_size):
                done += len(embedder.embed_images(arrays[i:i + batch_size]))
        out.append(done / (time.perf_counter() - started))

    results: list[float] = []
    measure(results)
    worker = threading.Thread(target=measure, args=(results,))
    worker.start()
    worker.join()
    return max(results)


def prefill(db, store_dir: Path, checkpoint: Path, tta: str, images: int, rerank: bool) -> None:
    """`images` synthetic vectors of the server's model in the store, and with `rerank` the snapshot of
    their re-ranking state where the server looks for it."""
    from bench_identify import fill

    from reid.embedding import Embedder
    from reid.identify.gallery import Galleries
    from reid.species.crops import embedding_model
    from service.metrics import Metrics
    from service.networks import Models
    from service.settings import build_settings

    settings = build_settings(store_dir=store_dir, checkpoint=checkpoint, tta=tta,
                              rerank="settings" if rerank else "off")
    embedder = Embedder.from_checkpoint(checkpoint, tta=tta, num_workers=0)
    stamp = embedding_model(embedder.fingerprint, settings.crop_settings())
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((images // 5, embedder.embedding_dim)).astype(np.float32)
    print(f"filling the store with {images} synthetic images", flush=True)
    fill(db, rng, centres / np.linalg.norm(centres, axis=1, keepdims=True), 5, stamp)
    if rerank:
        started = time.perf_counter()
        layout = Models(settings, Metrics()).layout  # the server's own layout of each species
        galleries = Galleries(db, layout, snapshot_dir=store_dir / "cache" / "rerank")
        galleries.rebuild()
        galleries.save_snapshots()
        print(f"re-ranking state of {images} images built and saved in {time.perf_counter() - started:.0f} s",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a training checkpoint (default: random-init --backbone)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128, help="model input size of the default model")
    parser.add_argument("--photo-size", type=int, default=256, help="side of the synthetic photos uploaded")
    parser.add_argument("--tta", default="none", choices=["none", "hflip", "flip4"])
    parser.add_argument("--batch-size", type=int, default=32, help="the server's micro-batch (and offline batch)")
    parser.add_argument("--identities", type=int, default=100, help="individuals enrolled (2 photos each)")
    parser.add_argument("--requests", type=int, default=256, help="identify requests at each concurrency "
                                                                    "(at least 8 per client)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--window-ms", type=float, default=2.0, help="the server's micro-batch window")
    parser.add_argument("--threadpool", type=int, help="the server's threadpool_size (default: the setting's)")
    parser.add_argument("--gallery-images", type=int, default=0, help="synthetic images added to the store first")
    parser.add_argument("--rerank", action="store_true", help="serve with k-reciprocal re-ranking")
    args = parser.parse_args()

    import httpx
    import torch

    from service.testing import ServerProcess

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else save_random_backbone(
            tmp / "best.pt", args.backbone, args.image_size, args.batch_size)
        csv = make_synthetic_dataset(tmp / "photos", identities=args.identities, images_per_identity=4, seed=0,
                                     image_size=args.photo_size, progress=False)
        import pandas as pd

        table = pd.read_csv(csv)
        paths = [str(csv.parent / p) for p in table["path"]]
        blobs = [Path(p).read_bytes() for p in paths]
        enroll_blobs = [(f"ind-{i:04d}", blobs[4 * i], blobs[4 * i + 1]) for i in range(args.identities)]
        query_blobs = [blobs[4 * i + 2] for i in range(args.identities)]  # other photos of enrolled individuals

        arrays = [read_image(p) for p in paths[2::4]]  # the identify photos, decoded
        rounds = max(1, 320 // len(arrays))
        offline_before = offline_img_per_s(checkpoint, args.tta, arrays, args.batch_size, rounds)
        threads = torch.get_num_threads()
        settings = tmp / "settings.json"
        settings.write_text(json.dumps({"max_batch": args.batch_size, "batch_window_ms": args.window_ms,
                                        "torch_threads": threads, "tta": args.tta,
                                        "threadpool_size": args.threadpool,
                                        "rerank": "settings" if args.rerank else "off"}))
        store = tmp / "store"
        from reid.store import Store

        db = Store(f"sqlite:///{store / 'wildreid.db'}", sqlite_synchronous="OFF")
        _, key = db.create_key("bench")
        if args.gallery_images:
            prefill(db, store, checkpoint, args.tta, args.gallery_images, args.rerank)
        db.close()
        headers = {"Authorization": f"Bearer {key}"}
        with ServerProcess(store, checkpoint, "--settings", str(settings), log=tmp / "server.log") as server:
            # the request bodies are encoded once, so that the clients (on the same CPU) cost the server little
            enroll_bodies = [multipart({"name": name, "species": "zebra"},
                                       [("images", "a.jpg", a), ("images", "b.jpg", b)]) for name, a, b in enroll_blobs]

            def enroll(connection, n):
                body, content_type = enroll_bodies[n]
                return connection.request("POST", "/v1/individuals", body, {**headers, "Content-Type": content_type})

            pid = server.process.pid
            enrolled = run_clients(server.url, 8, args.identities, enroll, pid)

            bodies = [multipart({"species": "zebra", "top_k": "5"}, [("images", "q.jpg", blob)]) for blob in query_blobs]

            def identify(connection, n):
                body, content_type = bodies[n % len(bodies)]
                return connection.request("POST", "/v1/identify", body, {"Content-Type": content_type})

            run_clients(server.url, 4, 16, identify)  # warm-up
            def batch_totals() -> tuple[float, float, float]:
                """(images, batches, seconds) the model worker has run so far."""
                text = httpx.get(server.url + "/metrics").text
                values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith("wildreid_embed_batch_")}
                return (values["wildreid_embed_batch_images_sum"], values["wildreid_embed_batch_images_count"],
                        values["wildreid_embed_batch_seconds_sum"])

            results = {}
            for c in levels:
                before = batch_totals()
                results[f"c{c}"] = run_clients(server.url, c, max(args.requests, 8 * c), identify, pid)
                images, batches, seconds = (after - b for after, b in zip(batch_totals(), before))
                results[f"c{c}"]["mean_batch"] = round(images / max(1.0, batches), 2)
                # the forward's wall time per image in the server, against 1000 / offline img/s
                results[f"c{c}"]["model_ms_per_image"] = round(1000 * seconds / max(1.0, images), 2)
                print(f"identify c{c}: {results[f'c{c}']}", flush=True)
            metrics = httpx.get(server.url + "/metrics").text
        def metric(name: str) -> float:
            return float(next(line for line in metrics.splitlines() if line.startswith(name + " ")).split()[-1])

        count, total = metric("wildreid_embed_batch_images_count"), metric("wildreid_embed_batch_images_sum")
        model_seconds = metric("wildreid_embed_batch_seconds_sum")

        offline_after = offline_img_per_s(checkpoint, args.tta, arrays, args.batch_size, rounds)
        offline = (offline_before + offline_after) / 2  # before and after the service: drift cancels

    top = results[f"c{max(levels)}"]
    out = {
        "model": "checkpoint" if args.checkpoint else f"{args.backbone}@{args.image_size} random-init",
        "tta": args.tta, "photo_px": args.photo_size, "gallery_individuals": args.identities,
        "gallery_images": 2 * args.identities + args.gallery_images, "rerank": args.rerank, "server_batch": args.batch_size, "torch_threads": threads,
        "identify": {name: {k: v for k, v in r.items()} for name, r in results.items()},
        "p50_ms": results[f"c{min(levels)}"]["p50_ms"], "p99_ms": results[f"c{min(levels)}"]["p99_ms"],
        "throughput_req_per_s": {name: r["req_per_s"] for name, r in results.items()},
        "offline_embed_img_per_s": round(offline, 1),
        "offline_embed_img_per_s_before_after": [round(offline_before, 1), round(offline_after, 1)],
        "throughput_ratio": round(top["req_per_s"] / offline, 3),
        "mean_server_batch": round(total / count, 2) if count else None,
        "server_model_ms_per_image": round(model_seconds / total * 1000, 2) if total else None,
        "enroll_per_s": enrolled["req_per_s"], "enroll_images_per_s": round(2 * enrolled["req_per_s"], 1),
        "enroll_p50_ms": enrolled["p50_ms"], "enroll_server_cpu_ms": enrolled["server_cpu_ms_per_req"],
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],
    }
    print(f"offline embed_images: {out['offline_embed_img_per_s']} img/s; ratio at {max(levels)} clients: "
          f"{out['throughput_ratio']}; enroll: {out['enroll_per_s']} individuals/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
