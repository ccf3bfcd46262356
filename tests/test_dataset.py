import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reid.data.dataset import ReIDDataset, read_image
from reid.data.transforms import Augmentation, build_transforms, seed_transform, use_hflip
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


def test_seeded_items_ignore_what_was_loaded_before(dataset):
    a = dataset[(2, 77)][0]
    for item in [(0, 1), 1, (2, 5)]:
        dataset[item]
    assert torch.equal(a, dataset[(2, 77)][0])


def test_a_seed_decides_each_augmentation_step_on_its_own_draw():
    """With one generator of the same seed per step (albumentations' set_random_seed), every step's
    `u < p` came from one number: steps of equal p applied together or not at all."""
    steps = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    pipeline = A.Compose(steps)
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    agree = 0
    for seed in range(400):
        seed_transform(pipeline, seed)
        out = pipeline(image=image)["image"]
        both = np.array_equal(out, image[::-1, ::-1])
        flipped_h, flipped_v = both or np.array_equal(out, image[:, ::-1]), both or np.array_equal(out, image[::-1])
        agree += flipped_h == flipped_v
        seed_transform(pipeline, seed)
        assert np.array_equal(pipeline(image=image)["image"], out)  # a seed gives the same photo again
    assert 160 < agree < 240  # independent: each pair of decisions agrees about half the time, not always


def test_augment_p_is_the_share_of_training_photos_varied_at_all():
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    plain = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=False, hflip=False, normalize=False)(image=image)
    for augment_p, low, high in ((0.0, 1.0, 1.0), (0.8, 0.15, 0.3), (1.0, 0.0, 0.1)):
        pipeline = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True, hflip=False, normalize=False,
                                    augmentation=Augmentation(augment_p=augment_p))
        untouched = 0
        for seed in range(300):
            seed_transform(pipeline, seed)
            untouched += torch.equal(pipeline(image=image)["image"], plain["image"])
        assert low <= untouched / 300 <= high, augment_p
    with pytest.raises(ConfigError, match="augment_p"):
        Augmentation(augment_p=1.5).check()


def test_worker_processes_give_the_same_batches(dataset):
    batches = [[(0, 11), (1, 12)], [(2, 13), (0, 14)]]

    def load(workers):
        return [images for images, _, _ in DataLoader(dataset, batch_sampler=batches, num_workers=workers)]

    for inline, parallel in zip(load(0), load(2)):
        assert torch.equal(inline, parallel)


def test_cache_keeps_shrunk_images(dataset):
    cached = ReIDDataset(dataset.paths, dataset.labels, dataset.transform, cache_images=True, cache_size=35)
    first, _, _ = cached[(0, 7)]
    assert torch.equal(first, cached[(0, 7)][0]) and len(cached.cache) == 1
    assert cached.cache[0].shape == (20, 35, 3) and cached.cache[0].dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    image.save(tmp_path / "turned.jpg", exif=exif)
    assert read_image(str(tmp_path / "turned.jpg")).shape == (30, 10, 3)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    ds = ReIDDataset([str(bad)], np.array([0]), build_transforms(32, (0.5,) * 3, (0.5,) * 3, False, False))
    with pytest.raises(DataError, match="bad.jpg"):
        ds[0]


def test_hflip_auto_rule():
    flanks = pd.DataFrame({"viewpoint": ["left", "right"]})
    assert use_hflip("auto", flanks)[0] is False
    assert use_hflip("auto", pd.DataFrame({"viewpoint": ["left", "left", ""]}))[0] is True
    assert use_hflip("auto", pd.DataFrame({"path": ["a"]}))[0] is True
    assert use_hflip(True, flanks)[0] is True and use_hflip(False, pd.DataFrame())[0] is False
    assert "flank" in use_hflip("auto", flanks)[1]
    with pytest.raises(ConfigError):
        use_hflip("sometimes", flanks)


def test_eval_transform_letterboxes_to_a_square():
    transform = build_transforms(32, (0.0,) * 3, (1.0,) * 3, train=False, hflip=False)
    image = transform(image=np.full((20, 80, 3), 255, np.uint8))["image"]
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image[:, 16], torch.ones(3, 32)) and torch.all(image[:, 0] == 0)  # padded top


def test_hflip_only_when_asked():
    def steps(hflip):
        return [type(t).__name__ for t in build_transforms(32, (0,) * 3, (1,) * 3, train=True, hflip=hflip)]
    assert "HorizontalFlip" in steps(True) and "HorizontalFlip" not in steps(False)
