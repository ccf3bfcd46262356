"""Ablation on the real nyala data: what learned whitening, fine-tuning and its losses each give.

Runs 5-fold `disjoint` cross-validation of nyala-mobilenet these ways:
  untrained:           the ImageNet backbone as it is, no whitening
  whitened:            learned whitening of its features (the config as written)
  triplet:             fine-tuned 8 epochs, batch-hard triplet only, no LLRD, no whitening
  fine-tuned:          fine-tuned 8 epochs, ArcFace + triplet + LLRD, no whitening
  fine-tuned+whitened: the same, whitened after
The last line printed is JSON with mean/std mAP, identity-balanced mAP and top-1 of each, and chance.

    python scripts/nyala_ablation.py --out runs/nyala-ablation
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.config import load_config  # noqa: E402
from reid.data.table import load_table  # noqa: E402
from reid.train.cv import cross_validate  # noqa: E402

FINE_TUNE = ["train.epochs=8"]
VARIANTS = {
    "untrained": ["train.whitening=false"],
    "whitened": [],
    "triplet": [*FINE_TUNE, "train.whitening=false", "loss.arcface_weight=0", "train.layer_decay=1.0",
                "train.head_lr_mult=1.0"],
    "fine-tuned": [*FINE_TUNE, "train.whitening=false"],
    "fine-tuned+whitened": FINE_TUNE,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/nyala-dev/metadata.csv"))
    parser.add_argument("--out", default="runs/nyala-ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    table = load_table(args.data, check_images=True)
    results = {}
    for name in args.variants:
        cfg = load_config("nyala-mobilenet", [*args.overrides, *VARIANTS[name]])  # the variant has the last word
        out = Path(args.out) / name
        summary = cross_validate(cfg, table, args.data, out, resume=(out / "split.csv").exists(), progress=False)
        results[name] = {key: summary[key] for key in ("mAP", "identity_balanced_mAP", "top1")}
        results["chance"] = {key: summary[f"chance_{key}"] for key in ("mAP", "identity_balanced_mAP", "top1")}
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
