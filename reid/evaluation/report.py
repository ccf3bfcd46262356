"""The evaluation report as a picture: CMC curve and rank lists (green: same individual, red: not).

The rank lists show the queries that teach the most: the most confident misses (a wrong individual
ranked first with a high score) and the least confident hits, each of another individual where the
set allows, rather than the first rows of the table (which are usually one or two individuals).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and laptops' terminals
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reid.data.dataset import read_image  # noqa: E402
from reid.io import atomic_path  # noqa: E402

THUMB = 128


def cmc_curve(ranks: Sequence[np.ndarray], max_rank: int = 20) -> np.ndarray:
    """Fraction of (evaluated) queries whose first positive is within rank r, for r = 1..max_rank."""
    first = np.array([r[0] for r in ranks if r.size])
    if first.size == 0:
        return np.zeros(max_rank)
    return np.array([(first <= r).mean() for r in range(1, max_rank + 1)])


def pick_examples(top_scores: np.ndarray, top_correct: np.ndarray, known: np.ndarray, identities: Sequence,
                  per_kind: int = 3) -> list[int]:
    """Query rows for the rank lists: the `per_kind` most confident misses, then the least confident hits.

    Only known queries (whose individual is in the gallery) count. Each pick is of an individual not
    picked before while there are such; the set's own order never decides which individuals are shown.
    """
    identities = np.asarray(identities)
    misses = [i for i in np.argsort(-top_scores, kind="stable") if known[i] and not top_correct[i]]
    hits = [i for i in np.argsort(top_scores, kind="stable") if known[i] and top_correct[i]]
    chosen: list[int] = []
    for candidates in (misses, hits):
        picked: list[int] = []
        for fresh_only in (True, False):
            for i in candidates:
                shown = {identities[j] for j in chosen + picked}
                if len(picked) < per_kind and i not in picked and not (fresh_only and identities[i] in shown):
                    picked.append(int(i))
        chosen += picked
    return chosen


def write_report(path: str | Path, ranks: Sequence[np.ndarray], examples: list[dict], title: str,
                 top_k: int = 5, score_name: str = "cosine similarity (higher: closer)") -> None:
    """A PNG: the CMC curve on top, then one row per example query and its top-k gallery images.

    Each example is {"query_path", "query_identity", "gallery": [(path, identity, value), ...]}; `score_name`
    says what the value under each thumbnail is (a similarity, or a re-ranked distance).
    """
    rows = len(examples)
    fig = plt.figure(figsize=(2 * (top_k + 1), 3 + 2 * rows), dpi=100)
    grid = fig.add_gridspec(rows + 1, top_k + 1, height_ratios=[1.5] + [1] * rows)
    curve = cmc_curve(ranks)
    ax = fig.add_subplot(grid[0, :])
    ax.plot(np.arange(1, len(curve) + 1), curve, marker="o")
    ax.set(xlabel="rank", ylabel="queries matched within rank", ylim=(0, 1.02), title=f"CMC: {title}")
    ax.set_xticks([1, *range(5, len(curve) + 1, 5)])  # ranks are whole numbers
    ax.grid(alpha=0.3)
    if examples:
        fig.supxlabel(f"rank lists: misses, then hits; under each image its individual and {score_name}",
                      fontsize=10)
    for row, example in enumerate(examples, start=1):
        _thumb(fig.add_subplot(grid[row, 0]), example["query_path"], f"query\n{example['query_identity']}", "black")
        for col, (image, identity, score) in enumerate(example["gallery"][:top_k], start=1):
            colour = "tab:green" if identity == example["query_identity"] else "tab:red"
            _thumb(fig.add_subplot(grid[row, col]), image, f"{identity}\n{score:.3f}", colour)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _thumb(ax, path: str, label: str, colour: str) -> None:
    ax.imshow(read_image(path, longest_side=THUMB))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
    ax.set_title(label, fontsize=8, color=colour)
