import numpy as np
import pytest

from reid.data.samplers import PKSampler
from reid.errors import ConfigError, DataError


def _labels():
    # identity 0 has 1 image, identity 1 has 2, the others 3..8; shuffled, as a table's rows are
    return np.random.default_rng(0).permutation(np.repeat(np.arange(8), [1, 2, 3, 4, 5, 6, 7, 8]))


def test_batches_hold_p_identities_times_k_images():
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=3, seed=0, batches_per_epoch=20)
    batches = sampler.epoch_batches(0)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        ids = labels[[i for i, _ in batch]]
        assert len(batch) == 12
        values, counts = np.unique(ids, return_counts=True)
        assert len(values) == 4 and set(counts) == {3}
        # each identity's images come in a block of K
        assert all(len(set(ids[j:j + 3])) == 1 for j in range(0, 12, 3))


def test_identities_with_enough_images_never_repeat_one_in_a_batch():
    labels = _labels()
    for batch in PKSampler(labels, 4, 3, 0, 30).epoch_batches(0):
        for j in range(0, 12, 3):
            block = [i for i, _ in batch[j:j + 3]]
            if np.sum(labels == labels[block[0]]) >= 3:
                assert len(set(block)) == 3


def test_identities_with_fewer_than_k_images_repeat_evenly_with_new_seeds():
    labels = _labels()
    pairs = [pair for batch in PKSampler(labels, 4, 4, 0, 30).epoch_batches(0) for pair in batch]
    twice = [(i, s) for i, s in pairs if labels[i] == 1]  # 2 images, K=4: each image twice per batch
    assert twice and np.all(np.bincount([i for i, _ in twice])[np.flatnonzero(labels == 1)] == len(twice) // 2)
    seeds = [s for _, s in pairs]
    assert len(set(seeds)) == len(seeds) and 0 <= min(seeds) and max(seeds) < 2**32


def test_identities_appear_about_equally_often():
    labels = _labels()
    batches = PKSampler(labels, 4, 2, 0, 40).epoch_batches(0)
    counts = np.bincount(labels[[i for b in batches for i, _ in b]], minlength=8) // 2
    assert counts.max() - counts.min() <= 2


def test_default_epoch_length():
    assert len(PKSampler(_labels(), 4, 2, 0)) == 36 // 8
    assert len(PKSampler(_labels(), 8, 8, 0)) == 1


def test_deterministic_per_epoch_and_different_between_epochs():
    labels = _labels()
    a, b = PKSampler(labels, 4, 2, seed=5), PKSampler(labels, 4, 2, seed=5)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(3) != a.epoch_batches(4)
    assert a.epoch_batches(3) != PKSampler(labels, 4, 2, seed=6).epoch_batches(3)


def test_ranks_share_out_the_epoch_and_resume_per_rank():
    sampler = PKSampler(_labels(), 4, 2, seed=5, batches_per_epoch=6)
    whole = sampler.epoch_batches(1)
    ranks = [sampler.for_epoch(1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]
    assert sampler.for_epoch(1, start_batch=2, rank=1, world_size=2) == ranks[1][2:]
    assert sampler.for_epoch(1) == whole and sampler.for_epoch(1, start_batch=4) == whole[4:]


def test_uneven_split_gives_every_rank_the_same_number_of_steps():
    sampler = PKSampler(_labels(), 4, 2, seed=5, batches_per_epoch=5)
    ranks = [sampler.for_epoch(0, rank=r, world_size=4) for r in range(4)]
    assert [len(r) for r in ranks] == [2, 2, 2, 2]
    assert {tuple(map(tuple, b)) for r in ranks for b in r} == {tuple(map(tuple, b)) for b in sampler.epoch_batches(0)}


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(DataError, match="has 2 identities.*lower sampler.p"):
        PKSampler(np.array([0, 0, 1, 1]), p=3, k=2, seed=0)


def test_invalid_settings():
    with pytest.raises(ConfigError):
        PKSampler(_labels(), p=0, k=2, seed=0)
    with pytest.raises(ConfigError):
        PKSampler(_labels(), p=2, k=2, seed=0, batches_per_epoch=0)
    with pytest.raises(ValueError):
        PKSampler(_labels(), p=2, k=2, seed=0).for_epoch(0, rank=2, world_size=2)


def test_epoch_length_is_one_pass_with_a_floor_or_as_given():
    from reid.data.samplers import epoch_length

    assert epoch_length(213, 8, 4) == 6  # one pass over the images
    assert epoch_length(213, 8, 4, min_batches_per_epoch=25) == 25  # small table: the floor holds
    assert epoch_length(10_000, 8, 4, min_batches_per_epoch=25) == 312  # large table: one pass is longer
    assert epoch_length(213, 8, 4, batches_per_epoch=3, min_batches_per_epoch=25) == 3  # explicit wins
    assert epoch_length(5, 8, 4) == 1
    assert len(PKSampler(_labels(), 4, 2, seed=0, min_batches_per_epoch=9)) == 9
    assert len(PKSampler(_labels(), 4, 2, seed=0, min_batches_per_epoch=9).epoch_batches(0)) == 9
    with pytest.raises(ConfigError, match="min_batches_per_epoch"):
        epoch_length(100, 4, 4, min_batches_per_epoch=-1)
