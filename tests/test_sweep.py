"""`reid sweep`: Optuna trials of cross-validation, resumable after SIGKILL, with a table and a plot."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from reid.config import dump_config
from reid.errors import ConfigError
from reid.train.sweep import SearchSpace
from tests.conftest import tiny_config
from tests.test_training import REPO, _env


def _space(tmp_path, **extra) -> str:
    space = {"metric": "mAP", "trials": 2, "seed": 0, "baseline": False,
             "enqueue": [{"train.lr": 1.0e-3}, {"train.lr": 3.0e-3}],
             "params": {"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}, **extra}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def test_sweep_of_two_trials_resumes_after_sigkill(tmp_path, synth_csv):
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(tiny_config("train.epochs=2", "cv.folds=2", "cv.split=disjoint")))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "reid.cli", "sweep", "--config", str(config), "--data", str(synth_csv),
               "--out", str(out), "--space", _space(tmp_path), "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    # kill it inside the first trial, once its first fold has a checkpoint
    deadline = time.monotonic() + 240
    while not list(out.glob("trials/*/fold_0/last.pt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the first fold never wrote a checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_folder = next(out.glob("trials/*"))

    done = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "interrupted: queued again" in done.stdout
    table = pd.read_csv(out / "trials.csv")
    complete = table[table["state"] == "complete"]
    assert len(complete) == 2 and set(complete["folds"]) == {2}
    assert sorted(complete["param.train.lr"]) == [1.0e-3, 3.0e-3]
    # the interrupted trial resumed its own folder rather than starting another
    assert len(list(out.glob("trials/*"))) == 2 and f"trials/{first_folder.name}" in set(complete["folder"])
    assert complete["mAP_mean"].between(0, 1).all() and complete["mAP_std"].notna().all()
    saved = json.loads((out / "trials.json").read_text())
    assert saved["best"]["trial"] in set(complete["trial"]) and (out / "trials.png").stat().st_size > 0
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"] == saved["best"]["params"]["train.lr"]
    # a finished sweep run again has nothing left to do
    again = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert again.returncode == 0 and "--- trial" not in again.stdout


def test_search_space_errors_name_the_fix(tmp_path):
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="params.train.lrr is not a config key"):
        SearchSpace({"params": {"train.lrr": {"low": 0.1, "high": 1.0}}}, cfg)
    with pytest.raises(ConfigError, match="low .* must be below high"):
        SearchSpace({"params": {"train.lr": {"low": 1.0, "high": 0.1}}}, cfg)
    with pytest.raises(ConfigError, match="outside its range"):
        SearchSpace({"params": {"train.lr": {"low": 0.1, "high": 1.0}}, "enqueue": [{"train.lr": 5.0}]}, cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        SearchSpace({"params": {"train.lr": {"low": 0.1, "high": 1.0}}, "trails": 3}, cfg)
    # the baseline trial takes each parameter's config value, which must lie in the space
    space = SearchSpace({"params": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                    "train.freeze_bn": {"choices": [False, True]},
                                    "sampler.min_batches_per_epoch": {"low": 0, "high": 40, "step": 10}}}, cfg)
    assert space.enqueued == [{"train.lr": 1e-3, "train.freeze_bn": False, "sampler.min_batches_per_epoch": 0}]
    assert type(space.distributions["sampler.min_batches_per_epoch"]).__name__ == "IntDistribution"
