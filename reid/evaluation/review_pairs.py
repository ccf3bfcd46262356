"""People's verdicts as labelled pairs for the next training run: one row per (query photo, candidate
individual) that a verdict in the review web app was about.

    confirmed   same        the photo is of the candidate
    rejected    different   the photo is not of the candidate
    new         different   against the first candidate shown, when there was one

Skipped verdicts say nothing and give no row. `query_path` is the photo's file in the store (its
content address under the store folder) when the store holds an image of that SHA-256 and the file
is there; a photo only rejected, never stored, has none.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from reid.errors import ReidError
from reid.evaluation.review_calibration import all_reviews, open_store

COLUMNS = ("review_id", "at", "reviewer", "species", "encounter", "animal_index", "query_sha256", "query_path",
           "candidate_id", "candidate_name", "candidate_rank", "label", "individual_id", "score", "cosine",
           "best_score", "decision", "model")
LABELS = {"confirmed": "same", "rejected": "different", "new": "different"}


def stored_paths(store, store_dir: Path, digests) -> dict[str, str]:
    """SHA-256 -> absolute path of a stored file of that photo (those the store holds and finds on disk)."""
    # files are content-addressed: every image of one photo names the same file
    return {sha256: str(store_dir / relpath) for sha256, relpath in store.paths_of_photos(digests).items()
            if (store_dir / relpath).is_file()}


def review_pairs(rows: list[dict], names: dict[int, str], paths: dict[str, str]) -> pd.DataFrame:
    """The labelled pairs of these reviews (`names`: individual id -> name; `paths`: SHA-256 -> file)."""
    out = []
    for row in rows:
        label = LABELS.get(row["verdict"])
        if label is None or row.get("candidate_id") is None:
            continue  # skipped, or a new individual that had no candidate to differ from
        for sha256 in row["query_sha256"]:
            out.append({
                "review_id": row["id"], "at": row["at"], "reviewer": row.get("key_name"), "species": row["species"],
                "encounter": row.get("encounter"), "animal_index": row.get("animal_index"), "query_sha256": sha256,
                "query_path": paths.get(sha256, ""), "candidate_id": row["candidate_id"],
                "candidate_name": names.get(row["candidate_id"], ""), "candidate_rank": row.get("candidate_rank"),
                "label": label, "individual_id": row.get("individual_id"), "score": row.get("score"),
                "cosine": row.get("cosine"), "best_score": row.get("best_score"), "decision": row.get("decision"),
                "model": row.get("model")})
    table = pd.DataFrame(out, columns=list(COLUMNS))
    for column in ("animal_index", "candidate_id", "candidate_rank", "individual_id"):
        table[column] = table[column].astype("Int64")  # whole numbers, empty where unknown
    return table


def export_review_pairs(store: str | Path, out: str | Path, species: str | None = None,
                        database_url: str | None = None) -> tuple[pd.DataFrame, int]:
    """Write the reviewed pairs of `store` (of one species, else all) to the CSV `out` (atomically);
    returns the table and how many reviews it was made from."""
    from reid.io import write_text

    store_dir = Path(store).expanduser().absolute()
    opened = open_store(store, database_url)
    try:
        present = opened.reviewed_species()
        if species is not None and species not in present:
            listed = ", ".join(f"{name} ({count})" for name, count in present.items()) or "none"
            raise ReidError(f"the store '{store}' has no reviews of species '{species}'; species with reviews: "
                            f"{listed}")
        if not present:
            raise ReidError(f"the store '{store}' has no reviews: no verdicts were made in the review web app yet")
        rows = [row for name in ([species] if species is not None else present) for row in all_reviews(opened, name)]
        rows.sort(key=lambda r: r["id"])
        names = opened.names(r["candidate_id"] for r in rows if r.get("candidate_id") is not None)
        paths = stored_paths(opened, store_dir, (sha for r in rows for sha in r["query_sha256"]))
    finally:
        opened.close()
    table = review_pairs(rows, names, paths)
    write_text(out, table.to_csv(index=False))
    return table, len(rows)


def label_counts(table: pd.DataFrame) -> Counter:
    return Counter(table["label"])
