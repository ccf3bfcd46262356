"""PK sampling: batches of P identities x K images each, as batch-hard triplet mining needs.

Every batch and every augmentation seed of an epoch follow from (seed, epoch) alone, so an epoch
can be replayed from any batch after a crash, and split between distributed processes.
"""
from __future__ import annotations

import numpy as np

from reid.errors import ConfigError, DataError

Batch = list[tuple[int, int]]  # (dataset index, augmentation seed) per image


def epoch_length(images: int, p: int, k: int, batches_per_epoch: int | None = None,
                 min_batches_per_epoch: int = 0) -> int:
    """Batches an epoch: `batches_per_epoch` when given, else one pass over the images
    (images // (P x K)) but at least `min_batches_per_epoch`.

    One pass over a small table is a handful of optimiser steps (213 photos in P=8 x K=4 batches
    are 6), far too few for an epoch of a network trained from scratch, and validation, early
    stopping and the LR schedule all count in epochs; the floor keeps an epoch a meaningful unit.
    """
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ConfigError(f"sampler.batches_per_epoch must be at least 1 (got {batches_per_epoch})")
    if min_batches_per_epoch < 0:
        raise ConfigError(f"sampler.min_batches_per_epoch must be 0 or more (got {min_batches_per_epoch})")
    if batches_per_epoch is not None:
        return batches_per_epoch
    return max(1, images // (p * k), min_batches_per_epoch)


class PKSampler:
    """Batches of `p` distinct identities x `k` images, as `(dataset index, augmentation seed)`.

    An identity with fewer than K images repeats them, each repeat with its own augmentation seed.
    Identities with a single image are allowed: they still train a classification (ArcFace) head,
    but give the triplet loss no positive pair.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, batches_per_epoch: int | None = None,
                 min_batches_per_epoch: int = 0):
        if p < 1 or k < 1:
            raise ConfigError(f"sampler.p and sampler.k must be at least 1 (got p={p}, k={k})")
        identities, inverse = np.unique(np.asarray(labels), return_inverse=True)
        if len(identities) < p:
            raise DataError(f"the training data has {len(identities)} identities but a batch needs sampler.p={p}; "
                            f"lower sampler.p to at most {len(identities)}")
        # dataset indices of each identity, in one sort rather than one scan per identity
        by_identity = np.argsort(inverse, kind="stable")
        self.members = np.split(by_identity, np.cumsum(np.bincount(inverse))[:-1])
        self.p, self.k, self.seed = p, k, seed
        self.batches_per_epoch = epoch_length(len(labels), p, k, batches_per_epoch, min_batches_per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[Batch]:
        """All batches of the epoch; each identity's K images sit together in the batch."""
        rng = np.random.default_rng([self.seed, epoch])
        identities = self._identity_stream(rng, self.batches_per_epoch * self.p)
        indices = np.concatenate([self._pick(rng, identity) for identity in identities])
        # distinct, so that repeats of one image never share an augmentation
        seeds = rng.choice(2**32, size=len(indices), replace=False)
        pairs = [(int(i), int(s)) for i, s in zip(indices, seeds)]
        size = self.p * self.k
        return [pairs[start:start + size] for start in range(0, len(pairs), size)]

    def for_epoch(self, epoch: int, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> list[Batch]:
        """This process's batches of the epoch, usable as a DataLoader `batch_sampler`.

        Batches are dealt round-robin (`batches[rank::world_size]`); when they do not divide evenly,
        the first ones are dealt again, so that every rank runs the same number of steps (a
        distributed step waits for all ranks). `start_batch` counts this rank's own steps: the
        result is the rank's list from its `start_batch`-th batch on.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        batches = self.epoch_batches(epoch)
        dealt = -(-len(batches) // world_size) * world_size
        batches = [batches[i % len(batches)] for i in range(dealt)]
        return batches[rank::world_size][start_batch:]

    def _identity_stream(self, rng: np.random.Generator, count: int) -> list[int]:
        """Shuffled passes over all identities, so each appears about equally often; no identity
        twice in one batch."""
        stream: list[int] = []
        while len(stream) < count:
            for identity in rng.permutation(len(self.members)):
                # at a pass boundary the batch may already hold it: skip, the next pass brings it again
                batch_start = len(stream) - len(stream) % self.p
                if identity not in stream[batch_start:]:
                    stream.append(int(identity))
        return stream[:count]

    def _pick(self, rng: np.random.Generator, identity: int) -> np.ndarray:
        """K of the identity's images; with fewer than K, each image as often as the others (+-1)."""
        return np.resize(rng.permutation(self.members[identity]), self.k)
