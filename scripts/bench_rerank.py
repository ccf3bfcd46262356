"""Re-ranking benchmark: online latency on a large gallery, offline peak memory, dense agreement.

    python scripts/bench_rerank.py                              # 100,000 x 512 gallery
    python scripts/bench_rerank.py --gallery 20000 --dim 128    # a quick look

Three measurements on clustered synthetic unit vectors (identities with several noisy views):
  * online: OnlineKReciprocal built once on the gallery, then queries re-ranked one at a time
    (top 100 candidates); median milliseconds per query, and the one-off precompute.
  * offline memory: KReciprocal on 2,000 queries + 18,000 gallery items (20,000 embeddings, --dim),
    consumed chunk by chunk through topk(100), in a fresh process; peak RSS (ru_maxrss) minus its
    value after imports and data creation.
  * dense agreement: KReciprocal against the dense reference on 1,000 queries + 4,000 gallery items:
    identical top-10 for every query, and the largest distance difference.

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.rerank import KReciprocal, OnlineKReciprocal, dense_k_reciprocal  # noqa: E402

VIEWS = 5  # gallery views per identity
NOISE = 1.5  # noise norm relative to the unit centre: views of one identity have cos ~ 0.3
GENERATE_ROWS = 1024  # rows generated at once: data creation must not leave a peak that hides the measured one


def log(message: str) -> None:
    print(message, flush=True)


def noisy_views(rng: np.random.Generator, centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One float32 unit vector per label: its centre plus isotropic noise of norm ~NOISE."""
    dim = centres.shape[1]
    views = np.empty((len(labels), dim), dtype=np.float32)
    for start in range(0, len(labels), GENERATE_ROWS):
        part = slice(start, start + GENERATE_ROWS)
        rows = rng.standard_normal((len(labels[part]), dim), dtype=np.float32)
        rows *= NOISE / np.sqrt(dim)
        rows += centres[labels[part]]
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        views[part] = rows
    return views


def query_gallery(seed: int, n_query: int, n_gallery: int, dim: int) -> tuple[np.ndarray, ...]:
    """A gallery of n_gallery views, VIEWS per identity, and n_query further views of identities
    that have all VIEWS in the gallery: (query, gallery, query labels, gallery labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((-(-n_gallery // VIEWS), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery_labels = np.repeat(np.arange(len(centres)), VIEWS)[:n_gallery]
    query_labels = rng.integers(0, n_gallery // VIEWS, n_query)
    return (noisy_views(rng, centres, query_labels), noisy_views(rng, centres, gallery_labels),
            query_labels, gallery_labels)


def online_latency(args: argparse.Namespace, n_query: int) -> dict:
    query, gallery, query_labels, gallery_labels = query_gallery(args.seed, n_query, args.gallery, args.dim)
    log(f"online: building OnlineKReciprocal on {len(gallery)} x {args.dim} ...")
    started = time.perf_counter()
    online = OnlineKReciprocal(gallery)
    precompute_s = time.perf_counter() - started
    log(f"online: precompute {precompute_s:.1f} s; re-ranking {n_query} queries one at a time")
    online.rerank(query[:5])  # warm-up: first-call allocations
    times, top1 = [], []
    for row in query:
        started = time.perf_counter()
        _, indices = online.rerank(row[None, :], candidates=100)
        times.append(time.perf_counter() - started)
        top1.append(indices[0, 0])
    plain_top1 = np.argmax(query @ gallery.T, axis=1)
    return {
        "gallery": len(gallery),
        "online_ms_per_query": round(1e3 * float(np.median(times)), 2),
        "online_ms_p90": round(1e3 * float(np.percentile(times, 90)), 2),
        "online_precompute_s": round(precompute_s, 1),
        "online_top1_accuracy": round(float(np.mean(gallery_labels[top1] == query_labels)), 3),
        "plain_top1_accuracy": round(float(np.mean(gallery_labels[plain_top1] == query_labels)), 3),
    }


def offline_peak(seed: int, dim: int, results: multiprocessing.Queue) -> None:
    """In a fresh process: peak RSS growth of whole-set re-ranking, 2,000 queries + 18,000 gallery."""
    query, gallery, _, _ = query_gallery(seed, 2000, 18000, dim)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    KReciprocal(query, gallery).topk(100)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results.put(((peak_kb - baseline_kb) / 1024, baseline_kb / 1024, seconds))


def offline_memory(args: argparse.Namespace) -> dict:
    log("offline: KReciprocal on 2000 queries + 18000 gallery in a fresh process ...")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=offline_peak, args=(args.seed, args.dim, results))
    child.start()
    peak_mb, baseline_mb, seconds = results.get()
    child.join()
    log(f"offline: {seconds:.1f} s, peak RSS +{peak_mb:.0f} MB over {baseline_mb:.0f} MB after imports and data")
    return {
        "offline_peak_mb_20k": round(peak_mb, 1),
        "offline_set_20k": "2000 queries + 18000 gallery, topk(100) consumed in chunks",
        "offline_s_20k": round(seconds, 1),
    }


def dense_agreement(args: argparse.Namespace) -> dict:
    query, gallery, _, _ = query_gallery(args.seed + 1, 1000, 4000, args.dim)
    log("agreement: dense reference on 1000 queries + 4000 gallery ...")
    started = time.perf_counter()
    dense = dense_k_reciprocal(query, gallery)
    dense_s = time.perf_counter() - started
    started = time.perf_counter()
    reranker = KReciprocal(query, gallery)
    _, indices = reranker.topk(10)
    sparse_s = time.perf_counter() - started
    max_difference = float(np.abs(reranker.distances(0, len(query)) - dense).max())
    agree = bool(np.array_equal(indices, np.argsort(dense, axis=1, kind="stable")[:, :10]))
    log(f"agreement: dense {dense_s:.1f} s, sparse {sparse_s:.1f} s, identical top-10 {agree}, "
        f"max |difference| {max_difference:.2e}")
    return {"dense_agreement": agree, "dense_max_abs_difference": max_difference,
            "dense_s_5k": round(dense_s, 1), "sparse_s_5k": round(sparse_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000, help="online gallery size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=200, help="online queries timed")
    args = parser.parse_args()
    log(f"cpu threads: {faiss.omp_get_max_threads()}")
    # Memory first: a child process starts with its parent's peak RSS (kept across fork and exec),
    # so the parent must still be small when the child is started.
    result = {**offline_memory(args), **dense_agreement(args), **online_latency(args, args.queries),
              "dim": args.dim, "cpu_threads": faiss.omp_get_max_threads()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
