import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reid.data.dataset import ReIDDataset
from reid.data.transforms import build_transforms, use_hflip
from reid.errors import ConfigError, DataError


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    transform = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True, hflip=True)
    return ReIDDataset(paths, np.array([0, 1, 1]), transform)


def test_seeded_items_ignore_global_rng(dataset):
    torch.manual_seed(0)
    np.random.seed(0)
    a, label, index = dataset[(1, 1234)]
    torch.manual_seed(99)
    np.random.seed(99)
    b, _, _ = dataset[(1, 1234)]
    c, _, _ = dataset[(1, 4321)]
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and (label, index) == (1, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_gives_the_same_images(dataset):
    cached = ReIDDataset(dataset.paths, dataset.labels, dataset.transform, cache_images=True, cache_size=48)
    first, _, _ = cached[(0, 7)]
    assert torch.equal(first, cached[(0, 7)][0]) and len(cached.cache) == 1


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    ds = ReIDDataset([str(bad)], np.array([0]), build_transforms(32, (0.5,) * 3, (0.5,) * 3, False, False))
    with pytest.raises(DataError, match="bad.jpg"):
        ds[0]


def test_hflip_auto_rule():
    flanks = pd.DataFrame({"viewpoint": ["left", "right"]})
    assert use_hflip("auto", flanks)[0] is False
    assert use_hflip("auto", pd.DataFrame({"viewpoint": ["left", "left"]}))[0] is True
    assert use_hflip("auto", pd.DataFrame({"path": ["a"]}))[0] is True
    assert use_hflip(True, flanks)[0] is True
    with pytest.raises(ConfigError):
        use_hflip("sometimes", flanks)
