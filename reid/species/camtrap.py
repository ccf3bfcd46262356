"""Camera Trap Data Package (Camtrap DP 1.0) tables from a batch identification run.

`observations.csv` has one media-level observation per detection row of the results (a blank
photo gets one `blank` observation, a photo that could not be read one `unclassified`), and
`media.csv` one row per photo. Deployments are the camera folders, events the encounters. Only
these two tables are written: `deployments.csv` (which needs coordinates and dates we do not know)
and `datapackage.json` are left to the user. See https://camtrap-dp.tdwg.org/data/.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from reid.io import atomic_path

OBSERVATION_COLUMNS = ["observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd",
                       "observationLevel", "observationType", "scientificName", "count", "individualID",
                       "bboxX", "bboxY", "bboxWidth", "bboxHeight", "classificationMethod", "classifiedBy",
                       "classificationProbability", "observationComments"]
MEDIA_COLUMNS = ["mediaID", "deploymentID", "timestamp", "filePath", "filePublic", "fileName", "fileMediatype"]
OBSERVATION_TYPES = {"match": "animal", "new": "animal", "uncertain": "animal", "species-only": "animal",
                     "human": "human", "vehicle": "vehicle", "blank": "blank", "failed": "unclassified"}
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
HUMAN_SCIENTIFIC_NAME = "Homo sapiens"
NOT_A_SPECIES = {"", "unknown", "failed", "blank", "animal", "human", "vehicle"}


def timestamp(value: str, utc_offset: str | None) -> str:
    """An ISO 8601 local time with the UTC offset appended when known ("" stays "")."""
    if not value:
        return ""
    return value + (utc_offset or "") if not _has_offset(value) else value


def _has_offset(value: str) -> bool:
    return value.endswith("Z") or (len(value) > 19 and value[19] in "+-")


def _number(value) -> float | str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) or value == "" else value


def observations_table(results: pd.DataFrame, utc_offset: str | None = None) -> pd.DataFrame:
    """observations.csv from the result rows (batch.RESULT_COLUMNS)."""
    events = results.groupby("encounter")["datetime"].agg(["min", "max"])
    rows = []
    for row in results.itertuples(index=False):
        kind = OBSERVATION_TYPES.get(row.decision, "unclassified")
        species = str(row.species or "")
        name = HUMAN_SCIENTIFIC_NAME if kind == "human" else (species if kind == "animal" and species not in
                                                              NOT_A_SPECIES else "")
        detection = int(row.detection)
        boxed = detection >= 0
        probability = _number(row.species_score) if kind == "animal" else _number(row.conf)
        comment = row.decision + (f": {row.note}" if row.note else "")
        if row.decision in ("match", "uncertain", "new") and row.score != "" and not pd.isna(row.score):
            comment += f" (re-ID score {float(row.score):.4f})"
        rows.append({
            "observationID": f"{row.file}#{detection}" if boxed else f"{row.file}#-",
            "deploymentID": row.camera, "mediaID": row.file, "eventID": row.encounter,
            "eventStart": timestamp(events.at[row.encounter, "min"], utc_offset),
            "eventEnd": timestamp(events.at[row.encounter, "max"], utc_offset),
            "observationLevel": "media", "observationType": kind, "scientificName": name,
            "count": 1 if boxed and kind in ("animal", "human", "vehicle") else "",
            "individualID": str(row.individual_id) if row.decision == "match" else "",
            "bboxX": _number(row.x) if boxed else "", "bboxY": _number(row.y) if boxed else "",
            "bboxWidth": _number(row.w) if boxed else "", "bboxHeight": _number(row.h) if boxed else "",
            "classificationMethod": "machine", "classifiedBy": "wildreid",
            "classificationProbability": probability, "observationComments": comment,
        })
    return pd.DataFrame(rows, columns=OBSERVATION_COLUMNS)


def media_table(results: pd.DataFrame, images: str | Path, utc_offset: str | None = None,
                package: str | Path | None = None) -> pd.DataFrame:
    """media.csv: one row per photo; `filePath` is the photo's path relative to the `package`
    folder (where the tables are written), or absolute without one."""
    photos = results.drop_duplicates("file")
    images = Path(images).resolve()
    paths = [images / f for f in photos["file"]]
    if package is not None:
        paths = [Path(os.path.relpath(p, Path(package).resolve())).as_posix() for p in paths]
    return pd.DataFrame({
        "mediaID": photos["file"], "deploymentID": photos["camera"],
        "timestamp": [timestamp(t, utc_offset) for t in photos["datetime"]],
        "filePath": [str(p) for p in paths], "filePublic": "false",
        "fileName": [Path(f).name for f in photos["file"]],
        "fileMediatype": [MEDIA_TYPES.get(Path(f).suffix.lower(), "application/octet-stream") for f in photos["file"]],
    }, columns=MEDIA_COLUMNS)


def write_camtrap_dp(folder: str | Path, results: pd.DataFrame, images: str | Path,
                     utc_offset: str | None = None) -> tuple[Path, Path]:
    """Write folder/observations.csv and folder/media.csv (atomically); return their paths."""
    folder = Path(folder)
    written = []
    for name, table in (("observations.csv", observations_table(results, utc_offset)),
                        ("media.csv", media_table(results, images, utc_offset, folder))):
        with atomic_path(folder / name) as tmp:
            table.to_csv(tmp, index=False)
        written.append(folder / name)
    return written[0], written[1]
