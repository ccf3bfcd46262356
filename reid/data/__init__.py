"""Data: tables of labelled photos, transforms, datasets, PK batches, k-fold splits, synthetic animals."""
