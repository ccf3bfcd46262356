"""MODEL_CARD.md: what a trained model is, what it was trained and scored on, under which terms, and
how to make it again, written for people from what a run recorded.

One concept: `gather_facts` reads a run's records, `render_card` turns them into Markdown,
`write_model_card` does both and writes the card atomically. The source is one of

- a `reid train` run folder (run.json, split.csv, summary.json, best.pt): card `RUN/MODEL_CARD.md`;
- a `reid cv` run folder (run.json, split.csv, cv_summary.json, calibration.json when `reid calibrate`
  ran): card `RUN/MODEL_CARD.md`;
- a checkpoint (best.pt), for `reid export`: its own record, and the records of the run folder it lies
  in when there is one (a `reid train` folder, or `fold_K/` of a `reid cv` folder). The card of an
  export lies beside it as `<stem>.MODEL_CARD.md` (`model.onnx` -> `model.MODEL_CARD.md`), since
  several exports, or an export and its run's own card, may share a folder.

Counts come from the data table when the caller has it (training does), else from the table the run
recorded (run.json's `data`, used only when its rows are still split.csv's), else from split.csv
alone. Every statement is generated from what is known; what is unknown is said to be.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reid.io import write_text

CARD_NAME = "MODEL_CARD.md"
METRICS = (("mAP", "mAP"), ("identity_balanced_mAP", "identity-balanced mAP"), ("top1", "top-1"),
           ("top5", "top-5"), ("mINP", "mINP"))
FLANK_SPLITS = ("same_flank", "cross_flank")
CV_METRICS = METRICS[:3]  # what cv_summary.json averages over folds

MEGADESCRIPTOR_PREFIX = "hf-hub:bvra/megadescriptor"
NON_COMMERCIAL = ("**Non-commercial use only.** MegaDescriptor's weights are licensed CC-BY-NC-4.0 (Creative "
                  "Commons Attribution-NonCommercial 4.0): this model is {how} them and carries the same terms. Do "
                  "not use it, its exports or its embeddings commercially; attribute BVRA (the WildlifeDatasets / "
                  "MegaDescriptor authors).")


def card_path(model_file: str | Path) -> Path:
    """Where the card of an exported model file lies: `model.onnx` -> `model.MODEL_CARD.md` beside it."""
    model_file = Path(model_file)
    return model_file.with_name(f"{model_file.stem}.{CARD_NAME}")


# ------------------------------------------------------------------------------ weights and licences
@dataclass(frozen=True)
class WeightsOrigin:
    origin: str            # where the starting weights came from
    licence: str           # their licence, as far as wildreid knows it
    non_commercial: bool = False
    warning: str | None = None  # what the card says first, in bold, when the terms restrict use


def weights_origin(model_cfg: dict) -> WeightsOrigin:
    """The origin and licence of the weights a model config starts from."""
    name = str(model_cfg.get("backbone", ""))
    mega = name.lower().startswith(MEGADESCRIPTOR_PREFIX)
    if model_cfg.get("weights"):
        note = (" If it is a copy of MegaDescriptor (the backbone is named so), CC-BY-NC-4.0 applies: "
                "non-commercial use only." if mega else "")
        return WeightsOrigin(f"a local weights file, `{model_cfg['weights']}`",
                             "as of its source, unknown to wildreid." + note, non_commercial=mega,
                             warning=NON_COMMERCIAL.format(how="presumably (its backbone is named so) fine-tuned "
                                                               "from a local copy of") if mega else None)
    if not model_cfg.get("pretrained", False):
        return WeightsOrigin("random initialisation: no pretrained weights",
                             "no pretrained weights, so no third-party weight licence; the trained weights are "
                             "what this run made of the data")
    if mega:
        return WeightsOrigin(f"the Hugging Face hub, `{name.removeprefix('hf-hub:')}` (MegaDescriptor, BVRA)",
                             "CC-BY-NC-4.0: non-commercial use only", non_commercial=True,
                             warning=NON_COMMERCIAL.format(how="made from"))
    if "_dinov2" in name.lower() or "/dinov2" in name.lower():
        return WeightsOrigin(f"DINOv2 (Meta AI) through timm / the Hugging Face hub, `{name}`", "Apache-2.0")
    recorded = _timm_licence(name)
    return WeightsOrigin(f"timm's pretrained weights for `{name}` (Hugging Face hub)",
                         "per the model's timm/Hugging Face card (often Apache-2.0; some ImageNet-21k/other "
                         "weights carry other terms)" + (f"; timm's registry records `{recorded}`" if recorded else ""))


def _timm_licence(name: str) -> str | None:
    """The licence timm's own registry records for a pretrained tag, when it records one (offline)."""
    if name.startswith("hf-hub:"):
        return None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name or an older timm: simply not known
        return None
    return getattr(cfg, "license", None) if cfg is not None else None


# ------------------------------------------------------------------------------------------ facts
def write_model_card(source: str | Path, out: str | Path | None = None, table: pd.DataFrame | None = None,
                     export: dict | None = None) -> Path:
    """Write the card of `source` (a run folder or a checkpoint, see the module's docstring) to `out`
    (default: `MODEL_CARD.md` in a run folder, `<stem>.MODEL_CARD.md` beside a checkpoint), atomically.
    `table` is the run's data table when the caller has it; `export` describes an exported file
    (path, format, opset, parity_min_cosine, fingerprint)."""
    source = Path(source)
    if out is None:
        out = source / CARD_NAME if source.is_dir() else card_path(source)
    write_text(out, render_card(gather_facts(source, table, export)))
    return Path(out)


def gather_facts(source: str | Path, table: pd.DataFrame | None = None, export: dict | None = None) -> dict:
    """What the card says, as plain data: read from the run's records (and the checkpoint's)."""
    source = Path(source)
    facts: dict[str, Any] = {"source": str(source), "export": export, "files": []}
    state = None
    if source.is_dir():
        run_dir, fold_dir = source, None
        facts["kind"] = "cv" if (source / "cv_summary.json").is_file() else "train"
    else:
        from reid.checkpoint import load_inference

        state = load_inference(source)
        facts["kind"] = "checkpoint"
        facts["files"].append(source.name)
        if (source.parent / "run.json").is_file():
            run_dir, fold_dir = source.parent, None
        elif source.parent.name.startswith("fold_") and (source.parent.parent / "run.json").is_file():
            run_dir, fold_dir = source.parent.parent, source.parent
        else:
            run_dir, fold_dir = None, None
    run = _read_json(run_dir / "run.json", facts) if run_dir else None
    split = _read_split(run_dir / "split.csv", facts) if run_dir else None
    cv_summary = _read_json(run_dir / "cv_summary.json", facts) if run_dir else None
    summary = None
    if facts["kind"] == "train":
        summary = _read_json(run_dir / "summary.json", facts)
        if (run_dir / "best.pt").is_file():
            from reid.checkpoint import load_checkpoint

            state = load_checkpoint(run_dir / "best.pt")
            facts["files"].append("best.pt")
    elif facts["kind"] == "checkpoint" and source.name == "best.pt":
        # a summary describes the folder's best.pt; another checkpoint (last.pt) has only its own record
        summary = _read_json((fold_dir or source.parent) / "summary.json", facts) if run_dir else None

    config = (state or {}).get("config") or (run or {}).get("config") or {}
    facts["config"] = config
    facts["run"] = run
    facts["weights"] = weights_origin(config.get("model", {}))
    facts["init_from"] = config.get("train", {}).get("init_from")
    fold = _fold_of(run, fold_dir)
    facts["data"] = _data_facts(table, run, split, run_dir)
    facts["split"] = _split_facts(config, split, fold, facts["kind"])
    facts["scores"] = _scores(facts["kind"], summary, cv_summary, state)
    facts["calibration"], facts["postprocessing"] = _calibration(state, run_dir, facts)
    facts["checkpoint"] = _checkpoint_facts(state)
    return facts


def _read_json(path: Path, facts: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    facts["files"].append(f"{path.parent.name}/{path.name}" if path.parent.name.startswith("fold_") else path.name)
    return value


def _read_split(path: Path, facts: dict) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    facts["files"].append(path.name)
    return pd.read_csv(path, dtype={"identity": str, "encounter": str}, keep_default_na=False)


def _fold_of(run: dict | None, fold_dir: Path | None) -> int | None:
    if fold_dir is not None:
        try:
            return int(fold_dir.name.removeprefix("fold_"))
        except ValueError:
            return None
    return (run or {}).get("fold")


def _recorded_table(run: dict | None, split: pd.DataFrame | None) -> pd.DataFrame | None:
    """The run's data table read again, when it still holds split.csv's rows (in order)."""
    if not run or not run.get("data") or split is None:
        return None
    from reid.data.table import load_table
    from reid.errors import ReidError

    command = [str(part) for part in run.get("command") or []]
    root = command[command.index("--root") + 1] if "--root" in command[:-1] else None
    try:
        table = load_table(run["data"], root=root)
    except (ReidError, OSError, ValueError):
        return None
    return table if table["path"].tolist() == split["path"].tolist() else None


def _data_facts(table: pd.DataFrame | None, run: dict | None, split: pd.DataFrame | None,
                run_dir: Path | None) -> dict | None:
    recorded, whole = "the table as training read it", True
    if table is None:
        table = _recorded_table(run, split)
        recorded = "the recorded table, read again"
    if table is None and split is not None:
        whole = False
        table, recorded = split, "split.csv (the table's viewpoint and species columns were not recorded)"
        views = _oof_viewpoints(run_dir, split)
        if views is not None:
            table = table.assign(viewpoint=views)
            recorded = "split.csv and oof_embeddings.npz (the table's species column was not recorded)"
    if table is None:
        return None
    from reid.data.classes import named_viewpoints
    from reid.data.splits import encounter_ids

    facts = {"table": (run or {}).get("data"), "from": recorded, "images": int(len(table)),
             "individuals": int(table["identity"].nunique()), "encounters": None, "viewpoints": None,
             "species": None, "species_known": whole or "species" in table.columns}
    if "encounter" in table.columns:
        facts["encounters"] = int(pd.Series(encounter_ids(table)).nunique())
    views = named_viewpoints(table)
    if views is not None and (views != "").any():
        facts["viewpoints"] = {str(k): int(v) for k, v in views[views != ""].value_counts().sort_index().items()}
    if "species" in table.columns:
        species = table["species"].fillna("").astype(str)
        facts["species"] = {str(k): int(v) for k, v in species[species != ""].value_counts().sort_index().items()}
    return facts


def _oof_viewpoints(run_dir: Path | None, split: pd.DataFrame) -> np.ndarray | None:
    path = run_dir / "oof_embeddings.npz" if run_dir else None
    if path is None or not path.is_file():
        return None
    with np.load(path) as data:
        if "viewpoint" not in data.files or data["path"].tolist() != split["path"].tolist():
            return None
        return data["viewpoint"].astype(str)


def _split_facts(config: dict, split: pd.DataFrame | None, fold: int | None, kind: str) -> dict:
    cv = config.get("cv", {})
    facts = {"kind": cv.get("split"), "folds": cv.get("folds"), "seed": config.get("seed"), "fold": fold,
             "recorded": split is not None, "encounters_named": split is not None and "encounter" in split.columns}
    if split is not None and fold is not None and kind != "cv":
        held = split["fold"] == fold
        trained = set(split.loc[~held, "identity"])
        held_ids = set(split.loc[held, "identity"])
        facts["validation"] = {"images": int(held.sum()), "individuals": len(held_ids),
                               "known_individuals": len(held_ids & trained),
                               "training_images": int((~held).sum()), "training_individuals": len(trained)}
    return facts


def _scores(kind: str, summary: dict | None, cv_summary: dict | None, state: dict | None) -> dict:
    scores: dict[str, Any] = {"cv": cv_summary}
    if summary is not None:
        scores.update(best=summary.get("best_metrics"), best_epoch=summary.get("best_epoch"),
                      epochs_run=summary.get("epochs_run"), monitor=summary.get("monitor"),
                      stopped_early=summary.get("stopped_early"), whitening=summary.get("whitening"),
                      warnings=summary.get("warnings") or [], source="summary.json")
    elif kind == "checkpoint" and state is not None and state.get("metrics"):
        scores.update(best=state["metrics"], best_epoch=state.get("epoch"), whitening=state.get("whitening"),
                      warnings=[], source="the checkpoint's record")
    if kind == "cv":
        scores["best"] = None
    return scores


def _calibration(state: dict | None, run_dir: Path | None, facts: dict) -> tuple[dict | None, dict | None]:
    if state is not None and state.get("calibration"):
        return state["calibration"], state.get("postprocessing")
    if facts["kind"] == "cv" and run_dir is not None:
        calibration = _read_json(run_dir / "calibration.json", facts)
        if calibration:
            return calibration, calibration.get("postprocessing")
    return None, None


def _checkpoint_facts(state: dict | None) -> dict | None:
    if state is None:
        return None
    return {"class_mode": state.get("class_mode"), "classes": len(state.get("identities") or []),
            "preprocessing": state.get("preprocessing"), "epoch": state.get("epoch")}


# ------------------------------------------------------------------------------------------ render
def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def _mean_std(value: dict | None) -> str:
    return "n/a" if not value else f"{_num(value.get('mean'))} ± {_num(value.get('std'))}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def render_card(facts: dict) -> str:
    """The card's Markdown."""
    lines: list[str] = []
    add = lines.append
    kind, config, weights = facts["kind"], facts["config"], facts["weights"]
    model = config.get("model", {})
    what = {"train": "`reid train` run", "cv": "`reid cv` run", "checkpoint": "checkpoint"}[kind]
    title = facts["export"]["path"] if facts.get("export") else facts["source"]
    add(f"# Model card: `{title}`")
    add("")
    if weights.warning:
        add(f"> {weights.warning}")
        add("")
    add(f"A wildreid animal re-identification model (embeddings of photos, compared by cosine similarity), from a "
        f"{what}. Generated from its records ({', '.join(facts['files']) or 'none found'}) by "
        f"wildreid {_version()}; it says only what those records hold.")
    add("")

    add("## Model")
    add("")
    add(f"- Backbone: `{model.get('backbone', 'unknown')}`"
        + (f" (timm kwargs {model['backbone_kwargs']})" if model.get("backbone_kwargs") else ""))
    add(f"- Starting weights: {weights.origin}")
    add(f"- Licence of those weights: {weights.licence}")
    if facts.get("init_from"):
        add(f"- Initialised from the checkpoint `{facts['init_from']}` before training: its weights' terms carry "
            "over too")
    add(f"- Embedding: {model.get('embedding_dim', '?')}-d, GeM pooling, L2-normalised")
    ckpt = facts.get("checkpoint")
    if ckpt and ckpt.get("preprocessing"):
        pre = ckpt["preprocessing"]
        add(f"- Input: {pre.get('image_size')} px letterboxed squares, mean {pre.get('mean')}, std {pre.get('std')}")
    elif config.get("data", {}).get("image_size"):
        add(f"- Input: {config['data']['image_size']} px letterboxed squares")
    loss = config.get("loss", {})
    if loss:
        add(f"- Training loss: ArcFace (weight {loss.get('arcface_weight')}) + triplet (weight "
            f"{loss.get('triplet_weight')})" + (f"; classes: {ckpt['class_mode']} ({ckpt['classes']} classes)"
                                                if ckpt and ckpt.get("class_mode") else ""))
    export = facts.get("export")
    if export:
        add(f"- Export: `{export.get('path')}`, {export.get('format', 'onnx').upper()}"
            + (f" opset {export['opset']}" if export.get("opset") else "")
            + (f"; ONNX Runtime matches PyTorch to cosine {export['parity_min_cosine']:.6f} on random batches"
               if export.get("parity_min_cosine") is not None else "")
            + (f"; model fingerprint {export['fingerprint']} (the checkpoint's)" if export.get("fingerprint") else "")
            + f"; exported from `{facts['source']}`")
    add("")

    _render_data(add, facts)
    _render_split(add, facts)
    _render_scores(add, facts)
    _render_calibration(add, facts)
    add("## Not evaluated on")
    add("")
    for item in not_evaluated(facts):
        add(f"- {item}")
    add("")
    _render_reproduce(add, facts)
    return "\n".join(lines).rstrip() + "\n"


def _version() -> str:
    from reid import __version__

    return __version__


def _render_data(add, facts: dict) -> None:
    data = facts["data"]
    add("## Data")
    add("")
    if data is None:
        add("Not recorded: no run folder lies around this checkpoint (no run.json or split.csv), so what it was "
            "trained on is unknown to this card.")
        add("")
        return
    add(f"- Table: `{data['table'] or 'not recorded'}` (counts from {data['from']})")
    add(f"- Images: {data['images']}")
    add(f"- Individuals: {data['individuals']}")
    if data["encounters"] is not None:
        add(f"- Encounters: {data['encounters']}")
    else:
        add("- Encounters: none named (each photo counts as an encounter of its own)")
    if data["viewpoints"]:
        add(f"- Viewpoints / flanks: {_counts(data['viewpoints'])}")
    if data["species"]:
        add(f"- Species: {_counts(data['species'])}")
    elif data["species_known"]:
        add("- Species: the table has no species column")
    else:
        add("- Species: not recorded")
    add("")


def _render_split(add, facts: dict) -> None:
    split = facts["split"]
    add("## Evaluation protocol")
    add("")
    kind = split["kind"]
    if not split["recorded"] and not facts["scores"].get("best"):
        add(f"No evaluation is recorded beside this model (its config names a `{kind}` split of {split['folds']} "
            "folds, which says nothing about whether it was run).")
        add("")
        return
    if kind == "closed":
        add(f"- Split: `closed`, {split['folds']} folds (seed {split['seed']}): folds are made of whole encounters, "
            "each individual's encounters spread over the folds, so held-out photos are of individuals seen in "
            "training; they are searched among the training photos and the other held-out photos.")
    elif kind == "disjoint":
        add(f"- Split: `disjoint`, {split['folds']} folds (seed {split['seed']}): folds are made of whole "
            "individuals, so held-out individuals were never trained on; held-out photos are searched among the "
            "other held-out photos only.")
    else:
        add("- Split: not recorded.")
    if facts["kind"] == "cv":
        add(f"- Every fold trained one model on the other folds and was scored on its own; scores are the mean ± "
            f"std over the {split['folds']} folds.")
    elif split["fold"] is not None:
        validation = split.get("validation")
        text = f"- This model: validation fold {split['fold']} of {split['folds']}"
        if validation:
            text += (f": trained on {validation['training_images']} images of {validation['training_individuals']} "
                     f"individuals, scored on {validation['images']} held-out images of "
                     f"{validation['individuals']} individuals ({validation['known_individuals']} of them also in "
                     "training)")
        add(text + ".")
    add("- A query is never scored against photos of its own encounter (nor against itself), so near-duplicate "
        "frames of one sighting do not count as matches." + (
            "" if split["encounters_named"] or not split["recorded"] else
            " The table names no encounters, so each photo is its own encounter: photos of one sighting may still "
            "find each other and inflate the scores."))
    add("")


def _metric_table(add, metrics: dict, chance: dict | None = None, cv: bool = False) -> None:
    splits = [s for s in FLANK_SPLITS if isinstance(metrics.get(s), dict)]
    keys = CV_METRICS if cv else [m for m in METRICS if m[0] in metrics]
    header = ["metric", "held-out" + (" (mean ± std)" if cv else ""), *[s.replace("_", "-") for s in splits]]
    if chance is not None:
        header.append("chance")
    add("| " + " | ".join(header) + " |")
    add("|" + "---|" * len(header))
    for key, label in keys:
        fmt = _mean_std if cv else _num
        cells = [label, fmt(metrics.get(key)), *[fmt(metrics[s].get(key)) for s in splits]]
        if chance is not None:
            cells.append(_num(chance.get(f"chance_{key}")))
        add("| " + " | ".join(cells) + " |")


def _render_scores(add, facts: dict) -> None:
    scores = facts["scores"]
    add("## Scores")
    add("")
    best, cv = scores.get("best"), scores.get("cv")
    if best:
        epoch = scores.get("best_epoch")
        ran = scores.get("epochs_run")
        add(f"Held-out scores of this model (from {scores.get('source')})"
            + (f", best epoch {epoch + 1}" if isinstance(epoch, int) else "")
            + (f" of {ran} run" if isinstance(ran, int) else "")
            + (f", by {scores['monitor']}" if scores.get("monitor") else "")
            + (", stopped early" if scores.get("stopped_early") else "")
            + (f"; {best['queries']} queries" if best.get("queries") is not None else "")
            + (f", {best['skipped_queries']} skipped (no other encounter of their individual in the gallery)"
               if best.get("skipped_queries") else "") + ":")
        add("")
        _metric_table(add, best)
        add("")
        if ran == 0:
            add("No epoch was trained: these are the scores of the backbone as it is (with its neck "
                + ("fitted as learned whitening)." if scores.get("whitening") else "untrained)."))
            add("")
        whitening = scores.get("whitening")
        if whitening and whitening.get("before"):
            add(f"Learned whitening of the neck on {whitening.get('images')} training images: held-out mAP "
                f"{_num(whitening['before'].get('mAP'))} -> {_num(whitening['after'].get('mAP'))}.")
            add("")
    if cv:
        folds = cv.get("folds") or []
        if best:
            add(f"The {len(folds)}-fold cross-validation this model is one fold of:")
        else:
            add(f"Cross-validation over {len(folds)} folds (from cv_summary.json), beside what random embeddings "
                "score under the same protocol:")
        add("")
        _metric_table(add, cv, chance=cv, cv=True)
        add("")
        if (cv.get("mAP") or {}).get("mean") is not None and cv.get("chance_mAP") is not None \
                and cv["mAP"]["mean"] <= 1.5 * cv["chance_mAP"]:
            add(f"**Mean held-out mAP ({_num(cv['mAP']['mean'])}) is within 1.5x of chance "
                f"({_num(cv['chance_mAP'])}):** this model does not yet tell these individuals apart.")
            add("")
        if folds:
            add("| fold | mAP | top-1 | best epoch | epochs run |")
            add("|---|---|---|---|---|")
            this = facts["split"]["fold"] if best else None
            for row in folds:
                epoch = row.get("best_epoch")
                mark = " (this model)" if row.get("fold") == this else ""
                add(f"| {row.get('fold')}{mark} | {_num(row.get('mAP'))} | {_num(row.get('top1'))} | "
                    f"{epoch + 1 if isinstance(epoch, int) else 'n/a'} | {row.get('epochs_run', 'n/a')} |")
            add("")
    if not best and not cv:
        add("No held-out scores are recorded for this model.")
        add("")
    warnings = list(scores.get("warnings") or []) + list((cv or {}).get("warnings") or [])
    if warnings:
        add("Warnings from training:")
        add("")
        for warning in dict.fromkeys(warnings):
            add(f"- {warning}")
        add("")


def _render_calibration(add, facts: dict) -> None:
    calibration, post = facts["calibration"], facts["postprocessing"]
    add("## Decisions and post-processing")
    add("")
    if not calibration:
        add("Not calibrated: no match / new-individual thresholds were fitted (`reid calibrate` on a `reid cv` run "
            "fits them, and chooses TTA and re-ranking); plain cosine, no TTA.")
        add("")
        return
    add(f"- Match threshold {_num(calibration.get('match_threshold'))}, new-individual threshold "
        f"{_num(calibration.get('new_threshold'))}, for precision {calibration.get('precision')} of both decisions"
        + (f", fitted on {calibration['queries']} out-of-fold queries" if calibration.get("queries") else "")
        + (f" (`{calibration['source']}`)" if calibration.get("source") else ""))
    if post:
        add(f"- Post-processing: TTA {post.get('tta', 'none')}, re-ranking {post.get('describe', 'none')}"
            + (f" (out-of-fold mAP {_num(post['baseline_mAP'])} -> {_num(post['oof_mAP'])}; rule: {post['rule']})"
               if post.get("oof_mAP") is not None and post.get("baseline_mAP") is not None else ""))
    add("")


def not_evaluated(facts: dict) -> list[str]:
    """What the scores say nothing about, from what the card knows."""
    data, split = facts["data"], facts["split"]
    items = ["individuals outside this table (no other population or site was scored)"]
    if data is None:
        items[0] = "any data this card knows of: the training data and its scores were not recorded"
    if data and data.get("species"):
        items.append(f"other species than {', '.join(data['species'])}")
    elif data and data.get("species_known"):
        items.append("other species than the table's (the table names no species)")
    else:
        items.append("other species than the training data's (not recorded)")
    items.append("videos or video frames, other cameras, seasons or image sizes than the table's photos")
    if split["kind"] == "closed":
        items.append("a disjoint split: the held-out individuals were trained on (on other encounters), so these "
                     "scores do not measure individuals never seen")
    if not data or not data.get("viewpoints"):
        items.append("flanks: no viewpoints were named, so same-flank and cross-flank scores are unknown")
    if not facts["calibration"]:
        items.append("open-set decisions (a known individual versus a new one): no thresholds were calibrated")
    else:
        items.append("thresholds on other data: they were fitted to this table's out-of-fold scores")
    if facts["kind"] != "cv" and split["fold"] is not None and not facts["scores"].get("cv"):
        items.append("the spread over folds: one fold was trained (`reid cv` gives mean ± std)")
    if facts.get("export"):
        items.append("the exported file on real photos beyond the parity check on random batches")
    return items


def _render_reproduce(add, facts: dict) -> None:
    from reid.config import dump_config

    run = facts["run"]
    add("## How to reproduce")
    add("")
    if run:
        command = [str(part) for part in run.get("command") or []]
        if command:
            is_reid = command[0].endswith(("reid", "cli.py"))  # the entry point, or python -m reid.cli
            shown = shlex.join(["reid", *command[1:]] if is_reid else command)
            add(f"Command, as recorded: `{shown}`")
            add("")
        add(f"Code: git revision {run.get('git_revision') or 'unknown (not a git checkout)'}; Python "
            f"{run.get('python')}, torch {run.get('torch')}, timm {run.get('timm')}; seed {run.get('seed')}.")
        add("")
    else:
        add("No run record (run.json) lies beside this checkpoint: the config below is the checkpoint's own.")
        add("")
    export = facts.get("export")
    if export:
        add("Export, as made: `" + shlex.join(["reid", "export", "--checkpoint", facts["source"], "--format",
                                               export.get("format", "onnx"), "--out", str(export.get("path")),
                                               *(["--opset", str(export["opset"])] if export.get("opset") else [])])
            + "`")
        add("")
    if facts["config"]:
        add("Config, as recorded (pass it back with `--config FILE`):")
        add("")
        add("```yaml")
        add(dump_config(facts["config"]).rstrip())
        add("```")
