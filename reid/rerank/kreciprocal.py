"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in memory bounded by the neighbour lists.

The paper's method, as torchreid's `re_ranking` writes it, needs the (Q+G)^2 distance matrix of the
joint query+gallery set. Every quantity it uses is local, though: the k-reciprocal sets need only
each item's top-(k1+1) list, the encoding V has about |R| non-zeros per row, and the Jaccard
distance between two items is 1 unless their query-expanded encodings share a column. So here the
neighbour lists come from a chunked FAISS search, V and its query expansion V_qe are sparse CSR
matrices, and Jaccard sums are formed only over shared columns, through an inverted index of the
gallery's V_qe. Memory is O((Q+G)·k1·k2) plus one chunk of dense output rows.

Distance is d(i, j) = 1 - cos(i, j) on L2-normalised embeddings. torchreid instead squares
Euclidean distances and divides each column by its maximum over the whole set; that scaling moves
whenever an item joins, so it cannot be computed online, and it is not used here.

Distances are evaluated in float64 from the float32 embeddings: a product of two float32 numbers is
exact in float64, so the order of summation changes a distance only around 1e-16, far below any
real gap between neighbours, and neighbour ranks (thus the re-ranked order) equal those of the dense
reference `reid.rerank.dense.dense_k_reciprocal`. One kernel (`pair_cosines`) forms every such
value, with the same bits for a pair whatever else shares the call. FAISS searches in float32; its
candidates are rescored in float64 (see `settle_nearest`).

The online, incremental form (`OnlineKReciprocal`) lives in `reid.rerank.online` and shares these
helpers.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp

SEARCH_ROWS = 2048  # queries per FAISS call: bounds the copies, results and rescoring buffers
PAIR_CHUNK = 128  # (row, column) pairs whose float64 dot products are formed at once (cache-sized: fastest)
SEARCH_MARGIN = 8  # extra FAISS candidates per row, so float32 rounding rarely hides a true neighbour
OUTPUT_ELEMENTS = 1 << 20  # float64 elements of a dense (queries x gallery) block built at once (8 MiB)
GATHER_ELEMENTS = 1 << 19  # gathered (query, gallery, column) triples of a Jaccard block held at once
ENCODE_ROWS = 8192  # rows of the k-reciprocal expansion test processed at once
NORM_TOLERANCE = 1e-3  # how far from 1 an embedding's norm may be: cos = dot only holds for unit vectors


def check_embeddings(name: str, embeddings: np.ndarray, dim: int | None = None) -> np.ndarray:
    """`embeddings` as a C-contiguous float32 (n, dim) array of finite unit vectors, else ValueError."""
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"embedding dimensions do not match: {name} has {array.shape[1]}, expected {dim}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(array, axis=1)
    if np.any(np.abs(norms - 1.0) > NORM_TOLERANCE):
        raise ValueError(f"{name} must be L2-normalised (norms range {norms.min():.4g}..{norms.max():.4g})")
    return array


def check_query_gallery(query_emb: np.ndarray, gallery_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (query, gallery) arrays: same dimension, non-empty gallery."""
    gallery = check_embeddings("gallery_emb", gallery_emb)
    if len(gallery) == 0:
        raise ValueError("the gallery is empty: nothing to rank against")
    return check_embeddings("query_emb", query_emb, gallery.shape[1]), gallery


def check_parameters(k1: int, k2: int, lambda_value: float) -> None:
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    if k2 < 1:
        raise ValueError(f"k2 must be >= 1, got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")


def flat_index(database: np.ndarray) -> faiss.IndexFlatIP:
    """An exact inner-product FAISS index over `database` (validated float32 rows)."""
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    return index


def search_inner_product(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-k (similarities float32, indices int64) of each query, SEARCH_ROWS queries per call."""
    similarities = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), SEARCH_ROWS):
        stop = min(start + SEARCH_ROWS, len(queries))
        similarities[start:stop], indices[start:stop] = index.search(queries[start:stop], k)
    return similarities, indices


def pair_cosines(left: np.ndarray, right: np.ndarray, left_rows: np.ndarray,
                 right_rows: np.ndarray) -> np.ndarray:
    """float64 cos of the pairs (left[left_rows[p]], right[right_rows[p]]), PAIR_CHUNK at a time.

    The one place a float64 similarity is formed, so every caller gets the same bits for the same
    pair: the products are exact, and each row's sum is numpy's pairwise sum along that row alone,
    so the value depends neither on which other pairs share the call nor on the order of the two
    vectors (unlike a BLAS product, whose blocking depends on the shapes).
    """
    cosines = np.empty(len(left_rows), dtype=np.float64)
    for start in range(0, len(left_rows), PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        products = left[left_rows[part]].astype(np.float64)
        products *= right[right_rows[part]].astype(np.float64)
        cosines[part] = products.sum(axis=1)
    return cosines


def pair_distances(left: np.ndarray, right: np.ndarray, left_rows: np.ndarray,
                   right_rows: np.ndarray) -> np.ndarray:
    """float64 d = 1 - cos of the pairs (left[left_rows[p]], right[right_rows[p]])."""
    return 1.0 - pair_cosines(left, right, left_rows, right_rows)


def float32_score_error(dim: int) -> float:
    """A bound on |FAISS float32 inner product - exact| for near-unit vectors: 2·dim·u, twice the
    textbook gamma_dim bound (u = 2^-24), which also covers norms up to NORM_TOLERANCE above 1."""
    return dim * float(np.finfo(np.float32).eps)


def exact_neighbours(queries: np.ndarray, database: np.ndarray, k: int,
                     index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest database rows: (float64 distances, int64 indices), sorted by distance,
    ties to the lower index, exactly as a stable argsort of the float64 distance row would give.
    Queries go SEARCH_ROWS at a time, so buffers stay O(SEARCH_ROWS·k)."""
    index = flat_index(database) if index is None else index
    k = min(k, len(database))
    distances = np.empty((len(queries), k), dtype=np.float64)
    neighbours = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), SEARCH_ROWS):
        part = slice(start, start + SEARCH_ROWS)
        chunk = queries[part]
        cosines, neighbours[part] = settle_nearest(lambda rows, wanted: index.search(chunk[rows], wanted),
                                                   chunk, database, k, len(database))
        distances[part] = 1.0 - cosines
    return distances, neighbours


def settle_nearest(propose, queries: np.ndarray, database: np.ndarray, k: int, population: int,
                   tie_keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest database rows of each query by float64 d = 1 - cos, ties to the lower
    tie key (the row index when None): (cosines float64 (m, k), rows int64 (m, k)), nearest first.

    `propose(query_rows, wanted)` gives float32 (similarities, rows) holding the `wanted` best
    float32 scores of those queries among the `population` rows that count (in any order). They
    are rescored in float64; a query is settled once its k-th float64 distance beats anything left
    out could have, given the float32 rounding bound, and the rest (near-ties at the margin) are
    proposed again, wider.
    """
    k = min(k, population)
    cosines = np.empty((len(queries), k), dtype=np.float64)
    neighbours = np.empty((len(queries), k), dtype=np.int64)
    error = float32_score_error(database.shape[1])
    pending = np.arange(len(queries))
    wanted = min(population, k + SEARCH_MARGIN)
    while pending.size and k:
        similarities, candidates = propose(pending, wanted)
        candidates = np.asarray(candidates, dtype=np.int64)
        rows = np.repeat(pending, wanted)
        candidate_cosines = pair_cosines(queries, database, rows, candidates.ravel()).reshape(candidates.shape)
        ties = candidates if tie_keys is None else tie_keys[candidates]
        order = np.lexsort((ties, 1.0 - candidate_cosines), axis=1)[:, :k]
        top_cosines = np.take_along_axis(candidate_cosines, order, axis=1)
        excluded_bound = 1.0 - similarities.min(axis=1).astype(np.float64) - error
        settled = (1.0 - top_cosines[:, -1] < excluded_bound) | (wanted == population)
        cosines[pending[settled]] = top_cosines[settled]
        neighbours[pending[settled]] = np.take_along_axis(candidates, order, axis=1)[settled]
        pending = pending[~settled]
        wanted = min(population, 4 * wanted)
    return cosines, neighbours


def expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + c) for each (s, c), without a Python loop."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts, counts) + np.repeat(starts, counts)


def gather_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored entries of `rows` of a CSR (or columns of a CSC) matrix as flat arrays:
    (position in `rows` each entry came from, its column, its value)."""
    starts = matrix.indptr[rows]
    counts = matrix.indptr[rows + 1] - starts
    positions = expand_ranges(starts, counts)
    return np.repeat(np.arange(len(rows)), counts), matrix.indices[positions], matrix.data[positions]


@dataclass(frozen=True)
class Encoding:
    """The sparse k-reciprocal encoding of a set of n embeddings.

    half_reciprocal: 0/1 rows of R(i, round(k1/2)), the sets tested for the 2/3 expansion.
    v: each row's expanded k-reciprocal set weighted by exp(-d), summing to 1.
    v_qe: v averaged over each row's top-k2 neighbours (local query expansion); v itself when k2 == 1,
        as torchreid does.
    """

    half_reciprocal: sp.csr_matrix
    v: sp.csr_matrix
    v_qe: sp.csr_matrix


def half_k(k1: int) -> int:
    """round(k1 / 2) with numpy's half-to-even rounding, as torchreid writes it."""
    return int(np.around(k1 / 2.0))


def reciprocal_sets(neighbours: np.ndarray, k: int) -> sp.csr_matrix:
    """R(i, k) as 0/1 rows: j is in i's top-(k+1) list and i is in j's (each list holds the item itself)."""
    top = neighbours[:, : k + 1]
    n, width = top.shape
    forward = sp.csr_matrix((np.ones(top.size, dtype=np.float32), top.ravel(),
                             np.arange(0, top.size + 1, width)), shape=(n, n))
    reciprocal = forward.multiply(forward.T).tocsr()
    reciprocal.sort_indices()
    return reciprocal


def expanded_sets(reciprocal: sp.csr_matrix, half_reciprocal: sp.csr_matrix) -> sp.csr_matrix:
    """R*(i): R(i, k1) joined by every R(c, k1/2), c in R(i, k1), that shares more than 2/3 of its
    members with R(i, k1). Overlaps are counted as a sparse product, ENCODE_ROWS rows at a time."""
    n = reciprocal.shape[0]
    half_sizes = np.diff(half_reciprocal.indptr)
    accepted_rows, accepted_columns = [], []
    for start in range(0, n, ENCODE_ROWS):
        block = reciprocal[start:start + ENCODE_ROWS]
        overlap = (block @ half_reciprocal.T).multiply(block).tocoo()  # |R(i) ∩ R_half(c)| for c in R(i)
        keep = overlap.data > 2.0 / 3 * half_sizes[overlap.col]
        accepted_rows.append(overlap.row[keep] + start)
        accepted_columns.append(overlap.col[keep])
    rows, columns = np.concatenate(accepted_rows), np.concatenate(accepted_columns)
    accepted = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=(n, n))
    expanded = (reciprocal + accepted @ half_reciprocal).tocsr()
    expanded.sort_indices()
    return expanded


def weighted_rows(pattern: sp.csr_matrix, embeddings: np.ndarray) -> sp.csr_matrix:
    """V: exp(-d(i, j)) on the pattern's entries, each row normalised to sum 1."""
    rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
    weights = np.exp(-pair_distances(embeddings, embeddings, rows, pattern.indices))
    weights /= np.bincount(rows, weights, minlength=pattern.shape[0])[rows]
    return sp.csr_matrix((weights, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)


def query_expansion(v: sp.csr_matrix, neighbours: np.ndarray, k2: int) -> sp.csr_matrix:
    """V_qe[i] = mean of V over i's top-k2 list (the item itself included); V unchanged for k2 == 1."""
    if k2 == 1:
        return v
    top = neighbours[:, :k2]
    n, width = top.shape
    selector = sp.csr_matrix((np.ones(top.size), top.ravel(), np.arange(0, top.size + 1, width)), shape=(n, n))
    v_qe = (selector @ v).tocsr()
    v_qe.data /= width
    v_qe.sort_indices()
    return v_qe


def encode(embeddings: np.ndarray, neighbours: np.ndarray, k1: int, k2: int) -> Encoding:
    """The k-reciprocal encoding of `embeddings` from their exact neighbour lists (at least
    max(k1 + 1, k2) columns, or all n)."""
    half_reciprocal = reciprocal_sets(neighbours, half_k(k1))
    v = weighted_rows(expanded_sets(reciprocal_sets(neighbours, k1), half_reciprocal), embeddings)
    return Encoding(half_reciprocal, v, query_expansion(v, neighbours, k2))


def row_mass(matrix: sp.csr_matrix) -> np.ndarray:
    """Row sums, float64: the sum(max) of a Jaccard pair is mass_a + mass_b - sum(min)."""
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


def gathered_row_blocks(rows: sp.csr_matrix, by_column: sp.csc_matrix) -> list[tuple[int, int]]:
    """Split `rows` into ranges whose gathered triples (one per shared stored column entry) stay
    within GATHER_ELEMENTS, a single row being the smallest range."""
    owner = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    per_row = np.bincount(owner, np.diff(by_column.indptr)[rows.indices], minlength=rows.shape[0])
    boundaries, total, start = [], 0, 0
    for row, cost in enumerate(per_row):
        if total + cost > GATHER_ELEMENTS and row > start:
            boundaries.append((start, row))
            start, total = row, 0
        total += cost
    boundaries.append((start, rows.shape[0]))
    return boundaries


def shared_minimum(rows: sp.csr_matrix, by_column: sp.csc_matrix) -> np.ndarray:
    """(len(rows), n_gallery) sums of min(row value, gallery value) over shared columns.

    `by_column` is the gallery's V_qe in CSC form, the inverted index: for each column of a query
    row it lists the gallery items that also hold that column, so only overlapping pairs are touched.
    """
    n_gallery = by_column.shape[0]
    sums = np.zeros((rows.shape[0], n_gallery), dtype=np.float64)
    for start, stop in gathered_row_blocks(rows, by_column):
        block = rows[start:stop]
        owner = np.repeat(np.arange(stop - start), np.diff(block.indptr))
        starts = by_column.indptr[block.indices]
        counts = by_column.indptr[block.indices + 1] - starts
        positions = expand_ranges(starts, counts)
        minima = np.minimum(np.repeat(block.data, counts), by_column.data[positions])
        cells = np.repeat(owner, counts) * n_gallery + by_column.indices[positions]
        sums[start:stop] = np.bincount(cells, minima, minlength=(stop - start) * n_gallery).reshape(-1, n_gallery)
    return sums


def jaccard_distances(shared: np.ndarray, mass_a: np.ndarray, mass_b: np.ndarray) -> np.ndarray:
    """1 - sum(min)/sum(max), using min + max = a + b; exactly 1 where nothing is shared."""
    return 1.0 - shared / (mass_a[:, None] + mass_b[None, :] - shared)


def cosine_distances(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """float64 (len(left), len(right)) d = 1 - cos, converting `right` to float64 a block at a time."""
    left64 = left.astype(np.float64)
    block = max(1, OUTPUT_ELEMENTS // max(1, right.shape[1]))
    cosines = np.empty((len(left), len(right)), dtype=np.float64)
    for start in range(0, len(right), block):
        cosines[:, start:start + block] = left64 @ right[start:start + block].astype(np.float64).T
    return 1.0 - cosines


def smallest_per_row(block: np.ndarray, n: int) -> np.ndarray:
    """Indices of each row's n smallest values in ascending order, ties to the lower index
    (the first n of a stable argsort, without sorting whole rows)."""
    kth = np.partition(block, n - 1, axis=1)[:, n - 1]
    result = np.empty((len(block), n), dtype=np.int64)
    for row, (values, bound) in enumerate(zip(block, kth)):
        candidates = np.flatnonzero(values <= bound)
        result[row] = candidates[np.argsort(values[candidates], kind="stable")[:n]]
    return result


class KReciprocal:
    """Offline k-reciprocal re-ranking of every query against the gallery, equal to the dense
    reference (same ranks; distances to float64 rounding) in memory linear in Q+G.

    Construction does the neighbour search of the joint query+gallery set and the sparse encoding;
    `distances` then produces final distance rows for any range of queries, so an evaluator can
    consume them chunk by chunk, and `topk` does exactly that to rank the whole gallery.
    """

    def __init__(self, query_emb: np.ndarray, gallery_emb: np.ndarray | None, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3):
        """`gallery_emb=None`: the queries are the gallery (every image queries all the others), so
        the joint set holds each image once, not twice."""
        same_set = gallery_emb is None
        query, gallery = check_query_gallery(query_emb, query_emb if same_set else gallery_emb)
        check_parameters(k1, k2, lambda_value)
        joint = query if same_set else np.concatenate([query, gallery])
        n_query = len(query)
        first_gallery = 0 if same_set else n_query
        _, neighbours = exact_neighbours(joint, joint, max(k1 + 1, k2))
        v_qe = encode(joint, neighbours, k1, k2).v_qe
        self.lambda_value = lambda_value
        self._query, self._gallery = joint[:n_query], joint[first_gallery:]
        self._query_v_qe = v_qe[:n_query]
        self._gallery_by_column = v_qe[first_gallery:].tocsc()
        self._query_mass, self._gallery_mass = row_mass(self._query_v_qe), row_mass(v_qe[first_gallery:])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self._query), len(self._gallery)

    def distances(self, start: int, stop: int) -> np.ndarray:
        """Final distances (stop - start, G) float64 of queries start:stop:
        (1 - lambda)·jaccard + lambda·d, with jaccard = 1 for pairs sharing no V_qe column."""
        if not 0 <= start <= stop <= len(self._query):
            raise ValueError(f"query range {start}:{stop} is outside 0:{len(self._query)}")
        shared = shared_minimum(self._query_v_qe[start:stop], self._gallery_by_column)
        jaccard = jaccard_distances(shared, self._query_mass[start:stop], self._gallery_mass)
        return jaccard * (1 - self.lambda_value) + cosine_distances(
            self._query[start:stop], self._gallery) * self.lambda_value

    def topk(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's n best gallery items: (distances (Q, n) float64, indices (Q, n) int64),
        ascending by distance, ties to the lower gallery index; memory stays at one block of rows."""
        n_query, n_gallery = self.shape
        if not 1 <= n <= n_gallery:
            raise ValueError(f"n must lie in 1..{n_gallery} (the gallery size), got {n}")
        distances = np.empty((n_query, n), dtype=np.float64)
        indices = np.empty((n_query, n), dtype=np.int64)
        rows = max(1, OUTPUT_ELEMENTS // n_gallery)
        for start in range(0, n_query, rows):
            stop = min(start + rows, n_query)
            block = self.distances(start, stop)
            indices[start:stop] = smallest_per_row(block, n)
            distances[start:stop] = np.take_along_axis(block, indices[start:stop], axis=1)
        return distances, indices
