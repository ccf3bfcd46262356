import os

import pytest
import torch
from torch import nn

from reid.errors import ReidError
from reid.io import atomic_path, write_json
from reid.checkpoint import load_checkpoint, load_matching, save_checkpoint


def test_failed_write_leaves_previous_file(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "torn')
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary left behind


def test_damaged_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ReidError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ReidError, match="unreadable"):
        load_checkpoint(broken)


def test_load_matching_skips_other_class_count(tmp_path):
    class Net(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.neck = nn.Linear(4, 3)
            self.head = nn.Linear(3, classes)

    source, target = Net(10), Net(7)
    save_checkpoint(tmp_path / "c.pt", source.state_dict())
    skipped = load_matching(target, load_checkpoint(tmp_path / "c.pt"))
    assert torch.equal(target.neck.weight, source.neck.weight)
    assert not torch.equal(target.head.weight[:1], source.head.weight[:1, :])
    assert skipped == ["head.weight (shape (10, 3) in checkpoint, (7, 3) here)",
                       "head.bias (shape (10,) in checkpoint, (7,) here)"]


def test_json_files_are_strict_json_with_null_for_what_is_not_a_number(tmp_path):
    import json

    import numpy as np

    from reid.io import write_jsonl

    write_json(tmp_path / "m.json", {"auroc": float("nan"), "per_fold": [np.float32("inf"), np.float64(0.5)],
                                     "count": np.int64(3), "vector": np.arange(2)})
    write_jsonl(tmp_path / "m.jsonl", [{"val_mAP": float("-inf")}])

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {
        "auroc": None, "per_fold": [None, 0.5], "count": 3, "vector": [0, 1]}
    assert json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse) == {"val_mAP": None}
