"""PK sampling: batches of P identities x K images each, as batch-hard triplet mining needs.

Every batch and every augmentation seed of an epoch follow from (seed, epoch) alone, so an epoch
can be replayed from any batch after a crash, and split between distributed processes.
"""
from __future__ import annotations

import numpy as np

from reid.errors import DataError


class PKSampler:
    """Identities with fewer than K images are repeated (each repeat augmented differently);
    identities with a single image still train the ArcFace head but give triplets no positive."""

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, batches_per_epoch: int | None = None):
        labels = np.asarray(labels)
        self.identities = np.unique(labels)
        if p < 1 or k < 1:
            raise DataError(f"sampler.p and sampler.k must be at least 1 (got p={p}, k={k})")
        if len(self.identities) < p:
            raise DataError(f"the training data has {len(self.identities)} identities but sampler.p={p}; "
                            f"lower sampler.p to at most {len(self.identities)}")
        self.members = [np.flatnonzero(labels == identity) for identity in self.identities]
        self.p, self.k, self.seed = p, k, seed
        self.batches_per_epoch = batches_per_epoch or max(1, len(labels) // (p * k))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's batches of (dataset index, augmentation seed)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self._identity_stream(rng, self.batches_per_epoch * self.p)
        seeds = rng.integers(0, 2**32, size=(self.batches_per_epoch, self.p * self.k), dtype=np.uint64)
        batches = []
        for b in range(self.batches_per_epoch):
            indices = np.concatenate([self._pick(rng, identity) for identity in order[b * self.p:(b + 1) * self.p]])
            batches.append([(int(i), int(s)) for i, s in zip(indices, seeds[b])])
        return batches

    def for_epoch(self, epoch: int, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, int]]]:
        """This process's batches of the epoch (dealt round-robin), from its `start_batch`-th on."""
        return self.epoch_batches(epoch)[rank::world_size][start_batch:]

    def _identity_stream(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Shuffled passes over all identities, so each appears about equally often; no identity
        twice in one batch."""
        stream: list[int] = []
        while len(stream) < count:
            for identity in rng.permutation(len(self.identities)):
                # a batch must not hold one identity twice: skip it; the next pass brings it again
                batch_start = len(stream) - len(stream) % self.p
                if identity not in stream[batch_start:]:
                    stream.append(int(identity))
        return np.array(stream[:count])

    def _pick(self, rng: np.random.Generator, identity: int) -> np.ndarray:
        members = self.members[identity]
        return rng.choice(members, size=self.k, replace=len(members) < self.k)
