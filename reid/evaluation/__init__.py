"""Evaluation: retrieval metrics for re-identification."""
