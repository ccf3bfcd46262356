"""Batch identification benchmark: `identify-batch` over synthetic camera-trap scenes.

Renders --frames synthetic frames (reid.species.make_synthetic_scenes), enrolls part of their
individuals (--enroll-fraction of each species, one ground-truth crop each) into a fresh store
through the service's Store API, then runs identify-batch on the whole folder with the scenes'
MegaDetector JSON (or, with --run-detector, the whole-image detector on every photo) and the true
species per photo as a SpeciesNet file, every species routed to the same checkpoint. The stage
shares come from the run's own timing accumulator (the one behind the command's summary line):
setup (store, model loading), io (listing, EXIF, decoding, cropping, the progress file and CSV),
detection, species, embedding, search; `other` is the rest of the wall time.

The model is a random-init resnet10t at 96 px (cpu-small's network; speed does not depend on the
weights), or --checkpoint.

    OMP_NUM_THREADS=1 python scripts/bench_pipeline.py
    python scripts/bench_pipeline.py --frames 500 --checkpoint runs/x/best.pt

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.checkpoint import save_random_backbone  # noqa: E402


def speciesnet_from_truth(truth: pd.DataFrame, path: Path) -> Path:
    """A SpeciesNet predictions file naming each photo's true species (common names)."""
    predictions = []
    for file, rows in truth.groupby("file", sort=True):
        species = next((s for s in rows["species"] if s), "blank")
        taxon = "bench;;;;;;" + species if species in ("blank", "vehicle") else \
            ("bench;mammalia;primates;hominidae;homo;sapiens;human" if species == "human"
             else f"bench;mammalia;order;family;genus;{species};{species}")
        predictions.append({"filepath": file, "prediction": taxon, "prediction_score": 0.9})
    path.write_text(json.dumps({"predictions": predictions}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--individuals-per-species", type=int, default=6)
    parser.add_argument("--frame-size", default="640x480", help="WIDTHxHEIGHT of the synthetic photos")
    parser.add_argument("--enroll-fraction", type=float, default=0.5, help="share of each species' individuals "
                                                                          "enrolled (the others should come out new)")
    parser.add_argument("--checkpoint", help="re-ID checkpoint (default: a random-init --backbone)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-images", type=int, default=8)
    parser.add_argument("--run-detector", action="store_true", help="run the whole-image detector instead of "
                                                                   "reading the MegaDetector JSON")
    parser.add_argument("--work", help="folder for scenes, store and results (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    from reid.species import make_synthetic_scenes
    from reid.species.batch import SpeciesNetFile, enroll_ground_truth, identify_batch
    from reid.species.routing import Router

    width, height = (int(v) for v in args.frame_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        scenes = make_synthetic_scenes(work / "scenes", args.frames, args.individuals_per_species,
                                       frame_size=(width, height), progress=False)
        truth = pd.read_csv(scenes.ground_truth, keep_default_na=False)
        checkpoint = Path(args.checkpoint) if args.checkpoint else save_random_backbone(
            work / "model.pt", args.backbone, args.image_size, 64)
        animals = truth[truth["category"] == "animal"]
        species = sorted(set(animals["species"]))
        router = Router({name: {"checkpoint": str(checkpoint.resolve())} for name in species}, source="bench")
        rng = np.random.default_rng(0)
        chosen = set()
        for name in species:
            members = sorted(set(animals.loc[animals["species"] == name, "identity"]))
            count = max(1, round(args.enroll_fraction * len(members)))
            chosen |= set(rng.choice(members, count, replace=False).tolist())
        store = work / "store"
        enrolled = enroll_ground_truth(work / "scenes", store, router, identities=chosen, key_name="bench")

        out = work / "results.csv"
        result = identify_batch(
            scenes.images, out, Router({name: {"checkpoint": str(checkpoint.resolve())} for name in species}),
            store, species_source=SpeciesNetFile(speciesnet_from_truth(truth, work / "speciesnet.json"),
                                                 scenes.images),
            detections=None if args.run_detector else scenes.detections, chunk=args.batch_images,
            progress=False, restart=True)
        rows = result.rows
        merged = rows.merge(truth, on=["file", "detection"], suffixes=("", "_gt"))
        known = merged[(merged["category_gt"] == "animal") & merged["identity"].isin(chosen)]
        unknown = merged[(merged["category_gt"] == "animal") & ~merged["identity"].isin(chosen)]
        print(result.summary())
        shares = result.timings.shares()
        print(json.dumps({
            "frames": result.photos, "frame_size": args.frame_size, "detections": int((rows["detection"] >= 0).sum()),
            "model": "checkpoint" if args.checkpoint else f"{args.backbone}@{args.image_size} random-init",
            "detector": "whole-image" if args.run_detector else "megadetector-json",
            "enrolled_individuals": len(enrolled), "batch_images": args.batch_images,
            "frames_per_s": round(result.frames_per_s, 2), "wall_s": round(result.timings.wall, 2),
            "frames_per_s_after_setup": round(result.processed / max(result.timings.wall
                                                                     - result.timings.seconds["setup"], 1e-9), 2),
            "shares": shares,
            **{stage: shares[stage] for stage in ("detection", "embedding", "search", "io")},
            "decisions": result.decisions(),
            "known_top1": (round(float((known["individual_name"] == known["identity"]).mean()), 3)
                           if len(known) else None),
            "unknown_called_new": round(float((unknown["decision"] == "new").mean()), 3) if len(unknown) else None,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }))


if __name__ == "__main__":
    main()
