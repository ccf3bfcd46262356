"""Retrieval options on a cross-validated run: no TTA, flip TTA, query expansion, k-reciprocal.

Each fold's held-out images are embedded by that fold's best.pt (through the embedding cache) and
every held-out image queries the others (never its own encounter), as in validation. The last line
printed is JSON with the mean and std over folds of mAP, identity-balanced mAP and top-1 per option.

    python scripts/nyala_retrieval.py --run runs/nyala-ablation/full
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.data.table import load_table  # noqa: E402
from reid.embedding import Embedder, cached_embeddings  # noqa: E402
from reid.evaluation.evaluate import RerankOptions, evaluate  # noqa: E402

OPTIONS = {
    "plain": ("none", RerankOptions()),
    "hflip_tta": ("hflip", RerankOptions()),
    "query_expansion": ("none", RerankOptions(qe=2, qe_alpha=3.0)),
    "k_reciprocal": ("none", RerankOptions(k_reciprocal=True, k1=6, k2=3, lambda_value=0.3)),
}
REPORTED = ("mAP", "identity_balanced_mAP", "top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="folder of a `reid cv` run")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/nyala-dev/metadata.csv"))
    parser.add_argument("--cache", default="cache")
    args = parser.parse_args()
    run = Path(args.run)
    table = load_table(args.data)
    folds = pd.read_csv(run / "split.csv")["fold"].to_numpy()
    per_option = {name: [] for name in OPTIONS}
    for fold in sorted(set(folds)):
        held_out = table.iloc[np.flatnonzero(folds == fold)].reset_index(drop=True)
        for name, (tta, options) in OPTIONS.items():
            embedder = Embedder.from_checkpoint(run / f"fold_{fold}" / "best.pt", tta=tta)
            emb = cached_embeddings(embedder, held_out, args.cache, progress=False)
            metrics, _ = evaluate(emb, held_out, emb, held_out, same_set=True, options=options)
            per_option[name].append({k: metrics[k] for k in REPORTED})
            print(f"fold {fold} {name}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in REPORTED), flush=True)
    summary = {name: {k: {"mean": round(float(np.mean([f[k] for f in rows])), 4),
                          "std": round(float(np.std([f[k] for f in rows])), 4)} for k in REPORTED}
               for name, rows in per_option.items()}
    summary["options"] = {name: {"tta": tta, "rerank": options.describe()} for name, (tta, options) in OPTIONS.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
