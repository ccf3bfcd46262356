"""Early stopping whose whole state is a small dict stored in every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    patience: int
    min_delta: float = 0.0
    best_score: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score (higher is better); True when it is a new best."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def patience_left(self) -> int:
        return self.patience - self.bad_epochs

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
