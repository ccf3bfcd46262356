"""The species pipeline: detections (MegaDetector, SpeciesNet, our detectors) to animal crops, and
the species of each crop (SpeciesNet or our classifier), ahead of re-identification.

Names load on first use (PEP 562): the command line imports this package to build its parser, and
should not pay for torch until a command needs it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "classifier": ("SpeciesClassifier", "species_table", "train_species_classifier"),
    "crops": ("Crop", "CropSettings", "animal_crops", "confident", "crop", "crop_region", "image_outcomes"),
    "detector": ("Detection", "Detector", "MegaDetector", "WholeImageDetector", "detect_images"),
    "megadetector": ("DEFAULT_CATEGORIES", "NO_DETECTION", "detection_table", "read_megadetector",
                     "write_megadetector_json"),
    "scenes": ("ScenePaths", "make_synthetic_scenes", "plan_scenes", "render_frame"),
    "speciesnet": ("SpeciesNetPredictions", "SpeciesNetSpecies", "SpeciesSource", "Taxon", "read_speciesnet"),
    "routing": ("Route", "Router"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'reid.species' has no attribute '{name}'")
    return getattr(importlib.import_module(f"reid.species.{_MODULE_OF[name]}"), name)
