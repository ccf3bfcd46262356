"""Embedding throughput through the cache against a bare model forward on the same batches and TTA.

`reid embed` adds file hashing, decoding, letterboxing and normalisation (in DataLoader workers),
chunked compressed writes and the manifest; the bare loop runs the model on ready tensors of the
same batch size with the same flip views. Their ratio is the share of the hardware the real
embedding path gets (target >= 0.9). Both run in this one process, so the ratio holds on a noisy
machine. The model is the config's architecture with random weights (speed does not depend on them).

    python scripts/bench_embed.py                                      # nyala-mobilenet on synthetic images
    python scripts/bench_embed.py --data ../shared/data/nyala-dev/metadata.csv --tta flip4

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.config import load_config  # noqa: E402
from reid.data.synth import make_synthetic_dataset  # noqa: E402
from reid.data.table import load_table  # noqa: E402
from reid.embedding import EmbeddingCache, Embedder, embed_batch  # noqa: E402
from reid.model.build import build_model, preprocessing  # noqa: E402


def bare_images_per_s(embedder: Embedder, n: int) -> float:
    size = embedder.image_size
    batch = torch.randn(embedder.batch_size, 3, size, size)
    embed_batch(embedder.model, batch, embedder.device, embedder.tta)  # warm-up
    started = time.perf_counter()
    done = 0
    while done < n:
        embed_batch(embedder.model, batch, embedder.device, embedder.tta)
        done += len(batch)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="nyala-mobilenet")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", help="CSV of images (default: 400 synthetic images)")
    parser.add_argument("--tta", default="hflip")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "model.pretrained=false", "model.weights=null"])
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_synthetic_dataset(Path(tmp) / "data", identities=50, images_per_identity=8,
                                                   seed=0, image_size=256, progress=False)
        table = load_table(data)
        model = build_model(cfg)
        mean, std = preprocessing(model)
        embedder = Embedder(model, cfg["data"]["image_size"], mean, std, args.tta, cfg["eval"]["batch_size"],
                            args.workers)
        forward = bare_images_per_s(embedder, len(table))
        started = time.perf_counter()
        EmbeddingCache(Path(tmp) / "cache").update(embedder, table, args.chunk, progress=False, log=lambda m: None)
        embed = len(table) / (time.perf_counter() - started)
        forward = (forward + bare_images_per_s(embedder, len(table))) / 2  # before and after: drift cancels
    result = {"images": len(table), "model": cfg["model"]["backbone"], "image_size": cfg["data"]["image_size"],
              "tta": args.tta, "batch_size": embedder.batch_size, "workers": args.workers,
              "embed_img_per_s": round(embed, 1), "forward_img_per_s": round(forward, 1),
              "ratio": round(embed / forward, 3), "cpu_threads": torch.get_num_threads()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
