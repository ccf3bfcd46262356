"""The `reid` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reid.errors import ReidError

# literal choices keep `reid --help` free of heavy imports; tests check they match the library's
TTA_CHOICES = ("none", "hflip", "flip4")
KIND_CHOICES = ("flat", "hnsw", "ivfpq")


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum, so a bad value gets a usage error, not a traceback."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: give at least {minimum}")
        return value
    return parse


def _fraction(open_interval: bool = False):
    """An argparse type: a number in [0, 1] (or (0, 1) with open_interval)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        inside = 0 < value < 1 if open_interval else 0 <= value <= 1
        if not inside:
            raise argparse.ArgumentTypeError(f"{value} must lie between 0 and 1"
                                             + (" (both excluded)" if open_interval else ""))
        return value
    return parse


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, required=default is None,
                        help="YAML file, or a name from configs/ (default, cpu-small, nyala-mobilenet)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_run_args(parser: argparse.ArgumentParser, resume_flag: bool = True) -> None:
    _add_config_args(parser)
    parser.add_argument("--data", required=True, help="CSV (path, identity[, viewpoint, encounter, species]) "
                                                       "or a folder with one sub-folder per identity")
    parser.add_argument("--root", help="folder that relative CSV paths start from (default: the CSV's folder)")
    parser.add_argument("--out", required=True, help="run folder")
    if resume_flag:
        parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description="Re-identification of individual animals.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="render synthetic spotted/striped individuals (images + metadata.csv), "
                                         "or with --scenes camera-trap frames with a MegaDetector JSON")
    synth.add_argument("--out", required=True)
    synth.add_argument("--identities", type=int, default=40)
    synth.add_argument("--images-per-identity", type=int, default=8)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    scenes = synth.add_argument_group("camera-trap scenes (--scenes)")
    scenes.add_argument("--scenes", action="store_true", help="render camera-trap frames instead of crops")
    scenes.add_argument("--frames", type=int, default=60)
    scenes.add_argument("--individuals-per-species", type=int, default=4)
    scenes.add_argument("--species", default="spotted-cat,striped-antelope", help="comma-separated")
    scenes.add_argument("--cameras", type=int, default=3)
    scenes.add_argument("--burst", type=int, default=3, help="frames per encounter, a few seconds apart")
    scenes.add_argument("--frame-size", default="320x240", help="WIDTHxHEIGHT")

    species = sub.add_parser("train-species", help="train a species classifier (cross-entropy head on a timm "
                                                   "backbone) on crops; writes OUT/species.pt")
    _add_config_args(species)
    species.add_argument("--data", required=True, help="CSV: path (or file), species[, x, y, w, h box, category, "
                                                       "encounter]")
    species.add_argument("--images", help="folder that the CSV's paths start from")
    species.add_argument("--out", required=True)
    species.add_argument("--val-fraction", type=_fraction(open_interval=True), default=0.2)
    species.add_argument("--threshold", type=_fraction(), default=0.5, help="below this confidence: 'unknown'")
    species.add_argument("--no-progress", action="store_true")

    train = sub.add_parser("train", help="train one fold; writes OUT/best.pt, OUT/last.pt, OUT/metrics.jsonl")
    _add_run_args(train)
    train.add_argument("--fold", type=int, default=0, help="validation fold of the configured split")

    cv = sub.add_parser("cv", help="k-fold cross-validation; writes OUT/fold_K/... and OUT/cv_summary.json")
    _add_run_args(cv)
    cv.add_argument("--folds", type=_at_least(2), help="number of folds (default: cv.folds of the config)")

    sweep = sub.add_parser("sweep", help="cross-validated recipe search with Optuna over a YAML search space; "
                                         "resumable; writes OUT/trials.csv, trials.json, trials.png, best.yaml")
    _add_run_args(sweep, resume_flag=False)  # a sweep always continues the study in --out
    sweep.add_argument("--space", required=True, help="search space YAML (metric, trials, params, ...; "
                                                      "see reid/train/sweep.py and configs/sweeps/)")

    demo = sub.add_parser("demo", help="synthetic data + cross-validation of cpu-small, end to end, offline")
    _add_config_args(demo, default="cpu-small")
    demo.add_argument("--out", default="demo", help="folder for the data and the run (default: ./demo)")
    demo.add_argument("--identities", type=int, default=40)
    demo.add_argument("--images-per-identity", type=int, default=8)
    embed = sub.add_parser("embed", help="embed images into a chunked, resumable cache of compressed .npz files")
    _add_embed_args(embed)
    embed.add_argument("--data", required=True, help="CSV (path, identity, ...) or a folder per identity")
    embed.add_argument("--root", help="folder that relative CSV paths start from (default: the CSV's folder)")
    embed.add_argument("--out", required=True, help="cache folder (reruns reuse it and embed only new images)")

    index = sub.add_parser("index", help="FAISS gallery index of embeddings with each image's metadata")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="build a gallery index from an embedding cache")
    _add_config_args(build, default="default")
    build.add_argument("--embeddings", required=True, help="cache folder written by `reid embed`")
    build.add_argument("--out", required=True, help="index file to write (atomically)")
    build.add_argument("--kind", choices=["auto", *KIND_CHOICES],
                       help="flat: exact; hnsw / ivfpq: approximate, for large galleries "
                            "(default: index.kind of the config; auto picks by index.ann_threshold)")

    evaluate = sub.add_parser("evaluate", help="retrieval metrics (mAP, CMC, mINP, open set) and a PNG report")
    _add_embed_args(evaluate)
    evaluate.add_argument("--data", required=True, help="query images (CSV or folder); without --gallery, "
                                                        "every image queries all the others")
    evaluate.add_argument("--gallery", help="gallery images (CSV or folder)")
    evaluate.add_argument("--root", help="folder that relative CSV paths start from")
    evaluate.add_argument("--out", required=True, help="metrics JSON; the report PNG is written beside it")
    evaluate.add_argument("--cache", default="cache", help="embedding cache root (default: ./cache)")
    _add_rerank_args(evaluate)

    calibrate = sub.add_parser("calibrate", help="choose the post-processing (TTA, re-ranking) and the match / "
                                                 "new-individual thresholds from a CV run's "
                                                 "out-of-fold embeddings and store them in its checkpoints; or, "
                                                 "with --reviews, refit a species' thresholds from people's verdicts")
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="folder of a `reid cv` run")
    source.add_argument("--reviews", metavar="STORE", help="store folder of `reid serve` whose review web app "
                                                           "recorded verdicts (needs --species and --checkpoint)")
    calibrate.add_argument("--species", help="with --reviews: the species whose verdicts refit its thresholds")
    calibrate.add_argument("--checkpoint", help="with --reviews: the best.pt that serves the species (the new "
                                                "thresholds are stored in it)")
    calibrate.add_argument("--database-url", help="with --reviews: SQLAlchemy URL of the store's shared database "
                                                  "instead of its SQLite")
    calibrate.add_argument("--precision", type=_fraction(open_interval=True), default=0.95, help="target precision of both decisions")

    reviews = sub.add_parser("reviews", help="the review web app's verdicts: export them as labelled pairs")
    reviews_sub = reviews.add_subparsers(dest="reviews_command", required=True)
    reviews_export = reviews_sub.add_parser("export", help="one row per (query photo, candidate individual) verdict, "
                                                           "labelled same / different, as CSV")
    reviews_export.add_argument("--store", required=True, help="store folder of `reid serve`")
    reviews_export.add_argument("--database-url", help="SQLAlchemy URL of the store's shared database instead of "
                                                       "its SQLite")
    reviews_export.add_argument("--out", required=True, help="CSV to write (atomically), e.g. pairs.csv")
    reviews_export.add_argument("--species", help="only this species' verdicts (default: every species)")

    export = sub.add_parser("export", help="export a checkpoint's model for ONNX Runtime: embed, evaluate, serve and "
                                           "identify-batch take the .onnx wherever they take the checkpoint")
    export.add_argument("--checkpoint", required=True, help="best.pt of a `reid train` / `reid cv` run")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only one so far)")
    export.add_argument("--out", required=True, help="model file to write (atomically), e.g. model.onnx")
    export.add_argument("--opset", type=_at_least(13), default=17, help="ONNX opset (default 17)")

    pairs = sub.add_parser("submit-pairs", help="Kaggle pair file -> submission with one similarity per pair")
    _add_embed_args(pairs)
    pairs.add_argument("--images", required=True, help="folder holding the competition's test images")
    pairs.add_argument("--pairs", required=True, help="CSV with query_image, gallery_image (and row_id)")
    pairs.add_argument("--out", required=True, help="submission CSV")
    pairs.add_argument("--cache", default="cache", help="embedding cache root (default: ./cache)")
    pairs.add_argument("--blend", type=_fraction(), default=0.5,
                       help="weight of the raw cosine when re-ranking: blend*raw + (1-blend)*re-ranked")
    _add_rerank_args(pairs)

    from service.commands import register  # serve, keys: the service's own commands (imports stay lazy)

    COMMANDS.update(register(sub))
    from reid.species.batch import add_identify_batch_parser

    COMMANDS.update(add_identify_batch_parser(sub))
    return parser


def _add_embed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pt of a `reid train` / `reid cv` run, or its .onnx "
                                                            "(`reid export`)")
    parser.add_argument("--tta", choices=list(TTA_CHOICES),
                        help="test-time augmentation: none, hflip, or flip4 (all four flips), averaged "
                             "(default: what `reid calibrate` chose for the checkpoint, else none)")
    parser.add_argument("--chunk", type=_at_least(1), default=100, help="images per cache chunk (default 100)")
    parser.add_argument("--batch-size", type=_at_least(1), help="default: eval.batch_size of the checkpoint's config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_rerank_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dba", type=_at_least(0), default=0, metavar="N", help="database-side augmentation with N neighbours")
    parser.add_argument("--qe", type=_at_least(0), default=0, metavar="N", help="alpha query expansion with N neighbours")
    parser.add_argument("--qe-alpha", type=float, default=3.0)
    parser.add_argument("--k-reciprocal", action="store_true", help="k-reciprocal re-ranking (Zhong et al. 2017)")
    parser.add_argument("--k1", type=_at_least(1), default=20)
    parser.add_argument("--k2", type=_at_least(1), default=6)
    parser.add_argument("--lambda", dest="lambda_value", type=_fraction(), default=0.3)
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="plain cosine, ignoring the re-ranking `reid calibrate` chose for the checkpoint "
                             "(without any re-ranking flag, that choice is applied)")


def _rerank_options(args: argparse.Namespace, embedder):
    """The re-ranking flags when any is given, else the checkpoint's calibrated choice (said so)."""
    from reid.evaluation.evaluate import RerankOptions
    from reid.evaluation.postprocessing import stored_options

    if args.dba or args.qe or args.k_reciprocal:
        return RerankOptions(args.dba, args.qe, args.qe_alpha, args.k_reciprocal, args.k1, args.k2, args.lambda_value)
    if args.no_postprocessing or not embedder.postprocessing:
        return RerankOptions()
    options = stored_options(embedder.postprocessing)
    print(f"re-ranking: {options.describe()} (chosen by `reid calibrate` on out-of-fold mAP; "
          "--no-postprocessing for plain cosine)")
    return options


def _embedder(args: argparse.Namespace):
    from reid.embedding import Embedder

    # embed, evaluate and the pair scores go through many photos: an ONNX export runs a batch a core
    embedder = Embedder.from_checkpoint(args.checkpoint, tta=args.tta, batch_size=args.batch_size, side_by_side=True)
    if args.tta is None and embedder.postprocessing:
        print(f"TTA: {embedder.tta} (chosen by `reid calibrate`; --tta to override)")
    return embedder


def _load(args: argparse.Namespace, extra: list[str] = ()):
    from reid.config import load_config
    from reid.data.table import load_table

    cfg = load_config(args.config, [*args.overrides, *extra])
    return cfg, load_table(args.data, root=args.root, check_images=True)


def cmd_synth(args: argparse.Namespace) -> None:
    if args.scenes:
        from reid.species import make_synthetic_scenes

        try:
            width, height = (int(v) for v in args.frame_size.lower().split("x"))
        except ValueError:
            raise ReidError(f"--frame-size '{args.frame_size}': give WIDTHxHEIGHT, e.g. 320x240") from None
        paths = make_synthetic_scenes(args.out, args.frames, args.individuals_per_species,
                                      tuple(s.strip() for s in args.species.split(",") if s.strip()), args.cameras,
                                      args.burst, (width, height), args.seed)
        print(f"wrote {paths.images}/, {paths.detections} (MegaDetector format), {paths.ground_truth}")
        return
    from reid.data.synth import make_synthetic_dataset

    csv = make_synthetic_dataset(args.out, args.identities, args.images_per_identity, args.seed, args.image_size)
    print(f"wrote {csv}")


def cmd_train_species(args: argparse.Namespace) -> None:
    from reid.config import load_config
    from reid.species import species_table, train_species_classifier

    cfg = load_config(args.config, args.overrides)
    epochs, kept = cfg["train"]["epochs"], {}

    def report(row: dict, is_kept: bool) -> None:
        if is_kept:
            kept.update(row)
        print(f"epoch {row['epoch']}/{epochs}: train accuracy {row['train_accuracy']:.3f}, "
              f"{_val_accuracy(row)}{' (kept)' if is_kept else ''}", flush=True)

    checkpoint = train_species_classifier(cfg, species_table(args.data, args.images), args.out, args.val_fraction,
                                          args.threshold, progress=not args.no_progress, on_epoch=report)
    if kept:
        print(f"best epoch {kept['epoch']}: {_val_accuracy(kept)} ({kept['val_images']} validation crops)")
    print(f"checkpoint: {checkpoint}")


def _val_accuracy(row: dict) -> str:
    return "no validation split" if row["val_accuracy"] is None else f"validation accuracy {row['val_accuracy']:.3f}"


def cmd_train(args: argparse.Namespace) -> None:
    from reid.train.cv import train_fold

    cfg, table = _load(args)
    summary = train_fold(cfg, table, args.data, args.out, args.fold, args.resume, not args.no_progress)
    best = summary["best_metrics"] or {}
    print(f"best epoch {summary['best_epoch'] + 1}: " + "  ".join(f"{k} {best.get(k, float('nan')):.4f}"
                                                                 for k in ("mAP", "identity_balanced_mAP", "top1")))
    print(f"checkpoint: {Path(args.out) / 'best.pt'}")


def print_cv_summary(summary: dict) -> None:
    """Held-out mean ± std over folds next to chance; with named flanks, same- and cross-flank too."""
    splits = [s for s in ("same_flank", "cross_flank") if s in summary]
    header = f"{'metric':<24}{'held-out':>17}" + "".join(f"{s.replace('_', '-'):>17}" for s in splits)
    print(header + f"{'chance':>9}")
    for key in ("mAP", "identity_balanced_mAP", "top1"):
        cells = [summary[key]] + [summary[s][key] for s in splits]
        print(f"{key:<24}" + "".join(f"{m['mean']:>8.4f} ± {m['std']:.4f}" for m in cells)
              + f"{summary[f'chance_{key}']:>9.4f}")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")


def cmd_cv(args: argparse.Namespace) -> None:
    from reid.train.cv import cross_validate

    cfg, table = _load(args, [f"cv.folds={args.folds}"] if args.folds else [])
    summary = cross_validate(cfg, table, args.data, args.out, args.resume, not args.no_progress)
    if summary:
        print_cv_summary(summary)
        print(f"summary: {Path(args.out) / 'cv_summary.json'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from reid.train.sweep import run_sweep

    cfg, table = _load(args)
    table = run_sweep(cfg, table, args.data, args.space, args.out, progress=not args.no_progress)
    columns = [c for c in table.columns if c.startswith("param.") or c in ("trial", "state", "folds")
               or c.endswith("_mean") or c.endswith("_std")]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"trials: {Path(args.out) / 'trials.csv'}; best recipe: {Path(args.out) / 'best.yaml'}")


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


def _warn_flips(table, tta: str) -> None:
    from reid.embedding import flank_warning

    warning = flank_warning(table, tta)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_embed(args: argparse.Namespace) -> None:
    from reid.data.table import load_table
    from reid.embedding import EmbeddingCache

    table = load_table(args.data, root=args.root)
    embedder = _embedder(args)
    _warn_flips(table, embedder.tta)
    emb = EmbeddingCache(args.out).update(embedder, table, args.chunk, progress=not args.no_progress)
    print(f"{len(emb)} embeddings of dimension {emb.shape[1]} in {args.out} (model {embedder.fingerprint})")


def cmd_index(args: argparse.Namespace) -> None:
    from reid.config import load_config
    from reid.embedding import EmbeddingCache
    from reid.index import build_gallery

    table, emb = EmbeddingCache(args.embeddings).load()
    metadata = table.rename(columns={"hash": "image_id"})
    icfg = load_config(args.config, args.overrides)["index"]
    gallery = build_gallery(emb, metadata, kind=args.kind or icfg["kind"], ann_threshold=icfg["ann_threshold"],
                            hnsw_ef_search=icfg["hnsw_ef_search"], ivf_nprobe=icfg["ivf_nprobe"])
    gallery.save(args.out)
    print(f"{args.out}: {gallery.kind} index of {len(gallery)} vectors "
          f"({metadata['identity'].nunique() if 'identity' in metadata else 0} identities)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from reid.data.table import load_table
    from reid.embedding import cached_embeddings
    from reid.evaluation.evaluate import evaluate
    from reid.io import to_json, write_json

    queries = load_table(args.data, root=args.root)
    gallery = load_table(args.gallery, root=args.root) if args.gallery else queries
    if gallery.empty:
        raise ReidError(f"the gallery '{args.gallery}' has no images")
    embedder = _embedder(args)
    _warn_flips(queries, embedder.tta)
    progress = not args.no_progress
    q_emb = cached_embeddings(embedder, queries, args.cache, args.chunk, progress)
    g_emb = cached_embeddings(embedder, gallery, args.cache, args.chunk, progress) if args.gallery else q_emb
    options = _rerank_options(args, embedder)
    metrics, results = evaluate(q_emb, queries, g_emb, gallery, same_set=not args.gallery, options=options,
                                thresholds=embedder.thresholds)
    metrics.update(checkpoint=str(args.checkpoint), tta=embedder.tta, model=embedder.fingerprint)
    write_json(args.out, metrics)
    report = Path(args.out).with_suffix(".png")
    _write_report(report, queries, gallery, results, metrics, options)
    print(to_json({k: metrics[k] for k in ("mAP", "identity_balanced_mAP", "top1", "top5", "mINP", "pair_auc")}))
    print(f"metrics: {args.out}\nreport: {report}")


def _write_report(path: Path, queries, gallery, results, metrics: dict, options) -> None:
    """The CMC curve and the rank lists of the most telling queries (misses and hits of several individuals)."""
    from reid.evaluation.report import pick_examples, write_report

    # k-reciprocal ranks by a distance (its scores are that distance negated): show the distance itself
    sign, score_name = (-1, "k-reciprocal re-ranked distance (lower: closer)") if options.k_reciprocal else \
        (1, "cosine similarity (higher: closer)")
    examples = []
    for i in pick_examples(results.top_scores, results.top_correct, results.known, queries["identity"].to_numpy()):
        top = zip(results.top_lists[i], results.top_list_scores[i])
        examples.append({"query_path": queries["path"].iloc[i], "query_identity": queries["identity"].iloc[i],
                         "gallery": [(gallery["path"].iloc[j], gallery["identity"].iloc[j], sign * float(s))
                                     for j, s in top]})
    write_report(path, results.ranks, examples,
                 f"mAP {metrics['mAP']:.3f}, top-1 {metrics['top1']:.3f} (re-ranking: {options.describe()})",
                 score_name=score_name)


def cmd_calibrate(args: argparse.Namespace) -> None:
    if args.reviews is not None:
        return _calibrate_reviews(args)
    given = [flag for flag, value in (("--species", args.species), ("--checkpoint", args.checkpoint),
                                      ("--database-url", args.database_url)) if value is not None]
    if given:
        raise ReidError(f"{' and '.join(given)} go with --reviews STORE; --run calibrates every checkpoint of "
                        "the run")
    from reid.evaluation.calibration import calibrate_run

    thresholds, checkpoints = calibrate_run(args.run, args.precision)
    post = thresholds["postprocessing"]
    print(f"{'TTA':<6} {'re-ranking':<44}{'OOF mAP':>9}{'top-1':>8}")
    for row in post["candidates"]:
        mark = "  <- chosen" if (row["tta"], row["describe"]) == (post["tta"], post["describe"]) else ""
        print(f"{row['tta']:<6} {row['describe']:<44}{row['mAP']:>9.4f}{row['top1']:>8.4f}{mark}")
    print(f"post-processing: TTA {post['tta']}, re-ranking {post['describe']} (out-of-fold mAP "
          f"{post['baseline_mAP']:.4f} -> {post['oof_mAP']:.4f}; the rule: {post['rule']})")
    photos, queries = thresholds["new_queries"], thresholds["queries"]
    print(f"match threshold {thresholds['match_threshold']:.4f}, new-individual threshold "
          f"{thresholds['new_threshold']:.4f} (precision {args.precision})")
    print(f"{queries} queries from {photos} photos: {queries - photos} as known individuals (the photos with another "
          f"encounter of their individual) and all {photos} again as new ones, their individual hidden")
    for path in checkpoints:
        print(f"stored in {path}")
    if (Path(args.run) / "run.json").is_file():
        from reid.modelcard import write_model_card

        print(f"model card: {write_model_card(args.run)}")


def _calibrate_reviews(args: argparse.Namespace) -> None:
    from reid.evaluation.review_calibration import OUTCOME_WORDS, OUTCOMES, calibrate_from_reviews

    missing = [flag for flag, value in (("--species SPECIES", args.species), ("--checkpoint best.pt", args.checkpoint))
               if value is None]
    if missing:
        raise ReidError(f"--reviews needs {' and '.join(missing)}: the species whose verdicts refit its thresholds "
                        "and the checkpoint that serves it")
    done = calibrate_from_reviews(args.reviews, args.species, args.checkpoint, args.precision, args.database_url)
    other = sum(done.other_model.values())
    print(f"read {done.read} reviews of {done.species} from {args.reviews}"
          + (f"; {other} ignored, scored by another model than this checkpoint's ("
             + ", ".join(f"{model}: {count}" for model, count in done.other_model.most_common(3)) + ")"
             if other else "; all scored by this checkpoint's model"))
    print("animals used: " + ", ".join(f"{done.counts[kind]} {OUTCOME_WORDS[kind]}" for kind in OUTCOMES)
          + (f"; {done.undecided} without a verdict that counts (skipped, or a lower candidate rejected)"
             if done.undecided else "")
          + (f"; {done.unscored} that had no candidate" if done.unscored else ""))
    new, old = done.calibration, done.before
    print(f"match threshold {old['match_threshold']:.4f} -> {new['match_threshold']:.4f}, new-individual threshold "
          f"{old['new_threshold']:.4f} -> {new['new_threshold']:.4f} (precision {args.precision}; before: "
          f"{done.before_source})")
    print(f"stored in {done.checkpoint} (its post-processing kept); `reid serve` takes them when it next starts, "
          "for every species the checkpoint serves without thresholds of its own route")


def cmd_reviews(args: argparse.Namespace) -> None:
    from reid.evaluation.review_pairs import export_review_pairs, label_counts

    table, read = export_review_pairs(args.store, args.out, args.species, args.database_url)
    labels = label_counts(table)
    print(f"{args.out}: {len(table)} rows ({labels['same']} same, {labels['different']} different) from {read} "
          f"reviews" + (f" of {args.species}" if args.species else " (every species)"))
    unstored = int((table["query_path"] == "").sum())
    if unstored:
        print(f"{unstored} rows have no query_path: the store holds no file of their photo (never stored, as a "
              "photo only rejected, or its file is gone)")


def cmd_export(args: argparse.Namespace) -> None:
    from reid.embedding.onnx_runtime import ONNX_SUFFIX
    from reid.export.onnx import export_onnx

    if Path(args.out).suffix.lower() != ONNX_SUFFIX:  # the suffix is how every command tells an export
        raise ReidError(f"--out '{args.out}': name the ONNX model with the {ONNX_SUFFIX} suffix, e.g. model.onnx")
    done = export_onnx(args.checkpoint, args.out, args.opset)
    print(f"{done.path}: ONNX model of {args.checkpoint} ({done.image_size} px in, {done.embedding_dim}-d embeddings "
          f"out); ONNX Runtime matches PyTorch to cosine {done.parity_min_cosine:.6f}")
    print(f"model {done.fingerprint}, as the checkpoint's: stores and embedding caches made with it go on with "
          "the .onnx")
    from reid.modelcard import card_path, write_model_card

    card = write_model_card(args.checkpoint, card_path(done.path), export={
        "path": str(done.path), "format": args.format, "opset": args.opset,
        "parity_min_cosine": done.parity_min_cosine, "fingerprint": done.fingerprint})
    print(f"model card: {card}")


def cmd_submit_pairs(args: argparse.Namespace) -> None:
    import pandas as pd

    from reid.embedding import cached_embeddings
    from reid.evaluation.evaluate import rerank_scores
    from reid.io import write_text
    from reid.kaggle import pair_similarities, read_pairs

    pairs, query, gallery, id_column = read_pairs(args.pairs, args.images)
    names = list(pd.unique(pd.concat([pairs[query], pairs[gallery]])))
    table = pd.DataFrame({"path": [str(Path(args.images) / n) for n in names], "identity": names})
    embedder = _embedder(args)
    emb = cached_embeddings(embedder, table, args.cache, args.chunk, not args.no_progress)
    options = _rerank_options(args, embedder)
    q_emb, g_emb, rows = rerank_scores(emb, emb, options, same_set=True)
    position = {name: i for i, name in enumerate(names)}
    q_index, g_index = pairs[query].map(position).to_numpy(), pairs[gallery].map(position).to_numpy()
    reranked_rows = (lambda start, stop: 1 + rows(start, stop)) if rows else None  # similarity = 1 - distance
    scores = pair_similarities(q_emb, g_emb, q_index, g_index, reranked_rows, args.blend)
    out = pd.DataFrame({id_column or "row_id": pairs[id_column] if id_column else range(len(pairs)),
                        "similarity": scores})
    write_text(args.out, out.to_csv(index=False))
    print(f"{args.out}: {len(out)} pairs over {len(names)} images")


COMMANDS = {"synth": cmd_synth, "train-species": cmd_train_species, "train": cmd_train, "cv": cmd_cv, "sweep": cmd_sweep, "demo": cmd_demo, "embed": cmd_embed,
            "index": cmd_index, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "reviews": cmd_reviews,
            "export": cmd_export,
            "submit-pairs": cmd_submit_pairs}


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
