"""Merge suggestions: pairs of individuals of one gallery whose photos match each other.

Two individuals whose best cross-individual pair of images has a cosine at or above the match
threshold would each be the other's `match` if one were identified against the other: most likely
one animal enrolled twice by mistake. `duplicate_pairs` finds them on plain arrays (a species'
L2-normalised vectors, each image's id and individual), best first and at most `top_n` of them.

Memory stays bounded for large galleries: rows are taken a block at a time, one matrix product per
block against the rows from the block's first on (each image pair is scored once), so at most
`block_rows` x n cosines exist at once, never n x n. Once `top_n` pairs are known, the n-th best
cosine becomes the floor below which nothing can enter. `Galleries.arrays` copies a species' gallery
out under the galleries' lock, so that the products run without holding it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_BYTES = 64 * 2**20  # the cosines of one block, at most (float32)


@dataclass(frozen=True)
class DuplicatePair:
    """Two individuals (a < b by id) and their best-matching images (image_a is a's, image_b is b's)."""
    individual_a: int
    individual_b: int
    cosine: float
    image_a: int
    image_b: int


def default_block_rows(n: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows a block takes so that its cosines (block x n float32) fit in `block_bytes`."""
    return max(1, min(max(n, 1), block_bytes // (4 * max(n, 1))))


def duplicate_pairs(vectors: np.ndarray, individual_ids, image_ids, threshold: float, top_n: int = 100,
                    block_rows: int | None = None) -> list[DuplicatePair]:
    """The pairs of distinct individuals whose best cross-individual image pair has cosine >= `threshold`,
    with that cosine and the two images, sorted by cosine (descending; ties by individual ids), the
    first `top_n`. `vectors` (n, dim) are L2-normalised (a dot product is a cosine); `individual_ids`
    and `image_ids` name each row's individual and image."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    owners = np.asarray(individual_ids, dtype=np.int64).reshape(-1)
    images = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    if vectors.ndim != 2 or not len(owners) == len(images) == len(vectors):
        raise ValueError(f"vectors {vectors.shape}, {len(owners)} individual ids and {len(images)} image ids: "
                         "one row, individual and image each")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold}: a cosine similarity between -1 and 1")
    if top_n < 1:
        raise ValueError(f"top_n {top_n}: at least 1")
    n = len(vectors)
    rows = block_rows or default_block_rows(n)
    if rows < 1:
        raise ValueError(f"block_rows {block_rows}: at least 1")
    best = _empty()  # (lo, hi, cosine, image of lo, image of hi), one row per pair, at most top_n
    floor = np.float32(threshold)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scores = vectors[start:stop] @ vectors[start:].T  # (block, n - start): column c is row start + c
        # each image pair once (column after row), never an individual with itself
        scores[np.arange(stop - start)[:, None] >= np.arange(n - start)[None, :]] = -np.inf
        scores[owners[start:stop, None] == owners[None, start:]] = -np.inf
        r, c = np.nonzero(scores >= floor)
        if not r.size:
            continue
        c = c + start
        r = r + start
        first = owners[r] < owners[c]
        found = (np.where(first, owners[r], owners[c]), np.where(first, owners[c], owners[r]),
                 scores[r - start, c - start], np.where(first, images[r], images[c]),
                 np.where(first, images[c], images[r]))
        best = _top(tuple(np.concatenate([old, new]) for old, new in zip(best, found)), top_n)
        if len(best[0]) == top_n:
            floor = max(floor, best[2][-1])  # the n-th best so far: nothing below it can enter
    return [DuplicatePair(int(a), int(b), float(s), int(i), int(j)) for a, b, s, i, j in zip(*best)]


def _empty() -> tuple[np.ndarray, ...]:
    ints = np.zeros(0, dtype=np.int64)
    return ints, ints, np.zeros(0, dtype=np.float32), ints, ints


def _top(hits: tuple[np.ndarray, ...], top_n: int) -> tuple[np.ndarray, ...]:
    """Each pair's best hit (ties: the smallest image ids), the first `top_n` pairs by cosine descending
    (ties: by individual ids)."""
    lo, hi, scores, image_lo, image_hi = hits
    order = np.lexsort((image_hi, image_lo, -scores, hi, lo))  # by pair, its best hit first
    first = np.ones(len(order), dtype=bool)
    first[1:] = (lo[order][1:] != lo[order][:-1]) | (hi[order][1:] != hi[order][:-1])
    kept = order[first]
    ranked = kept[np.lexsort((hi[kept], lo[kept], -scores[kept]))][:top_n]
    return tuple(column[ranked] for column in hits)
