"""Gallery search: exact (flat) against approximate (the ANN kind `auto` picks for large galleries).

A clustered synthetic gallery stands in for re-ID embeddings: `n` unit vectors, twenty noisy views
around each individual's centre; queries are new views of random individuals. Both indexes are
searched one query at a time, as the service does, and the ANN top-10 is compared with the exact
top-10 (recall@10). Everything is measured in this one run.

    python scripts/bench_index.py                       # 1,000,000 x 512
    python scripts/bench_index.py --n 100000 --kind ivfpq

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.index import GalleryIndex, choose_kind  # noqa: E402

VIEWS = 20


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit vectors, VIEWS noisy views of each centre (centres made when not given, else drawn).

    Every individual has VIEWS photos, so a query's true top-10 are photos of its own individual,
    ordered by how alike the views are, as in a real gallery. With fewer views per individual the
    top-10 would be padded with unrelated vectors of near-zero similarity, ties no index can keep.
    """
    if centres is None:
        centres = rng.standard_normal((max(1, n // VIEWS), dim), dtype=np.float32)
        owners = np.repeat(np.arange(len(centres)), VIEWS)[:n]
    else:
        owners = rng.integers(0, len(centres), n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: the noise of a million rows at once doubles peak memory
        stop = min(start + 100_000, n)
        x[start:stop] = centres[owners[start:stop]]
        x[start:stop] += 0.6 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x, centres


def per_query_ms(gallery: GalleryIndex, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    gallery.search(queries[:5], k)  # warm-up
    ids, times = [], []
    for q in queries:
        started = time.perf_counter()
        ids.append(gallery.search(q[None], k)[1][0])
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times)), np.array(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kind", default="auto", help="ANN kind (default: what kind=auto picks for n)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    x, centres = clustered(args.n, args.dim, rng)
    queries, _ = clustered(args.queries, args.dim, rng, centres)
    kind = choose_kind(args.kind, args.n, ann_threshold=0) if args.kind == "auto" else args.kind
    result = {"n": args.n, "dim": args.dim, "queries": args.queries, "ann_kind": kind,
              "cpu_threads": faiss.omp_get_max_threads()}

    flat = GalleryIndex(args.dim, "flat")
    flat.add(x)
    result["flat_ms"], exact = per_query_ms(flat, queries, 10)
    del flat
    print(f"flat: {result['flat_ms']:.2f} ms/query", flush=True)

    ann = GalleryIndex(args.dim, kind)
    started = time.perf_counter()
    ann.add(x)
    result["ann_build_s"] = round(time.perf_counter() - started, 1)
    print(f"{kind}: built in {result['ann_build_s']} s", flush=True)
    result["ann_ms"], found = per_query_ms(ann, queries, 10)
    result["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
    result["speedup"] = round(result["flat_ms"] / result["ann_ms"], 1)
    result["flat_ms"], result["ann_ms"] = round(result["flat_ms"], 3), round(result["ann_ms"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
