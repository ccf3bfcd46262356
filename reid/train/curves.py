"""Learning-curve PNGs drawn from `metrics.jsonl` rows: one per run, one over a CV run's folds."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from reid.io import atomic_path  # noqa: E402

LR_KEYS = ("backbone_bottom", "backbone_top", "head")


def read_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _epochs(rows: list[dict]) -> list[int]:
    return [row["epoch"] + 1 for row in rows]


def _series(rows: list[dict], *keys: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a nested key, for the rows that have it."""
    xs, ys = [], []
    for row in rows:
        value = row
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            xs.append(row["epoch"] + 1)
            ys.append(float(value))
    return xs, ys


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def run_figure(rows: list[dict], title: str = "") -> Figure:
    """Losses, training-probe vs held-out mAP, learning rates and GeM's p, epoch by epoch."""
    trained = [row for row in rows if "train_loss" in row]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    ax.plot(*_series(trained, "train_loss"), label="total", color="black")
    for part in sorted({k for row in trained for k in row.get("train_loss_parts", {})}):
        ax.plot(*_series(trained, "train_loss_parts", part), label=part)
    _finish(ax, "training loss", "loss")
    ax = axes[0, 1]
    ax.plot(*_series(rows, "val", "mAP"), label="held-out mAP", color="tab:blue", marker="o", ms=3)
    ax.plot(*_series(rows, "train_probe", "mAP"), label="training-probe mAP", color="tab:orange", marker="o", ms=3)
    for split, style in (("same_flank", "--"), ("cross_flank", ":")):
        xs, ys = _series(rows, "val", split, "mAP")
        if xs:
            ax.plot(xs, ys, style, label=f"held-out {split.replace('_', '-')} mAP", color="tab:blue")
    best = [row["epoch"] + 1 for row in rows if row.get("best")]
    if best:
        ax.axvline(best[-1], color="gray", lw=0.8, ls="--")
        ax.annotate("best", (best[-1], ax.get_ylim()[1]), fontsize=8, ha="left", va="top", color="gray")
    ax.set_ylim(0, 1)
    _finish(ax, "retrieval (query never scores its own encounter)", "mAP")
    ax = axes[1, 0]
    for key in LR_KEYS:
        xs, ys = _series(trained, "lr", key)
        if xs and any(y > 0 for y in ys):
            ax.plot(xs, ys, label=key.replace("_", " "))
    if ax.lines:
        ax.set_yscale("log")
    _finish(ax, "learning rate at epoch end", "lr")
    ax = axes[1, 1]
    ax.plot(*_series(trained, "gem_p"), label="GeM p", color="tab:green")
    _finish(ax, "GeM pooling exponent", "p")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def cv_figure(histories: dict[int, list[dict]], title: str = "") -> Figure:
    """Held-out and training-probe mAP, and training loss, of every fold over epochs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fold, rows in sorted(histories.items()):
        color = f"C{fold % 10}"
        axes[0].plot(*_series(rows, "val", "mAP"), color=color, marker="o", ms=3, label=f"fold {fold} held-out")
        axes[0].plot(*_series(rows, "train_probe", "mAP"), color=color, ls="--", label=f"fold {fold} training probe")
        axes[1].plot(*_series(rows, "train_loss"), color=color, label=f"fold {fold}")
    axes[0].set_ylim(0, 1)
    _finish(axes[0], "mAP per fold (solid: held-out, dashed: training probe)", "mAP")
    _finish(axes[1], "training loss per fold", "loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
