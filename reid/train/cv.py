"""K-fold cross-validation: the split, one trainer per fold, a summary and out-of-fold embeddings.

The split is written to `split.csv` before any training and reused on resume, so every fold of a
run (and every process under torchrun) sees the same assignment.
"""
from __future__ import annotations

import multiprocessing
import sys
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from reid.data.classes import flank_count, named_viewpoints
from reid.data.splits import encounter_ids, fold_summary, make_folds
from reid.errors import ConfigError, ReidError
from reid.evaluation.metrics import FLANK_SPLITS, FlankViews, chance_metrics
from reid.io import atomic_path, write_json, write_text
from reid.modelcard import write_model_card
from reid.reproducibility import run_record
from reid.train import distributed
from reid.checkpoint import load_checkpoint
from reid.train.curves import cv_figure, read_history, save_figure
from reid.train.runlock import run_lock
from reid.train.trainer import FoldTrainer, refuse_existing_run

REPORTED = ("mAP", "identity_balanced_mAP", "top1")


def load_or_make_split(cfg: dict, table: pd.DataFrame, out: Path) -> np.ndarray:
    """Fold id per table row, from `out/split.csv` when a run already made one."""
    path = out / "split.csv"
    if path.exists():
        saved = pd.read_csv(path)
        if saved["path"].tolist() != table["path"].tolist():
            raise ReidError(f"{path} was made for other data; use another --out for this data")
        return saved["fold"].to_numpy()
    folds = make_folds(table, cfg["cv"]["folds"], cfg["cv"]["split"], cfg["seed"])
    if distributed.init().is_main:
        columns = [c for c in ("path", "identity", "encounter") if c in table.columns]
        write_text(path, table[columns].assign(fold=folds).to_csv(index=False))
    return folds


def _record_run(cfg: dict, out: Path, data: str, **extra) -> None:
    if distributed.init().is_main:
        write_json(out / "run.json", run_record(cfg, data=str(data), split=cfg["cv"]["split"], **extra))


def train_fold(cfg: dict, table: pd.DataFrame, data: str, out: str | Path, fold: int = 0,
               resume: bool = False, progress: bool = True) -> dict:
    """`reid train`: one fold of the configured split, written straight into `out`."""
    out = Path(out)
    refuse_existing_run(out, resume)
    with run_lock(out):
        folds = load_or_make_split(cfg, table, out)
        if not 0 <= fold < cfg["cv"]["folds"]:
            raise ReidError(f"--fold {fold} is outside 0..{cfg['cv']['folds'] - 1}")
        _record_run(cfg, out, data, fold=fold)
        trainer = FoldTrainer(cfg, table, np.flatnonzero(folds != fold), np.flatnonzero(folds == fold), out, progress)
        summary = trainer.fit(resume=resume)
        if trainer.ctx.is_main:
            write_model_card(out, table=table)
        return summary


def cross_validate(cfg: dict, table: pd.DataFrame, data: str, out: str | Path, resume: bool = False,
                   progress: bool = True, on_fold: Callable[[int, dict], None] | None = None) -> dict:
    """`reid cv`: every fold, then `cv_summary.json` and `oof_embeddings.npz`.

    `on_fold(fold, best_metrics)` is called as each fold ends (a sweep prunes from it)."""
    out = Path(out)
    for fold in range(cfg["cv"]["folds"]):
        refuse_existing_run(out / f"fold_{fold}", resume)
    with run_lock(out):
        return _cross_validate(cfg, table, data, out, resume, progress, on_fold)


def _cross_validate(cfg: dict, table: pd.DataFrame, data: str, out: Path, resume: bool, progress: bool,
                    on_fold: Callable[[int, dict], None] | None) -> dict:
    folds = load_or_make_split(cfg, table, out)
    _record_run(cfg, out, data, folds=cfg["cv"]["folds"])
    ctx = distributed.init()
    if ctx.is_main:
        print(fold_summary(table, folds).to_string())
    workers = fold_workers(cfg, ctx.distributed)
    if workers > 1:
        finished = _folds_in_processes(cfg, table, folds, out, resume, workers)
    else:
        finished = _folds_in_turn(cfg, table, folds, out, resume, progress)
    per_fold, oof = [], []
    with closing(finished):  # a pruned trial (on_fold raises) stops the folds still training
        for fold, summary, embeddings in finished:
            if not ctx.is_main:
                continue
            per_fold.append({"fold": fold, **summary["best_metrics"], "best_epoch": summary["best_epoch"],
                             "epochs_run": summary["epochs_run"], "warnings": summary["warnings"],
                             "chance": _chance(cfg, table, folds, fold)})
            oof.append((np.flatnonzero(folds == fold), embeddings))
            if on_fold is not None:
                on_fold(fold, summary["best_metrics"])
    if not ctx.is_main:
        return {}
    summary = summarise(sorted(per_fold, key=lambda f: f["fold"]))
    write_json(out / "cv_summary.json", summary)
    _write_oof(out / "oof_embeddings.npz", table, folds, oof)
    histories = {fold: read_history(out / f"fold_{fold}" / "metrics.jsonl") for fold in range(cfg["cv"]["folds"])}
    save_figure(cv_figure(histories, title=f"{out}: {cfg['cv']['folds']}-fold {cfg['cv']['split']}"),
                out / "curves.png")
    write_model_card(out, table=table)
    return summary


def fold_workers(cfg: dict, distributed_run: bool) -> int:
    """How many folds train at once (`cv.workers`, at most one per fold; one under torchrun, whose
    processes already share each fold)."""
    workers = cfg["cv"]["workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"cv.workers is {workers!r}; use a whole number of processes, 1 or more")
    if distributed_run and workers > 1:
        raise ConfigError("cv.workers > 1 under torchrun: its processes already train each fold together; "
                          "set cv.workers to 1")
    return min(workers, cfg["cv"]["folds"])


def _fit_fold(fold: int, cfg: dict, table: pd.DataFrame, folds: np.ndarray, out: Path, resume: bool,
              progress: bool, tag_lines: bool = False) -> tuple[int, dict, np.ndarray | None]:
    """Train one fold; its summary and the held-out embeddings of its best weights (main process only).
    `tag_lines` starts each log line with the fold, for folds trained side by side."""
    val_idx = np.flatnonzero(folds == fold)
    trainer = FoldTrainer(cfg, table, np.flatnonzero(folds != fold), val_idx, out / f"fold_{fold}", progress,
                          f"[fold {fold}] " if tag_lines else "")
    summary = trainer.fit(resume=resume)
    return fold, summary, _best_embeddings(trainer, val_idx) if trainer.ctx.is_main else None


def _folds_in_turn(cfg: dict, table: pd.DataFrame, folds: np.ndarray, out: Path, resume: bool,
                   progress: bool) -> Iterator[tuple[int, dict, np.ndarray | None]]:
    for fold in range(cfg["cv"]["folds"]):
        if distributed.init().is_main:
            print(f"--- fold {fold + 1}/{cfg['cv']['folds']} ---")
        yield _fit_fold(fold, cfg, table, folds, out, resume, progress)


def _start_fold_process(threads: int) -> None:
    torch.set_num_threads(threads)
    sys.stdout.reconfigure(line_buffering=True)  # epoch lines as they come, not when a buffer fills


def _folds_in_processes(cfg: dict, table: pd.DataFrame, folds: np.ndarray, out: Path, resume: bool,
                        workers: int) -> Iterator[tuple[int, dict, np.ndarray | None]]:
    """Folds trained `workers` at a time, each in a process of its own with a share of the CPU threads,
    yielded as they finish. Small networks use several cores poorly, so on a CPU this finishes a
    cross-validation sooner than folds in turn with all threads each."""
    threads = max(1, torch.get_num_threads() // workers)  # the threads this process may use, shared out
    n_folds = cfg["cv"]["folds"]
    print(f"training the {n_folds} folds {workers} at a time, {threads} CPU thread{'s' * (threads > 1)} each "
          "(cv.workers); lines start with their fold")
    fit = partial(_fit_fold, cfg=cfg, table=table, folds=folds, out=out, resume=resume, progress=False,
                  tag_lines=True)
    # spawn, not fork: a forked copy of a process that already ran torch threads can deadlock
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_start_fold_process, initargs=(threads,))
    try:
        yield from pool.imap_unordered(fit, range(n_folds))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _mean_std(values: list[float]) -> dict:
    array = np.array(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std())}


def summarise(per_fold: list[dict]) -> dict:
    """Per-fold metrics plus their mean and standard deviation (and chance's mean), overall and,
    where flanks are named, per flank split."""
    summary = {"folds": per_fold}
    for key in REPORTED:
        summary[key] = _mean_std([f[key] for f in per_fold])
        summary[f"chance_{key}"] = float(np.mean([f["chance"][key] for f in per_fold]))
    for split in FLANK_SPLITS:
        if all(split in f for f in per_fold):
            summary[split] = {key: _mean_std([f[split][key] for f in per_fold]) for key in REPORTED}
            summary[split].update({f"chance_{key}": float(np.mean([f["chance"][split][key] for f in per_fold]))
                                   for key in REPORTED})
    summary["warnings"] = [f"fold {f['fold']}: {w}" for f in per_fold for w in f.get("warnings", [])]
    return summary


def _chance(cfg: dict, table: pd.DataFrame, folds: np.ndarray, fold: int) -> dict:
    """What random embeddings would score under the very same validation protocol."""
    val_idx = np.flatnonzero(folds == fold)
    gallery_idx = np.arange(len(table)) if cfg["cv"]["split"] == "closed" else val_idx
    ids, groups = table["identity"].to_numpy(), encounter_ids(table)
    protocol = dict(query_ids=ids[val_idx], gallery_ids=ids[gallery_idx], query_groups=groups[val_idx],
                    gallery_groups=groups[gallery_idx], seed=cfg["seed"])
    chance = chance_metrics(**protocol)
    if flank_count(table) > 1:
        views = named_viewpoints(table).to_numpy()
        for split in FLANK_SPLITS:
            chance[split] = chance_metrics(**protocol, views=FlankViews(views[val_idx], views[gallery_idx], split))
    return chance


def _best_embeddings(trainer: FoldTrainer, rows: np.ndarray) -> np.ndarray:
    trainer.eval_model.load_state_dict(load_checkpoint(trainer.out / "best.pt")["model"])
    return trainer.embed(rows, desc="out-of-fold")


def _write_oof(path: Path, table: pd.DataFrame, folds: np.ndarray, oof: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Held-out embeddings of every image, each from the model that never trained on it."""
    rows = np.concatenate([r for r, _ in oof])
    order = np.argsort(rows)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, embeddings=np.concatenate([e for _, e in oof])[order],
                                path=table["path"].to_numpy(str)[rows[order]],
                                identity=table["identity"].to_numpy(str)[rows[order]],
                                encounter=encounter_ids(table).astype(str)[rows[order]],
                                viewpoint=_viewpoints(table)[rows[order]],
                                fold=folds[rows[order]])


def _viewpoints(table: pd.DataFrame) -> np.ndarray:
    views = named_viewpoints(table)
    return np.full(len(table), "") if views is None else views.to_numpy(str)
