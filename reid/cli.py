"""The `reid` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reid.errors import ReidError


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, required=default is None,
                        help="YAML file, or a name from configs/ (default, cpu-small, nyala-mobilenet)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--data", required=True, help="CSV (path, identity[, viewpoint, encounter, species]) "
                                                       "or a folder with one sub-folder per identity")
    parser.add_argument("--root", help="folder that relative CSV paths start from (default: the CSV's folder)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description="Re-identification of individual animals.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="render synthetic spotted/striped individuals (images + metadata.csv)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--identities", type=int, default=40)
    synth.add_argument("--images-per-identity", type=int, default=8)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="train one fold; writes OUT/best.pt, OUT/last.pt, OUT/metrics.jsonl")
    _add_run_args(train)
    train.add_argument("--fold", type=int, default=0, help="validation fold of the configured split")

    cv = sub.add_parser("cv", help="k-fold cross-validation; writes OUT/fold_K/... and OUT/cv_summary.json")
    _add_run_args(cv)
    cv.add_argument("--folds", type=int, help="number of folds (default: cv.folds of the config)")

    demo = sub.add_parser("demo", help="synthetic data + cross-validation of cpu-small, end to end, offline")
    _add_config_args(demo, default="cpu-small")
    demo.add_argument("--out", default="demo", help="folder for the data and the run (default: ./demo)")
    demo.add_argument("--identities", type=int, default=40)
    demo.add_argument("--images-per-identity", type=int, default=8)
    return parser


def _load(args: argparse.Namespace, extra: list[str] = ()):
    from reid.config import load_config
    from reid.data.table import load_table

    cfg = load_config(args.config, [*args.overrides, *extra])
    return cfg, load_table(args.data, root=args.root, check_images=True)


def cmd_synth(args: argparse.Namespace) -> None:
    from reid.data.synth import make_synthetic_dataset

    csv = make_synthetic_dataset(args.out, args.identities, args.images_per_identity, args.seed, args.image_size)
    print(f"wrote {csv}")


def cmd_train(args: argparse.Namespace) -> None:
    from reid.train.cv import train_fold

    cfg, table = _load(args)
    summary = train_fold(cfg, table, args.data, args.out, args.fold, args.resume, not args.no_progress)
    best = summary["best_metrics"] or {}
    print(f"best epoch {summary['best_epoch'] + 1}: " + "  ".join(f"{k} {best.get(k, float('nan')):.4f}"
                                                                 for k in ("mAP", "identity_balanced_mAP", "top1")))
    print(f"checkpoint: {Path(args.out) / 'best.pt'}")


def print_cv_summary(summary: dict) -> None:
    print(f"{'metric':<24}{'held-out':>18}{'chance':>10}")
    for key in ("mAP", "identity_balanced_mAP", "top1"):
        m = summary[key]
        print(f"{key:<24}{m['mean']:>10.4f} ± {m['std']:.4f}{summary[f'chance_{key}']:>10.4f}")


def cmd_cv(args: argparse.Namespace) -> None:
    from reid.train.cv import cross_validate

    cfg, table = _load(args, [f"cv.folds={args.folds}"] if args.folds else [])
    summary = cross_validate(cfg, table, args.data, args.out, args.resume, not args.no_progress)
    if summary:
        print_cv_summary(summary)
        print(f"summary: {Path(args.out) / 'cv_summary.json'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from reid.config import load_config
    from reid.data.synth import make_synthetic_dataset
    from reid.data.table import load_table
    from reid.train.cv import cross_validate

    started = time.perf_counter()
    out = Path(args.out)
    csv = out / "data" / "metadata.csv"
    if not csv.exists():
        print(f"rendering {args.identities} synthetic individuals into {csv.parent}")
        make_synthetic_dataset(csv.parent, args.identities, args.images_per_identity, seed=0)
    cfg = load_config(args.config, args.overrides)
    run = out / "run"
    resume = (run / "split.csv").exists()
    summary = cross_validate(cfg, load_table(csv), str(csv), run, resume=resume)
    print_cv_summary(summary)
    print(f"{cfg['cv']['folds']}-fold {cfg['cv']['split']} cross-validation in {time.perf_counter() - started:.0f} s; "
          f"run folder: {run}")


COMMANDS = {"synth": cmd_synth, "train": cmd_train, "cv": cmd_cv, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ReidError as exc:
        print(f"reid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nreid {args.command}: interrupted; run it again with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
