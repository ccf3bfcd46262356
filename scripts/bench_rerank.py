"""Re-ranking benchmark: the incremental OnlineKReciprocal on a large gallery (build, add, remove,
query, snapshot), its exactness against a state built at once, the offline KReciprocal's peak
memory and its agreement with the dense reference.

    python scripts/bench_rerank.py                              # 100,000 x 512 gallery (~2.5 min on 2 cores)
    python scripts/bench_rerank.py --gallery 20000 --dim 128    # a quick look
    python scripts/bench_rerank.py --no-offline --no-dense      # the online state only

On clustered synthetic unit vectors (identities with several noisy views):
  * build: OnlineKReciprocal on the gallery, once; the exact neighbour search of the gallery against
    itself, O(n^2·dim), dominates.
  * query: rerank(q, 100), one query at a time: p50 and p99 ms, and top-1 identity accuracy with
    and without re-ranking.
  * add: single enrolments of new views under new keys; remove: single deletions of random
    gallery items; restore: those items added back. Mean and p99 ms of each.
  * memory: bytes the state holds beyond the vectors, against the vectors' own bytes.
  * snapshot: save to an uncompressed .npz, then load (best of 3), against building a plain
    faiss.IndexFlatIP from the same vectors (best of 3: a copy of the vectors, what any index costs).
  * exactness: on a smaller gallery (--exact-gallery), --exact-updates adds and as many removes
    (some re-adds of removed keys) in random order; then every answer (rerank and search of 100
    queries) against a state built at once from the remaining items.
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
import tempfile
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


def milliseconds(times: list[float]) -> dict[str, float]:
    values = 1e3 * np.asarray(times)
    return {"mean": round(float(values.mean()), 2), "p50": round(float(np.median(values)), 2),
            "p99": round(float(np.percentile(values, 99)), 2)}


def timed_each(function, items) -> list[float]:
    """Seconds each call function(item) took."""
    times = []
    for item in items:
        started = time.perf_counter()
        function(item)
        times.append(time.perf_counter() - started)
    return times


def best_of(function, repeats: int = 3) -> tuple[float, object]:
    """The fastest of `repeats` calls, in seconds, and the last result."""
    best, result = np.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def plain_index(vectors: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def same_answers(state: OnlineKReciprocal, reference: OnlineKReciprocal, queries: np.ndarray) -> tuple[bool, float]:
    """(identical keys and cosines everywhere, largest |distance difference|) of rerank and search."""
    got, expected = state.rerank(queries, 100), reference.rerank(queries, 100)
    searched, searched_reference = state.search(queries, 100), reference.search(queries, 100)
    identical = (np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
                 and all(np.array_equal(a, b) for a, b in zip(searched, searched_reference)))
    return identical, float(np.abs(got[0] - expected[0]).max())


def online(args: argparse.Namespace) -> dict:
    updates = args.updates
    query, gallery, query_labels, gallery_labels = query_gallery(args.seed, args.queries, args.gallery + updates,
                                                                 args.dim)
    gallery, new_views = gallery[:args.gallery], gallery[args.gallery:]
    log(f"online: building OnlineKReciprocal on {len(gallery)} x {args.dim} ...")
    started = time.perf_counter()
    state = OnlineKReciprocal(gallery, keys=np.arange(len(gallery)))
    build_s = time.perf_counter() - started
    memory = state.memory()
    log(f"online: built in {build_s:.1f} s; state {memory['state'] / 2 ** 20:.0f} MiB beyond "
        f"{memory['vectors'] / 2 ** 20:.0f} MiB of vectors")

    state.rerank(query[:5])  # warm-up: first-call allocations
    top1 = []
    query_times = timed_each(lambda row: top1.append(state.rerank(row[None, :], candidates=100)[1][0, 0]), query)
    plain_top1 = state.search(query, 1)[1][:, 0]
    new_keys = np.arange(len(gallery), len(gallery) + updates)
    add_times = timed_each(lambda i: state.add(new_views[i:i + 1], new_keys[i:i + 1]), range(updates))
    removed = np.random.default_rng(args.seed + 2).choice(len(gallery), updates, replace=False)
    remove_times = timed_each(lambda key: state.remove([key]), removed)
    restore_times = timed_each(lambda key: state.add(gallery[key:key + 1], [key]), removed)
    adds, removes, restores, queries = (milliseconds(t) for t in (add_times, remove_times, restore_times, query_times))
    log(f"online: query p50 {queries['p50']} ms p99 {queries['p99']} ms; add mean {adds['mean']} ms "
        f"p99 {adds['p99']} ms; remove mean {removes['mean']} ms p99 {removes['p99']} ms; "
        f"restore mean {restores['mean']} ms")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.npz"
        started = time.perf_counter()
        state.save(path)
        save_s = time.perf_counter() - started
        load_s, loaded = best_of(lambda: OnlineKReciprocal.load(path))
        snapshot_bytes = path.stat().st_size
    vectors = state.vectors_of(state.keys)
    plain_index_s, _ = best_of(lambda: plain_index(vectors))
    load_equal, _ = same_answers(loaded, state, query[:20])
    log(f"online: save {save_s:.2f} s, load {load_s:.2f} s, plain IndexFlatIP {plain_index_s:.2f} s, "
        f"loaded state answers identically: {load_equal}")
    return {
        "gallery": len(gallery), "dim": args.dim, "build_s": round(build_s, 1),
        "load_s": round(load_s, 3), "plain_index_s": round(plain_index_s, 3),
        "load_ratio": round(load_s / plain_index_s, 2), "save_s": round(save_s, 2),
        "snapshot_bytes": snapshot_bytes, "load_equal": load_equal,
        "add_ms_mean": adds["mean"], "add_ms_p99": adds["p99"],
        "remove_ms_mean": removes["mean"], "remove_ms_p99": removes["p99"],
        "restore_ms_mean": restores["mean"], "restore_ms_p99": restores["p99"],
        "query_ms_p50": queries["p50"], "query_ms_p99": queries["p99"], "updates_timed": updates,
        "queries_timed": len(query),
        "state_bytes": memory["state"], "vectors_bytes": memory["vectors"],
        "vector_capacity_bytes": memory["vector_capacity"],
        "state_ratio": round(memory["state"] / memory["vectors"], 3),
        "online_top1_accuracy": round(float(np.mean(gallery_labels[np.array(top1)] == query_labels)), 3),
        "plain_top1_accuracy": round(float(np.mean(gallery_labels[plain_top1] == query_labels)), 3),
    }


def exactness(args: argparse.Namespace) -> dict:
    """Random adds, removes and re-adds on a smaller gallery, then every answer against a fresh build."""
    n, updates = args.exact_gallery, args.exact_updates
    query, vectors, _, _ = query_gallery(args.seed + 3, 100, n + updates, args.dim)
    rng = np.random.default_rng(args.seed + 4)
    keys = rng.choice(10 ** 9, n + updates, replace=False).astype(np.int64)  # not in vector order
    log(f"exactness: {updates} adds and {updates} removes on {n} x {args.dim} ...")
    state = OnlineKReciprocal(vectors[:n], keys=keys[:n])
    present, absent = set(range(n)), list(range(n, n + updates))
    for step in rng.permutation(np.repeat([0, 1], updates)):
        if step == 0:  # add: mostly new items, sometimes one removed before
            item = absent.pop(rng.integers(len(absent)))
            state.add(vectors[item:item + 1], keys[item:item + 1])
            present.add(item)
        else:
            item = int(rng.choice(sorted(present)))
            state.remove(keys[item:item + 1])
            present.remove(item)
            absent.append(item)
    remaining = np.array(sorted(present, key=lambda i: keys[i]))
    rebuilt = OnlineKReciprocal(vectors[remaining], keys=keys[remaining])
    identical, difference = same_answers(state, rebuilt, query)
    log(f"exactness: answers identical to a state built at once: {identical}, "
        f"max |distance difference| {difference:.1e}")
    return {"exact_gallery": n, "exact_updates": updates, "exact_identical": identical,
            "exact_max_abs_difference": difference}


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
    parser.add_argument("--updates", type=int, default=200, help="single adds, removes and restores timed")
    parser.add_argument("--exact-gallery", type=int, default=5000, help="gallery of the exactness check")
    parser.add_argument("--exact-updates", type=int, default=200, help="adds and removes of the exactness check")
    parser.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                        help="KReciprocal's peak memory, in a fresh process (~10 s)")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                        help="KReciprocal against the dense reference (~15 s)")
    args = parser.parse_args()
    log(f"cpu threads: {faiss.omp_get_max_threads()}")
    started = time.perf_counter()
    # Memory first: a child process starts with its parent's peak RSS (kept across fork and exec),
    # so the parent must still be small when the child is started.
    result = offline_memory(args) if args.offline else {}
    if args.dense:
        result.update(dense_agreement(args))
    result.update(exactness(args))
    result.update(online(args))
    result["cpu_threads"] = faiss.omp_get_max_threads()
    result["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
