"""`reid identify-batch`: synthetic camera-trap scenes identified against a store enrolled through
the service's Store API, with tiny random-init models (an identical crop gives an identical vector).

Two checkpoints: spotted cats are routed to one, striped antelopes to the other; one antelope is
enrolled with the cats' model, as a service running that checkpoint would have stored it, so the
batch run must embed it again with the antelopes' model.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.data.dataset import read_image
from reid.embedding.embedder import Embedder
from reid.errors import ReidError
from reid.species.batch import (FixedSpecies, RESULT_COLUMNS, SpeciesNetFile, add_identify_batch_parser,
                                enroll_ground_truth, identify_batch, list_photos)
from reid.species.camtrap import MEDIA_COLUMNS, OBSERVATION_COLUMNS
from reid.species.crops import CropSettings, animal_crops, embedding_model
from reid.species.megadetector import read_megadetector
from reid.identify.decision import DEFAULT_THRESHOLDS
from reid.species.routing import Router
from reid.species.scenes import make_synthetic_scenes
from reid.identify.photos import decode_upload
from reid.store import store_file
from service.settings import Settings, build_settings
from reid.store import NewImage, Store
from reid.store.database import SCHEMA_VERSION
from tests.conftest import write_checkpoint

CAT, ANTELOPE = "spotted-cat", "striped-antelope"


# ------------------------------------------------------------------------------------ helpers
def enroll(store_dir: Path, name: str, species: str, crops: list[np.ndarray], embedder: Embedder) -> int:
    """What the service does for POST /v1/individuals with uploads and no bbox: store each file
    content-addressed, then one Store.enroll with the model's vectors and fingerprint."""
    settings = build_settings(store_dir=store_dir)
    rows = []
    for crop, vector in zip(crops, embedder.embed_images(crops)):
        buffer = io.BytesIO()
        Image.fromarray(crop).save(buffer, format="PNG")  # lossless: the stored file is the crop
        upload = decode_upload(buffer.getvalue(), 0, f"{name}.png", settings.max_pixels, settings.allowed_formats)
        rows.append(NewImage(upload.sha256, store_file(settings.store_dir, upload.relpath, upload.data, upload.sha256), upload.media_type, upload.width,
                             upload.height, len(upload.data), vector, upload.filename))
    store = Store(settings.url)
    try:
        return store.enroll(name, species, rows, embedding_model(embedder.fingerprint, CropSettings()),
                            "test")["individual_id"]
    finally:
        store.close()


def batch_crop(scenes: Path, detections: pd.DataFrame, row) -> np.ndarray | None:
    """The crop identify-batch cuts for a ground-truth box (default CropSettings), or None if too
    small. The box is taken as detections.json has it (rounded to 4 digits, as MegaDetector
    writes them), which is what the batch run reads: the CSV's unrounded box can differ by a pixel."""
    image = read_image(str(scenes / "images" / row.file))
    box = detections[(detections.file == row.file) & (detections.detection == int(row.detection))]
    assert len(box) == 1
    found = animal_crops(image, box, CropSettings())
    return found[0].image if found else None


def speciesnet_file(path: Path, truth: pd.DataFrame, override: dict[str, str] | None = None) -> Path:
    """A SpeciesNet predictions file saying what the ground truth says, per photo."""
    taxa = {CAT: "u1;mammalia;carnivora;felidae;felis;maculata;spotted-cat",
            ANTELOPE: "u2;mammalia;artiodactyla;bovidae;tragelaphus;striata;striped-antelope",
            "zebra": "u3;mammalia;perissodactyla;equidae;equus;quagga;zebra",
            "human": "u4;mammalia;primates;hominidae;homo;sapiens;human",
            "vehicle": "u5;;;;;;vehicle", "blank": "u6;;;;;;blank"}
    predictions = []
    for file, rows in truth.groupby("file", sort=True):
        named = [s for s in rows["species"] if s] or ["blank"]
        species = (override or {}).get(file, named[0])
        predictions.append({"filepath": file, "prediction": taxa[species], "prediction_score": 0.9})
    path.write_text(json.dumps({"predictions": predictions}))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """The `reid` command once identify-batch is wired into reid/cli.py, else the same parser and
    error handling (`python -m reid.species.batch`)."""
    import reid.cli
    from reid.species import batch

    reid.cli.build_parser()
    main = reid.cli.main if "identify-batch" in reid.cli.COMMANDS else batch.main
    capsys.readouterr()
    code = main(["identify-batch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    scenes = root / "scenes"
    # seed 3: three cats and two antelopes show up in 24 frames, besides blanks, people and vehicles
    paths = make_synthetic_scenes(scenes, frames=24, individuals_per_species=3, seed=3, progress=False)
    truth = pd.read_csv(paths.ground_truth, keep_default_na=False)
    cat_ckpt = write_checkpoint(root / "models" / "cat.pt", seed=0)
    antelope_ckpt = write_checkpoint(root / "models" / "antelope.pt", seed=7)
    embedders = {CAT: Embedder.from_checkpoint(cat_ckpt), ANTELOPE: Embedder.from_checkpoint(antelope_ckpt)}
    store_dir = root / "store"
    enrolled = {}  # (file, detection) -> identity
    ids = {}       # identity -> individual id
    animals = truth[truth["category"] == "animal"]
    detections = read_megadetector(paths.detections)
    for identity, rows in animals.groupby("identity", sort=True):
        for row in rows.itertuples():
            crop = batch_crop(scenes, detections, row)
            if crop is not None:
                break
        species = row.species
        # the last antelope is embedded by the cats' model: the store's vector is "stale" for its route
        model = embedders[CAT] if identity == sorted(animals.loc[animals.species == ANTELOPE, "identity"])[-1] \
            else embedders[species]
        ids[identity] = enroll(store_dir, identity, species, [crop], model)
        enrolled[(row.file, int(row.detection))] = identity
    assert animals.groupby("species")["identity"].nunique().to_dict() == {CAT: 3, ANTELOPE: 2}
    routes = root / "models" / "routes.yaml"
    routes.write_text(f"species:\n  {CAT}: {{checkpoint: cat.pt}}\n  {ANTELOPE}: {{checkpoint: antelope.pt, "
                      "tta: none}\n")
    return {"root": root, "scenes": scenes, "paths": paths, "truth": truth, "store": store_dir, "routes": routes,
            "enrolled": enrolled, "ids": ids, "embedders": embedders, "cat_ckpt": cat_ckpt,
            "speciesnet": speciesnet_file(root / "speciesnet.json", truth)}


def store_state(store_dir: Path) -> tuple:
    store = Store(build_settings(store_dir=store_dir).url, create=False)
    try:
        return store.change_seq(), store.counts()
    finally:
        store.close()


# ------------------------------------------------------------------------------------ tests
def test_batch_identifies_routes_and_exports(world, capsys):
    before = store_state(world["store"])
    out = world["root"] / "cli" / "results.csv"
    paths = world["paths"]
    code, printed, err = run_cli(["--images", str(paths.images), "--detections", str(paths.detections),
                                  "--speciesnet", str(world["speciesnet"]), "--routes", str(world["routes"]),
                                  "--store", str(world["store"]), "--out", str(out), "--export", "camtrap-dp",
                                  "--utc-offset", "+02:00", "--no-progress"], capsys)
    assert code == 0, err
    assert "frames/s" in printed and "embedding" in printed
    assert "1 store images were embedded by another model" in err
    assert store_state(world["store"]) == before  # identification only: the store is untouched
    assert not out.with_name("results.csv.partial").exists()

    results = pd.read_csv(out, keep_default_na=False)
    assert list(results.columns) == RESULT_COLUMNS
    truth = world["truth"]
    merged = results.merge(truth, on=["file", "detection"], how="outer", suffixes=("", "_gt"), indicator=True)
    assert (merged["_merge"] == "both").all()  # one row per true box, one per empty frame, nothing else

    expected = {"": "blank", "person": "human", "vehicle": "vehicle"}
    for category, decision in expected.items():
        rows = merged[merged["category_gt"] == category]
        assert len(rows) and (rows["decision"] == decision).all(), category
        assert (rows["individual_id"] == "").all()
    animals = merged[merged["category_gt"] == "animal"]
    assert animals["decision"].isin(["match", "uncertain", "new"]).all()
    assert (animals["species"] == animals["species_gt"]).all()

    # every enrolled crop finds itself: decision match, its identity at rank 1
    for (file, detection), identity in world["enrolled"].items():
        row = results[(results.file == file) & (results.detection == detection)].iloc[0]
        assert (row.decision, row.individual_name, int(row.individual_id)) == ("match", identity,
                                                                               world["ids"][identity])
        assert float(row.score) >= 0.9999
    # each species only ever answered from its own gallery, by its own model
    species_of = {world["ids"][i]: s for i, s in truth.loc[truth.category == "animal"]
                  .drop_duplicates("identity")[["identity", "species"]].itertuples(index=False)}
    answered = animals[animals["individual_id"] != ""]
    assert len(answered) == len(animals)
    assert all(species_of[int(i)] == s for i, s in zip(answered["individual_id"], answered["species"]))
    for species, embedder in world["embedders"].items():
        assert (answered.loc[answered.species == species, "model"] == embedder.fingerprint).all()

    # encounters: exactly the scenes' bursts (one camera, seconds apart), whatever their names
    pairs = merged[["encounter", "encounter_gt"]].drop_duplicates()
    assert pairs["encounter"].is_unique and pairs["encounter_gt"].is_unique
    assert (results["datetime_source"] == "exif").all()
    assert (results["camera"] == results["file"].str.split("/").str[0]).all()

    # Camtrap DP
    folder = out.with_name("results-camtrap-dp")
    observations = pd.read_csv(folder / "observations.csv", keep_default_na=False)
    media = pd.read_csv(folder / "media.csv", keep_default_na=False)
    assert list(observations.columns) == OBSERVATION_COLUMNS and list(media.columns) == MEDIA_COLUMNS
    assert len(observations) == len(results) and len(media) == results["file"].nunique()
    assert set(observations["observationLevel"]) == {"media"}
    assert observations["observationID"].is_unique
    matched = (results["decision"] == "match").to_numpy()
    assert (observations.loc[matched, "individualID"] != "").all()
    assert (observations.loc[~matched, "individualID"] == "").all()
    assert set(observations["observationType"]) == {"animal", "human", "vehicle", "blank"}
    assert observations["eventStart"].str.endswith("+02:00").all()
    boxed = observations[observations["observationType"] != "blank"]
    boxes = boxed[["bboxX", "bboxY", "bboxWidth", "bboxHeight"]].astype(float).to_numpy()
    assert ((boxes >= 0) & (boxes <= 1)).all()
    # the photos lie outside the package folder: file: URLs (Camtrap DP allows no '..' in a path)
    assert all(Path(url2pathname(urlparse(p).path)).is_file() for p in media["filePath"])
    assert media["filePath"].str.startswith("file:").all()


def test_interrupted_run_resumes_to_the_same_csv(world):
    paths = world["paths"]
    options = dict(store=world["store"], detections=paths.detections, chunk=4, progress=False,
                   species_source=SpeciesNetFile(world["speciesnet"], paths.images))
    full = identify_batch(paths.images, world["root"] / "full.csv", Router.from_file(world["routes"]), **options)

    class Stop(Exception):
        pass

    def stop_after_seven(file, done):
        if done == 7:  # mid-chunk: the second chunk of four has three photos written
            raise Stop

    out = world["root"] / "resumed.csv"
    with pytest.raises(Stop):
        identify_batch(paths.images, out, Router.from_file(world["routes"]), on_image=stop_after_seven, **options)
    partial = out.with_name("resumed.csv.partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 7
    with open(partial, "a") as handle:
        handle.write('{"file": "CAM01/IMG_00')  # a kill in the middle of a write
    resumed = identify_batch(paths.images, out, Router.from_file(world["routes"]), **options)
    assert resumed.processed == full.photos - 7 == 17
    assert out.read_bytes() == full.out.read_bytes()
    assert not partial.exists()

    # a progress file of other options is refused rather than mixed in
    with pytest.raises(Stop):
        identify_batch(paths.images, out, Router.from_file(world["routes"]), on_image=stop_after_seven, **options)
    with pytest.raises(ReidError, match="other options.*gap_seconds.*--restart"):
        identify_batch(paths.images, out, Router.from_file(world["routes"]), gap_seconds=5, **options)
    again = identify_batch(paths.images, out, Router.from_file(world["routes"]), gap_seconds=5, restart=True,
                           **options)
    assert again.processed == again.photos
    # and so is one of an older wildreid, whose rows have other columns
    partial.write_text(json.dumps({"format": "wildreid-identify-batch-1", "options": {}}) + "\n")
    with pytest.raises(ReidError, match="another version of wildreid.*--restart"):
        identify_batch(paths.images, out, Router.from_file(world["routes"]), **options)


def test_demo_enroll_keeps_the_scenes_viewpoints_and_the_batch_names_the_flank_that_matched(world, tmp_path):
    paths, truth = world["paths"], world["truth"]
    router = Router.from_file(world["routes"])
    store_dir = tmp_path / "store"
    enrolled = enroll_ground_truth(world["scenes"], store_dir, router)
    store = Store(f"sqlite:///{store_dir / 'wildreid.db'}")
    expected = {}  # (file, detection) of each enrolled box -> (individual id, viewpoint)
    for identity, info in enrolled.items():
        (file,) = info["files"]
        box = truth[(truth.file == file) & (truth.identity == identity)].iloc[0]
        expected[(file, int(box.detection))] = (info["individual_id"], box.viewpoint)
        (image,) = store.get_individual(info["individual_id"])["images"]
        assert image["viewpoint"] == box.viewpoint and box.viewpoint in ("left", "right")
    store.close()
    result = identify_batch(paths.images, tmp_path / "results.csv", router, store_dir, detections=paths.detections,
                            species_source=SpeciesNetFile(world["speciesnet"], paths.images), progress=False)
    rows = pd.read_csv(result.out, keep_default_na=False).set_index(["file", "detection"])
    for key, (individual_id, viewpoint) in expected.items():  # each enrolled crop finds itself, and its flank
        assert (rows.loc[key, "individual_id"], rows.loc[key, "matched_viewpoint"]) == (str(individual_id), viewpoint)
    identified = rows.individual_id != ""
    assert set(rows.matched_viewpoint[identified]) <= {"left", "right"}
    assert (rows.matched_viewpoint[~identified] == "").all()


def test_a_store_of_an_older_schema_is_read_only_refused_not_upgraded(world, tmp_path, capsys):
    from tests.test_service_store import make_schema_1_store, schema_version

    url = f"sqlite:///{tmp_path / 'old-store' / 'wildreid.db'}"
    make_schema_1_store(url)
    code, _, err = run_cli(["--images", str(world["paths"].images), "--species", CAT, "--routes", str(world["routes"]),
                            "--store", str(tmp_path / "old-store"), "--out", str(tmp_path / "r.csv")], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"schema version 1, older than this wildreid's ({SCHEMA_VERSION}): start `reid serve` on it once" in err
    store = Store(url, create=False)
    assert schema_version(store) == 1  # identify-batch only reads the store
    store.close()


def test_folder_without_detections_names_suffixes_mtimes_and_failures(world):
    """No MegaDetector file: every photo is one animal (WholeImageDetector). PNG and upper-case
    suffixes are found at any depth, a photo without EXIF falls back to its mtime, an unreadable
    one is `failed`, and a species without a route gets a species-only answer."""
    folder = world["root"] / "loose"
    enrolled_file, _ = next(iter(world["enrolled"]))
    (folder / "site" / "CAMX").mkdir(parents=True)
    shutil.copy(world["paths"].images / enrolled_file, folder / "site" / "CAMX" / "A.JPEG")
    Image.fromarray(read_image(str(world["paths"].images / enrolled_file))).save(folder / "site" / "CAMX" / "b.Png")
    (folder / "site" / "CAMX" / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    photos = list_photos(folder)
    assert [p.file for p in photos] == ["site/CAMX/A.JPEG", "site/CAMX/b.Png", "site/CAMX/broken.jpg"]
    assert [p.datetime_source for p in photos] == ["exif", "mtime", "mtime"]
    assert photos[0].camera == "site/CAMX"

    router = Router({CAT: {"checkpoint": str(world["cat_ckpt"])}})
    speciesnet = world["root"] / "loose-speciesnet.json"
    speciesnet.write_text(json.dumps({"predictions": [
        {"filepath": "site/CAMX/A.JPEG", "prediction": "u;m;c;f;felis;maculata;spotted-cat", "prediction_score": 0.8},
        {"filepath": "site/CAMX/b.Png", "prediction": "u;m;p;e;equus;quagga;zebra", "prediction_score": 0.7}]}))
    result = identify_batch(folder, world["root"] / "loose.csv", router, world["store"], progress=False,
                            species_source=SpeciesNetFile(speciesnet, folder))
    rows = result.rows.set_index("file")
    assert rows.loc["site/CAMX/A.JPEG", "decision"] in ("match", "uncertain", "new")
    assert (rows.loc["site/CAMX/A.JPEG", ["x", "y", "w", "h"]].tolist()) == [0.0, 0.0, 1.0, 1.0]
    assert rows.loc["site/CAMX/b.Png", "decision"] == "species-only"
    assert "no re-ID model for species 'zebra'" in rows.loc["site/CAMX/b.Png", "note"]
    assert rows.loc["site/CAMX/broken.jpg", "decision"] == "failed"
    assert "is not an image" in rows.loc["site/CAMX/broken.jpg", "note"]
    assert rows.loc["site/CAMX/b.Png", "datetime_source"] == "mtime"
    # encounters are named after the camera folder
    assert result.rows["encounter"].str.startswith("site/CAMX-E").all()

    # one-species shortcut, fixed species: the same photos through the library
    shortcut = identify_batch(folder, world["root"] / "loose2.csv", Router.single(world["cat_ckpt"], CAT),
                              world["store"], progress=False, species_source=FixedSpecies(CAT))
    assert (shortcut.rows.set_index("file").loc["site/CAMX/b.Png", "species"]) == CAT


@pytest.mark.parametrize("routes, message", [
    ("species:\n  spotted-cat: {checkpoint: cat.pt, treshold: 0.5}\n", "species.spotted-cat: unknown key 'treshold'"),
    ("species:\n  spotted-cat: {checkpoint: missing.pt}\n", "species.spotted-cat.checkpoint: checkpoint '"),
    ("species:\n  spotted-cat: {tta: none}\n", "species.spotted-cat: missing key 'checkpoint'"),
    ("specie:\n  spotted-cat: {checkpoint: cat.pt}\n", "a routes file is a mapping with a 'species' key"),
    ("species:\n  spotted-cat: {checkpoint: cat.pt, tta: sideways}\n", "species.spotted-cat.tta: 'sideways'"),
    ("species: [spotted-cat\n", "not valid YAML"),
])
def test_bad_routes_are_clear_errors(world, capsys, routes, message):
    path = world["routes"].with_name("bad.yaml")
    path.write_text(routes)
    code, _, err = run_cli(["--images", str(world["paths"].images), "--species", CAT, "--routes", str(path),
                            "--store", str(world["store"]), "--out", str(world["root"] / "bad.csv")], capsys)
    assert code == 2
    assert message in err and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "nowhere/best.pt", "--species", CAT], "checkpoint 'nowhere/best.pt' not found"),
    (["--checkpoint", "CKPT"], "--checkpoint needs --species"),
    (["--routes", "ROUTES"], "say how to tell the species"),
    (["--routes", "ROUTES", "--species", CAT, "--store", "no-store-here"], "no store at 'no-store-here'"),
])
def test_bad_arguments_are_clear_errors(world, capsys, extra, message):
    extra = [str(world["cat_ckpt"]) if a == "CKPT" else str(world["routes"]) if a == "ROUTES" else a for a in extra]
    store = [] if "--store" in extra else ["--store", str(world["store"])]
    code, _, err = run_cli(["--images", str(world["paths"].images), *store, "--out", str(world["root"] / "x.csv"),
                            *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_parser_and_defaults_agree_with_the_service():
    parser = argparse.ArgumentParser()
    commands = add_identify_batch_parser(parser.add_subparsers(dest="command"))
    assert set(commands) == {"identify-batch"}
    fields = Settings.model_fields
    assert DEFAULT_THRESHOLDS == {"match_threshold": fields["match_threshold"].default,
                                  "new_threshold": fields["new_threshold"].default}


def test_store_vectors_of_another_model_can_be_refused(world, capsys):
    paths = world["paths"]
    code, _, err = run_cli(["--images", str(paths.images), "--detections", str(paths.detections), "--speciesnet",
                            str(world["speciesnet"]), "--routes", str(world["routes"]), "--store", str(world["store"]),
                            "--out", str(world["root"] / "stale" / "r.csv"), "--stale-embeddings", "error",
                            "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"1 of the store's 2 '{ANTELOPE}' images were embedded by model" in err
