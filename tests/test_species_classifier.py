"""The species classifier trains a few steps on tiny scene crops; its checkpoint reloads and predicts."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from reid.data.dataset import read_image
from reid.errors import DataError, ReidError
from reid.species.classifier import SpeciesClassifier, species_table, train_species_classifier
from reid.species.scenes import make_synthetic_scenes
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic_scenes(tmp_path_factory.mktemp("scenes"), frames=16, individuals_per_species=2, cameras=2,
                                 frame_size=(128, 96), seed=2, progress=False)


def test_species_table_reads_the_scene_ground_truth_animals_with_boxes(scenes):
    table = species_table(scenes.ground_truth, scenes.images)
    truth = pd.read_csv(scenes.ground_truth, keep_default_na=False)
    assert len(table) == (truth["category"] == "animal").sum()
    assert set(table["species"]) == {"spotted-cat", "striped-antelope"}
    assert table["path"].str.startswith(str(scenes.images)).all()
    assert table[["x", "y", "w", "h"]].notna().all().all() and "encounter" in table.columns


def test_classifier_trains_and_its_checkpoint_reloads_and_predicts(scenes, tmp_path):
    table = species_table(scenes.ground_truth, scenes.images)
    cfg = tiny_config("train.epochs=2")
    checkpoint = train_species_classifier(cfg, table, tmp_path / "run", val_fraction=0.25, batch_size=4)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["val_images"] > 0 and 0 <= row["val_accuracy"] <= 1 for row in history)

    classifier = SpeciesClassifier.from_checkpoint(checkpoint, threshold=0.0)
    assert classifier.classes == ["spotted-cat", "striped-antelope"]
    crops = [np.full((40, 60, 3), 90, np.uint8), read_image(table["path"].iloc[0])]
    species, scores = classifier.predict(crops)
    assert set(species) <= set(classifier.classes) and ((scores >= 0.5) & (scores <= 1)).all()
    # every class is below a threshold of 1: "unknown"
    sure = SpeciesClassifier.from_checkpoint(checkpoint, threshold=1.0)
    assert sure.predict(crops)[0] == ["unknown", "unknown"]
    row = table.iloc[0]
    name, score = classifier.species_for(row["path"], (row["x"], row["y"], row["w"], row["h"]))
    assert name in classifier.classes and 0.5 <= score <= 1


def test_one_species_or_a_foreign_checkpoint_is_refused(scenes, tmp_path, tiny_checkpoint):
    table = species_table(scenes.ground_truth, scenes.images)
    with pytest.raises(DataError, match="needs at least two species"):
        train_species_classifier(tiny_config(), table[table["species"] == "spotted-cat"], tmp_path)
    with pytest.raises(ReidError, match="is not a species classifier checkpoint"):
        SpeciesClassifier.from_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("csv, message", [
    ("path,label\na.jpg,cat\n", "needs columns path (or file) and species"),
    ("path,species\na.jpg,\n", "empty species on lines 2"),
    ("path,species,x,y\na.jpg,cat,0.1,0.2\n", "a box needs all of x, y, w, h"),
    ("path,species,x,y,w,h\na.jpg,cat,0.1,0.2,0.3,\n", "line 2 has only part of its box"),
    ("path,species,x,y,w,h\na.jpg,cat,0.1,0.2,0.3,0.4\nb.jpg,cat,0.1,0.2,1.3,0.4\n", "line 3 has box values outside"),
    ("path,species\nmissing.jpg,cat\n", "1 images not found (line 2: "),
])
def test_species_table_problems_name_the_line(tmp_path, csv, message):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    path = tmp_path / "species.csv"
    path.write_text(csv)
    with pytest.raises(DataError, match=re.escape(message)):
        species_table(path)


def test_train_species_prints_validation_accuracy_per_epoch_and_the_kept_one(scenes, tmp_path, capsys):
    from reid.cli import main
    from reid.config import dump_config

    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(tiny_config("train.epochs=2")))
    assert main(["train-species", "--config", str(config), "--data", str(scenes.ground_truth), "--images",
                 str(scenes.images), "--out", str(tmp_path / "species"), "--val-fraction", "0.25",
                 "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    history = [json.loads(line) for line in (tmp_path / "species" / "metrics.jsonl").read_text().splitlines()]
    assert [line.split(":")[0] for line in lines[:2]] == ["epoch 1/2", "epoch 2/2"]
    for line, row in zip(lines, history):
        assert f"validation accuracy {row['val_accuracy']:.3f}" in line
    best = max(history, key=lambda row: (row["val_accuracy"], row["epoch"]))
    assert lines[2] == (f"best epoch {best['epoch']}: validation accuracy {best['val_accuracy']:.3f} "
                        f"({best['val_images']} validation crops)")
    assert lines[3] == f"checkpoint: {tmp_path / 'species' / 'species.pt'}"
