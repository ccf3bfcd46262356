"""Calibrating the new-individual decision on a CV run's out-of-fold embeddings.

Out-of-fold embeddings come from models that never trained on those images, so their scores are
what the model will give to photos it has not seen. Each image is scored twice: once against all
the others (a known individual, when others of it exist outside its encounter) and once with its
whole identity hidden (a new individual). Known and new queries therefore weigh equally.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reid.data.classes import flank_count
from reid.errors import ReidError
from reid.evaluation.metrics import rank_queries
from reid.evaluation.open_set import calibrate_thresholds
from reid.evaluation.postprocessing import choose
from reid.io import write_json
from reid.checkpoint import record_calibration


def oof_thresholds(embeddings: np.ndarray, identities: np.ndarray, encounters: np.ndarray,
                   precision: float) -> dict:
    known = rank_queries(embeddings, identities, embeddings, identities, encounters, encounters, same_set=True)
    new = rank_queries(embeddings, identities, embeddings, identities, identities, identities, same_set=True)
    has_match = known.known
    scores = np.concatenate([known.top_scores[has_match], new.top_scores])
    correct = np.concatenate([known.top_correct[has_match], np.zeros(len(new.top_scores), bool)])
    is_known = np.concatenate([np.ones(int(has_match.sum()), bool), np.zeros(len(new.top_scores), bool)])
    return calibrate_thresholds(scores, correct, is_known, precision)


def _hflip_oof(run: Path, data: np.lib.npyio.NpzFile, progress: bool) -> np.ndarray:
    """Out-of-fold embeddings again with horizontal-flip TTA, each fold by its own best.pt."""
    from reid.embedding import Embedder

    paths, folds = data["path"], data["fold"]
    out = np.zeros_like(data["embeddings"])
    for fold in np.unique(folds):
        rows = np.flatnonzero(folds == fold)
        embedder = Embedder.from_checkpoint(run / f"fold_{fold}" / "best.pt", tta="hflip")
        out[rows] = embedder.embed_paths(paths[rows].tolist(), progress=progress, desc=f"fold {fold} hflip")
    return out


def _flips_allowed(data: np.lib.npyio.NpzFile) -> bool:
    """Flip TTA is a candidate only when the run's table names no flanks (a flipped left flank is a
    fake right one); a run written before viewpoints were recorded is not flipped."""
    if "viewpoint" not in data.files:
        return False
    return flank_count(pd.DataFrame({"viewpoint": data["viewpoint"]})) < 2


def calibrate_run(run: str | Path, precision: float = 0.95, progress: bool = True) -> tuple[dict, list[Path]]:
    """Post-processing and thresholds from `run/oof_embeddings.npz`, stored in every fold's best.pt
    and in calibration.json.

    The post-processing (flip TTA where flanks allow it, alpha-QE, k-reciprocal) is chosen first,
    on out-of-fold mAP (see `reid.evaluation.postprocessing`); the thresholds are then fitted to the
    cosine scores of the embeddings made the chosen way.
    """
    run = Path(run)
    if run.is_file():
        folder = run.parent.parent if run.parent.name.startswith("fold_") else run.parent
        raise ReidError(f"'{run}' is a file: give the folder of a `reid cv` run (it holds oof_embeddings.npz and "
                        f"fold_*/best.pt), here probably '{folder}'")
    oof = run / "oof_embeddings.npz"
    if not oof.is_file():
        raise ReidError(f"'{oof}' not found: calibration needs the out-of-fold embeddings of a finished `reid cv` run")
    checkpoints = sorted(run.glob("fold_*/best.pt"))
    with np.load(oof) as data:
        identities, encounters, folds = data["identity"], data["encounter"], data["fold"]
        by_tta = {"none": data["embeddings"]}
        if _flips_allowed(data) and checkpoints:
            by_tta["hflip"] = _hflip_oof(run, data, progress)
    chosen = choose(by_tta, identities, encounters, folds)
    thresholds = oof_thresholds(by_tta[chosen["tta"]], identities, encounters, precision)
    thresholds["source"] = str(oof)
    for path in checkpoints:
        record_calibration(path, thresholds, chosen)
    write_json(run / "calibration.json", {**thresholds, "postprocessing": chosen})
    return {**thresholds, "postprocessing": chosen}, checkpoints
