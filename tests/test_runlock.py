"""One writer per run folder: a second `reid train` / `reid cv` on a folder in use is refused at once, and
a writer killed with SIGKILL leaves no stale lock behind."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reid.data.table import load_table
from reid.errors import ReidError
from reid.train.cv import cross_validate, train_fold
from reid.train.runlock import run_lock
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time\nfrom reid.train.runlock import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('locked', flush=True)\n    time.sleep(120)\n"


@pytest.fixture
def held_folder(tmp_path):
    """A run folder whose lock another process holds; that process is killed with SIGKILL afterwards."""
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    assert holder.stdout.readline().strip() == "locked"
    yield folder, holder
    holder.kill()
    holder.wait()


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(held_folder, synth_csv):
    folder, holder = held_folder
    cfg, table = tiny_config("train.epochs=0"), load_table(synth_csv)
    for train in (lambda: train_fold(cfg, table, str(synth_csv), folder, resume=True),
                  lambda: cross_validate(cfg, table, str(synth_csv), folder, resume=True)):
        with pytest.raises(ReidError, match="being written by another process"):
            train()
    assert not (folder / "split.csv").exists()  # refused before writing anything
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(folder):  # the lock died with its process
        pass
    train_fold(cfg, table, str(synth_csv), folder)
    assert (folder / "best.pt").is_file()
