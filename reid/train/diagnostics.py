"""What a run's learning curves say: a fixed training probe, and warnings that name what to try.

Held-out mAP alone cannot tell over-fitting from under-fitting. Next to it, each epoch scores the
same fixed sample of training images (the probe) the same way: a probe far above held-out with an
early held-out best is over-fitting; a probe that stays low is under-fitting.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from reid.data.splits import encounter_ids

OVERFIT_SHARE = 0.2        # held-out best within this share of the epochs run
MIN_EPOCHS_TO_JUDGE = 5    # fewer epochs say too little about the curve's shape
UNDERFIT_PROBE_MAP = 0.5   # training images still ranked this badly at the best epoch


def probe_rows(table: pd.DataFrame, train_idx: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Up to `size` training rows, whole identities drawn at random, each with 2+ encounters so its
    photos have a positive outside their own encounter; the same rows every epoch and on resume."""
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    train_idx = np.asarray(train_idx)
    frame = pd.DataFrame({"row": train_idx, "identity": table["identity"].to_numpy()[train_idx],
                          "encounter": encounter_ids(table)[train_idx]})
    usable = frame.groupby("identity")["encounter"].nunique()
    identities = usable[usable >= 2].index.to_numpy()
    rng = np.random.default_rng([seed, 0x9b0be])
    chosen: list[np.ndarray] = []
    total = 0
    for identity in rng.permutation(np.array(identities)):
        rows = frame["row"].to_numpy()[frame["identity"].to_numpy() == identity]
        if total + len(rows) > size and chosen:
            continue
        chosen.append(rows)
        total += len(rows)
        if total >= size:
            break
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def run_warnings(history: list[dict], best_epoch: int, monitor: str) -> list[str]:
    """Warnings about the run's curves, each naming the settings to try."""
    trained = [row for row in history if "train_loss" in row]
    if len(trained) < MIN_EPOCHS_TO_JUDGE or best_epoch < 0:
        return []
    warnings = []
    if best_epoch + 1 <= OVERFIT_SHARE * len(trained):
        warnings.append(
            f"over-fitting: held-out {monitor} peaked at epoch {best_epoch + 1} of {len(trained)} and fell after; "
            "try a lower train.lr or train.head_lr_mult, train.freeze_bn=true, train.frozen_layers with "
            "train.frozen_epochs, stronger augmentation (data.crop_scale, data.rotate_deg, data.scale_min, data.erasing_p), "
            "data.context_swap_p when photos of one encounter share a background, "
            "train.ema_decay, or fewer train.epochs")
    best = next((row for row in trained if row["epoch"] == best_epoch), trained[-1])
    probe = best.get("train_probe") or {}
    if "mAP" in probe and probe["mAP"] < UNDERFIT_PROBE_MAP:
        warnings.append(
            f"under-fitting: training-probe mAP is {probe['mAP']:.3f} at the best epoch (the model does not yet "
            "separate even the individuals it trains on); try more steps (train.epochs, "
            "sampler.min_batches_per_epoch), a higher train.lr, or a smaller loss.arcface_margin_deg")
    return warnings
