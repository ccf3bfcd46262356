"""Ablation on the real nyala data: what pretraining, the triplet loss, and ArcFace + LLRD each give.

Runs 5-fold `disjoint` cross-validation of nyala-mobilenet three ways:
  (a) untrained: the ImageNet backbone as it is (train.epochs=0)
  (b) triplet:   batch-hard triplet only, no LLRD
  (c) full:      ArcFace + triplet + LLRD (the config as written)
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

VARIANTS = {
    "untrained": ["train.epochs=0"],
    "triplet": ["loss.arcface_weight=0", "train.layer_decay=1.0", "train.head_lr_mult=1.0"],
    "full": [],
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
