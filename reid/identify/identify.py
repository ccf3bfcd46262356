"""One animal identified: its views' vectors fused into one query, searched (and re-ranked) in its
species' gallery, its candidates scored as individuals, and the decision made."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reid.identify.decision import decide
from reid.identify.gallery import Candidate, Galleries


def answer_score(value: float) -> float:
    """A similarity as answered: float32 rounding can put an identical image at 1.0000001."""
    return round(min(1.0, max(-1.0, float(value))), 6)


def fused_query(vectors: np.ndarray) -> np.ndarray:
    """The mean of an animal's view vectors, L2-normalised: one query for the encounter."""
    query = np.asarray(vectors, dtype=np.float32).mean(axis=0)
    norm = float(np.linalg.norm(query))
    return (query / norm if norm > 0 else query).astype(np.float32)


@dataclass
class Identification:
    decision: str              # match, uncertain or new
    best_score: float | None   # the first candidate's cosine, which the thresholds apply to
    candidates: list[Candidate]


def identify(galleries: Galleries, species: str, vectors: np.ndarray, thresholds: dict,
             top_k: int) -> Identification:
    """The top_k candidate individuals of one animal (its views' vectors) and the decision."""
    candidates = galleries.search(species, fused_query(vectors), top_k)
    for candidate in candidates:
        candidate.score, candidate.cosine = answer_score(candidate.score), answer_score(candidate.cosine)
        for image in candidate.images:
            image.score, image.cosine = answer_score(image.score), answer_score(image.cosine)
    best = candidates[0].cosine if candidates else None
    return Identification(decide(best, thresholds), best, candidates)
