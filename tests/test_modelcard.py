"""MODEL_CARD.md (reid/modelcard.py): `reid train`, `reid cv`, `reid calibrate` and `reid export` write a card
whose backbone, licence, counts, split and scores are the run's own records."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from reid.checkpoint import load_checkpoint, save_checkpoint, save_untrained
from reid.cli import main
from reid.config import dump_config
from reid.data.table import load_table
from reid.modelcard import CARD_NAME, card_path, weights_origin, write_model_card
from tests.conftest import tiny_config


def _config(tmp_path: Path, *overrides: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(tiny_config(*overrides)))
    return str(path)


@pytest.fixture
def species_csv(tmp_path, synth_csv) -> Path:
    """The synthetic table with absolute paths and a species column (two species)."""
    table = pd.read_csv(synth_csv)
    table["path"] = [str(synth_csv.parent / p) for p in table["path"]]
    table["species"] = ["zebra" if int(i.rsplit("_", 1)[1]) % 2 else "nyala" for i in table["identity"]]
    path = tmp_path / "species.csv"
    table.to_csv(path, index=False)
    return path


def _row(label: str, *values: float) -> str:
    return "| " + " | ".join([label, *(f"{v:.4f}" for v in values)]) + " |"


def test_train_card_names_backbone_data_split_and_the_summary_scores_and_export_writes_one(tmp_path, species_csv):
    run = tmp_path / "run"
    assert main(["train", "--config", _config(tmp_path, "train.epochs=1", "cv.split=closed"), "--data",
                 str(species_csv), "--out", str(run), "--no-progress"]) == 0
    card = (run / CARD_NAME).read_text()
    table = load_table(species_csv)
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best_metrics"]

    assert "- Backbone: `test_resnet`" in card
    assert "- Starting weights: random initialisation: no pretrained weights" in card
    assert "Non-commercial" not in card
    assert f"- Table: `{species_csv}`" in card
    assert f"- Images: {len(table)}\n" in card and f"- Individuals: {table['identity'].nunique()}\n" in card
    assert f"- Encounters: {table['encounter'].nunique()}\n" in card
    counts = table["species"].value_counts()
    assert f"- Species: nyala {counts['nyala']}, zebra {counts['zebra']}" in card
    assert "- Viewpoints / flanks: left" in card
    assert "- Split: `closed`, 3 folds (seed 42)" in card and "validation fold 0 of 3" in card
    assert "never scored against photos of its own encounter" in card
    for key, label in (("mAP", "mAP"), ("identity_balanced_mAP", "identity-balanced mAP"), ("top1", "top-1")):
        assert _row(label, best[key], best["same_flank"][key], best["cross_flank"][key]) in card
    assert f"best epoch {summary['best_epoch'] + 1} of {summary['epochs_run']} run" in card
    not_evaluated = card.split("## Not evaluated on")[1].split("##")[0]
    assert "individuals outside this table" in not_evaluated and "a disjoint split" in not_evaluated
    assert "open-set decisions" in not_evaluated and "other species than nyala, zebra" in not_evaluated
    assert "```yaml\nseed: 42\n" in card and "backbone: test_resnet" in card

    onnx = tmp_path / "exports" / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(onnx)]) == 0
    exported = card_path(onnx)
    assert exported == tmp_path / "exports" / "model.MODEL_CARD.md" and exported.is_file()
    text = exported.read_text()
    assert text.startswith(f"# Model card: `{onnx}`") and "ONNX opset 17" in text
    assert f"reid export --checkpoint {run / 'best.pt'} --format onnx --out {onnx}" in text
    assert _row("mAP", best["mAP"], best["same_flank"]["mAP"], best["cross_flank"]["mAP"]) in text
    # the counts come from the recorded table, read again
    assert f"- Images: {len(table)}\n" in text and f"zebra {counts['zebra']}" in text


def test_cv_card_has_mean_std_and_chance_and_calibrate_refreshes_it(tmp_path, synth_csv):
    run = tmp_path / "cv"
    assert main(["cv", "--config", _config(tmp_path, "train.epochs=0", "cv.folds=2", "cv.split=disjoint"),
                 "--data", str(synth_csv), "--out", str(run), "--no-progress"]) == 0
    card = (run / CARD_NAME).read_text()
    cv = json.loads((run / "cv_summary.json").read_text())
    assert "from a `reid cv` run" in card and "- Split: `disjoint`, 2 folds (seed 42)" in card
    for key, label in (("mAP", "mAP"), ("identity_balanced_mAP", "identity-balanced mAP"), ("top1", "top-1")):
        cells = [cv[key], cv["same_flank"][key], cv["cross_flank"][key]]
        row = "| " + " | ".join([label, *(f"{c['mean']:.4f} ± {c['std']:.4f}" for c in cells),
                                 f"{cv[f'chance_{key}']:.4f}"]) + " |"
        assert row in card
    assert "Not calibrated" in card and "a disjoint split" not in card

    assert main(["calibrate", "--run", str(run), "--precision", "0.9"]) == 0
    card = (run / CARD_NAME).read_text()
    calibration = json.loads((run / "calibration.json").read_text())
    assert f"- Match threshold {calibration['match_threshold']:.4f}, new-individual threshold " \
           f"{calibration['new_threshold']:.4f}, for precision 0.9" in card
    assert f"- Post-processing: TTA {calibration['postprocessing']['tta']}" in card
    assert "Not calibrated" not in card and "open-set decisions" not in card


def test_licence_of_each_kind_of_starting_weights():
    mega = weights_origin({"backbone": "hf-hub:BVRA/MegaDescriptor-L-384", "pretrained": True, "weights": None})
    assert mega.non_commercial and "CC-BY-NC-4.0" in mega.licence and "Non-commercial use only" in mega.warning
    local_mega = weights_origin({"backbone": "hf-hub:BVRA/MegaDescriptor-T-224", "pretrained": True,
                                 "weights": "/w/pytorch_model.bin"})
    assert local_mega.non_commercial and "unknown to wildreid" in local_mega.licence
    dino = weights_origin({"backbone": "vit_large_patch14_dinov2.lvd142m", "pretrained": True, "weights": None})
    assert dino.licence == "Apache-2.0" and not dino.non_commercial and dino.warning is None
    timm = weights_origin({"backbone": "mobilenetv2_100", "pretrained": True, "weights": None})
    assert timm.licence.startswith("per the model's timm/Hugging Face card (often Apache-2.0")
    local = weights_origin({"backbone": "mobilenetv2_100", "pretrained": True, "weights": "w.safetensors"})
    assert local.licence == "as of its source, unknown to wildreid." and not local.non_commercial
    scratch = weights_origin({"backbone": "test_resnet", "pretrained": False, "weights": None})
    assert "no pretrained weights" in scratch.origin and not scratch.non_commercial


def test_megadescriptor_checkpoint_card_warns_first_and_says_its_data_is_unknown(tmp_path):
    checkpoint = save_untrained(tmp_path / "best.pt", tiny_config())
    state = load_checkpoint(checkpoint)
    state["config"]["model"].update(backbone="hf-hub:BVRA/MegaDescriptor-T-224", pretrained=True)
    save_checkpoint(checkpoint, state)
    card = write_model_card(checkpoint).read_text()
    assert card_path(checkpoint).name == "best.MODEL_CARD.md"
    lines = card.splitlines()
    assert lines[2].startswith("> **Non-commercial use only.**") and "CC-BY-NC-4.0" in lines[2]
    assert "## Data\n\nNot recorded" in card and "No held-out scores are recorded" in card
    assert "No evaluation is recorded beside this model" in card
    assert "No run record (run.json) lies beside this checkpoint" in card
