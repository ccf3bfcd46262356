"""Learning-curve diagnostics: the training probe, warnings that name settings, curves drawn from metrics.jsonl."""
import json

import numpy as np
import pandas as pd

from reid.train.curves import read_history, run_figure, cv_figure
from reid.train.diagnostics import probe_rows, run_warnings


def _rows(val, probe, best):
    return [{"epoch": e, "train_loss": 5.0 - e, "train_loss_parts": {"arcface": 4.0 - e, "triplet": 1.0},
             "lr": {"backbone_bottom": 1e-5, "backbone_top": 1e-4, "head": 1e-3 / (e + 1)}, "gem_p": 3.0 + 0.1 * e,
             "train_probe": {"mAP": p}, "val": {"mAP": v, "same_flank": {"mAP": v + 0.1}}, "best": e == best}
            for e, (v, p) in enumerate(zip(val, probe))]


def test_curves_plot_exactly_what_metrics_jsonl_holds(tmp_path):
    rows = _rows([0.2, 0.3, 0.25], [0.3, 0.6, 0.9], best=1)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = run_figure(read_history(path))
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["held-out mAP"].get_ydata()) == [0.2, 0.3, 0.25]
    assert list(lines["training-probe mAP"].get_ydata()) == [0.3, 0.6, 0.9]
    assert list(lines["held-out same-flank mAP"].get_ydata()) == [0.2 + 0.1, 0.3 + 0.1, 0.25 + 0.1]
    assert list(lines["arcface"].get_ydata()) == [4.0, 3.0, 2.0]
    assert list(lines["head"].get_ydata()) == [1e-3, 5e-4, 1e-3 / 3]
    assert list(lines["GeM p"].get_ydata()) == [3.0, 3.1, 3.2]
    assert list(lines["held-out mAP"].get_xdata()) == [1, 2, 3]  # epochs count from 1, as the log does
    cv = cv_figure({0: rows, 1: rows[:2]})
    assert [list(l.get_ydata()) for l in cv.axes[0].get_lines()][2] == [0.2, 0.3]


def test_warnings_name_settings_for_over_and_under_fitting():
    over = run_warnings(_rows([0.5, 0.4, 0.3, 0.3, 0.2, 0.2], [0.9] * 6, best=0), 0, "mAP")
    assert len(over) == 1 and "over-fitting" in over[0] and "train.lr" in over[0] and "train.freeze_bn" in over[0]
    under = run_warnings(_rows([0.1, 0.12, 0.13, 0.14, 0.15, 0.16], [0.1, 0.15, 0.2, 0.25, 0.3, 0.3], best=5), 5, "mAP")
    assert len(under) == 1 and "under-fitting" in under[0] and "sampler.min_batches_per_epoch" in under[0]
    healthy = run_warnings(_rows([0.1, 0.2, 0.3, 0.4, 0.5, 0.5], [0.3, 0.5, 0.7, 0.8, 0.9, 0.9], best=4), 4, "mAP")
    assert healthy == []
    assert run_warnings(_rows([0.5, 0.1], [0.9, 0.9], best=0), 0, "mAP") == []  # too short to judge


def test_probe_takes_whole_identities_with_two_encounters_fixed_by_seed():
    table = pd.DataFrame({"identity": np.repeat(list("abcdef"), 4),
                          "encounter": [f"{i}{j // 2}" for i in "abcdef" for j in range(4)]})
    table.loc[table["identity"] == "f", "encounter"] = "f0"  # one encounter: no positive outside it
    train = np.arange(len(table))
    rows = probe_rows(table, train, size=8, seed=3)
    assert len(rows) == 8 and set(table["identity"].iloc[rows]) <= set("abcde")
    assert table["identity"].iloc[rows].value_counts().tolist() == [4, 4]
    assert probe_rows(table, train, 8, seed=3).tolist() == rows.tolist()
    assert len(probe_rows(table, train, 0, seed=3)) == 0
