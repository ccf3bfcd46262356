"""wildreid: re-identification of individual animals (library)."""

__version__ = "0.1.0"
