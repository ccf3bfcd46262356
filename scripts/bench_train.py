"""Training throughput against a bare forward+backward loop on the same model and batch.

The trainer adds data loading and augmentation, PK sampling, the loss and mining, LR scheduling and
bookkeeping; the bare loop does forward, loss, backward and the optimiser step on one fixed tensor
batch. Their ratio is the share of the hardware the real training loop gets (target >= 0.85).
Both are measured in this one run, so the ratio holds on a noisy machine.

    python scripts/bench_train.py                          # cpu-small on synthetic animals
    python scripts/bench_train.py --config nyala-mobilenet --data ../shared/data/nyala-dev/metadata.csv

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.config import load_config  # noqa: E402
from reid.data.table import load_table  # noqa: E402
from reid.model.build import build_model  # noqa: E402
from reid.train.losses import ReIDLoss, TrainStep  # noqa: E402
from reid.train.optim import build_optimizer, param_groups  # noqa: E402
from reid.train.trainer import FoldTrainer  # noqa: E402


def bare_images_per_s(cfg: dict, num_classes: int, steps: int, device: torch.device) -> float:
    model = build_model(cfg).to(device, memory_format=torch.channels_last).train()  # as the trainer runs it
    loss = ReIDLoss(num_classes, cfg["model"]["embedding_dim"], cfg["loss"]).to(device)
    step = TrainStep(model, loss)
    optimizer = build_optimizer(param_groups(model.backbone, [model.pool, model.neck, loss], cfg["train"]))
    p, k, size = cfg["sampler"]["p"], cfg["sampler"]["k"], cfg["data"]["image_size"]
    images = torch.randn(p * k, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(p, device=device).repeat_interleave(k)

    def one_step() -> None:
        value, _ = step(images, labels)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, kernels
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * p * k / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--data", help="metadata CSV (default: synthetic animals rendered now)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed; the first (cache fill) is reported apart")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from reid.data.synth import make_synthetic_dataset

            data = str(make_synthetic_dataset(Path(tmp) / "synth", identities=48, images_per_identity=8,
                                              seed=0, progress=False))
        cfg = load_config(args.config, [*args.overrides, f"train.epochs={args.epochs}", "train.patience=0"])
        table = load_table(data)
        train_idx = np.arange(len(table))
        val_idx = train_idx[: min(len(table), 64)]  # validation is not timed; keep it short
        trainer = FoldTrainer(cfg, table, train_idx, val_idx, Path(tmp) / "run", progress=False)
        trainer.fit()
        epochs = trainer.history
        steady = [e["train_images_per_s"] for e in epochs[1:]] or [epochs[0]["train_images_per_s"]]
        train_ips = float(np.median(steady))
        device = trainer.ctx.device
        steps = max(5, trainer.batches_per_epoch)
        bare_ips = bare_images_per_s(cfg, len(trainer.identities), steps, device)

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "config": args.config,
        "backbone": cfg["model"]["backbone"],
        "batch": cfg["sampler"]["p"] * cfg["sampler"]["k"],
        "image_size": cfg["data"]["image_size"],
        "device": str(device),
        "train_img_per_s": round(train_ips, 2),
        "train_first_epoch_img_per_s": epochs[0]["train_images_per_s"],
        "bare_img_per_s": round(bare_ips, 2),
        "ratio": round(train_ips / bare_ips, 3),
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
    }))


if __name__ == "__main__":
    main()
