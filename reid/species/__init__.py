"""The species pipeline: detections (MegaDetector, SpeciesNet, our detectors) to animal crops, and
the species of each crop (SpeciesNet or our classifier), ahead of re-identification."""
from reid.species.classifier import SpeciesClassifier, species_table, train_species_classifier
from reid.species.crops import Crop, CropSettings, animal_crops, confident, crop, crop_region, image_outcomes
from reid.species.detector import Detection, Detector, MegaDetector, WholeImageDetector, detect_images
from reid.species.megadetector import (DEFAULT_CATEGORIES, NO_DETECTION, detection_table, read_megadetector,
                                       write_megadetector_json)
from reid.species.scenes import ScenePaths, make_synthetic_scenes, plan_scenes, render_frame
from reid.species.speciesnet import (SpeciesNetPredictions, SpeciesNetSpecies, SpeciesSource, Taxon, read_speciesnet)

__all__ = [
    "SpeciesClassifier", "species_table", "train_species_classifier",
    "Crop", "CropSettings", "animal_crops", "confident", "crop", "crop_region", "image_outcomes",
    "Detection", "Detector", "MegaDetector", "WholeImageDetector", "detect_images",
    "DEFAULT_CATEGORIES", "NO_DETECTION", "detection_table", "read_megadetector", "write_megadetector_json",
    "ScenePaths", "make_synthetic_scenes", "plan_scenes", "render_frame",
    "SpeciesNetPredictions", "SpeciesNetSpecies", "SpeciesSource", "Taxon", "read_speciesnet",
]
