"""Training classes: one per individual, or one per (individual, flank)."""
import numpy as np
import pandas as pd
import pytest

from reid.data import classes
from reid.errors import ConfigError


def _table(viewpoints):
    return pd.DataFrame({"identity": ["a", "a", "a", "b", "b"], "viewpoint": viewpoints})


def test_auto_trains_one_class_per_flank_when_flanks_are_named():
    table = _table(["left", "right", "left", "right", None])
    mode, reason = classes.resolve_mode("auto", table)
    assert mode == "identity_viewpoint" and "flank" in reason
    names, labels = classes.encode(classes.class_keys(table, mode))
    # b's photo without a viewpoint stays a class of its individual
    assert names == ["a|left", "a|right", "b", "b|right"]
    assert labels.tolist() == [0, 1, 0, 3, 2]


def test_auto_trains_one_class_per_individual_without_flanks():
    for table in (_table(["left"] * 5), pd.DataFrame({"identity": ["a", "b"]})):
        assert classes.resolve_mode("auto", table)[0] == "identity"
    names, labels = classes.encode(classes.class_keys(_table(["left", "right", "left", "right", ""]), "identity"))
    assert names == ["a", "b"] and labels.tolist() == [0, 0, 0, 1, 1]


def test_flank_classes_without_flanks_or_an_unknown_mode_is_a_clear_error():
    with pytest.raises(ConfigError, match="fewer than two viewpoints"):
        classes.resolve_mode("identity_viewpoint", pd.DataFrame({"identity": ["a"]}))
    with pytest.raises(ConfigError, match="loss.classes"):
        classes.resolve_mode("flank", _table(["left"] * 5))


def test_flank_count_ignores_blank_viewpoints():
    assert classes.flank_count(_table([" left", "left ", "", None, np.nan])) == 1
    assert classes.flank_count(pd.DataFrame({"identity": ["a"]})) == 0
