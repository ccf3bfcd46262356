"""End-to-end training through the `reid` command: exact resume after SIGKILL, CV outputs, DDP, errors."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from reid.config import dump_config
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    # identical thread counts in every process: CPU float sums are only reproducible that way
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _reid(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "reid.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"reid {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _config_file(tmp_path: Path, *overrides: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(tiny_config(*overrides)))
    return str(path)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"loss.{k}": v for k, v in state["loss"].items()}}


def _history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # wall-clock figures differ between runs by nature
        for key in ("train_seconds", "train_images_per_s"):
            row.pop(key)
    return rows


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, synth_csv):
    config = _config_file(tmp_path, "train.epochs=3", "train.checkpoint_every=3", "train.patience=0",
                          "train.warmup_epochs=1", "cv.split=closed",
                          "data.context_swap_p=0.5")  # its draws must replay on resume too
    common = ["train", "--config", config, "--data", str(synth_csv), "--no-progress"]
    straight = tmp_path / "straight"
    _reid(*common, "--out", str(straight))

    crashed = tmp_path / "crashed"
    # Count forward passes of the loss and SIGKILL the process in the middle of epoch 2, after a
    # mid-epoch checkpoint and with unsaved work lost: nothing gets a chance to clean up.
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from reid.train import losses
        calls = [0]
        forward = losses.ReIDLoss.forward
        def counting_forward(self, *args):
            calls[0] += 1
            if calls[0] == 8:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, *args)
        losses.ReIDLoss.forward = counting_forward
        from reid.cli import main
        sys.exit(main({[*common, '--out', str(crashed)]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", killer], env=_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    mid = torch.load(crashed / "last.pt", map_location="cpu", weights_only=False)
    assert mid["epoch"] == 1 and 0 < mid["batch"], "the kill should land after a mid-epoch checkpoint"

    _reid(*common, "--out", str(crashed), "--resume")
    a, b = _weights(straight), _weights(crashed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    assert _history(straight) == _history(crashed)
    assert (crashed / "best.pt").exists() and (crashed / "summary.json").exists()


def test_existing_run_needs_resume_and_resume_of_finished_run_is_a_no_op(tmp_path, synth_csv):
    config = _config_file(tmp_path, "train.epochs=1")
    args = ["train", "--config", config, "--data", str(synth_csv), "--out", str(tmp_path / "run"), "--no-progress"]
    _reid(*args)
    record = (tmp_path / "run" / "run.json").read_text()
    again = _reid(*args, "--set", "seed=7", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "run" / "run.json").read_text() == record  # the refused run wrote nothing
    assert _reid(*args, "--resume").returncode == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["seed"] == 42 and record["config"]["train"]["epochs"] == 1 and "git_revision" in record
    split = (tmp_path / "run" / "split.csv").read_text().splitlines()
    assert split[0] == "path,identity,encounter,fold" and len(split) == 12 * 4 + 1


def test_init_from_checkpoint_with_other_identities_reports_skipped_head(tmp_path, synth_csv):
    first = tmp_path / "first"
    _reid("train", "--config", _config_file(tmp_path, "train.epochs=1"), "--data", str(synth_csv),
          "--out", str(first), "--no-progress")
    subset = tmp_path / "subset.csv"
    lines = synth_csv.read_text().splitlines()
    keep = [lines[0]] + [line for line in lines[1:] if not line.split(",")[1].endswith(("00", "01", "02"))]
    subset.write_text("\n".join(keep).replace("images/", f"{synth_csv.parent}/images/") + "\n")
    second = _reid("train", "--config", _config_file(tmp_path, "train.epochs=1", f"train.init_from={first / 'best.pt'}"),
                   "--data", str(subset), "--out", str(tmp_path / "second"), "--no-progress")
    found = re.search(r"initialised from .*skipped: arcface\.W \(shape \(32, (\d+)\) in checkpoint, \(32, (\d+)\) here\)",
                      second.stdout)
    assert found and found.group(1) != found.group(2), second.stdout[:2000]
    assert "backbone" not in found.group(0)  # the backbone and neck transferred


def test_cv_writes_summary_and_out_of_fold_embeddings(tmp_path, synth_csv):
    out = tmp_path / "cv"
    proc = _reid("cv", "--config", _config_file(tmp_path, "train.epochs=1"), "--data", str(synth_csv),
                 "--out", str(out), "--folds", "3", "--no-progress")
    assert "chance" in proc.stdout
    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 3
    for key in ("mAP", "identity_balanced_mAP", "top1"):
        assert 0 <= summary[key]["mean"] <= 1 and summary[key]["std"] >= 0 and 0 < summary[f"chance_{key}"] < 1
    oof = np.load(out / "oof_embeddings.npz")
    assert oof["embeddings"].shape == (48, 32)
    assert np.allclose(np.linalg.norm(oof["embeddings"], axis=1), 1, atol=1e-4)
    assert sorted(set(oof["fold"].tolist())) == [0, 1, 2]
    for fold in range(3):
        assert (out / f"fold_{fold}" / "best.pt").exists() and (out / f"fold_{fold}" / "metrics.jsonl").exists()
        assert (out / f"fold_{fold}" / "curves.png").stat().st_size > 0
    assert (out / "curves.png").stat().st_size > 0
    # the synthetic table names flanks: classes per (identity, flank), and the flank splits beside the overall
    assert "same-flank" in proc.stdout and "one class per flank" not in proc.stdout
    for split in ("same_flank", "cross_flank"):
        assert 0 <= summary[split]["mAP"]["mean"] <= 1 and 0 < summary[split]["chance_mAP"] < 1
    row = json.loads((out / "fold_0" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["train_loss_parts"]) == {"arcface", "triplet"}
    assert set(row["lr"]) == {"backbone_bottom", "backbone_top", "head"} and row["gem_p"] > 0
    assert 0 <= row["train_probe"]["mAP"] <= 1 and row["train_probe"]["queries"] > 0
    assert "same_flank" in row["val"] and oof["viewpoint"].tolist().count("left") > 0
    best = torch.load(out / "fold_0" / "best.pt", weights_only=False)
    assert best["class_mode"] == "identity_viewpoint" and any("|" in name for name in best["identities"])


def test_folds_trained_side_by_side_match_folds_trained_in_turn(tmp_path, synth_csv):
    """cv.workers: each fold in its own process, with the same thread count (one here) as in turn."""
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        proc = _reid("cv", "--config", _config_file(tmp_path, "train.epochs=1", f"cv.workers={workers}"),
                     "--data", str(synth_csv), "--out", str(out), "--folds", "3", "--no-progress")
        runs[workers] = json.loads((out / "cv_summary.json").read_text()), np.load(out / "oof_embeddings.npz")
    assert "[fold 2] epoch 1:" in proc.stdout and "2 at a time, 1 CPU thread each" in proc.stdout
    (serial, serial_oof), (parallel, parallel_oof) = runs[1], runs[2]
    assert [f["fold"] for f in parallel["folds"]] == [0, 1, 2]
    assert [f["mAP"] for f in parallel["folds"]] == [f["mAP"] for f in serial["folds"]]
    assert np.array_equal(parallel_oof["embeddings"], serial_oof["embeddings"])
    assert np.array_equal(parallel_oof["path"], serial_oof["path"])


def test_ddp_two_processes_gloo(tmp_path, synth_csv):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "reid.cli", "train", "--config", _config_file(tmp_path, "train.epochs=2"),
           "--data", str(synth_csv), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["epoch"] == 2
    assert len(_history(out)) == 2


def test_bad_csv_row_gives_one_clear_message(tmp_path, synth_csv):
    bad = tmp_path / "bad.csv"
    lines = synth_csv.read_text().splitlines()
    lines[3] = lines[3].replace(".jpg", "_missing.jpg").replace(".png", "_missing.png")
    bad.write_text("\n".join(lines).replace("images/", f"{synth_csv.parent}/images/") + "\n")
    proc = _reid("train", "--config", _config_file(tmp_path), "--data", str(bad), "--out", str(tmp_path / "r"),
                 check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "_missing" in proc.stderr and "4" in proc.stderr
