"""The searchable gallery of known individuals' images (FAISS + metadata)."""
from reid.index.gallery import KINDS, GalleryIndex, build_gallery, choose_kind

__all__ = ["KINDS", "GalleryIndex", "build_gallery", "choose_kind"]
