"""Evaluation: retrieval metrics for re-identification."""
from reid.evaluation.metrics import chance_metrics, retrieval_metrics

__all__ = ["chance_metrics", "retrieval_metrics"]
