"""A folder of embedding chunks: computed once, reused, resumed, never mixed across models.

Layout of a cache folder:
    manifest.json      the model fingerprint (weights hash, preprocessing, TTA) and its description
    chunk_000000.npz   compressed: embeddings, hashes (image content), paths, sizes, mtimes, fingerprint
    table.csv          the rows last embedded, with their content hash (what `reid index build` reads)

Each chunk is written atomically (temporary file, then rename) and carries the fingerprint itself,
so a killed run leaves only whole chunks and a rerun embeds only what no chunk holds yet. Images
are keyed by content hash: a moved or renamed photo is not embedded again. A file whose path, size
and modification time match a cached entry is not even read again.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from reid.embedding.embedder import Embedder
from reid.errors import DataError, ReidError
from reid.io import atomic_path, write_json, write_text

CHUNK_GLOB = "chunk_*.npz"
HASH_BLOCK = 1 << 20


def file_hash(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read image '{path}' ({exc.strerror}); restore the file or remove its row") from None
    return digest.hexdigest()


CHUNK_KEYS = ("embeddings", "hashes", "paths", "sizes", "mtimes", "fingerprint")


def _read_chunk(path: Path) -> dict | None:
    """A chunk's arrays, or None when the file is damaged (it is then recomputed, never trusted)."""
    try:
        with np.load(path) as chunk:
            return {key: chunk[key] for key in CHUNK_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        print(f"warning: ignoring damaged cache chunk '{path}' ({exc}); its images will be embedded again")
        return None


@dataclass
class _Entries:
    """Every cached vector with the file facts that let a rerun skip hashing unchanged files."""
    embeddings: np.ndarray
    hashes: np.ndarray
    paths: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "_Entries":
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, "U32"), np.zeros(0, "U1"),
                   np.zeros(0, np.int64), np.zeros(0, np.int64))


class EmbeddingCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    # ------------------------------------------------------------------ reading
    def manifest(self) -> dict | None:
        path = self.folder / "manifest.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReidError(f"{path} is unreadable ({exc}); delete the cache folder '{self.folder}' to rebuild it")

    def chunk_files(self) -> list[Path]:
        return sorted(self.folder.glob(CHUNK_GLOB))

    def _entries(self, fingerprint: str | None = None, dim: int = 0) -> _Entries:
        """All cached entries of `fingerprint` (default: the manifest's), later chunks last."""
        fingerprint = fingerprint or (self.manifest() or {}).get("fingerprint")
        parts = []
        for path in self.chunk_files():
            chunk = _read_chunk(path)
            if chunk is not None and str(chunk["fingerprint"]) == fingerprint:
                parts.append(chunk)
        if not parts:
            return _Entries.empty(dim)
        return _Entries(**{key: np.concatenate([p[key] for p in parts]) for key in CHUNK_KEYS if key != "fingerprint"})

    def table(self) -> pd.DataFrame:
        """The rows last embedded (their metadata and content hash)."""
        path = self.folder / "table.csv"
        if not path.exists():
            raise ReidError(f"'{self.folder}' holds no embeddings (no table.csv); run `reid embed --out {self.folder}` first")
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    def lookup(self, hashes: Sequence[str]) -> np.ndarray:
        """Embeddings of images by content hash, in the order asked."""
        entries = self._entries()
        position = {h: i for i, h in enumerate(entries.hashes)}
        missing = [h for h in hashes if h not in position]
        if missing:
            raise ReidError(f"{len(missing)} images of the request are not in the cache '{self.folder}'; "
                            "run `reid embed` on them first")
        return entries.embeddings[[position[h] for h in hashes]]

    def load(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The last embedded table and one embedding per row."""
        table = self.table()
        return table, self.lookup(table["hash"].tolist())

    # ------------------------------------------------------------------ writing
    def _start(self, embedder: Embedder, log) -> None:
        """Make the folder this embedder's; chunks of another model are removed, never mixed in."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(".chunk_*.tmp"):  # a run killed mid-write
            leftover.unlink()
        manifest = self.manifest()
        if manifest and manifest.get("fingerprint") != embedder.fingerprint:
            log(f"cache '{self.folder}' was made by another model or TTA ({manifest.get('fingerprint')}); "
                f"its vectors are discarded and recomputed for {embedder.fingerprint}")
        write_json(self.folder / "manifest.json", {"fingerprint": embedder.fingerprint, "model": embedder.describe()})
        for path in self.chunk_files():
            chunk = _read_chunk(path)
            if chunk is None or str(chunk["fingerprint"]) != embedder.fingerprint:
                path.unlink()

    def update(self, embedder: Embedder, table: pd.DataFrame, chunk_size: int = 100, progress: bool = True,
               log=print) -> np.ndarray:
        """Embed every row of `table` not cached yet, chunk by chunk; return all rows' embeddings."""
        if chunk_size < 1:
            raise ReidError(f"--chunk must be at least 1, got {chunk_size}")
        self._start(embedder, log)
        cached = self._entries(embedder.fingerprint, embedder.embedding_dim)
        paths = table["path"].astype(str).tolist()
        hashes, sizes, mtimes = self._hashes(paths, cached, progress)
        todo, seen = [], set(cached.hashes.tolist())
        for i, h in enumerate(hashes):  # one row per new content: duplicate files are embedded once
            if h not in seen:
                seen.add(h)
                todo.append(i)
        if todo:
            log(f"embedding {len(todo)} new images of {len(paths)} in chunks of {chunk_size} into {self.folder}")
        number = self._next_chunk_number()
        bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=None if progress else True)
        pending = np.zeros((0, embedder.embedding_dim), np.float32)
        done = 0
        # one loader for the whole run: chunk boundaries do not stall decoding
        for batch in embedder.iter_paths([paths[i] for i in todo]) if todo else ():
            pending = np.concatenate([pending, batch])
            bar.update(len(batch))
            # a full chunk, or the last rows of the run
            while len(pending) >= chunk_size or (len(pending) and done + len(pending) == len(todo)):
                rows = todo[done:done + min(chunk_size, len(pending))]
                self._write_chunk(number, embedder.fingerprint, pending[:len(rows)], [hashes[i] for i in rows],
                                  [paths[i] for i in rows], sizes[rows], mtimes[rows])
                pending, done, number = pending[len(rows):], done + len(rows), number + 1
        bar.close()
        write_text(self.folder / "table.csv", table.drop(columns=["row"], errors="ignore")
                   .assign(hash=hashes).to_csv(index=False))
        return self.lookup(hashes)

    def _hashes(self, paths: list[str], cached: _Entries, progress: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Content hash per path; a path whose size and mtime match its cached entry is not reread."""
        by_stat = {(p, int(s), int(m)): h for p, s, m, h in zip(cached.paths, cached.sizes, cached.mtimes, cached.hashes)}
        hashes, sizes, mtimes = [], np.zeros(len(paths), np.int64), np.zeros(len(paths), np.int64)
        for i, path in enumerate(tqdm(paths, desc="hashing", unit="img", disable=None if progress else True,
                                      leave=False)):
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise DataError(f"cannot read image '{path}' ({exc.strerror}); restore the file or remove its row") from None
            sizes[i], mtimes[i] = stat.st_size, stat.st_mtime_ns
            hashes.append(by_stat.get((path, stat.st_size, stat.st_mtime_ns)) or file_hash(path))
        return hashes, sizes, mtimes

    def _next_chunk_number(self) -> int:
        numbers = [int(p.stem.split("_")[1]) for p in self.chunk_files()]
        return max(numbers, default=-1) + 1

    def _write_chunk(self, number: int, fingerprint: str, emb: np.ndarray, hashes: list[str], paths: list[str],
                     sizes: np.ndarray, mtimes: np.ndarray) -> None:
        with atomic_path(self.folder / f"chunk_{number:06d}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, embeddings=emb.astype(np.float32), hashes=np.array(hashes),
                                    paths=np.array(paths), sizes=sizes, mtimes=mtimes,
                                    fingerprint=np.array(fingerprint))


def cached_embeddings(embedder: Embedder, table: pd.DataFrame, cache_root: str | Path = "cache",
                      chunk_size: int = 100, progress: bool = True) -> np.ndarray:
    """Embeddings of the table's rows through the cache `cache_root/<model fingerprint>`."""
    return EmbeddingCache(Path(cache_root) / embedder.fingerprint).update(embedder, table, chunk_size, progress)
