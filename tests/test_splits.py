import numpy as np
import pandas as pd
import pytest

from reid.data.splits import fold_summary, make_folds
from reid.errors import DataError


def _table(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for identity in range(30):
        for encounter in range(rng.integers(1, 5)):
            for image in range(rng.integers(1, 4)):
                rows.append((f"{identity}_{encounter}_{image}.jpg", f"id{identity}", f"id{identity}_e{encounter}"))
    rows.append(("group.jpg", "id0", "shared"))  # a group photo: one encounter, two individuals
    rows.append(("group2.jpg", "id1", "shared"))
    return pd.DataFrame(rows, columns=["path", "identity", "encounter"])


def _assert_no_encounter_leak(table, folds):
    per_encounter = pd.Series(folds).groupby(table["encounter"].to_numpy()).nunique()
    assert (per_encounter == 1).all()


@pytest.mark.parametrize("kind", ["closed", "disjoint"])
def test_no_encounter_straddles_folds(kind):
    table = _table()
    folds = make_folds(table, 4, kind, seed=0)
    assert set(folds) == {0, 1, 2, 3}
    _assert_no_encounter_leak(table, folds)


def test_disjoint_keeps_each_identity_in_one_fold_and_closed_spreads_them():
    table = _table()
    disjoint = make_folds(table, 4, "disjoint", 0)
    assert (pd.Series(disjoint).groupby(table["identity"].to_numpy()).nunique() == 1).all()
    closed = make_folds(table, 4, "closed", 0)
    spread = pd.Series(closed).groupby(table["identity"].to_numpy()).nunique()
    assert (spread > 1).mean() > 0.5


def test_same_seed_same_folds_other_seed_other_folds():
    table = _table()
    for kind in ("closed", "disjoint"):
        assert np.array_equal(make_folds(table, 4, kind, 1), make_folds(table, 4, kind, 1))
        assert not np.array_equal(make_folds(table, 4, kind, 1), make_folds(table, 4, kind, 2))


def test_nyala_split_has_no_leak(nyala_csv):
    from reid.data.table import load_table

    table = load_table(nyala_csv)
    for kind in ("closed", "disjoint"):
        folds = make_folds(table, 5, kind, seed=42)
        _assert_no_encounter_leak(table, folds)
        summary = fold_summary(table, folds)
        assert list(summary.columns) == ["images", "identities", "encounters"] and len(summary) == 5
        assert summary["images"].sum() == len(table) and summary["encounters"].sum() == table["encounter"].nunique()
    disjoint = make_folds(table, 5, "disjoint", seed=42)
    assert (pd.Series(disjoint).groupby(table["identity"].to_numpy()).nunique() == 1).all()


@pytest.mark.parametrize("kind", ["closed", "disjoint"])
def test_without_encounters_each_image_stands_alone(kind):
    table = _table().drop(columns="encounter")
    folds = make_folds(table, 3, kind, 0)
    assert len(np.unique(folds)) == 3
    assert fold_summary(table, folds)["encounters"].sum() == len(table)


def test_empty_encounter_cells_stand_alone():
    table = _table()
    table.loc[:5, "encounter"] = ""
    assert fold_summary(table, make_folds(table, 3, "closed", 0))["encounters"].sum() == table["encounter"].nunique() + 5


def test_errors():
    table = _table()
    with pytest.raises(DataError, match="'closed' or 'disjoint'"):
        make_folds(table, 3, "random", 0)
    with pytest.raises(DataError, match="at least 2"):
        make_folds(table, 1, "closed", 0)
    # id0 and id1 share a group photo, so they count as one unit: 29 to split
    with pytest.raises(DataError, match="only 29 individuals"):
        make_folds(table, 40, "disjoint", 0)
    with pytest.raises(DataError, match="only 3 encounters"):
        make_folds(table.head(3).assign(encounter=["a", "b", "c"]), 4, "closed", 0)
    with pytest.raises(DataError, match="no images"):
        make_folds(table.head(0), 2, "closed", 0)
