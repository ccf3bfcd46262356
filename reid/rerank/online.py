"""Incremental k-reciprocal re-ranking (Zhong et al., CVPR 2017) of one query at a time against a
gallery that changes: `OnlineKReciprocal`, addressed by int64 image keys.

What is kept per gallery item (its slot):
  * the float32 vector (one array for the whole gallery, searched directly: no second copy in an index);
  * its neighbour list: the nearest live items by d = 1 - cos, ties to the lower key, with their
    float64 distances, max(k1 + 1, k2) + SPARE_NEIGHBOURS long;
  * three flags per list position: whether that neighbour is in R(i, k1) (the k1-reciprocal set:
    j in i's top-(k1+1) and i in j's), whether it is in R(i, k1/2) (the half set, positions up to
    k1/2 only), and whether its half set passed the 2/3 test that adds it to i's expansion R*(i);
  * its row of V: R*(i) weighted by exp(-d), normalised, in one buffer of rows (`RowPool`).
V_qe (a row's mean of V over its top-k2 list) is formed only for a query's ~100 candidates, and the
radii at which a query enters a list are read from the lists. Memory beyond the vectors is about
(list width)·12 + (k1+1 + k1/2+1 + k1+1) + |R*|·12 bytes per item: 0.5x the vectors at dim 512.

Queries. Gallery rows are not updated for the query: its k-reciprocal set counts the query in gallery
item j's top-(k1+1) list when it is closer than j's (k1+1)-th entry, and expands it through the
gallery's half sets; where the query enters a candidate's top-k2 list, the query's V row replaces
the list's last row in that candidate's V_qe mean. That is the one approximation against the offline
joint set (`KReciprocal` on the query alone); it makes a query one exact search plus
O(k1·k2 + candidates·k2) sparse work.

Updates, and why they are exact. The invariant kept is: every list holds a prefix of its item's true
order (the nearest `count` items of the live set), at least min(max(k1 + 1, k2), n) long, and
nothing past that length is read. Then the lists' first max(k1 + 1, k2) entries, and with them R, R*,
V and every answer, are functions of the live set alone, whatever sequence of adds and removes led to it.
  * add(x): one exact O(n·dim) float32 pass of x against the gallery gives x's own list (rescored in
    float64) and the lists x can enter: those whose last entry it may beat, within the float32
    rounding bound (each list keeps that threshold); float64 distances and keys decide. x goes into
    those lists at its place, pushing the last entry out of full ones.
  * remove(x): the lists holding x (an integer scan of the lists, no vector pass) lose it and keep
    their remaining prefix; a list left shorter than the encoding reads is refilled by an exact
    search, which the spare entries make rare.
  * Then R(., k) can have changed only for items whose top-(k+1) changed and for the items that
    entered or left those; their flags are recomputed. Membership needs no search of the other list:
    i is in j's top-(k+1) exactly when d(i, j), which i's list holds, beats j's (k+1)-th entry (ties
    by key), since lists are exact prefixes and d is symmetric to the bit. R* can change only where R
    did, and where a member's half set changed and passes the 2/3 test now or did before (the stored
    flag); R is symmetric, so those items are the changed item's own R. R* is recomputed there, and V
    only for rows whose R* differs from the stored row's columns (V depends on nothing else).
  * Every float is formed the same way whichever path forms it: distances by one pair kernel
    (`pair_cosines`: exact products, a pairwise sum along the row, the same bits for (i, j) and (j, i)
    in any batch), and every sum over a set in key order (the query's column last) or in list order.
    So an updated state holds the same bits as one built at once from the same items, and answers
    identically, however its items happen to be laid out in memory.

Slots freed by removal are reused by later adds; search masks free slots, and when more than half
are free (and at least COMPACT_MIN_FREE) the state is renumbered compactly from its own arrays, as
`save` writes them (no recomputation). `save` writes one .npz atomically (items in key order); `load`
reads each array straight into the array it will live in, so it costs about what copying the vectors
into a plain index does.
"""
from __future__ import annotations

import operator
import zipfile
import zlib
from pathlib import Path

import faiss
import numpy as np
from numpy.lib import format as npy_format

from reid.io import atomic_path
from reid.rerank.kreciprocal import (SEARCH_ROWS, check_embeddings, check_parameters, expand_ranges,
                                     float32_score_error, half_k, jaccard_distances, pair_cosines,
                                     settle_nearest)

FORMAT = "wildreid.online-k-reciprocal/1"
SPARE_NEIGHBOURS = 8  # list entries beyond those the encoding reads, so a removal rarely needs a search
HEADROOM = 0.25  # spare room (slots, V entries) allocated on build and load, so the first updates copy nothing
SCAN_ELEMENTS = 1 << 24  # float32 scores of a batch of new items against the gallery held at once (64 MiB)
GEMM_MIN_ROWS = 4  # queries scored by one matrix product (`_scores`)
FAISS_MIN_ROWS = 1024  # queries searched by faiss.knn rather than numpy (`_nearest`)
ENCODE_ROWS = 4096  # rows whose expanded k-reciprocal sets are formed at once
ROW_SLACK = 8  # a V row's capacity is its length rounded up to this, so most rewrites stay in place
POOL_GARBAGE_MIN = 1 << 16  # abandoned V entries tolerated before the buffer is compacted
COMPACT_MIN_FREE = 1024  # free slots tolerated before the state is compacted (once they are most slots)
QUERY_COLUMN = -1  # the query's own column in its V row (it has no slot)
READ_BYTES = 1 << 24  # a snapshot is read in pieces this large, straight into its arrays


class RowPool:
    """One variable-length sparse row per slot, (int32 column, float64 value) entries in a shared buffer.

    A rewritten row stays in place when it fits its capacity, else it moves to the end of the buffer;
    the space left behind is reclaimed by compacting once it exceeds the space in use.
    """

    def __init__(self, slots: int):
        self.columns = np.empty(0, dtype=np.int32)
        self.values = np.empty(0, dtype=np.float64)
        self.start = np.zeros(slots, dtype=np.int64)
        self.length = np.zeros(slots, dtype=np.int32)
        self.capacity = np.zeros(slots, dtype=np.int32)
        self.end = 0  # first unused entry of the buffer
        self.garbage = 0  # entries below `end` that no row owns

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (self.columns, self.values, self.start, self.length, self.capacity))

    def grow_slots(self, slots: int) -> None:
        self.start, self.length, self.capacity = (np.concatenate([array, np.zeros(slots - len(array), array.dtype)])
                                                   for array in (self.start, self.length, self.capacity))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of `rows` as flat arrays: (position in `rows`, column, value), row by row."""
        lengths = self.length[rows]
        positions = expand_ranges(self.start[rows], lengths)
        return np.repeat(np.arange(len(rows)), lengths), self.columns[positions], self.values[positions]

    def write(self, rows: np.ndarray, owner: np.ndarray, columns: np.ndarray, values: np.ndarray) -> None:
        """Replace the distinct `rows` by the entries (owner = position in `rows`, sorted ascending)."""
        lengths = np.bincount(owner, minlength=len(rows)).astype(np.int32)
        moving = lengths > self.capacity[rows]
        if moving.any():
            self._relocate(rows[moving], lengths[moving])
        self.length[rows] = lengths
        offsets = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        destination = self.start[rows][owner] + offsets
        self.columns[destination] = columns
        self.values[destination] = values
        self._compact_if_wasteful()

    def clear(self, rows: np.ndarray) -> None:
        self.garbage += int(self.capacity[rows].sum())
        self.start[rows] = self.length[rows] = self.capacity[rows] = 0
        self._compact_if_wasteful()

    def restore(self, indptr: np.ndarray, read_entries) -> None:
        """Rows 0..n-1 from a CSR layout, kept as it is (each row's capacity its length, so a row
        that grows later moves); `read_entries(columns, values)` fills the two given buffers."""
        entries = int(indptr[-1])
        size = entries + int(HEADROOM * entries) + ROW_SLACK
        self.columns, self.values = np.empty(size, dtype=np.int32), np.empty(size, dtype=np.float64)
        read_entries(self.columns[:entries], self.values[:entries])
        rows = len(indptr) - 1
        self.start[:rows] = indptr[:-1]
        self.length[:rows] = self.capacity[:rows] = np.diff(indptr)
        self.end, self.garbage = entries, 0

    def to_csr(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, columns, values) of `rows` in that order, as a CSR matrix stores them."""
        _, columns, values = self.gather(rows)
        return np.concatenate([[0], np.cumsum(self.length[rows], dtype=np.int64)]), columns, values

    def _relocate(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        capacities = -(-lengths // ROW_SLACK) * ROW_SLACK
        needed = self.end + int(capacities.sum())
        if needed > len(self.columns):  # headroom: a freshly loaded state should not copy on its first update
            size = max(needed + int(HEADROOM * needed), 2 * len(self.columns))
            self.columns = np.concatenate([self.columns[:self.end], np.empty(size - self.end, np.int32)])
            self.values = np.concatenate([self.values[:self.end], np.empty(size - self.end, np.float64)])
        self.garbage += int(self.capacity[rows].sum())
        self.start[rows] = self.end + np.cumsum(capacities) - capacities
        self.capacity[rows] = capacities
        self.end = needed

    def _compact_if_wasteful(self) -> None:
        if self.garbage <= max(POOL_GARBAGE_MIN, self.end - self.garbage):
            return
        rows = np.flatnonzero(self.length)
        owner, columns, values = self.gather(rows)
        self.columns, self.values = np.empty(0, np.int32), np.empty(0, np.float64)
        self.start[:] = self.capacity[:] = 0
        self.end = self.garbage = 0
        self.write(rows, owner, columns, values)


class NeighbourLists:
    """Each slot's nearest live items, nearest first, ties to the lower key: int32 slots (-1 past
    the end), float64 distances (inf past the end) and the count of entries; and per list the
    float32 score a newcomer must reach to possibly rank before the last entry (`entry_scores`,
    that entry's similarity less `score_margin`; inf for an empty list), so an add can test every
    list against its scan in one comparison."""

    def __init__(self, slots: int, width: int, score_margin: float):
        self.width, self.score_margin = width, score_margin
        self.ids = np.full((slots, width), -1, dtype=np.int32)
        self.distances = np.full((slots, width), np.inf, dtype=np.float64)
        self.counts = np.zeros(slots, dtype=np.int32)
        self.entry_scores = np.full(slots, np.inf, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.distances.nbytes + self.counts.nbytes + self.entry_scores.nbytes

    def grow_slots(self, slots: int) -> None:
        extra = slots - len(self.counts)
        self.ids = np.vstack([self.ids, np.full((extra, self.width), -1, np.int32)])
        self.distances = np.vstack([self.distances, np.full((extra, self.width), np.inf)])
        self.counts = np.concatenate([self.counts, np.zeros(extra, np.int32)])
        self.entry_scores = np.concatenate([self.entry_scores, np.full(extra, np.inf, np.float32)])

    def restore(self, counts: np.ndarray, read_lists) -> None:
        """The first len(counts) slots' lists from a snapshot: `read_lists(ids, distances)` fills
        the two given arrays."""
        count = len(counts)
        read_lists(self.ids[:count], self.distances[:count])
        self.counts[:count] = counts
        self._update_entry_scores(np.arange(count))

    def _update_entry_scores(self, rows: np.ndarray) -> None:
        counts = self.counts[rows]
        last = self.distances[rows, np.maximum(counts - 1, 0)]
        self.entry_scores[rows] = np.where(counts > 0, 1.0 - last - self.score_margin, np.inf)

    def entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lists of `rows` as flat arrays in list order: (position in `rows`, slot, distance)."""
        ids = self.ids[rows]
        owner, position = np.nonzero(ids >= 0)
        return owner, ids[owner, position].astype(np.int64), self.distances[rows][owner, position]

    def write(self, rows: np.ndarray, owner: np.ndarray, ids: np.ndarray, distances: np.ndarray) -> None:
        """Replace the distinct `rows` by the entries (owner = position in `rows`, ascending, each
        row's entries in list order), keeping the first `width` of each."""
        counts = np.bincount(owner, minlength=len(rows))
        rank = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
        kept = rank < self.width
        self.clear(rows)
        self.ids[rows[owner[kept]], rank[kept]] = ids[kept]
        self.distances[rows[owner[kept]], rank[kept]] = distances[kept]
        self.counts[rows] = np.minimum(counts, self.width)
        self._update_entry_scores(rows)

    def merge(self, rows: np.ndarray, owner: np.ndarray, ids: np.ndarray, distances: np.ndarray,
              slot_keys: np.ndarray) -> None:
        """Insert the entries (owner = position in the distinct `rows`) into those lists at their place."""
        old_owner, old_ids, old_distances = self.entries(rows)
        owner, ids = np.concatenate([old_owner, owner]), np.concatenate([old_ids, ids])
        distances = np.concatenate([old_distances, distances])
        order = np.lexsort((slot_keys[ids], distances, owner))
        self.write(rows, owner[order], ids[order], distances[order])

    def discard(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Drop `slots` from the lists of `rows`; what remains keeps its order."""
        owner, ids, distances = self.entries(rows)
        kept = ~np.isin(ids, slots)
        self.write(rows, owner[kept], ids[kept], distances[kept])

    def clear(self, rows: np.ndarray) -> None:
        self.ids[rows] = -1
        self.distances[rows] = np.inf
        self.counts[rows] = 0
        self.entry_scores[rows] = np.inf

    def holding(self, slots: np.ndarray, used: int) -> np.ndarray:
        """The rows (below `used`) whose lists hold any of `slots`: an integer scan, no vector pass."""
        ids = self.ids[:used].ravel()
        held = np.flatnonzero(ids == slots[0] if len(slots) == 1 else np.isin(ids, slots))
        return np.unique(held // self.width)


def npz_headers(archive: zipfile.ZipFile) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array in an .npz archive, from the .npy headers alone."""
    headers = {}
    for member in archive.namelist():
        with archive.open(member) as handle:
            headers[member.removesuffix(".npy")] = _npy_header(handle)
    return headers


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    version = npy_format.read_magic(handle)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    if fortran_order or dtype.hasobject:
        raise ValueError("snapshot arrays must be C-ordered plain arrays")
    return shape, dtype


def read_npz_member(archive: zipfile.ZipFile, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """The array `name` of an .npz archive, read straight into `out` (C-contiguous, of its shape and
    dtype) when given: a snapshot's large arrays go where they will live, with no second copy."""
    with archive.open(f"{name}.npy") as handle:
        shape, dtype = _npy_header(handle)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"snapshot array {name} is {dtype}{list(shape)}, expected {out.dtype}{list(out.shape)}")
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        filled = 0
        while filled < len(buffer):
            read = handle.readinto(buffer[filled:filled + READ_BYTES])
            if not read:
                raise ValueError(f"snapshot array {name} is truncated")
            filled += read
    return out


def top_scores(scores: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """The `wanted` largest scores of each row and their columns, in no particular order."""
    if wanted >= scores.shape[1]:
        return scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    columns = np.argpartition(scores, scores.shape[1] - wanted, axis=1)[:, -wanted:]
    return np.take_along_axis(scores, columns, axis=1), columns


def lookup(sorted_columns: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values at the positions of `wanted` in `sorted_columns`; 0 where a column is not there."""
    if len(sorted_columns) == 0:
        return np.zeros(wanted.shape)
    positions = np.minimum(np.searchsorted(sorted_columns, wanted), len(sorted_columns) - 1)
    return np.where(sorted_columns[positions] == wanted, values[positions], 0.0)


def check_keys(keys, count: int) -> np.ndarray:
    """`keys` as a 1-D int64 array of `count` distinct values, else ValueError."""
    array = np.asarray(keys)
    if array.ndim != 1 or len(array) != count:
        raise ValueError(f"expected {count} keys in a 1-D array, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"keys must be integers (int64 image ids), got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError("keys must fit in int64")
    array = array.astype(np.int64)
    unique, counts = np.unique(array, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"duplicate keys: {unique[counts > 1][:10].tolist()}")
    return array


class OnlineKReciprocal:
    """k-reciprocal re-ranking of queries one at a time against a gallery that gains and loses items.

    `OnlineKReciprocal(vectors, keys=ids)` builds the state (an exact neighbour search of the gallery
    against itself, then the encoding); `add` and `remove` update it in time independent of the
    gallery size but for one O(n·dim) pass per added vector; `rerank` re-ranks a query's top
    candidates, `search` is the plain exact cosine search; `save` and `load` snapshot it. After any
    sequence of updates the answers equal those of a state built at once from the same items
    (see the module docstring for the invariant that makes this so).
    """

    def __init__(self, gallery_emb: np.ndarray | None = None, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, keys=None, dim: int | None = None):
        """`keys` default to 0..n-1; an empty state (gallery_emb None or with no rows) needs `dim`
        or a (0, dim) array."""
        check_parameters(k1, k2, lambda_value)
        if gallery_emb is None:
            if dim is None:
                raise ValueError("an empty OnlineKReciprocal needs dim, the embedding dimension")
            gallery_emb = np.empty((0, dim), dtype=np.float32)
        vectors = check_embeddings("gallery_emb", gallery_emb, dim)
        if vectors.shape[1] < 1:
            raise ValueError(f"the embedding dimension must be >= 1, got {vectors.shape[1]}")
        self.k1, self.k2, self.lambda_value = int(k1), int(k2), float(lambda_value)
        self._reset(vectors.shape[1], 0)
        self.add(vectors, np.arange(len(vectors)) if keys is None else keys)

    # ---- the live set -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    @property
    def keys(self) -> np.ndarray:
        """The live keys, sorted (a copy)."""
        return self._sorted_keys.copy()

    def __len__(self) -> int:
        return len(self._sorted_keys)

    def __contains__(self, key) -> bool:
        try:
            key = np.array([operator.index(key)], dtype=np.int64)
        except (TypeError, OverflowError):  # not an integer, or beyond int64: never a key
            return False
        return bool(self._present(key)[0])

    def vectors_of(self, keys) -> np.ndarray:
        """float32 (len(keys), dim) copies of the stored vectors, in the order of `keys`."""
        return self._vectors[self._slots_of(np.asarray(keys, dtype=np.int64).reshape(-1))]

    def memory(self) -> dict[str, int]:
        """Bytes held: the live vectors, the vector array as allocated, and everything else (the state)."""
        state = (self._lists.nbytes + self._pool.nbytes + sum(flags.nbytes for flags in self._flags.values())
                 + self._slot_keys.nbytes + self._sorted_keys.nbytes + self._sorted_slots.nbytes + self._free.nbytes)
        return {"vectors": len(self) * self.dim * 4, "vector_capacity": self._vectors.nbytes, "state": state}

    @property
    def _encoded_width(self) -> int:
        """List entries the encoding reads: the top-(k1+1) for R, the top-k2 for V_qe."""
        return max(self.k1 + 1, self.k2)

    def _reset(self, dim: int, capacity: int, list_width: int | None = None) -> None:
        """An empty state with room for `capacity` items, lists `list_width` long (by default the
        entries the encoding reads plus SPARE_NEIGHBOURS)."""
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._slot_keys = np.zeros(capacity, dtype=np.int64)
        list_width = self._encoded_width + SPARE_NEIGHBOURS if list_width is None else list_width
        # Twice the float32 rounding bound: also covers the float64 rounding of the distances.
        self._lists = NeighbourLists(capacity, list_width, 2 * float32_score_error(dim))
        self._flags = {name: np.zeros((capacity, width), dtype=bool) for name, width in self._flag_widths().items()}
        self._pool = RowPool(capacity)
        self._used = 0  # slots below this are live or free; above it, never used
        self._free = np.empty(0, dtype=np.int64)  # sorted
        self._sorted_keys = np.empty(0, dtype=np.int64)
        self._sorted_slots = np.empty(0, dtype=np.int64)

    def _grow(self, capacity: int) -> None:
        vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        vectors[:self._used] = self._vectors[:self._used]
        self._vectors = vectors
        self._slot_keys = np.concatenate([self._slot_keys, np.zeros(capacity - len(self._slot_keys), np.int64)])
        self._lists.grow_slots(capacity)
        self._flags = {name: np.vstack([flags, np.zeros((capacity - len(flags), flags.shape[1]), dtype=bool)])
                       for name, flags in self._flags.items()}
        self._pool.grow_slots(capacity)

    def _positions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where `keys` are (or would go) in the sorted keys, and whether they are there: a binary
        search, not a pass over the gallery."""
        if len(self) == 0:
            return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        positions = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self) - 1)
        return positions, self._sorted_keys[positions] == keys

    def _present(self, keys: np.ndarray) -> np.ndarray:
        return self._positions(keys)[1]

    def _slots_of(self, keys: np.ndarray) -> np.ndarray:
        """The slots of `keys`, else ValueError naming those not in the gallery."""
        positions, found = self._positions(keys)
        if not found.all():
            raise ValueError(f"keys not in the gallery: {keys[~found][:10].tolist()}")
        return self._sorted_slots[positions]

    def _enter(self, vectors: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Give the new items slots (free ones first), store them and index their keys."""
        reused, self._free = self._free[:len(keys)], self._free[len(keys):]
        fresh = np.arange(self._used, self._used + len(keys) - len(reused))
        if self._used + len(fresh) > len(self._vectors):
            self._grow(max(2 * len(self._vectors), self._used + len(fresh)))
        self._used += len(fresh)
        slots = np.concatenate([reused, fresh])
        self._vectors[slots] = vectors
        self._slot_keys[slots] = keys
        order = np.argsort(keys)
        positions = np.searchsorted(self._sorted_keys, keys[order])
        self._sorted_keys = np.insert(self._sorted_keys, positions, keys[order])
        self._sorted_slots = np.insert(self._sorted_slots, positions, slots[order])
        return slots

    def _leave(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """Forget the items in `slots` and free the slots for later adds."""
        positions = np.searchsorted(self._sorted_keys, keys)
        self._sorted_keys = np.delete(self._sorted_keys, positions)
        self._sorted_slots = np.delete(self._sorted_slots, positions)
        self._vectors[slots] = 0.0
        self._lists.clear(slots)
        for flags in self._flags.values():
            flags[slots] = False
        self._pool.clear(slots)
        self._free = np.union1d(self._free, slots)

    # ---- exact search -------------------------------------------------------------------------

    def _scores(self, queries: np.ndarray) -> np.ndarray:
        """float32 (len(queries), used) inner products with every slot; -inf at free slots.

        One matrix product for GEMM_MIN_ROWS queries or more; fewer go one matrix-vector product
        each, which OpenBLAS runs faster for two or three rows than its matrix product does."""
        database = self._vectors[:self._used]
        if len(queries) < GEMM_MIN_ROWS:
            scores = np.stack([database @ query for query in queries])
        else:
            scores = queries @ database.T
        if self._free.size:
            scores[:, self._free] = -np.inf
        return scores

    def _nearest(self, queries: np.ndarray, k: int, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The exact k nearest live items of each query: (cosines float64 (m, k'), slots (m, k')),
        k' = min(k, len(self)), by d = 1 - cos, ties to the lower key. `scores`: the queries'
        float32 `_scores` when the caller already has them.

        Batches of FAISS_MIN_ROWS queries or more (a gallery's own items, as it is built) go to
        faiss.knn, which selects the top k in C++ (2048 x 30,000: 0.51 s against numpy's 0.81);
        fewer (the concurrent searches of a server) are scored by numpy's BLAS and selected by
        argpartition, SCAN_ELEMENTS scores at a time: 1.2-2.3 ms a query against 100,000 x 512 in
        batches of 32 to 256, where faiss.knn took 5-17 (its BLAS path pays off on big batches only).
        FAISS cannot skip free slots: while there are any, every batch is scored by `_scores`."""
        database, tie_keys = self._vectors[:self._used], self._slot_keys[:self._used]
        if scores is not None:
            return settle_nearest(lambda rows, wanted: top_scores(scores[rows], wanted),
                                  queries, database, k, len(self), tie_keys)
        if self._free.size == 0 and len(queries) >= FAISS_MIN_ROWS:
            return settle_nearest(lambda rows, wanted: faiss.knn(queries[rows], database, wanted,
                                                                 faiss.METRIC_INNER_PRODUCT),
                                  queries, database, k, len(self), tie_keys)
        rows_per_scan = self._rows_per_scan
        parts = [self._nearest(part, k, self._scores(part))
                 for part in (queries[start:start + rows_per_scan] for start in range(0, len(queries), rows_per_scan))]
        return np.vstack([cosines for cosines, _ in parts]), np.vstack([slots for _, slots in parts])

    @property
    def _rows_per_scan(self) -> int:
        """Queries whose float32 scores against every slot fit in SCAN_ELEMENTS."""
        return max(1, SCAN_ELEMENTS // max(1, self._used))

    def _write_nearest(self, slots: np.ndarray) -> None:
        """Fill the lists of `slots` by exact search, SEARCH_ROWS at a time."""
        for start in range(0, len(slots), SEARCH_ROWS):
            part = slots[start:start + SEARCH_ROWS]
            cosines, ids = self._nearest(self._vectors[part], self._lists.width)
            self._lists.write(part, np.repeat(np.arange(len(part)), ids.shape[1]), ids.ravel(), 1.0 - cosines.ravel())

    # ---- updates ------------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, keys) -> None:
        """Enrol new gallery vectors under new `keys` (int64, distinct, not already present).

        Cost: one exact float32 pass of each new vector against the gallery (batched), then list
        and V updates local to the items whose lists or reciprocal sets change."""
        new = check_embeddings("vectors", vectors, self.dim)
        keys = check_keys(keys, len(new))
        present = self._present(keys)
        if present.any():
            raise ValueError(f"keys already in the gallery: {keys[present][:10].tolist()}")
        if len(new) == 0:
            return
        if len(self) == 0:
            self._build(new, keys)
            return
        old_count = len(self)
        slots = self._enter(new, keys)
        rows, pair_rows, pair_slots, pair_distances = self._link(slots, old_count)
        old_tops = self._lists.ids[rows, :self.k1 + 1].copy()
        self._lists.merge(rows, pair_rows, pair_slots, pair_distances, self._slot_keys)
        self._refresh(rows, old_tops, joined=slots)

    def _build(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        """The whole state of an empty gallery at once: exact lists of all items, then all V rows."""
        self._reset(self.dim, len(vectors) + int(HEADROOM * len(vectors)) + 16)
        slots = self._enter(vectors, keys)
        self._write_nearest(slots)
        self._mark_reciprocal(slots, self.k1, "reciprocal")
        self._mark_reciprocal(slots, half_k(self.k1), "half_reciprocal")
        self._encode(slots, only_changed=False)

    def _entry_bounds(self, new_slots: np.ndarray, old_count: int) -> np.ndarray:
        """Per slot, the float32 score above which one of the new items may enter its list: any
        score for a list holding all old items with room left, none for a free slot or a new item
        (its list comes from the scan itself), else its list's entry score."""
        bounds = self._lists.entry_scores[:self._used].copy()
        bounds[new_slots] = np.inf
        if old_count < self._lists.width:
            counts = self._lists.counts[:self._used]
            bounds[(counts == old_count) & (counts < self._lists.width)] = -np.inf
        return bounds

    def _link(self, slots: np.ndarray, old_count: int) -> tuple[np.ndarray, ...]:
        """Write the new items' own lists and find where they enter the others'. Returns (rows whose
        lists they enter, then per entering pair: position in rows, new slot, float64 distance)."""
        bounds = self._entry_bounds(slots, old_count)
        pair_slots, pair_rows = [], []
        for start in range(0, len(slots), self._rows_per_scan):
            part = slots[start:start + self._rows_per_scan]
            scores = self._scores(self._vectors[part])
            cosines, ids = self._nearest(self._vectors[part], self._lists.width, scores)
            self._lists.write(part, np.repeat(np.arange(len(part)), ids.shape[1]), ids.ravel(), 1.0 - cosines.ravel())
            new, row = np.nonzero(scores >= bounds)
            pair_slots.append(part[new])
            pair_rows.append(row)
        pair_slots, pair_rows = np.concatenate(pair_slots), np.concatenate(pair_rows)
        distances = 1.0 - pair_cosines(self._vectors, self._vectors, pair_slots, pair_rows)
        enters = self._enters(pair_rows, pair_slots, distances, old_count)
        rows, owner = np.unique(pair_rows[enters], return_inverse=True)
        return rows, owner, pair_slots[enters], distances[enters]

    def _enters(self, rows: np.ndarray, slots: np.ndarray, distances: np.ndarray, old_count: int) -> np.ndarray:
        """Whether each new item (slot, distance) belongs in row's list: it ranks before the last
        entry, or the list held every old item and has room."""
        counts = self._lists.counts[rows]
        last = counts - 1
        last_distance = self._lists.distances[rows, last]
        last_key = self._slot_keys[self._lists.ids[rows, last]]
        keys = self._slot_keys[slots]
        before_last = (distances < last_distance) | ((distances == last_distance) & (keys < last_key))
        return before_last | ((counts == old_count) & (counts < self._lists.width))

    def remove(self, keys) -> None:
        """Drop the items of `keys` (ValueError naming any not in the gallery).

        Cost: an integer scan of the lists for those holding them, an exact search only for lists
        left shorter than the encoding needs, then local V updates."""
        keys = check_keys(np.asarray(keys).reshape(-1), np.asarray(keys).size)
        slots = self._slots_of(keys)
        if len(slots) == 0:
            return
        if len(slots) == len(self):
            self._reset(self.dim, 0)
            return
        rows = self._lists.holding(slots, self._used)
        rows = rows[~np.isin(rows, slots)]
        old_tops = self._lists.ids[rows, :self.k1 + 1].copy()
        self._lists.discard(rows, slots)
        self._leave(slots, keys)
        # A list shorter than the encoding reads is refilled; one holding every live item is complete.
        self._write_nearest(rows[self._lists.counts[rows] < min(self._encoded_width, len(self))])
        self._refresh(rows, old_tops)
        if len(self._free) >= COMPACT_MIN_FREE and len(self._free) > len(self):
            self._compact()

    # ---- the encoding -------------------------------------------------------------------------

    def _flag_widths(self) -> dict[str, int]:
        """Per-list-position flags kept with the lists: which of the top-(k1+1) entries are
        k1-reciprocal neighbours, which of the top-(k1/2+1) are k1/2-reciprocal ones, and which
        reciprocal neighbours' half sets expand the item's R* (the 2/3 test passed)."""
        return {"reciprocal": self.k1 + 1, "half_reciprocal": half_k(self.k1) + 1, "expands": self.k1 + 1}

    def _reciprocal_mask(self, rows: np.ndarray, k: int) -> np.ndarray:
        """Which entries of each row's top-(k+1) list are k-reciprocal neighbours (the row is in
        their top-(k+1) too). Lists are exact prefixes and d is symmetric to the bit, so that is
        the row's distance to the neighbour against the neighbour's (k+1)-th entry, ties by key:
        O(k) per row, no search of the neighbours' lists."""
        lists = self._lists
        top, distances = lists.ids[rows, :k + 1], lists.distances[rows, :k + 1]
        valid = top >= 0
        neighbours = np.where(valid, top, 0)
        # A list without a (k+1)-th entry holds every item: its edge distance is the padding's inf.
        edge_distance, edge = lists.distances[neighbours, k], lists.ids[neighbours, k]
        own_keys = self._slot_keys[rows][:, None]
        inside = (distances < edge_distance) | ((distances == edge_distance) & (own_keys <= self._slot_keys[edge]))
        return valid & inside

    def _mark_reciprocal(self, rows: np.ndarray, k: int, flag: str) -> None:
        for start in range(0, len(rows), ENCODE_ROWS):
            part = rows[start:start + ENCODE_ROWS]
            self._flags[flag][part] = self._reciprocal_mask(part, k)

    def _reciprocal_sets(self, rows: np.ndarray) -> np.ndarray:
        """R(row, k1) of each row: (len(rows), k1+1) int64 member slots in list order, -1 elsewhere."""
        return np.where(self._flags["reciprocal"][rows], self._lists.ids[rows, :self.k1 + 1], -1).astype(np.int64)

    def _half_sets(self, slots: np.ndarray) -> np.ndarray:
        """R(c, k1/2) of each slot c: (len(slots), k1/2+1) int64 members, -2 elsewhere (never
        equal to the -1 padding of `_reciprocal_sets`)."""
        width = half_k(self.k1) + 1
        return np.where(self._flags["half_reciprocal"][slots], self._lists.ids[slots, :width], -2).astype(np.int64)

    def _accepted(self, owner_sets: np.ndarray, owner: np.ndarray,
                  members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each pair (owner, member c of its set): whether more than 2/3 of R(c, k1/2) lies in
        the owner's set (a row of owner_sets), so that it joins the expansion; and those half sets."""
        half = self._half_sets(members)
        shared = (half[:, :, None] == owner_sets[owner][:, None, :]).sum(axis=(1, 2))
        return shared > 2.0 / 3 * (half >= 0).sum(axis=1), half

    @property
    def _code_base(self) -> int:
        """A multiplier that packs (row position, slot) pairs into one int64 code."""
        return len(self._vectors) + 1

    def _expanded_sets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """R*(row) of each row, flat (position in rows, member slot) with each row's members in key
        order, and the rows' "expands" flags."""
        reciprocal = self._reciprocal_sets(rows)
        owner, position = np.nonzero(reciprocal >= 0)
        members = reciprocal[owner, position]
        accepted, half = self._accepted(reciprocal, owner, members)
        expands = np.zeros(reciprocal.shape, dtype=bool)
        expands[owner[accepted], position[accepted]] = True
        pair, place = np.nonzero(half[accepted] >= 0)
        joined_owner, joined = owner[accepted][pair], half[accepted][pair, place]
        base = self._code_base
        codes = np.unique(np.concatenate([owner * base + members, joined_owner * base + joined]))
        owner, members = codes // base, codes % base
        order = np.lexsort((self._slot_keys[members], owner))
        return owner[order], members[order], expands

    def _distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """float64 d of the slot pairs (left[p], right[p]): from left's list where it holds right
        (the same bits, computed by the same kernel), else computed."""
        match = self._lists.ids[left] == right[:, None]
        held = match.any(axis=1)
        distances = np.empty(len(left), dtype=np.float64)
        distances[held] = self._lists.distances[left[held], match[held].argmax(axis=1)]
        distances[~held] = 1.0 - pair_cosines(self._vectors, self._vectors, left[~held], right[~held])
        return distances

    def _encode(self, rows: np.ndarray, only_changed: bool) -> None:
        """Recompute R* and the "expands" flags of `rows`, ENCODE_ROWS at a time, and their V rows;
        with `only_changed`, V only where R* differs from the stored row's columns (V depends on
        nothing else)."""
        for start in range(0, len(rows), ENCODE_ROWS):
            part = rows[start:start + ENCODE_ROWS]
            owner, members, expands = self._expanded_sets(part)
            self._flags["expands"][part] = expands
            if only_changed:
                part, owner, members = self._changed_sets(part, owner, members)
            weights = np.exp(-self._distances(part[owner], members))
            weights /= np.bincount(owner, weights, minlength=len(part))[owner]
            self._pool.write(part, owner, members, weights)

    def _changed_sets(self, rows: np.ndarray, owner: np.ndarray,
                      members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows (with their entries) whose expanded set differs from their stored V row's columns."""
        stored_owner, stored_members, _ = self._pool.gather(rows)
        base = self._code_base
        differing = np.setxor1d(owner * base + members, stored_owner * base + stored_members, assume_unique=True)
        changed = np.unique(differing // base)
        keep = np.isin(owner, changed)
        return rows[changed], np.searchsorted(changed, owner[keep]), members[keep]

    def _list_changes(self, rows: np.ndarray, old_tops: np.ndarray, k: int) -> np.ndarray:
        """Live slots whose R(., k) may differ after rows' top-(k+1) lists went from old_tops to the
        current ones: rows whose top-(k+1) changed, and every item that entered or left one."""
        new_tops = self._lists.ids[rows, :k + 1]
        base = self._code_base
        position = np.arange(len(rows))[:, None] * base
        old_codes, new_codes = (position + old_tops[:, :k + 1] + 1), (position + new_tops + 1)
        differing = np.setxor1d(old_codes[old_tops[:, :k + 1] >= 0], new_codes[new_tops >= 0], assume_unique=True)
        changed = np.union1d(rows[np.unique(differing // base)], differing % base - 1)
        return changed[self._live(changed)]

    def _refresh(self, rows: np.ndarray, old_tops: np.ndarray, joined: np.ndarray | None = None) -> None:
        """Bring the flags and V up to date after the lists of `rows` changed from `old_tops` and
        the items `joined` arrived with lists of their own.

        R(., k) can have changed only where `_list_changes` says, and for the newcomers; not for the
        members of a newcomer's list, whose R changes only if the newcomer entered their list too (and
        then they are among `rows`). R* of an item depends on its R and the half sets of its members,
        so it is recomputed for items whose R may have changed and for those that hold a member with
        a changed half set which passes the 2/3 test now or did before (a half set that expands
        nothing either way changes nothing)."""
        joined = np.empty(0, dtype=np.int64) if joined is None else joined
        moved = np.union1d(self._list_changes(rows, old_tops, self.k1), joined)
        moved_half = np.union1d(self._list_changes(rows, old_tops, half_k(self.k1)), joined)
        self._mark_reciprocal(moved, self.k1, "reciprocal")
        self._mark_reciprocal(moved_half, half_k(self.k1), "half_reciprocal")
        self._encode(np.union1d(moved, self._expansion_changes(moved_half, moved)), only_changed=True)

    def _expansion_changes(self, changed_halves: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """Items outside `moved` (their R unchanged) that hold a member c of `changed_halves` in R
        and accept its half set now or did before. R is symmetric, so they are R(c, k1)."""
        affected = []
        for start in range(0, len(changed_halves), ENCODE_ROWS):
            part = changed_halves[start:start + ENCODE_ROWS]
            sets = self._reciprocal_sets(part)
            holder, position = np.nonzero(sets >= 0)
            rows, members = sets[holder, position], part[holder]
            outside = ~np.isin(rows, moved)
            rows, members = rows[outside], members[outside]
            place = (self._lists.ids[rows, :self.k1 + 1] == members[:, None]).argmax(axis=1)
            accepted, _ = self._accepted(self._reciprocal_sets(rows), np.arange(len(rows)), members)
            affected.append(rows[accepted | self._flags["expands"][rows, place]])
        return np.unique(np.concatenate(affected)) if affected else np.empty(0, dtype=np.int64)

    def _live(self, slots: np.ndarray) -> np.ndarray:
        """Mask of `slots` holding a live item (slot -1, a list's padding, never does)."""
        inside = (slots >= 0) & (slots < self._used)
        live = np.zeros(len(slots), dtype=bool)
        live[inside] = self._lists.counts[slots[inside]] > 0
        return live

    # ---- queries ------------------------------------------------------------------------------

    def _require_items(self) -> None:
        if len(self) == 0:
            raise ValueError("the gallery is empty: nothing to rank against")

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Plain exact cosine search: (cosines (n, k') float64, keys (n, k') int64), k' = min(k,
        len(self)), best first by d = 1 - cos, ties to the lower key."""
        queries = check_embeddings("query_emb", query_emb, self.dim)
        self._require_items()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        cosines, slots = self._nearest(queries, k)
        return cosines, self._slot_keys[slots]

    def rerank(self, query_emb: np.ndarray, candidates: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Re-rank each query's top `candidates` gallery items: (final distances (n, c) float64,
        keys (n, c) int64, raw cosines to the query (n, c) float64), ascending by final distance,
        ties to the lower key; c = min(candidates, len(self))."""
        queries = check_embeddings("query_emb", query_emb, self.dim)
        self._require_items()
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        shown = min(candidates, len(self))
        searched = min(len(self), max(shown, self.k1, self.k2 - 1))
        distances = np.empty((len(queries), shown), dtype=np.float64)
        keys = np.empty((len(queries), shown), dtype=np.int64)
        raw_cosines = np.empty((len(queries), shown), dtype=np.float64)
        cosines, slots = self._nearest(queries, searched)
        for row, query in enumerate(queries):
            distances[row], keys[row], raw_cosines[row] = self._rerank_one(query, cosines[row], slots[row], shown)
        return distances, keys, raw_cosines

    def _rerank_one(self, query: np.ndarray, cosines: np.ndarray, slots: np.ndarray,
                    shown: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        distances = 1.0 - cosines
        query_v = self._query_v(query, distances, slots)
        query_columns, query_values = self._query_v_qe(query_v, slots)
        candidates = slots[:shown]
        owner, columns, values = self._candidate_v_qe(candidates, distances[:shown], query_v)
        by_column = np.argsort(query_columns)
        minima = np.minimum(values, lookup(query_columns[by_column], query_values[by_column], columns))
        shared = np.bincount(owner, minima, minlength=shown)
        mass = np.bincount(owner, values, minlength=shown)
        jaccard = jaccard_distances(shared[None, :], np.array([query_values.sum()]), mass)[0]
        final = jaccard * (1 - self.lambda_value) + distances[:shown] * self.lambda_value
        keys = self._slot_keys[candidates]
        order = np.lexsort((keys, final))
        return final[order], keys[order], cosines[:shown][order]

    def _k1_radii(self, slots: np.ndarray) -> np.ndarray:
        """Distance to each item's (k1+1)-th list entry: a query closer than that enters its top-(k1+1);
        any query does while the gallery is too small to fill one."""
        if len(self) <= self.k1:
            return np.full(len(slots), np.inf)
        return self._lists.distances[slots, self.k1]

    def _query_v(self, query: np.ndarray, distances: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The query's row of V: columns (gallery slots in key order, then QUERY_COLUMN for the
        query itself) and weights exp(-d) summing to 1."""
        forward = slots[:self.k1]
        reciprocal = forward[distances[:self.k1] < self._k1_radii(forward)]
        # The query's own R(q, k1/2) lies inside R(q, k1), so only gallery members can expand it.
        accepted, half = self._accepted(reciprocal[None, :], np.zeros(len(reciprocal), dtype=np.int64), reciprocal)
        joined = half[accepted]
        expanded = np.union1d(reciprocal, joined[joined >= 0])
        expanded = expanded[np.argsort(self._slot_keys[expanded])]
        member_distances = self._query_distances(query, expanded, distances, slots)
        own_distance = 1.0 - pair_cosines(query[None, :], query[None, :], np.zeros(1, np.int64), np.zeros(1, np.int64))
        weights = np.exp(-np.concatenate([member_distances, own_distance]))
        return np.append(expanded, QUERY_COLUMN), weights / weights.sum()

    def _query_distances(self, query: np.ndarray, wanted: np.ndarray, distances: np.ndarray,
                         slots: np.ndarray) -> np.ndarray:
        """float64 d from the query to the `wanted` slots: from its searched list where there, else computed."""
        by_slot = np.argsort(slots)
        position = np.minimum(np.searchsorted(slots[by_slot], wanted), len(slots) - 1)
        held = slots[by_slot][position] == wanted
        result = np.where(held, distances[by_slot][position], 0.0)
        missing = wanted[~held]
        result[~held] = 1.0 - pair_cosines(query[None, :], self._vectors, np.zeros(len(missing), np.int64), missing)
        return result

    def _cell_sums(self, owner: np.ndarray, columns: np.ndarray,
                   values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sum the values of each (owner, column) cell, cells in canonical order (by owner, then
        column key, the query's column last) and each cell summed in the order given."""
        is_query = columns == QUERY_COLUMN
        order = np.lexsort((self._slot_keys[np.where(is_query, 0, columns)], is_query, owner))
        owner, columns, values = owner[order], columns[order], values[order]
        starts = np.ones(len(owner), dtype=bool)
        starts[1:] = (owner[1:] != owner[:-1]) | (columns[1:] != columns[:-1])
        return owner[starts], columns[starts], np.bincount(np.cumsum(starts) - 1, values)

    def _query_v_qe(self, query_v: tuple[np.ndarray, np.ndarray], slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean of V over the query's top-k2 list: the query itself and its k2-1 nearest gallery items."""
        if self.k2 == 1:
            return query_v
        others = slots[:self.k2 - 1]
        _, columns, values = self._pool.gather(others)
        _, columns, sums = self._cell_sums(np.zeros(len(columns) + len(query_v[0]), dtype=np.int64),
                                           np.concatenate([query_v[0], columns]),
                                           np.concatenate([query_v[1], values]))
        return columns, sums / (len(others) + 1)

    def _candidate_v_qe(self, candidates: np.ndarray, distances: np.ndarray,
                        query_v: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The candidates' V_qe rows as (candidate position, column, value) cells. Where the query
        enters a candidate's top-k2 list, its V row replaces the list's last one (or joins a list
        shorter than k2, in a gallery that small)."""
        if self.k2 == 1:
            return self._pool.gather(candidates)
        members = self._lists.ids[candidates, :self.k2].astype(np.int64)
        if len(self) >= self.k2:
            entered = distances < self._lists.distances[candidates, self.k2 - 1]
            members[entered, -1] = -1
        else:
            entered = np.ones(len(candidates), dtype=bool)
        member_owner, member_position = np.nonzero(members >= 0)
        owner, columns, values = self._pool.gather(members[member_owner, member_position])
        query_columns, query_values = query_v
        entered_at = np.flatnonzero(entered)
        owner = np.concatenate([member_owner[owner], np.repeat(entered_at, len(query_columns))])
        columns = np.concatenate([columns, np.tile(query_columns, len(entered_at))])
        values = np.concatenate([values, np.tile(query_values, len(entered_at))])
        rows_averaged = np.bincount(member_owner, minlength=len(candidates)) + entered
        owner, columns, sums = self._cell_sums(owner, columns, values)
        return owner, columns, sums / rows_averaged[owner]

    # ---- snapshots ----------------------------------------------------------------------------

    def save(self, path: str | Path, compressed: bool = False) -> None:
        """Write the whole state to one .npz file, atomically (a crash leaves the previous file)."""
        arrays = self._snapshot()
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            (np.savez_compressed if compressed else np.savez)(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "OnlineKReciprocal":
        """The state `save` wrote: no search and no encoding, only reading the arrays back, each
        straight into the array it will live in. A file that is not such a snapshot, or is damaged,
        is a ValueError (a missing array a KeyError, an unreadable file an OSError)."""
        try:
            with zipfile.ZipFile(path) as archive:
                return cls._from_archive(archive, path)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ValueError(f"{path} is not a readable OnlineKReciprocal snapshot ({FORMAT}): {error}") from error

    @classmethod
    def _from_archive(cls, archive: zipfile.ZipFile, path: str | Path) -> "OnlineKReciprocal":
        headers = npz_headers(archive)
        if "format" not in headers or str(read_npz_member(archive, "format")) != FORMAT:
            raise ValueError(f"{path} is not an OnlineKReciprocal snapshot ({FORMAT})")
        state = cls.__new__(cls)
        state.k1, state.k2 = int(read_npz_member(archive, "k1")), int(read_npz_member(archive, "k2"))
        state.lambda_value = float(read_npz_member(archive, "lambda_value"))
        check_parameters(state.k1, state.k2, state.lambda_value)
        state._restore(lambda name, out=None: read_npz_member(archive, name, out), headers["vectors"][0],
                       headers["neighbours"][0][1])
        return state

    def _compact(self) -> None:
        """Renumber the live items 0..n-1 (dropping free slots), as a save and load would."""
        arrays = self._snapshot()

        def read(name: str, out: np.ndarray | None = None) -> np.ndarray:
            if out is None:
                return arrays[name]
            out[...] = arrays[name]
            return out

        self._restore(read, arrays["vectors"].shape, self._lists.width)

    def _snapshot(self) -> dict[str, np.ndarray]:
        """The state as flat arrays, items in key order and renumbered 0..n-1 (no free slots)."""
        slots = self._sorted_slots
        renumber = np.full(self._used + 1, -1, dtype=np.int32)  # the extra last entry maps padding -1 to -1
        renumber[slots] = np.arange(len(slots), dtype=np.int32)
        indptr, columns, values = self._pool.to_csr(slots)
        return {
            "format": np.array(FORMAT), "k1": np.array(self.k1), "k2": np.array(self.k2),
            "lambda_value": np.array(self.lambda_value), "keys": self._sorted_keys.copy(),
            "vectors": self._vectors[slots], "neighbours": renumber[self._lists.ids[slots]],
            "neighbour_distances": self._lists.distances[slots], "neighbour_counts": self._lists.counts[slots],
            "v_indptr": indptr, "v_columns": renumber[columns], "v_values": values,
            **{f"flags_{name}": flags[slots] for name, flags in self._flags.items()},
        }

    def _restore(self, read, vectors_shape: tuple[int, int], list_width: int) -> None:
        """Take the state from `_snapshot`'s arrays, item i in slot i: `read(name, out=None)` gives
        the array `name`, written into `out` when given. The lists keep the width they were saved
        with (the spare entries may differ from SPARE_NEIGHBOURS now; the answers do not depend on them)."""
        count, dim = vectors_shape
        keys, counts, indptr = read("keys").astype(np.int64), read("neighbour_counts"), read("v_indptr")
        if len(keys) != count or len(counts) != count or len(indptr) != count + 1 or np.any(np.diff(keys) <= 0):
            raise ValueError("inconsistent OnlineKReciprocal snapshot: array lengths or key order do not match")
        if list_width < self._encoded_width:
            raise ValueError(f"snapshot lists are {list_width} long; k1={self.k1}, k2={self.k2} "
                             f"need {self._encoded_width}")
        self._reset(dim, count + int(HEADROOM * count) + 16, list_width)
        read("vectors", self._vectors[:count])
        self._slot_keys[:count] = keys
        self._sorted_keys, self._sorted_slots, self._used = keys, np.arange(count), count
        self._lists.restore(counts, lambda ids, distances: (read("neighbours", ids),
                                                            read("neighbour_distances", distances)))
        for name, flags in self._flags.items():
            read(f"flags_{name}", flags[:count])
        self._pool.restore(indptr, lambda columns, values: (read("v_columns", columns), read("v_values", values)))
