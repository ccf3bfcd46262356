"""Kaggle pair submissions: one similarity per (query, gallery) row of a competition's pair file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reid.errors import DataError

QUERY_COLUMNS = ("query_image", "query")
GALLERY_COLUMNS = ("gallery_image", "gallery")
ID_COLUMNS = ("row_id", "id", "pair_id")


def read_pairs(path: str | Path, images: str | Path) -> tuple[pd.DataFrame, str, str, str | None]:
    """The pair table and its (query, gallery, id) column names; every named image must exist."""
    path, images = Path(path), Path(images)
    try:
        pairs = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read the pair file '{path}' ({exc})") from None
    query, gallery = _column(pairs, QUERY_COLUMNS, path), _column(pairs, GALLERY_COLUMNS, path)
    id_column = next((c for c in ID_COLUMNS if c in pairs.columns), None)
    names = pd.unique(pd.concat([pairs[query], pairs[gallery]]))
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images named in '{path}' are not in '{images}', e.g. {missing[:3]}; "
                        "check --images")
    return pairs, query, gallery, id_column


def _column(pairs: pd.DataFrame, options: tuple[str, ...], path: Path) -> str:
    found = next((c for c in options if c in pairs.columns), None)
    if found is None:
        raise DataError(f"'{path}' has no column {' or '.join(options)} (columns: {', '.join(pairs.columns)})")
    return found


def pair_similarities(query_emb: np.ndarray, gallery_emb: np.ndarray, query_index: np.ndarray,
                      gallery_index: np.ndarray, reranked_rows=None, blend: float = 0.5, chunk: int = 256) -> np.ndarray:
    """Similarity of each pair (query_emb[query_index[i]], gallery_emb[gallery_index[i]]): cosine,
    blended with re-ranked scores.

    `reranked_rows(start, stop)` gives re-ranked similarities of images start:stop against all
    images; it is read in chunks of rows, so no all-pairs matrix is held. The blend is
    `blend * cosine + (1 - blend) * re-ranked`.
    """
    scores = np.einsum("ij,ij->i", query_emb[query_index], gallery_emb[gallery_index])
    if reranked_rows is None:
        return scores
    reranked = np.empty_like(scores)
    for start in range(0, len(query_emb), chunk):
        stop = min(start + chunk, len(query_emb))
        pairs = np.flatnonzero((query_index >= start) & (query_index < stop))
        if pairs.size:
            reranked[pairs] = reranked_rows(start, stop)[query_index[pairs] - start, gallery_index[pairs]]
    return blend * scores + (1 - blend) * reranked
