"""`reid evaluate`, `reid calibrate`, `reid index build` and `reid submit-pairs` end to end, and the
evaluation's encounter rule across a query table and a gallery table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reid.config import dump_config
from reid.data.table import load_table
from reid.embedding import Embedder, file_hash
from reid.evaluation.evaluate import RerankOptions, evaluate
from reid.index import GalleryIndex
from tests.conftest import clustered_embeddings, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _reid(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "reid.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"reid {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def _refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def test_evaluate_writes_metrics_and_report(tmp_path, tiny_checkpoint, synth_csv):
    images = sorted(Path(synth_csv).parent.rglob("*.jpg"))
    before = [file_hash(p) for p in images]
    out = tmp_path / "eval" / "metrics.json"
    _reid("evaluate", "--checkpoint", tiny_checkpoint, "--data", synth_csv, "--out", out,
          "--cache", tmp_path / "cache", "--no-progress")
    plain = json.loads(out.read_text(), parse_constant=_refuse)  # strict JSON: no NaN / Infinity
    assert plain["open_set"]["auroc_known_vs_new"] is None  # every individual is known here: nothing to measure
    for key in ("mAP", "identity_balanced_mAP", "top1", "top5", "top10", "mINP", "pair_auc"):
        assert 0.0 <= plain[key] <= 1.0
    assert plain["open_set"]["threshold_source"].startswith("best on this set")
    with Image.open(out.with_suffix(".png")) as report:
        assert report.size[0] > 500
    assert [file_hash(p) for p in images] == before  # the user's photos are only ever read

    _reid("evaluate", "--checkpoint", tiny_checkpoint, "--data", synth_csv, "--out", out, "--cache",
          tmp_path / "cache", "--k-reciprocal", "--k1", "4", "--k2", "2", "--qe", "2", "--no-progress")
    reranked = json.loads(out.read_text())
    assert reranked["rerank"]["k_reciprocal"] and reranked["queries"] == plain["queries"]
    assert reranked["mAP"] != plain["mAP"]


def test_empty_gallery_is_a_clear_error(tmp_path, tiny_checkpoint, synth_csv):
    empty = tmp_path / "gallery.csv"
    empty.write_text("path,identity\n")
    proc = _reid("evaluate", "--checkpoint", tiny_checkpoint, "--data", synth_csv, "--gallery", empty,
                 "--out", tmp_path / "m.json", check=False)
    assert proc.returncode == 2 and "no rows" in proc.stderr and "Traceback" not in proc.stderr


def test_a_query_never_scores_its_own_encounter_across_tables():
    emb = np.eye(3, dtype=np.float32)
    queries = pd.DataFrame({"path": ["q"], "identity": ["a"], "encounter": ["e1"]})
    gallery = pd.DataFrame({"path": ["g1", "g2", "g3"], "identity": ["a", "b", "a"], "encounter": ["e1", "e2", "e3"]})
    q = np.array([[1.0, 0.6, 0.0]], dtype=np.float32)
    q /= np.linalg.norm(q)
    metrics, _ = evaluate(q, queries, emb, gallery, same_set=False)
    # g1 (same encounter) is hidden: b ranks first, the other a second
    assert metrics["top1"] == 0.0 and metrics["mAP"] == pytest.approx(0.5)
    no_encounters = queries.drop(columns="encounter"), gallery.drop(columns="encounter")
    metrics, _ = evaluate(q, no_encounters[0], emb, no_encounters[1], same_set=False)
    assert metrics["top1"] == 1.0  # without encounters nothing is hidden


def test_reranking_options_change_the_scores_not_the_protocol():
    emb, ids = clustered_embeddings(10, 5, noise=0.8)
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(50)], "identity": ids.astype(str)})
    plain, _ = evaluate(emb, table, emb, table, same_set=True)
    for options in (RerankOptions(qe=2), RerankOptions(dba=2), RerankOptions(k_reciprocal=True, k1=5, k2=2)):
        metrics, _ = evaluate(emb, table, emb, table, same_set=True, options=options)
        assert metrics["queries"] == plain["queries"] == 50
        assert metrics["mAP"] > 0.3


def test_calibrate_stores_thresholds_that_evaluate_uses(tmp_path, synth_csv):
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(tiny_config("train.epochs=0", "cv.folds=2", "cv.split=disjoint")))
    run = tmp_path / "run"
    _reid("cv", "--config", config, "--data", synth_csv, "--out", run, "--no-progress")
    proc = _reid("calibrate", "--run", run, "--precision", "0.9")
    assert "match threshold" in proc.stdout and "post-processing:" in proc.stdout
    best = torch.load(run / "fold_0" / "best.pt", weights_only=False)
    assert best["calibration"]["precision"] == 0.9
    assert json.loads((run / "calibration.json").read_text())["match_threshold"] == best["calibration"]["match_threshold"]
    post = best["postprocessing"]
    # the synthetic table names flanks, so flip TTA is never a candidate
    assert post["tta"] == "none" and {row["tta"] for row in post["candidates"]} == {"none"}
    # metadata added to the checkpoint does not change the model fingerprint (the cache stays valid)
    out = tmp_path / "m.json"
    proc = _reid("evaluate", "--checkpoint", run / "fold_0" / "best.pt", "--data", synth_csv, "--out", out,
                 "--cache", tmp_path / "cache", "--no-progress")
    metrics = json.loads(out.read_text())
    assert metrics["open_set"]["threshold_source"].startswith("calibrated")
    # evaluate applies the chosen re-ranking by default and says so; --no-postprocessing turns it off
    assert metrics["rerank"] == post["rerank"]
    assert ("re-ranking:" in proc.stdout) == (post["describe"] != "none")
    _reid("evaluate", "--checkpoint", run / "fold_0" / "best.pt", "--data", synth_csv, "--out", out,
          "--cache", tmp_path / "cache", "--no-progress", "--no-postprocessing")
    assert json.loads(out.read_text())["rerank"]["k_reciprocal"] is False and json.loads(out.read_text())["rerank"]["qe"] == 0


def test_calibrate_without_a_cv_run_is_a_clear_error(tmp_path):
    proc = _reid("calibrate", "--run", tmp_path, check=False)
    assert proc.returncode == 2 and "oof_embeddings.npz" in proc.stderr


def test_index_build_carries_the_metadata(tmp_path, tiny_checkpoint, synth_csv):
    cache = tmp_path / "cache"
    _reid("embed", "--checkpoint", tiny_checkpoint, "--data", synth_csv, "--out", cache, "--no-progress")
    _reid("index", "build", "--embeddings", cache, "--out", tmp_path / "g.index")
    gallery = GalleryIndex.load(tmp_path / "g.index")
    table = load_table(synth_csv)
    assert len(gallery) == len(table) and gallery.kind == "flat"
    emb = Embedder.from_checkpoint(tiny_checkpoint).embed_paths(table["path"].iloc[:3].tolist())
    _, ids = gallery.search(emb, 1)
    assert gallery.metadata.loc[ids[:, 0], "path"].tolist() == table["path"].iloc[:3].tolist()
    assert gallery.metadata.loc[ids[:, 0], "identity"].tolist() == table["identity"].iloc[:3].tolist()


def test_submit_pairs_scores_every_row(tmp_path, tiny_checkpoint, synth_csv):
    table = load_table(synth_csv)
    images = Path(table["path"].iloc[0]).parents[1]
    names = [str(Path(p).relative_to(images)) for p in table["path"]]
    pairs = tmp_path / "test.csv"
    pd.DataFrame({"row_id": [10, 11, 12], "query_image": names[:3], "gallery_image": names[3:6]}).to_csv(pairs, index=False)
    out = tmp_path / "submission.csv"
    _reid("submit-pairs", "--checkpoint", tiny_checkpoint, "--images", images, "--pairs", pairs, "--out", out,
          "--cache", tmp_path / "cache", "--no-progress")
    submission = pd.read_csv(out)
    assert submission["row_id"].tolist() == [10, 11, 12]
    emb = Embedder.from_checkpoint(tiny_checkpoint).embed_paths(table["path"].iloc[:6].tolist())
    np.testing.assert_allclose(submission["similarity"], np.sum(emb[:3] * emb[3:6], axis=1), atol=1e-5)

    _reid("submit-pairs", "--checkpoint", tiny_checkpoint, "--images", images, "--pairs", pairs, "--out", out,
          "--cache", tmp_path / "cache", "--k-reciprocal", "--k1", "4", "--k2", "2", "--no-progress")
    reranked = pd.read_csv(out)["similarity"]
    assert len(reranked) == 3 and np.all(np.abs(reranked) <= 1.0 + 1e-6)

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    proc = _reid("submit-pairs", "--checkpoint", tiny_checkpoint, "--images", images, "--pairs", bad, "--out", out,
                 check=False)
    assert proc.returncode == 2 and "query_image" in proc.stderr


def test_report_rank_lists_show_confident_misses_and_unsure_hits_of_several_individuals():
    from reid.evaluation.report import pick_examples

    identities = np.array(list("aabbccdde"))
    scores = np.array([0.9, 0.8, 0.95, 0.3, 0.7, 0.6, 0.5, 0.4, 0.99])
    correct = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0], bool)
    known = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # e has no other photo: not a rank list
    chosen = pick_examples(scores, correct, known, identities, per_kind=3)
    # misses by confidence, one per individual first (b 0.95, a 0.9), then a's other; hits of unseen c, d
    # first, least confident first, then b
    assert chosen == [2, 0, 1, 7, 5, 3]
