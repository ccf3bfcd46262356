"""The gallery: a FAISS inner-product index over L2-normalised embeddings, plus a metadata table.

Each vector has an int64 id, and the metadata table (image id, identity, species, path, ...) is
indexed by it. Vectors are added and removed incrementally; kinds whose FAISS index cannot delete
(HNSW, IVF-PQ with refinement) hide removed ids from every search and drop them when the index is
rebuilt (`compact`, done automatically once a fifth of the vectors are hidden). An index is saved as
one file written atomically, so a crash leaves the previous gallery intact.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from reid.errors import ReidError
from reid.io import atomic_path

KINDS = ("flat", "hnsw", "ivfpq")
FORMAT = "wildreid-gallery-1"
COMPACT_FRACTION = 0.2
REFINE_K_FACTOR = 4


def choose_kind(kind: str, size: int, ann_threshold: int, ann_kind: str = "ivfpq") -> str:
    """`auto` is exact `flat` for galleries up to `ann_threshold` vectors, else the ANN kind.

    IVF-PQ rather than HNSW: re-ID galleries are tight clusters (several photos per individual),
    on which an HNSW graph splits into islands and loses recall, while IVF lists follow clusters.
    """
    if kind == "auto":
        return "flat" if size <= ann_threshold else ann_kind
    if kind not in KINDS:
        raise ReidError(f"unknown index kind '{kind}'; use auto, {', '.join(KINDS)}")
    return kind


def _factory(kind: str, dim: int, size: int) -> faiss.Index:
    if kind == "flat":
        spec = "IDMap2,Flat"
    elif kind == "hnsw":
        spec = "IDMap2,HNSW32,Flat"
    else:
        # sqrt(n) inverted lists (k-means on a million vectors stays at minutes on 2 cores); PQ codes
        # with dim/8 sub-quantisers, their candidates re-scored with the exact vectors (RFlat)
        nlist = max(1, min(65536, int(math.sqrt(max(size, 1)))))
        spec = f"IDMap2,IVF{nlist},PQ{max(1, dim // 8)}x8,RFlat"
    return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)


def _as_vectors(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ReidError(f"embeddings must be a 2-D array (images, dim), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ReidError(f"embedding dimension {array.shape[1]} does not match the gallery's {dim}; "
                        "embed with the checkpoint that built this gallery")
    if not np.isfinite(array).all():
        raise ReidError("embeddings hold NaN or infinite values")
    return array


class GalleryIndex:
    def __init__(self, dim: int, kind: str = "flat", hnsw_ef_search: int = 128, ivf_nprobe: int = 32):
        if kind not in KINDS:
            raise ReidError(f"unknown index kind '{kind}'; use {', '.join(KINDS)}")
        self.dim, self.kind = int(dim), kind
        self.search_options = {"hnsw_ef_search": hnsw_ef_search, "ivf_nprobe": ivf_nprobe}
        self.index: faiss.Index | None = None
        self.metadata = pd.DataFrame(index=pd.Index([], dtype=np.int64, name="vector_id"))
        self.hidden: set[int] = set()
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.metadata)

    # ------------------------------------------------------------------ changes
    def add(self, vectors: np.ndarray, metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Append vectors with their metadata rows; return their new ids."""
        vectors = _as_vectors(vectors, self.dim)
        if metadata is None:
            metadata = pd.DataFrame(index=range(len(vectors)))
        if len(metadata) != len(vectors):
            raise ReidError(f"{len(vectors)} vectors but {len(metadata)} metadata rows")
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        if len(vectors) == 0:
            return ids
        if self.index is None:
            self.index = self._new_index(vectors)
        self.index.add_with_ids(vectors, ids)
        self.next_id += len(vectors)
        rows = metadata.reset_index(drop=True).set_axis(pd.Index(ids, name="vector_id"))
        self.metadata = rows if self.metadata.empty else pd.concat([self.metadata, rows])
        return ids

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        index = _factory(self.kind, self.dim, len(vectors))
        if not index.is_trained:
            inner = faiss.extract_index_ivf(index)
            minimum = max(inner.nlist * 4, 4 * 256)  # k-means per list, and 256 codes per PQ sub-quantiser
            if len(vectors) < minimum:
                raise ReidError(f"an ivfpq index needs at least {minimum} vectors to train on, got "
                                f"{len(vectors)}; use --kind flat or hnsw for a gallery this small")
            index.train(vectors)
        return index

    def remove(self, ids) -> int:
        """Remove vectors by id (unknown ids are ignored); return how many were removed."""
        ids = np.intersect1d(np.asarray(list(ids), dtype=np.int64), self.metadata.index.to_numpy())
        if ids.size == 0:
            return 0
        if self.kind == "flat":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            self.hidden.update(int(i) for i in ids)
        self.metadata = self.metadata.drop(index=ids)
        if self.hidden and len(self.hidden) > COMPACT_FRACTION * (len(self) + len(self.hidden)):
            self.compact()
        return int(ids.size)

    def vectors(self, ids) -> np.ndarray:
        """The stored vectors of `ids` (exact for flat and hnsw; ivfpq keeps them for refinement)."""
        ids = np.asarray(ids, dtype=np.int64)
        unknown = np.setdiff1d(ids, self.metadata.index.to_numpy())
        if unknown.size:
            raise ReidError(f"vector ids not in the gallery: {unknown[:5].tolist()}")
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if ids.size else np.zeros((0, self.dim), np.float32)

    def compact(self) -> None:
        """Rebuild the FAISS index from the live vectors, dropping hidden ones."""
        live = self.metadata.index.to_numpy()
        vectors = self.vectors(live)
        self.hidden.clear()
        self.index = self._new_index(vectors) if len(live) else None
        if self.index is not None:
            self.index.add_with_ids(vectors, live)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, ids) per query, best first; missing places hold -inf and -1."""
        queries = _as_vectors(queries, self.dim)
        if k < 1:
            raise ReidError(f"k must be at least 1, got {k}")
        if self.index is None or len(self) == 0:
            raise ReidError("the gallery is empty: add images of known individuals before searching")
        scores, ids = self.index.search(queries, k, params=self._search_params())
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_params(self) -> faiss.SearchParameters:
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=self.search_options["hnsw_ef_search"])
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=self.search_options["ivf_nprobe"])
        else:
            params = faiss.SearchParameters()
        if self.hidden:
            batch = faiss.IDSelectorBatch(np.fromiter(self.hidden, np.int64))
            params.sel = faiss.IDSelectorNot(batch)
            params._keep = (batch, params.sel)  # the C++ side holds raw pointers: keep the Python objects alive
        if self.kind == "ivfpq":  # PQ candidates re-scored with exact vectors
            outer = faiss.IndexRefineSearchParameters(k_factor=REFINE_K_FACTOR, base_index_params=params)
            outer._keep = params
            return outer
        return params

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """One file (written atomically): the FAISS index, the metadata table and the header."""
        header = {"format": FORMAT, "dim": self.dim, "kind": self.kind, "next_id": self.next_id,
                  "hidden": sorted(self.hidden), "search_options": self.search_options}
        blob = faiss.serialize_index(self.index) if self.index is not None else np.zeros(0, np.uint8)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, header=np.array(json.dumps(header)), faiss=blob,
                         metadata=np.array(self.metadata.reset_index().to_csv(index=False)))

    @classmethod
    def load(cls, path: str | Path) -> "GalleryIndex":
        path = Path(path)
        if not path.is_file():
            raise ReidError(f"gallery index '{path}' not found; build one with `reid index build`")
        try:
            with np.load(path) as data:
                header = json.loads(str(data["header"]))
                blob, table = data["faiss"], str(data["metadata"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ReidError(f"'{path}' is not a readable gallery index ({exc}); rebuild it with `reid index build`") from None
        if header.get("format") != FORMAT:
            raise ReidError(f"'{path}' has format {header.get('format')!r}, expected {FORMAT!r}; rebuild it")
        gallery = cls(header["dim"], header["kind"], **header["search_options"])
        gallery.index = faiss.deserialize_index(blob) if blob.size else None
        gallery.metadata = pd.read_csv(io.StringIO(table), dtype=str, keep_default_na=False)
        gallery.metadata["vector_id"] = gallery.metadata["vector_id"].astype(np.int64)
        gallery.metadata = gallery.metadata.set_index("vector_id")
        gallery.hidden, gallery.next_id = set(header["hidden"]), header["next_id"]
        return gallery


def build_gallery(vectors: np.ndarray, metadata: pd.DataFrame, kind: str = "auto", ann_threshold: int = 200_000,
                  **search_options) -> GalleryIndex:
    """A gallery of these vectors, of the kind asked (or chosen by size with `auto`)."""
    vectors = _as_vectors(vectors, None)
    gallery = GalleryIndex(vectors.shape[1], choose_kind(kind, len(vectors), ann_threshold), **search_options)
    gallery.add(vectors, metadata)
    return gallery
