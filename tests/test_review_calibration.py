"""Decisions are data: `reid calibrate --reviews` refits a species' thresholds from the review web app's verdicts
(and stores them in the checkpoint the service reads them from), `reid reviews export` writes the verdicts as
labelled pairs. The reviews are recorded in a real SQLite store as service/web/encounters.py records them."""
from __future__ import annotations

import csv
import hashlib
import itertools

import numpy as np
import pytest

from conftest import write_checkpoint
from reid.cli import main
from reid.embedding import Embedder
from reid.errors import ReidError
from reid.evaluation.review_calibration import (CONFIRMED_FIRST, CONFIRMED_OTHER, NEW, REJECTED_FIRST, Outcome,
                                                animal_outcomes, fit_thresholds)
from reid.species.crops import CropSettings, embedding_model
from reid.store import NewImage, Review, Store

SPECIES = "zebra"
_serial = itertools.count(1)


def sha(seed) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


def new_image(seed, store_dir=None) -> NewImage:
    """An image row; with `store_dir`, its file is written at its content address there too."""
    digest = sha(seed)
    relpath = f"images/{digest[:2]}/{digest}.jpg"
    if store_dir is not None:
        (store_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
        (store_dir / relpath).write_bytes(b"jpeg " + digest.encode())
    vector = np.random.default_rng(abs(hash(seed)) % 2**32).normal(size=8).astype(np.float32)
    return NewImage(digest, relpath, "image/jpeg", 8, 8, 100, vector / np.linalg.norm(vector))


@pytest.fixture
def store_dir(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


@pytest.fixture
def store(store_dir):
    opened = Store(f"sqlite:///{store_dir / 'wildreid.db'}")
    yield opened
    opened.close()


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "best.pt")


@pytest.fixture
def model(checkpoint) -> str:
    """What the service records as a review's model: the embedder's fingerprint and the crops' digest."""
    return embedding_model(Embedder.from_checkpoint(checkpoint, num_workers=0).fingerprint, CropSettings())


def review(store: Store, verdict: str, best: float, model: str, candidate: int | None = None, rank: int | None = 1,
           cosine: float | None = None, individual: int | None = None, encounter: str | None = None,
           animal: int = 0, photos=None, key: str = "alice", species: str = SPECIES) -> int:
    """Record one verdict as the web app's `_review` does (the thresholds it was decided under: the defaults)."""
    decision = "match" if best >= 0.7 else "new" if best < 0.5 else "uncertain"
    return store.record_review(Review(
        species=species, verdict=verdict, query_sha256=photos or [sha(f"query-{next(_serial)}")], image_ids=[],
        encounter=encounter or f"enc-{next(_serial)}", animal_index=animal, candidate_id=candidate,
        candidate_rank=rank if candidate is not None else None, score=cosine if cosine is not None else best,
        cosine=cosine if cosine is not None else best, best_score=best, decision=decision,
        individual_id=individual, model=model, match_threshold=0.7, new_threshold=0.5,
        thresholds_source="settings"), key)


def enroll(store: Store, name: str, seed) -> int:
    return store.enroll(name, SPECIES, [new_image(seed)], "m", "alice")["individual_id"]


def people_confirm_low_and_enroll_new(store: Store, model: str) -> None:
    """First candidates confirmed at cosines 0.55-0.65 (uncertain under the defaults), new animals whose first
    candidate scored 0.30-0.42."""
    known = enroll(store, "Known", "known")
    for best in np.linspace(0.55, 0.65, 8):
        review(store, "confirmed", float(best), model, candidate=known, individual=known)
    for best in np.linspace(0.30, 0.42, 6):
        enrolled = enroll(store, f"New {best:.2f}", f"new-{best}")
        review(store, "new", float(best), model, candidate=known, individual=enrolled)


def calibrate(store_dir, checkpoint, *extra: str) -> int:
    return main(["calibrate", "--reviews", str(store_dir), "--species", SPECIES, "--checkpoint", str(checkpoint),
                 *extra])


# ---------------------------------------------------------------------- the refit moves the thresholds
def test_confirmed_uncertain_matches_lower_the_match_threshold(store, store_dir, checkpoint, model, capsys):
    people_confirm_low_and_enroll_new(store, model)
    assert Embedder.from_checkpoint(checkpoint, num_workers=0).thresholds is None  # uncalibrated: the defaults
    assert calibrate(store_dir, checkpoint) == 0
    out = capsys.readouterr().out
    thresholds = Embedder.from_checkpoint(checkpoint, num_workers=0).thresholds
    assert thresholds["match_threshold"] < 0.6 and 0.42 < thresholds["new_threshold"] < 0.55
    assert thresholds["match_threshold"] == pytest.approx(0.55)
    assert f"read 14 reviews of {SPECIES} from {store_dir}; all scored by this checkpoint's model" in out
    assert "animals used: 8 confirmed as the first candidate, 0 confirmed as a lower candidate, 6 new individuals, " \
           "0 first candidate rejected" in out
    assert (f"match threshold 0.7000 -> {thresholds['match_threshold']:.4f}, new-individual threshold 0.5000 -> "
            f"{thresholds['new_threshold']:.4f} (precision 0.95; before: the defaults)") in out
    assert f"stored in {checkpoint} (its post-processing kept)" in out


def test_rejected_first_candidates_raise_the_match_threshold_only(store, store_dir, checkpoint, model, capsys):
    known = enroll(store, "Known", "known")
    for best in np.linspace(0.82, 0.9, 6):
        review(store, "confirmed", float(best), model, candidate=known, individual=known)
    for best in np.linspace(0.3, 0.4, 5):
        review(store, "new", float(best), model, candidate=known, individual=enroll(store, "N", best))
    wrong = enroll(store, "Look-alike", "alike")
    for i, best in enumerate(np.linspace(0.75, 0.8, 4)):
        encounter = f"rejected-{i}"
        review(store, "rejected", float(best), model, candidate=wrong, encounter=encounter)
        review(store, "skipped", float(best), model, candidate=wrong, encounter=encounter)  # says nothing more
    assert calibrate(store_dir, checkpoint, "--precision", "0.9") == 0
    thresholds = Embedder.from_checkpoint(checkpoint, num_workers=0).thresholds
    assert thresholds["match_threshold"] > 0.8
    # the rejections (known or new: nobody said) are no evidence below the new-individual threshold
    assert 0.4 < thresholds["new_threshold"] < 0.41
    assert "4 first candidate rejected (no decision after)" in capsys.readouterr().out


def test_a_second_refit_starts_from_the_checkpoints_thresholds_and_keeps_its_postprocessing(
        store, store_dir, checkpoint, model, capsys):
    import torch

    state = torch.load(checkpoint, weights_only=False)
    state["calibration"] = {"match_threshold": 0.8, "new_threshold": 0.45, "source": "runs/cv/oof_embeddings.npz"}
    state["postprocessing"] = {"tta": "hflip", "describe": "none", "rerank": None}
    torch.save(state, checkpoint)
    people_confirm_low_and_enroll_new(store, model)
    assert calibrate(store_dir, checkpoint) == 0
    out = capsys.readouterr().out
    assert "match threshold 0.8000 -> 0.5500" in out and "new-individual threshold 0.4500 -> 0.42" in out
    assert "before: the checkpoint's calibration (runs/cv/oof_embeddings.npz)" in out
    state = torch.load(checkpoint, weights_only=False)
    assert state["postprocessing"] == {"tta": "hflip", "describe": "none", "rerank": None}
    assert state["calibration"]["fitted_on"] == "reviews" and state["calibration"]["reviews"] == 14
    assert state["calibration"]["source"] == f"reviews: 14 verdicts on 14 animals of {SPECIES} in {store_dir}"
    assert state["calibration"]["animals"] == {CONFIRMED_FIRST: 8, CONFIRMED_OTHER: 0, NEW: 6, REJECTED_FIRST: 0}
    # the served TTA (hflip) has another fingerprint than the none the reviews were made with: same weights, kept
    assert Embedder.from_checkpoint(checkpoint, num_workers=0).tta == "hflip"


def test_reviews_of_another_model_are_ignored_and_counted(store, store_dir, checkpoint, model, capsys):
    people_confirm_low_and_enroll_new(store, model)
    for best in (0.95, 0.96, 0.97):  # another model's wrong first candidates would raise the match threshold
        review(store, "rejected", best, "0123456789abcdef-0b259c40", candidate=1)
    assert calibrate(store_dir, checkpoint) == 0
    out = capsys.readouterr().out
    assert "read 17 reviews" in out and "3 ignored, scored by another model than this checkpoint's " \
                                       "(0123456789abcdef-0b259c40: 3)" in out
    assert Embedder.from_checkpoint(checkpoint, num_workers=0).thresholds["match_threshold"] == pytest.approx(0.55)


# ---------------------------------------------------------------------- verdicts -> outcomes
def test_the_last_decisive_verdict_of_each_animal_is_its_outcome():
    rows = [
        # rejected first, then a lower candidate confirmed: known, the first candidate wrong
        {"id": 1, "encounter": "a", "animal_index": 0, "verdict": "rejected", "candidate_rank": 1, "best_score": 0.8},
        {"id": 2, "encounter": "a", "animal_index": 0, "verdict": "confirmed", "candidate_rank": 2, "best_score": 0.8},
        # the other animal of the same encounter: rejected first, then enrolled as new
        {"id": 3, "encounter": "a", "animal_index": 1, "verdict": "rejected", "candidate_rank": 1, "best_score": 0.6},
        {"id": 4, "encounter": "a", "animal_index": 1, "verdict": "new", "candidate_rank": 1, "best_score": 0.6},
        # rejected first, no decision after
        {"id": 5, "encounter": "b", "animal_index": 0, "verdict": "rejected", "candidate_rank": 1, "best_score": 0.7},
        {"id": 6, "encounter": "b", "animal_index": 0, "verdict": "skipped", "candidate_rank": 1, "best_score": 0.7},
        # only a lower candidate rejected, or only skipped: nothing said about the first
        {"id": 7, "encounter": "c", "animal_index": 0, "verdict": "rejected", "candidate_rank": 3, "best_score": 0.5},
        {"id": 8, "encounter": "d", "animal_index": 0, "verdict": "skipped", "candidate_rank": 1, "best_score": 0.5},
        # confirmed first; a new animal that had no candidate at all
        {"id": 9, "encounter": "e", "animal_index": 0, "verdict": "confirmed", "candidate_rank": 1, "best_score": 0.9},
        {"id": 10, "encounter": "f", "animal_index": 0, "verdict": "new", "candidate_rank": None, "best_score": None},
    ]
    outcomes, undecided = animal_outcomes(rows[::-1])  # taken in id order, whatever the order given
    assert [(o.kind, o.best_score, o.reviews) for o in outcomes] == [
        (CONFIRMED_OTHER, 0.8, [1, 2]), (NEW, 0.6, [3, 4]), (REJECTED_FIRST, 0.7, [5, 6]),
        (CONFIRMED_FIRST, 0.9, [9]), (NEW, None, [10])]
    assert undecided == 2


def test_too_few_verdicts_are_refused_naming_what_is_missing():
    outcomes = [Outcome(CONFIRMED_FIRST, 0.6)] * 7 + [Outcome(NEW, 0.3)] * 4 + [Outcome(NEW, None)] * 3
    with pytest.raises(ReidError, match=r"at least 5 animals enrolled as new individuals \(have 4\)") as caught:
        fit_thresholds(outcomes)
    assert "first candidate was confirmed" not in str(caught.value)
    assert fit_thresholds(outcomes + [Outcome(NEW, 0.35)])["new_threshold"] > 0.35


def test_too_few_reviews_is_one_message_and_exit_2(store, store_dir, checkpoint, model, capsys):
    known = enroll(store, "Known", "known")
    for best in (0.6, 0.62, 0.64):
        review(store, "confirmed", best, model, candidate=known, individual=known)
    before = checkpoint.read_bytes()
    assert calibrate(store_dir, checkpoint) == 2
    err = capsys.readouterr().err
    assert err.startswith("reid calibrate: error: too few verdicts to refit the thresholds: it needs at least 5 "
                          "animals whose first candidate was confirmed (have 3) and 5 animals enrolled as new "
                          "individuals (have 0)")
    assert "Traceback" not in err and checkpoint.read_bytes() == before  # nothing written


def test_a_species_without_reviews_lists_the_species_that_have_some(store, store_dir, checkpoint, model, capsys):
    review(store, "skipped", 0.5, model, species="lion")
    review(store, "skipped", 0.5, model, species="lion")
    assert calibrate(store_dir, checkpoint) == 2
    assert f"has no reviews of species '{SPECIES}'; species with reviews: lion (2)" in capsys.readouterr().err


def test_reviews_of_no_model_of_this_checkpoint_are_refused(store, store_dir, checkpoint, capsys):
    people_confirm_low_and_enroll_new(store, "fedcba9876543210-0b259c40")
    assert calibrate(store_dir, checkpoint) == 2
    err = capsys.readouterr().err
    assert "none of the 14 reviews of 'zebra' was scored by" in err and "fedcba9876543210-0b259c40 (14)" in err


@pytest.mark.parametrize("argv, message", [
    (["calibrate"], "one of the arguments --run --reviews is required"),
    (["calibrate", "--run", "r", "--reviews", "s"], "argument --reviews: not allowed with argument --run"),
])
def test_run_and_reviews_are_alternatives(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_reviews_needs_species_and_checkpoint_and_run_takes_neither(tmp_path, capsys):
    assert main(["calibrate", "--reviews", str(tmp_path)]) == 2
    assert ("reid calibrate: error: --reviews needs --species SPECIES and --checkpoint best.pt"
            in capsys.readouterr().err)
    assert main(["calibrate", "--reviews", str(tmp_path), "--species", SPECIES]) == 2
    assert "--reviews needs --checkpoint best.pt:" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(tmp_path), "--species", SPECIES]) == 2
    assert "--species go with --reviews STORE" in capsys.readouterr().err


def test_a_mistyped_store_is_said_and_not_created(tmp_path, checkpoint, capsys):
    assert calibrate(tmp_path / "typo", checkpoint) == 2
    assert "no store at" in capsys.readouterr().err and not (tmp_path / "typo").exists()


# ---------------------------------------------------------------------- reviews export
def test_export_writes_each_query_photo_and_candidate_as_a_labelled_pair(store, store_dir, model, tmp_path, capsys):
    stored = store.enroll("Stripes", SPECIES, [new_image("stripes", store_dir)], "m", "alice")
    stripes = stored["individual_id"]
    dots = store.enroll("Dots", SPECIES, [new_image("dots", store_dir)], "m", "alice")["individual_id"]
    # an animal of two photos: its first candidate (Dots) rejected, then the second (Stripes) confirmed; the
    # confirmed photos are stored as a sighting of Stripes (here: one of them, the other's file is not there)
    photos = [sha("photo-1"), sha("photo-2")]
    sighting = store.add_sighting(stripes, [new_image("photo-1", store_dir)], "m", "bob")
    review(store, "rejected", 0.71, model, candidate=dots, rank=1, encounter="E1", photos=photos, key="bob")
    review(store, "confirmed", 0.71, model, candidate=stripes, rank=2, cosine=0.66, individual=stripes,
           encounter="E1", photos=photos, key="bob")
    # a new individual: different from the first candidate shown; one without candidates gives no pair
    newcomer = store.enroll("Newcomer", SPECIES, [new_image("photo-3", store_dir)], "m", "alice")["individual_id"]
    review(store, "new", 0.4, model, candidate=stripes, rank=1, individual=newcomer, encounter="E2",
           photos=[sha("photo-3")])
    review(store, "new", 0.0, model, encounter="E3", photos=[sha("photo-4")])
    review(store, "skipped", 0.6, model, candidate=dots, encounter="E4")
    review(store, "confirmed", 0.9, model, candidate=dots, individual=dots, species="lion")
    out = tmp_path / "pairs.csv"
    assert main(["reviews", "export", "--store", str(store_dir), "--out", str(out), "--species", SPECIES]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: 5 rows (2 same, 3 different) from 5 reviews of {SPECIES}\n")
    assert "2 rows have no query_path" in printed
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:17] == ["review_id", "at", "reviewer", "species", "encounter", "animal_index",
                                  "query_sha256", "query_path", "candidate_id", "candidate_name", "candidate_rank",
                                  "label", "individual_id", "score", "cosine", "best_score", "decision"]
    assert [(r["query_sha256"], r["candidate_name"], r["candidate_rank"], r["label"], r["reviewer"]) for r in rows] == [
        (photos[0], "Dots", "1", "different", "bob"), (photos[1], "Dots", "1", "different", "bob"),
        (photos[0], "Stripes", "2", "same", "bob"), (photos[1], "Stripes", "2", "same", "bob"),
        (sha("photo-3"), "Stripes", "1", "different", "alice")]
    assert rows[0]["query_path"] == str(store_dir / "images" / photos[0][:2] / f"{photos[0]}.jpg")
    assert rows[1]["query_path"] == "" and rows[4]["query_path"].endswith(f"{sha('photo-3')}.jpg")
    assert rows[2]["individual_id"] == str(stripes) and float(rows[2]["cosine"]) == pytest.approx(0.66)
    assert float(rows[2]["best_score"]) == pytest.approx(0.71) and rows[2]["decision"] == "match"
    assert rows[2]["encounter"] == "E1" and rows[2]["animal_index"] == "0" and rows[4]["individual_id"] == str(newcomer)
    assert sighting["image_ids"] and not list(tmp_path.glob(".pairs.csv.*.tmp"))  # written whole, nothing left
    assert main(["reviews", "export", "--store", str(store_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 6 rows (3 same, 3 different) from 6 reviews (every species)")


def test_export_of_a_species_without_reviews_is_refused(store, store_dir, model, tmp_path, capsys):
    review(store, "skipped", 0.5, model)
    assert main(["reviews", "export", "--store", str(store_dir), "--out", str(tmp_path / "p.csv"),
                 "--species", "lion"]) == 2
    assert "has no reviews of species 'lion'; species with reviews: zebra (1)" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
