"""Calibrating the new-individual decision on a CV run's out-of-fold embeddings.

Out-of-fold embeddings come from models that never trained on those images, so their scores are
what the model will give to photos it has not seen. Each image is scored twice: once against all
the others (a known individual, when others of it exist outside its encounter) and once with its
whole identity hidden (a new individual). Known and new queries therefore weigh equally.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reid.errors import ReidError
from reid.evaluation.metrics import rank_queries
from reid.evaluation.open_set import calibrate_thresholds
from reid.io import write_json
from reid.train.checkpoint import load_checkpoint, save_checkpoint


def oof_thresholds(embeddings: np.ndarray, identities: np.ndarray, encounters: np.ndarray,
                   precision: float) -> dict:
    known = rank_queries(embeddings, identities, embeddings, identities, encounters, encounters, same_set=True)
    new = rank_queries(embeddings, identities, embeddings, identities, identities, identities, same_set=True)
    has_match = known.known
    scores = np.concatenate([known.top_scores[has_match], new.top_scores])
    correct = np.concatenate([known.top_correct[has_match], np.zeros(len(new.top_scores), bool)])
    is_known = np.concatenate([np.ones(int(has_match.sum()), bool), np.zeros(len(new.top_scores), bool)])
    return calibrate_thresholds(scores, correct, is_known, precision)


def calibrate_run(run: str | Path, precision: float = 0.95) -> tuple[dict, list[Path]]:
    """Thresholds from `run/oof_embeddings.npz`, stored in every fold's best.pt and in calibration.json."""
    run = Path(run)
    if run.is_file():
        folder = run.parent.parent if run.parent.name.startswith("fold_") else run.parent
        raise ReidError(f"'{run}' is a file: give the folder of a `reid cv` run (it holds oof_embeddings.npz and "
                        f"fold_*/best.pt), here probably '{folder}'")
    oof = run / "oof_embeddings.npz"
    if not oof.is_file():
        raise ReidError(f"'{oof}' not found: calibration needs the out-of-fold embeddings of a finished `reid cv` run")
    with np.load(oof) as data:
        thresholds = oof_thresholds(data["embeddings"], data["identity"], data["encounter"], precision)
    thresholds["source"] = str(oof)
    checkpoints = sorted(run.glob("fold_*/best.pt"))
    for path in checkpoints:
        state = load_checkpoint(path)
        state["calibration"] = thresholds
        save_checkpoint(path, state)
    write_json(run / "calibration.json", thresholds)
    return thresholds, checkpoints
