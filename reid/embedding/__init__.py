"""Embeddings: a model from a checkpoint or its ONNX export (`Embedder`), flip TTA, and the chunked on-disk cache."""
from reid.embedding.cache import EmbeddingCache, cached_embeddings, file_hash
from reid.embedding.compute import compute_embeddings, embed_batch
from reid.embedding.embedder import Embedder, weights_fingerprint
from reid.embedding.tta import TTA_VIEWS, flank_warning

__all__ = ["EmbeddingCache", "Embedder", "TTA_VIEWS", "cached_embeddings", "compute_embeddings", "embed_batch", "file_hash",
           "flank_warning", "weights_fingerprint"]
