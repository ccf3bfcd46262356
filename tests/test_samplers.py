import numpy as np
import pytest

from reid.data.samplers import PKSampler
from reid.errors import DataError


def _labels():
    # identity 0 has 1 image, identity 1 has 2, the others 3..8
    return np.repeat(np.arange(8), [1, 2, 3, 4, 5, 6, 7, 8])


def test_batches_hold_p_identities_times_k_images():
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=3, seed=0, batches_per_epoch=20)
    batches = sampler.epoch_batches(0)
    assert len(batches) == 20
    for batch in batches:
        ids = labels[[i for i, _ in batch]]
        assert len(batch) == 12
        values, counts = np.unique(ids, return_counts=True)
        assert len(values) == 4 and set(counts) == {3}
        # each identity's images come in a block of K, in order
        assert all(len(set(ids[j:j + 3])) == 1 for j in range(0, 12, 3))


def test_identities_with_fewer_than_k_images_repeat_with_new_seeds():
    labels = _labels()
    batch_pairs = [pair for batch in PKSampler(labels, 4, 3, 0, 30).epoch_batches(0) for pair in batch]
    singles = [pair for pair in batch_pairs if labels[pair[0]] == 0]
    assert singles and len({seed for _, seed in singles}) == len(singles)


def test_identities_appear_about_equally_often():
    labels = _labels()
    batches = PKSampler(labels, 4, 2, 0, 40).epoch_batches(0)
    counts = np.bincount(labels[[i for b in batches for i, _ in b]], minlength=8) // 2
    assert counts.max() - counts.min() <= 2


def test_deterministic_per_epoch_and_sharded_by_rank():
    labels = _labels()
    a, b = PKSampler(labels, 4, 2, seed=5), PKSampler(labels, 4, 2, seed=5)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(3) != a.epoch_batches(4)
    whole = a.epoch_batches(1)
    rank0, rank1 = a.for_epoch(1, rank=0, world_size=2), a.for_epoch(1, rank=1, world_size=2)
    assert rank0 + rank1 != whole and sorted(rank0 + rank1) == sorted(whole)
    assert a.for_epoch(1, start_batch=1, rank=1, world_size=2) == rank1[1:]


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(DataError, match="lower sampler.p"):
        PKSampler(np.array([0, 0, 1, 1]), p=3, k=2, seed=0)
