"""Identification core benchmark: re-ranked galleries of a 100,000-image store.

    python scripts/bench_identify.py                          # 100,000 images x 512, 5 per individual
    python scripts/bench_identify.py --images 20000 --dim 128 # a quick look

A SQLite store is filled with clustered synthetic unit vectors (each individual's photos around its
own centre, cos ~ 0.3-0.5 between views, as in scripts/bench_rerank.py), then, for one species:

  * rebuild_s: today's start without re-ranking (read every row, build the FAISS gallery);
  * build_s: the first start with k-reciprocal re-ranking (every image's exact neighbours), and
    save_s, the snapshot it writes;
  * start_s: a later start, which loads the snapshot and checks it against the store's rows
    (`start_ratio` = start_s / rebuild_s, target <= 2); start_after_changes_s: the same after the
    enrolls, merge, delete and restore below, which the start applies to the older snapshot;
  * enroll_ms: enrolling one photo (store transaction + the gallery's sync, which updates the
    re-ranking state in place), mean and p99 over --enrolls;
  * update_ms: the re-ranking state's own update within that sync (target <= 20 ms an image);
  * identify_ms: a query identified (alpha-QE off, k-reciprocal over the top 100 images, candidates
    grouped into individuals, decision), p50 and p99 over --queries, one client;
  * state_ratio: the re-ranking state's memory beyond the vectors, over the vectors' bytes (target <= 2);
  * exact: after the enrolls, a merge, a delete and a restore, the synced gallery answers exactly
    what a gallery built afresh from the store answers.

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.evaluation.evaluate import RerankOptions  # noqa: E402
from reid.identify.gallery import Galleries, Layout  # noqa: E402
from reid.identify.identify import identify  # noqa: E402
from reid.store import NewImage, Store  # noqa: E402

SPECIES, STAMP = "zebra", "bench-model"
NOISE = 1.2
THRESHOLDS = {"match_threshold": 0.7, "new_threshold": 0.5}


def log(message: str) -> None:
    print(message, flush=True)


def views(rng: np.random.Generator, centre: np.ndarray, count: int) -> np.ndarray:
    rows = centre + NOISE * rng.standard_normal((count, len(centre)), dtype=np.float32) / np.sqrt(len(centre))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def fill(store: Store, rng: np.random.Generator, centres: np.ndarray, per_individual: int,
         stamp: str = STAMP) -> list[int]:
    """One zebra per centre, `per_individual` photos each, their vectors stamped as made by `stamp`; their ids."""
    ids, serial = [], 0
    for number, centre in enumerate(centres):
        photos = []
        for vector in views(rng, centre, per_individual):
            serial += 1
            photos.append(NewImage(f"{serial:064x}", f"images/{serial}.jpg", "image/jpeg", 8, 8, 100, vector))
        ids.append(store.enroll(f"ind-{number}", SPECIES, photos, stamp, "bench")["individual_id"])
        if number % 5000 == 0:
            log(f"  filled {serial} images")
    return ids


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def answers(galleries: Galleries, queries: np.ndarray) -> list:
    return [[(c.individual_id, c.score, c.cosine) for c in galleries.search(SPECIES, q, 5)] for q in queries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-individual", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--enrolls", type=int, default=100)
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    individuals = args.images // args.per_individual
    centres = rng.standard_normal((individuals, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    plain = Layout(STAMP, args.dim)
    reranked = Layout(STAMP, args.dim, RerankOptions(k_reciprocal=True, k1=args.k1, k2=args.k2), "settings")
    out = {"images": individuals * args.per_individual, "dim": args.dim, "k1": args.k1, "k2": args.k2}
    with tempfile.TemporaryDirectory() as tmp:
        url, snapshots = f"sqlite:///{Path(tmp) / 'wildreid.db'}", Path(tmp) / "rerank"
        store = Store(url, sqlite_synchronous="OFF")
        log(f"filling a store with {out['images']} images of {individuals} individuals")
        ids = fill(store, rng, centres, args.per_individual)

        started = time.perf_counter()
        Galleries(store, lambda species: plain).rebuild()
        out["rebuild_s"] = round(time.perf_counter() - started, 2)
        log(f"rebuild without re-ranking: {out['rebuild_s']} s")

        started = time.perf_counter()
        galleries = Galleries(store, lambda species: reranked, snapshot_dir=snapshots)
        galleries.rebuild()
        out["build_s"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        galleries.save_snapshots()
        out["save_s"] = round(time.perf_counter() - started, 2)
        log(f"first start with re-ranking: {out['build_s']} s (snapshot {out['save_s']} s)")
        started = time.perf_counter()
        Galleries(store, lambda species: reranked, snapshot_dir=snapshots).rebuild()
        out["start_s"] = round(time.perf_counter() - started, 2)
        out["start_ratio"] = round(out["start_s"] / out["rebuild_s"], 3)
        log(f"start from the snapshot: {out['start_s']} s ({out['start_ratio']}x the rebuild without re-ranking)")

        state = galleries.by_species[SPECIES].state
        memory = state.memory()
        out["state_bytes"], out["vectors_bytes"] = memory["state"], memory["vectors"]
        out["state_ratio"] = round(memory["state"] / memory["vectors"], 3)

        chosen = rng.integers(0, individuals, args.queries)
        queries = np.stack([views(rng, centres[i], 1)[0] for i in chosen])
        times = []
        for query in queries:
            started = time.perf_counter()
            identify(galleries, SPECIES, query[None, :], THRESHOLDS, 5)
            times.append(1000 * (time.perf_counter() - started))
        out["identify_ms_p50"], out["identify_ms_p99"] = percentile(times, 50), percentile(times, 99)
        log(f"identify: p50 {out['identify_ms_p50']} ms, p99 {out['identify_ms_p99']} ms")

        enroll_times, sync_times, serial = [], [], 10 ** 9
        for i in rng.integers(0, individuals, args.enrolls):
            serial += 1
            photo = NewImage(f"{serial:064x}", f"images/{serial}.jpg", "image/jpeg", 8, 8, 100,
                             views(rng, centres[i], 1)[0])
            started = time.perf_counter()
            store.add_sighting(ids[i], [photo], STAMP, "bench")
            synced = time.perf_counter()
            galleries.sync()
            done = time.perf_counter()
            enroll_times.append(1000 * (done - started))
            sync_times.append(1000 * (done - synced))
        out["enroll_ms_mean"], out["enroll_ms_p99"] = round(float(np.mean(enroll_times)), 2), percentile(enroll_times, 99)
        out["update_ms_mean"], out["update_ms_p99"] = round(float(np.mean(sync_times)), 2), percentile(sync_times, 99)
        log(f"enroll one photo: {out['enroll_ms_mean']} ms (the gallery's sync {out['update_ms_mean']} ms)")

        store.merge(ids[0], ids[1], "bench")
        store.set_deleted(ids[2], True, "bench")
        store.set_deleted(ids[3], True, "bench")
        store.set_deleted(ids[3], False, "bench")
        galleries.sync()
        started = time.perf_counter()
        restarted = Galleries(store, lambda species: reranked, snapshot_dir=snapshots)
        restarted.rebuild()  # the snapshot predates the enrolls, merge and deletes: they are applied now
        out["start_after_changes_s"] = round(time.perf_counter() - started, 2)
        log(f"start from the snapshot, {args.enrolls + 10} image changes behind: {out['start_after_changes_s']} s")
        probe = queries[:20]
        out["exact"] = answers(galleries, probe) == answers(restarted, probe)
        store.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
