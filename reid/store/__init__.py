"""The store: the database (individuals, images with their embeddings, sightings, keys, audit log,
reviewers' verdicts, and the change feed galleries follow) and the content-addressed image files beside it.

Used by the service and by `reid identify-batch` alike; it knows nothing of HTTP (its errors are
`reid.errors.RequestError` kinds, which the service maps to status codes).
"""
from reid.store.database import (REVIEW_VERDICTS, GalleryRow, NewImage, Review, Store, blob_to_vector, disk_full,
                                 normalise_url, vector_to_blob)
from reid.store.files import MISSING, FileIntegrity, SweepResult, file_problem, store_file, sweep_orphans

__all__ = ["GalleryRow", "MISSING", "FileIntegrity", "NewImage", "REVIEW_VERDICTS", "Review", "Store", "SweepResult",
           "blob_to_vector", "disk_full", "file_problem", "normalise_url", "store_file", "sweep_orphans", "vector_to_blob"]
