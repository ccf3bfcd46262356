"""K-fold splits that never let one encounter straddle training and validation.

Photos of one encounter share a moment, a background and a pose: with one in training and another
in validation, a model scores by recognising the scene. Folds are therefore made of whole
encounters (`closed`) or whole individuals (`disjoint`).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from reid.errors import DataError

KINDS = ("closed", "disjoint")


def encounter_ids(table: pd.DataFrame) -> np.ndarray:
    """The encounter of each row; a row without one is an encounter of its own."""
    own = np.array([f"__row{i}" for i in range(len(table))], dtype=object)
    if "encounter" not in table.columns:
        return own
    enc = table["encounter"].astype(object).to_numpy()
    return np.where(pd.isna(enc) | (enc == ""), own, enc)


def _linked_groups(table: pd.DataFrame) -> np.ndarray:
    """Connected components of identity <-> encounter: an encounter with several individuals keeps
    them all together."""
    identity = pd.factorize(table["identity"])[0]
    encounter = pd.factorize(encounter_ids(table))[0] + identity.max() + 1
    n = encounter.max() + 1
    graph = coo_matrix((np.ones(len(table)), (identity, encounter)), shape=(n, n))
    return connected_components(graph, directed=False)[1][identity]


def make_folds(table: pd.DataFrame, n_folds: int, kind: str, seed: int) -> np.ndarray:
    """Fold id (0..n_folds-1) of every row.

    `closed`: each individual's encounters are spread over folds (stratified by identity); an
    individual with fewer encounters than folds is validated in only some folds. `disjoint`:
    individuals are split over folds, measuring recognition of animals never trained on; those
    sharing an encounter (a group photo) share a fold. Either way an encounter lies in one fold.
    """
    if kind not in KINDS:
        raise DataError(f"unknown split '{kind}'; use 'closed' or 'disjoint'")
    if n_folds < 2:
        raise DataError(f"{n_folds} folds: cross-validation needs at least 2")
    if table.empty:
        raise DataError("the table has no images to split into folds")
    if kind == "closed":
        groups = pd.factorize(encounter_ids(table))[0]
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        labels = pd.factorize(table["identity"])[0]
    else:
        groups = _linked_groups(table)
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        labels = None
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        unit = "encounters" if kind == "closed" else "individuals (those photographed together count as one)"
        raise DataError(f"{n_folds} folds but only {n_groups} {unit} to split; use at most {n_groups} folds")
    folds = np.empty(len(table), dtype=np.int64)
    with warnings.catch_warnings():
        # expected: many individuals have fewer encounters than there are folds
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, val) in enumerate(splitter.split(np.zeros(len(table)), labels, groups)):
            folds[val] = fold
    return folds


def fold_summary(table: pd.DataFrame, folds: np.ndarray) -> pd.DataFrame:
    """Images, identities and encounters per fold, for the log."""
    frame = pd.DataFrame({"fold": folds, "identity": table["identity"].to_numpy(), "encounter": encounter_ids(table)})
    return frame.groupby("fold").agg(images=("identity", "size"), identities=("identity", "nunique"),
                                     encounters=("encounter", "nunique"))
