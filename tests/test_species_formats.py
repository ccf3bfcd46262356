"""MegaDetector and SpeciesNet files of the real formats: parsed, written back, malformed ones refused."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from reid.errors import DataError, ReidError
from reid.species.megadetector import NO_DETECTION, read_megadetector, write_megadetector_json
from reid.species.speciesnet import SpeciesNetSpecies, read_speciesnet

# as MegaDetector's run_detector_batch writes it (format 1.4)
MD_OUTPUT = {
    "info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt", "detection_completion_time": "2024-05-02 10:11:12",
             "detector_metadata": {"megadetector_version": "v5a.0.0", "typical_detection_threshold": 0.2,
                                   "conservative_detection_threshold": 0.05}},
    "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
    "images": [
        {"file": "CAM01/IMG_0001.JPG", "detections": [
            {"category": "1", "conf": 0.926, "bbox": [0.0, 0.2762, 0.1539, 0.2825]},
            {"category": "2", "conf": 0.043, "bbox": [0.5, 0.1, 0.2, 0.7]}]},
        {"file": "CAM01/IMG_0002.JPG", "detections": []},
        {"file": "CAM02/IMG_0001.JPG", "failure": "Failure image access", "detections": None},
        {"file": "CAM02/IMG_0002.JPG", "detections": [
            {"category": "3", "conf": 0.71, "bbox": [0.3125, 0.4, 0.6875, 0.6]}]},
    ],
}

SN_OUTPUT = {"predictions": [
    {"filepath": "images/missing.jpg", "failures": ["CLASSIFIER", "DETECTOR"], "model_version": "4.0.1a"},
    {"filepath": "images/lion.jpg", "country": "KEN",
     "classifications": {
         "classes": ["5a565886-156e-4b19-a017-6a5bbae4df0f;mammalia;carnivora;felidae;panthera;leo;lion",
                     "1f689929-883d-4dae-958c-3d57ab5b6c16;;;;;;animal"],
         "scores": [0.94, 0.03]},
     "detections": [{"category": "1", "label": "animal", "conf": 0.93, "bbox": [0.7041, 0.4766, 0.1108, 0.125]},
                    {"category": "2", "label": "human", "conf": 0.05, "bbox": [0.1, 0.2, 0.1, 0.3]}],
     "prediction": "5a565886-156e-4b19-a017-6a5bbae4df0f;mammalia;carnivora;felidae;panthera;leo;lion",
     "prediction_score": 0.94, "prediction_source": "classifier", "model_version": "4.0.1a"},
    {"filepath": "images/cat.jpg",
     "detections": [{"category": "1", "label": "animal", "conf": 0.88, "bbox": [0.2, 0.2, 0.3, 0.3]}],
     "prediction": "ab0dcde9-7a9b-4a8d-9cd4-9c5e5a3b8e3b;mammalia;carnivora;felidae;;;cat family",
     "prediction_score": 0.81, "prediction_source": "classifier+rollup_to_family", "model_version": "4.0.1a"},
    {"filepath": "images/empty.jpg", "detections": [],
     "prediction": "f1856211-cfb7-4a5b-9158-c0f72fd09ee6;;;;;;blank", "prediction_score": 0.99,
     "prediction_source": "classifier", "model_version": "4.0.1a"},
    {"filepath": "images/hiker.jpg",
     "detections": [{"category": "2", "label": "human", "conf": 0.97, "bbox": [0.4, 0.1, 0.2, 0.8]}],
     "prediction": "990ae9dd-7a59-4344-afcb-1b7b21368000;mammalia;primates;hominidae;homo;sapiens;human",
     "prediction_score": 0.97, "prediction_source": "detector", "model_version": "4.0.1a"},
    {"filepath": "images/truck.jpg",
     "detections": [{"category": "3", "label": "vehicle", "conf": 0.9, "bbox": [0.0, 0.3, 0.6, 0.5]}],
     "prediction": "e2895ed5-780b-48f6-8a11-9e27cb594511;;;;;;vehicle", "prediction_score": 0.9,
     "prediction_source": "detector", "model_version": "4.0.1a"},
    {"filepath": "images/blur.jpg", "detections": [],
     "prediction": "f2efdae9-efb8-48fb-8a91-eccf79ab4ffb;no cv result;no cv result;no cv result;no cv result;"
                   "no cv result;no cv result",
     "prediction_score": 0.4, "prediction_source": "classifier", "model_version": "4.0.1a"},
]}


def _write(tmp_path, doc, name="out.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_megadetector_output_becomes_one_row_per_detection_and_per_empty_image(tmp_path):
    table = read_megadetector(_write(tmp_path, MD_OUTPUT))
    assert list(table["file"]) == ["CAM01/IMG_0001.JPG", "CAM01/IMG_0001.JPG", "CAM01/IMG_0002.JPG",
                                   "CAM02/IMG_0001.JPG", "CAM02/IMG_0002.JPG"]
    assert list(table["detection"]) == [0, 1, NO_DETECTION, NO_DETECTION, 0]
    assert list(table["category"]) == ["animal", "person", "", "", "vehicle"]
    assert table.loc[0, ["conf", "x", "y", "w", "h"]].tolist() == [0.926, 0.0, 0.2762, 0.1539, 0.2825]
    assert list(table["failure"]) == ["", "", "", "Failure image access", ""]
    assert np.isnan(table.loc[2, "conf"])


def test_megadetector_json_written_reads_back_the_same(tmp_path):
    table = read_megadetector(_write(tmp_path, MD_OUTPUT))
    out = tmp_path / "again.json"
    write_megadetector_json(out, table, info={"detector": "test"})
    doc = json.loads(out.read_text())
    assert doc["info"] == {"format_version": "1.4", "detector": "test"}
    assert doc["detection_categories"] == MD_OUTPUT["detection_categories"]
    assert doc["images"] == MD_OUTPUT["images"]
    assert read_megadetector(out).equals(table)


def _md_broken(change) -> dict:
    doc = copy.deepcopy(MD_OUTPUT)
    change(doc)
    return doc


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][3]["detections"][0].update(bbox=[0.1, 0.2, 0.3]),
     "images[3].detections[0].bbox: must be 4 numbers"),
    (lambda d: d["images"][0]["detections"][1].update(bbox=[0.5, 0.1, 0.2, 1.2]),
     "images[0].detections[1].bbox: [0.5, 0.1, 0.2, 1.2] has values outside [0, 1]"),
    (lambda d: d["images"][0]["detections"][1].update(bbox=[0.9, 0.1, 0.2, 0.5]),
     "images[0].detections[1].bbox: [0.9, 0.1, 0.2, 0.5] reaches past the image"),
    (lambda d: d["images"][0]["detections"][0].update(category="4"),
     "images[0].detections[0].category: unknown category id '4'; detection_categories has '1' (animal)"),
    (lambda d: d["images"][0]["detections"][0].update(category=1),
     "images[0].detections[0].category: must be a string, not a number (1)"),
    (lambda d: d["images"][0]["detections"][0].update(conf=1.5),
     "images[0].detections[0].conf: must be between 0 and 1, got 1.5"),
    (lambda d: d["images"][0]["detections"][0].pop("conf"), "images[0].detections[0]: missing key 'conf'"),
    (lambda d: d["images"][1].pop("file"), "images[1]: missing key 'file'"),
    (lambda d: d["images"][1].pop("detections"), "images[1]: has neither 'detections'"),
    (lambda d: d["images"][1].update(file="CAM01/IMG_0001.JPG"),
     "images[1].file: 'CAM01/IMG_0001.JPG' is listed twice (also at images[0])"),
    (lambda d: d.pop("detection_categories"), "missing key 'detection_categories'"),
])
def test_malformed_megadetector_output_names_the_file_the_position_and_the_problem(tmp_path, change, message):
    path = _write(tmp_path, _md_broken(change))
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_megadetector(path)


def test_a_file_that_is_not_json_is_refused_with_the_line(tmp_path):
    path = _write(tmp_path, '{"images": [\n  {"file": "a.jpg",}\n]}')
    with pytest.raises(DataError, match=re.escape(f"{path}: not valid JSON (") + ".*line 2"):
        read_megadetector(path)
    with pytest.raises(DataError, match="MegaDetector output file .* not found"):
        read_megadetector(tmp_path / "absent.json")


def test_speciesnet_predictions_give_species_per_image_and_md_detections(tmp_path):
    result = read_speciesnet(_write(tmp_path, SN_OUTPUT))
    images = result.images.set_index("file")
    assert images["species"].to_dict() == {
        "images/missing.jpg": "failed", "images/lion.jpg": "lion", "images/cat.jpg": "cat family",
        "images/empty.jpg": "blank", "images/hiker.jpg": "human", "images/truck.jpg": "vehicle",
        "images/blur.jpg": "unknown"}
    assert images.loc["images/lion.jpg", ["rank", "scientific_name", "score"]].tolist() == ["species", "panthera leo",
                                                                                          0.94]
    assert images.loc["images/cat.jpg", ["rank", "scientific_name"]].tolist() == ["family", "felidae"]
    assert images.loc["images/missing.jpg", "failures"] == "CLASSIFIER,DETECTOR"
    assert images.loc["images/blur.jpg", "rank"] == ""
    scientific = read_speciesnet(_write(tmp_path, SN_OUTPUT), naming="scientific").images.set_index("file")
    assert scientific.loc["images/lion.jpg", "species"] == "panthera leo"
    detections = result.detections
    lion = detections[detections["file"] == "images/lion.jpg"]
    assert list(lion["category"]) == ["animal", "person"]  # SpeciesNet's "human" in MegaDetector's words
    assert lion.iloc[0][["x", "y", "w", "h"]].tolist() == [0.7041, 0.4766, 0.1108, 0.125]
    missing = detections[detections["file"] == "images/missing.jpg"].iloc[0]
    assert missing["detection"] == NO_DETECTION and missing["failure"] == "CLASSIFIER,DETECTOR"


def test_speciesnet_classifier_only_output_uses_the_top_classification(tmp_path):
    doc = {"predictions": [{"filepath": "a.jpg", "classifications": {
        "classes": ["5a565886-156e-4b19-a017-6a5bbae4df0f;mammalia;carnivora;felidae;panthera;leo;lion"],
        "scores": [0.7]}}]}
    images = read_speciesnet(_write(tmp_path, doc)).images
    assert images.loc[0, ["species", "score", "source"]].tolist() == ["lion", 0.7, "classifier"]


def _sn_broken(change) -> dict:
    doc = copy.deepcopy(SN_OUTPUT)
    change(doc)
    return doc


@pytest.mark.parametrize("change, message", [
    (lambda d: d["predictions"][1].update(prediction="abc;mammalia;lion"),
     "predictions[1].prediction: 'abc;mammalia;lion' has 3 ';'-separated fields; a SpeciesNet taxon has 7"),
    (lambda d: d["predictions"][1].pop("prediction_score"), "predictions[1]: missing key 'prediction_score'"),
    (lambda d: d["predictions"][2]["detections"][0].update(category="7"),
     "predictions[2].detections[0].category: unknown category '7'"),
    (lambda d: d["predictions"][2]["detections"][0].update(label="vehicle"),
     "predictions[2].detections[0].label: 'vehicle' does not match category '1' (animal)"),
    (lambda d: d["predictions"][2]["detections"][0].update(bbox=[0.2, 0.2, -0.3, 0.3]),
     "predictions[2].detections[0].bbox: [0.2, 0.2, -0.3, 0.3] has values outside [0, 1]"),
    (lambda d: d["predictions"][1]["classifications"]["scores"].pop(),
     "predictions[1].classifications: has 2 classes but 1 scores"),
    (lambda d: d["predictions"][0].pop("filepath"), "predictions[0]: missing key 'filepath'"),
    (lambda d: d.update(predictions={"a": 1}), 'predictions: must be a list, not an object ({"a": 1})'),
    (lambda d: d["predictions"].append("images/x.jpg"),
     "predictions[7]: must be an object (predictions), not a string"),
])
def test_malformed_speciesnet_output_names_the_file_the_position_and_the_problem(tmp_path, change, message):
    path = _write(tmp_path, _sn_broken(change))
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_speciesnet(path)


def test_speciesnet_adapter_names_the_species_of_a_file_below_threshold_unknown(tmp_path):
    source = SpeciesNetSpecies(_write(tmp_path, SN_OUTPUT), threshold=0.85, root="/data")
    assert source.species_for("/data/images/lion.jpg", (0.7, 0.47, 0.1, 0.12)) == ("lion", 0.94)
    assert source.species_for("/data/images/./cat.jpg") == ("unknown", 0.81)
    assert source.species_for("/data/images/missing.jpg")[0] == "failed"
    with pytest.raises(ReidError, match="'/data/other.jpg' has no prediction in"):
        source.species_for("/data/other.jpg")
