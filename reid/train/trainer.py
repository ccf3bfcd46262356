"""Training one fold: PK batches, ArcFace + triplet, LLRD, validation mAP each epoch, exact resume.

Exact resume rests on three facts: the sampler derives every batch and every augmentation seed
from (seed, epoch) alone; data loaders draw on private generators, never the global RNG; and
`last.pt` stores every other piece of mutable state, including RNG states and the position
within the epoch. Resuming from it replays the rest of the run bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reid.data.dataset import ReIDDataset
from reid.data.samplers import PKSampler
from reid.data.splits import encounter_ids
from reid.data.transforms import build_transforms, use_hflip
from reid.embedding import compute_embeddings
from reid.errors import ConfigError, ReidError
from reid.evaluation.metrics import retrieval_metrics
from reid.io import write_json, write_jsonl
from reid.model.build import build_model, preprocessing
from reid.reproducibility import rng_state, seed_everything, set_rng_state
from reid.train import distributed
from reid.train.checkpoint import load_checkpoint, load_matching, save_checkpoint
from reid.train.early_stopping import EarlyStopping
from reid.train.losses import ReIDLoss, TrainStep
from reid.train.optim import build_optimizer, build_scheduler, param_groups

CHECKPOINT_KIND = "wildreid-reid"


class _EpochBatches:
    """A batch sampler whose batches are replaced each epoch, so loader workers (and their image
    caches) persist across epochs."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def refuse_existing_run(out: Path, resume: bool) -> None:
    """A run over one that exists needs --resume; checked before anything (run.json, split.csv) is written."""
    if not resume and ((out / "last.pt").exists() or (out / "summary.json").exists()):
        raise ReidError(f"'{out}' already holds a run; pass --resume to continue it, or choose another --out")


class FoldTrainer:
    def __init__(self, cfg: dict, table: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray,
                 out_dir: str | Path, progress: bool = True):
        self.cfg, self.table, self.out = cfg, table, Path(out_dir)
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.ctx = distributed.init()
        self.progress = progress and self.ctx.is_main
        tcfg = cfg["train"]
        if tcfg["monitor"] not in ("mAP", "identity_balanced_mAP", "top1"):
            raise ConfigError(f"train.monitor '{tcfg['monitor']}': use mAP, identity_balanced_mAP or top1")

        seed_everything(cfg["seed"])
        # channels-last convolutions run ~1.5x faster on CPU and use tensor cores on GPU
        self.model = build_model(cfg).to(self.ctx.device, memory_format=torch.channels_last)
        self.mean, self.std = preprocessing(self.model)
        size = cfg["data"]["image_size"]
        self.hflip, hflip_reason = use_hflip(cfg["data"]["hflip"], table)
        self.log(f"horizontal flip augmentation {'on' if self.hflip else 'off'}: {hflip_reason}")

        self.identities = sorted(table["identity"].iloc[self.train_idx].unique())
        label_of = {name: i for i, name in enumerate(self.identities)}
        labels = np.array([label_of[x] for x in table["identity"].iloc[self.train_idx]], dtype=np.int64)
        self.train_set = ReIDDataset(table["path"].iloc[self.train_idx].tolist(), labels,
                                     build_transforms(size, self.mean, self.std, train=True, hflip=self.hflip),
                                     cache_images=cfg["data"]["cache_images"], cache_size=int(size * 1.15))
        self.eval_transform = build_transforms(size, self.mean, self.std, train=False, hflip=False)
        scfg = cfg["sampler"]
        self.sampler = PKSampler(labels, scfg["p"], scfg["k"], cfg["seed"], scfg["batches_per_epoch"])
        self.images_per_batch = scfg["p"] * scfg["k"]

        self.loss = ReIDLoss(len(self.identities), cfg["model"]["embedding_dim"], cfg["loss"]).to(self.ctx.device)
        self.step_module = TrainStep(self.model, self.loss)
        groups = param_groups(self.model.backbone, [self.model.pool, self.model.neck, self.loss], tcfg)
        self.optimizer = build_optimizer(groups)
        self.accum = max(1, int(tcfg["grad_accum"]))
        self.batches_per_epoch = len(self.sampler.for_epoch(0, rank=self.ctx.rank, world_size=self.ctx.world_size))
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.accum)
        self.scheduler = build_scheduler(self.optimizer, tcfg["epochs"] * steps_per_epoch,
                                         int(tcfg["warmup_epochs"] * steps_per_epoch))
        self.amp = bool(tcfg["amp"]) and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.stopper = EarlyStopping(tcfg["patience"], tcfg["min_delta"])
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        self.loss_sum = 0.0  # this epoch's so far: a mid-epoch resume reports the same epoch loss

    # ------------------------------------------------------------------ state
    def log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    def resume_state(self) -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "rng": distributed.gather(rng_state(), self.ctx),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "history": self.history,
            "loss_sum": self.loss_sum,
            "world_size": self.ctx.world_size,
            **self.inference_state(),
        }

    def inference_state(self) -> dict:
        return {
            "config": self.cfg,
            "identities": self.identities,
            "preprocessing": {"image_size": self.cfg["data"]["image_size"], "mean": list(self.mean),
                              "std": list(self.std)},
        }

    def save_last(self) -> None:
        state = self.resume_state()  # every rank takes part in gathering RNG states
        if self.ctx.is_main:
            save_checkpoint(self.last_path, state)
            # metrics.jsonl is rewritten from the checkpoint's history, so the two never disagree
            write_jsonl(self.out / "metrics.jsonl", self.history)
        distributed.barrier(self.ctx)

    def restore(self) -> None:
        state = load_checkpoint(self.last_path)
        if state.get("world_size", 1) != self.ctx.world_size:
            raise ReidError(f"{self.last_path} was written by {state.get('world_size', 1)} processes; "
                            f"resume with the same number (now {self.ctx.world_size})")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.epoch, self.batch, self.step, self.history = state["epoch"], state["batch"], state["step"], state["history"]
        self.loss_sum = state["loss_sum"]
        set_rng_state(state["rng"][self.ctx.rank])
        self.log(f"resumed {self.last_path} at epoch {self.epoch + 1}, batch {self.batch}")

    def init_from(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        skipped = load_matching(self.model, state["model"]) + load_matching(self.loss, state.get("loss", {}))
        self.log(f"initialised from {path}" + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))

    # --------------------------------------------------------------- training
    def fit(self, resume: bool = False) -> dict:
        summary_path = self.out / "summary.json"
        if resume and summary_path.exists():
            self.log(f"{self.out} already finished; nothing to resume")
            return json.loads(summary_path.read_text())
        refuse_existing_run(self.out, resume)
        if resume and self.last_path.exists():
            self.restore()
        elif self.cfg["train"]["init_from"]:
            self.init_from(self.cfg["train"]["init_from"])

        net = self.step_module
        if self.ctx.distributed:
            net = DistributedDataParallel(self.step_module, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None)
        batches = _EpochBatches()
        nw = self.cfg["data"]["num_workers"]
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=nw, persistent_workers=nw > 0,
                            pin_memory=self.ctx.device.type == "cuda", generator=torch.Generator())
        epochs = self.cfg["train"]["epochs"]
        if epochs == 0 and not self.history:  # score the backbone as it is, untrained
            self._record_epoch({}, distributed.broadcast(self.validate() if self.ctx.is_main else None, self.ctx))
            self.save_last()
        while self.epoch < epochs and not self.stopper.should_stop:
            batches.batches = self.sampler.for_epoch(self.epoch, start_batch=self.batch, rank=self.ctx.rank,
                                                     world_size=self.ctx.world_size)
            train_stats = self._train_epoch(net, loader)
            metrics = distributed.broadcast(self.validate() if self.ctx.is_main else None, self.ctx)
            self._end_epoch(train_stats, metrics)
        summary = {"best_epoch": self.stopper.best_epoch, "best_score": self.stopper.best_score,
                   "monitor": self.cfg["train"]["monitor"], "epochs_run": self.epoch,
                   "stopped_early": self.stopper.should_stop,
                   "best_metrics": next((h["val"] for h in self.history if h["epoch"] == self.stopper.best_epoch), None)}
        if self.ctx.is_main:
            write_json(summary_path, summary)
        distributed.barrier(self.ctx)
        return summary

    def _train_epoch(self, net: torch.nn.Module, loader: DataLoader) -> dict:
        self.model.train()
        device, every = self.ctx.device, self.cfg["train"]["checkpoint_every"]
        bar = tqdm(total=self.batches_per_epoch, initial=self.batch, disable=None if self.progress else True, leave=False,
                   desc=f"epoch {self.epoch + 1}/{self.cfg['train']['epochs']}", unit="batch")
        resumed_at, started = self.batch, time.perf_counter()
        for images, labels, _index in loader:
            boundary = (self.batch + 1) % self.accum == 0 or self.batch + 1 == self.batches_per_epoch
            sync = boundary or not isinstance(net, DistributedDataParallel)
            with contextlib.nullcontext() if sync else net.no_sync():
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.amp):
                    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                    loss, parts = net(images, labels.to(device, non_blocking=True))
                self.scaler.scale(loss / self.accum).backward()
            self.batch += 1
            self.loss_sum += loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{self.loss_sum / self.batch:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
            if boundary:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                if every and self.step % every == 0 and self.batch < self.batches_per_epoch:
                    self.save_last()
        bar.close()
        seconds = time.perf_counter() - started
        n = self.batch - resumed_at
        return {"loss": self.loss_sum / max(self.batch, 1), "seconds": round(seconds, 3),
                "images_per_s": round(n * self.images_per_batch * self.ctx.world_size / max(seconds, 1e-9), 2),
                "lr_head": self.optimizer.param_groups[-1]["lr"]}

    def embed(self, rows: np.ndarray, desc: str) -> np.ndarray:
        """Embeddings of the table's `rows` with the current weights and the eval transform."""
        dataset = ReIDDataset(self.table["path"].iloc[rows].tolist(), np.zeros(len(rows), dtype=np.int64),
                              self.eval_transform)
        return compute_embeddings(self.model, dataset, self.cfg["eval"]["batch_size"], self.ctx.device,
                                  self.cfg["data"]["num_workers"], progress=self.progress, desc=desc)

    def validate(self) -> dict:
        """Retrieval metrics of the held-out images; a query never scores its own encounter.

        In a `closed` split the held-out individuals are known, so the gallery is the training
        images plus the other held-out ones; in a `disjoint` split it is the held-out images only.
        """
        closed = self.cfg["cv"]["split"] == "closed"
        gallery_idx = np.concatenate([self.train_idx, self.val_idx]) if closed else self.val_idx
        rows = np.unique(np.concatenate([self.val_idx, gallery_idx]))
        emb = self.embed(rows, desc="validating")
        ids, groups = self.table["identity"].to_numpy(), encounter_ids(self.table)
        q, g = np.searchsorted(rows, self.val_idx), np.searchsorted(rows, gallery_idx)
        return retrieval_metrics(emb[q], ids[self.val_idx], emb[g], ids[gallery_idx],
                                 query_groups=groups[self.val_idx], gallery_groups=groups[gallery_idx])

    def _record_epoch(self, train_stats: dict, metrics: dict) -> None:
        """Log the epoch, update early stopping, keep best.pt when it is the best so far."""
        improved = self.stopper.update(metrics[self.cfg["train"]["monitor"]], self.epoch)
        self.history.append({"epoch": self.epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                             "val": metrics, "best": improved})
        trained = f"loss {train_stats['loss']:.3f}  " if train_stats else "untrained: "
        speed = f"  ({train_stats['images_per_s']:.0f} img/s)" if train_stats else ""
        self.log(f"epoch {self.epoch + 1}: {trained}val mAP {metrics['mAP']:.3f}  top1 {metrics['top1']:.3f}{speed}"
                 + ("  *best*" if improved else f"  patience left {self.stopper.patience_left}" if self.stopper.patience else ""))
        if improved and self.ctx.is_main:
            save_checkpoint(self.out / "best.pt", {"kind": CHECKPOINT_KIND, "model": self.model.state_dict(),
                                                   "loss": self.loss.state_dict(), "epoch": self.epoch,
                                                   "metrics": metrics, **self.inference_state()})

    def _end_epoch(self, train_stats: dict, metrics: dict) -> None:
        self._record_epoch(train_stats, metrics)
        self.epoch, self.batch, self.loss_sum = self.epoch + 1, 0, 0.0
        self.save_last()
