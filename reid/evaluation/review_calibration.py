"""Refitting a species' match and new-individual thresholds from people's verdicts in the review web app.

Each verdict (the store's `reviews` table, written by service/web/encounters.py) is about one animal
of an identification and one of its candidates. The verdicts of an animal, taken in order, become one
outcome (`animal_outcomes`): the last confirmed or new is final; a rejected first candidate with no
decision after it says only that the first candidate was wrong; skipped says nothing.

The thresholds are applied to the first candidate's cosine (`best_score`), so that is what they are
fitted on, with `reid.evaluation.open_set.calibrate_thresholds`:

    confirmed, first candidate      known, the first candidate right
    confirmed, a lower candidate    known, the first candidate wrong
    new                             a new individual (the first candidate wrong)
    first candidate rejected        the first candidate wrong; nothing about new or known

The match threshold is fitted on every outcome, the new-individual threshold on those that say
whether the animal was known (not the rejections). The scores belong to the model that made them:
only the reviews of the checkpoint's weights count (the service records each review's `model` as
`<embedder fingerprint>-<crop digest>`, and the fingerprint hashes the weights, preprocessing and TTA).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reid.errors import ReidError

MIN_CONFIRMED_FIRST = 5  # animals whose first candidate was confirmed: evidence for the match threshold
MIN_NEW = 5  # animals enrolled as new individuals: evidence for the new-individual threshold
PAGE = 10_000  # reviews read at a time
REVIEWS_SCHEMA = 3  # the store schema that brought the reviews table

CONFIRMED_FIRST, CONFIRMED_OTHER, NEW, REJECTED_FIRST = ("confirmed-first", "confirmed-other", "new",
                                                         "rejected-first")
OUTCOMES = (CONFIRMED_FIRST, CONFIRMED_OTHER, NEW, REJECTED_FIRST)
OUTCOME_WORDS = {CONFIRMED_FIRST: "confirmed as the first candidate",
                 CONFIRMED_OTHER: "confirmed as a lower candidate",
                 NEW: "new individuals",
                 REJECTED_FIRST: "first candidate rejected (no decision after)"}


# ---------------------------------------------------------------------- reading a store's reviews
def open_store(store: str | Path, database_url: str | None = None):
    """The store of folder `store` (its wildreid.db, or `database_url`), opened read-only: never created
    or upgraded here."""
    from reid.store import Store

    store_dir = Path(store).expanduser().absolute()
    if database_url is None and not (store_dir / "wildreid.db").is_file():
        raise ReidError(f"no store at '{store}' (it has no wildreid.db): give the --store folder of `reid serve`, "
                        "where the review web app recorded the verdicts")
    opened = Store(database_url or f"sqlite:///{store_dir / 'wildreid.db'}", create=False)
    try:
        version = opened.schema_version()
        opened.refuse_newer(version)
        if version < REVIEWS_SCHEMA:  # any later schema has the reviews table: read as it is, never upgraded
            raise ReidError(f"the store '{store}' is of schema version {version}, from before reviews were recorded "
                            f"(schema {REVIEWS_SCHEMA}): it holds no verdicts; `reid serve` on it upgrades it")
    except ReidError:
        opened.close()
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors of a database that is not a store
        opened.close()
        raise ReidError(f"cannot read the store '{store}': {exc}") from None
    return opened


def all_reviews(store, species: str) -> list[dict]:
    """Every review of `species`, in the order they were made."""
    out: list[dict] = []
    while page := store.reviews_of(species, after_id=out[-1]["id"] if out else 0, limit=PAGE):
        out.extend(page)
    return out


def require_reviews(store, species: str, where: str) -> list[dict]:
    rows = all_reviews(store, species)
    if not rows:
        present = store.reviewed_species()
        listed = (", ".join(f"{name} ({count})" for name, count in present.items()) if present
                  else "none: no verdicts were made in the review web app yet")
        raise ReidError(f"the store '{where}' has no reviews of species '{species}'; species with reviews: {listed}")
    return rows


# ---------------------------------------------------------------------- verdicts -> outcomes
@dataclass
class Outcome:
    """What people decided about one animal of an identification."""
    kind: str  # one of OUTCOMES
    best_score: float | None  # the first candidate's cosine (None: the animal had no candidate)
    reviews: list[int] = field(default_factory=list)  # ids of the verdicts it comes from


def _animal_key(row: dict):
    if row.get("encounter") is None or row.get("animal_index") is None:
        return ("review", row["id"])  # a verdict outside an encounter is an animal of its own
    return (row["encounter"], row["animal_index"])


def animal_outcomes(rows: list[dict]) -> tuple[list[Outcome], int]:
    """One outcome per reviewed animal (encounter, animal_index), and how many animals gave none
    (only skipped, or only a lower candidate rejected). Rows are taken in id order."""
    by_animal: dict[object, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        by_animal.setdefault(_animal_key(row), []).append(row)
    outcomes, undecided = [], 0
    for verdicts in by_animal.values():
        decisive = [r for r in verdicts if r["verdict"] in ("confirmed", "new")]
        rejected_first = [r for r in verdicts if r["verdict"] == "rejected" and r.get("candidate_rank") == 1]
        if decisive:
            last = decisive[-1]
            kind = NEW if last["verdict"] == "new" else \
                CONFIRMED_FIRST if last.get("candidate_rank") == 1 else CONFIRMED_OTHER
        elif rejected_first:
            last, kind = rejected_first[-1], REJECTED_FIRST
        else:
            undecided += 1
            continue
        score = last.get("best_score")
        outcomes.append(Outcome(kind, None if score is None else float(score), [r["id"] for r in verdicts]))
    return outcomes, undecided


# ---------------------------------------------------------------------- the fit
def fit_thresholds(outcomes: list[Outcome], precision: float = 0.95) -> dict:
    """Match and new-individual thresholds for `precision` from scored outcomes.

    Two calls of `calibrate_thresholds`, each with the other decision made impossible so that it
    cannot move this one: the match threshold on every outcome (right only when the first candidate
    was confirmed), the new-individual threshold on the outcomes that say known or new (a rejected
    first candidate says neither). Where the two cross, both become their midpoint, as there."""
    from reid.evaluation.open_set import calibrate_thresholds

    scored = [o for o in outcomes if o.best_score is not None]
    counts = Counter(o.kind for o in scored)
    missing = [f"{need} {words} (have {have})" for need, words, have in (
        (MIN_CONFIRMED_FIRST, "animals whose first candidate was confirmed", counts[CONFIRMED_FIRST]),
        (MIN_NEW, "animals enrolled as new individuals", counts[NEW])) if have < need]
    if missing:
        raise ReidError(f"too few verdicts to refit the thresholds: it needs at least {' and '.join(missing)}; "
                        "review more identifications in the web app")
    scores = np.array([o.best_score for o in scored])
    first_right = np.array([o.kind == CONFIRMED_FIRST for o in scored])
    every = np.ones(len(scored), bool)
    match = calibrate_thresholds(scores, first_right, every, precision)["match_threshold"]
    says = np.array([o.kind != REJECTED_FIRST for o in scored])
    known = np.array([o.kind in (CONFIRMED_FIRST, CONFIRMED_OTHER) for o in scored])[says]
    new = calibrate_thresholds(scores[says], np.zeros(int(says.sum()), bool), known, precision)["new_threshold"]
    match = min(match, 1.0)  # no score reached the precision: above every cosine
    if new > match:
        new = match = (new + match) / 2
    return {"match_threshold": float(match), "new_threshold": float(new), "precision": precision}


# ---------------------------------------------------------------------- the command
@dataclass
class ReviewCalibration:
    """What `calibrate_from_reviews` did."""
    species: str
    checkpoint: Path
    calibration: dict  # as stored in the checkpoint
    before: dict  # the thresholds the checkpoint gave before
    before_source: str  # "the checkpoint's calibration (SOURCE)" or "the defaults"
    read: int  # reviews of the species in the store
    other_model: Counter  # reviews scored by another model: model -> count
    counts: Counter  # outcome -> animals used
    undecided: int  # animals with no usable verdict (skipped only, a lower candidate rejected only)
    unscored: int  # decided animals that had no candidate (no first cosine)
    fingerprints: dict  # this checkpoint's model fingerprint under each TTA


def model_fingerprints(state: dict) -> dict[str, str]:
    """The fingerprint (`Embedder.fingerprint`) of a checkpoint's model under each TTA: what the service
    puts before the crop digest in the `model` it records."""
    import torch

    from reid.checkpoint import inference_model
    from reid.embedding.embedder import Embedder, weights_fingerprint
    from reid.embedding.tta import TTA_VIEWS

    embedder = Embedder.from_record(inference_model(state), state, weights_fingerprint(state["model"]), tta="none",
                                    num_workers=0, device=torch.device("cpu"))
    out = {}
    for tta in TTA_VIEWS:
        embedder.tta = tta
        out[embedder.fingerprint] = tta
    return out


def _of_model(model: str | None, fingerprints: dict) -> bool:
    # no model: an animal no re-ID model identified, which can only be skipped (no scores, no outcome)
    return model is None or model.split("-", 1)[0] in fingerprints


def calibrate_from_reviews(store: str | Path, species: str, checkpoint: str | Path, precision: float = 0.95,
                           database_url: str | None = None) -> ReviewCalibration:
    """Refit `species`' thresholds from the reviews in `store` and store them in `checkpoint` (atomically,
    keeping its post-processing); the service takes them from there when it next starts."""
    from reid.checkpoint import load_inference, record_calibration
    from reid.embedding.onnx_runtime import is_onnx
    from reid.identify.decision import DEFAULT_THRESHOLDS, stored_thresholds

    if not 0 < precision < 1:
        raise ReidError(f"precision must be between 0 and 1 (both excluded), got {precision}")
    checkpoint = Path(checkpoint)
    if is_onnx(checkpoint):
        raise ReidError(f"--checkpoint '{checkpoint}' is an ONNX export: give the best.pt it was exported from "
                        "(then `reid export` it again, so that the .onnx carries the new thresholds)")
    state = load_inference(checkpoint)  # before the store: a wrong path is said first, and cheaply
    fingerprints = model_fingerprints(state)
    opened = open_store(store, database_url)
    try:
        rows = require_reviews(opened, species, str(store))
    finally:
        opened.close()
    ours = [r for r in rows if _of_model(r.get("model"), fingerprints)]
    other = Counter(r["model"] for r in rows if not _of_model(r.get("model"), fingerprints))
    if other and not any(r.get("model") for r in ours):
        scored_by = ", ".join(f"{model} ({count})" for model, count in other.most_common(5))
        raise ReidError(f"none of the {len(rows)} reviews of '{species}' was scored by '{checkpoint}' (its model "
                        f"{' / '.join(fingerprints)}, by TTA); they were scored by {scored_by}: give the checkpoint "
                        "the service identified this species with")
    outcomes, undecided = animal_outcomes(ours)
    thresholds = fit_thresholds(outcomes, precision)
    used = [o for o in outcomes if o.best_score is not None]
    counts = Counter(o.kind for o in used)
    old = state.get("calibration")
    before = stored_thresholds(old)
    before_source = (f"the checkpoint's calibration ({old.get('source', 'no source recorded')})" if before
                     else "the defaults")
    calibration = {
        **thresholds,
        "source": f"reviews: {len(ours)} verdicts on {len(used)} animals of {species} in "
                  f"{Path(store).expanduser().absolute()}",
        "fitted_on": "reviews", "species": species, "reviews": len(ours),
        "animals": {kind: counts[kind] for kind in OUTCOMES},
    }
    record_calibration(checkpoint, calibration, state.get("postprocessing"))
    return ReviewCalibration(species, checkpoint, calibration, before or dict(DEFAULT_THRESHOLDS), before_source,
                             len(rows), other, counts, undecided, len(outcomes) - len(used), fingerprints)
