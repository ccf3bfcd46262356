"""The service on full camera-trap frames: detections, crops, species, per-species models (routes).

Synthetic scenes hold two species, people, vehicles and blank frames; each species has its own
random-init checkpoint. The frames' detections are the scenes' MegaDetector-format ground truth,
sent in the `detections` field as a camera-trap platform that already runs MegaDetector sends them.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from reid.embedding.embedder import Embedder
from reid.species.crops import CropSettings, embedding_model
from reid.species.megadetector import DEFAULT_CATEGORIES, read_megadetector
from reid.species.scenes import make_synthetic_scenes
from service.app import create_app
from service.settings import Settings
from tests.conftest import tiny_config, write_checkpoint

CAT, ANTELOPE = "spotted-cat", "striped-antelope"
CATEGORY_IDS = {name: key for key, name in DEFAULT_CATEGORIES.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    paths = make_synthetic_scenes(root / "scenes", frames=24, individuals_per_species=3, seed=3, progress=False)
    write_checkpoint(root / "cat.pt", seed=0)
    write_checkpoint(root / "antelope.pt", seed=7)
    routes = root / "routes.yaml"
    routes.write_text(f"species:\n  {CAT}: cat.pt\n  {ANTELOPE}: {{checkpoint: antelope.pt}}\n")
    truth = pd.read_csv(paths.ground_truth, keep_default_na=False)
    return {"root": root, "images": paths.images, "routes": routes, "truth": truth,
            "detections": read_megadetector(paths.detections)}


def frame(world, file: str) -> tuple:
    return ("images", (file.replace("/", "_"), (world["images"] / file).read_bytes(), "image/jpeg"))


def detections_of(world, file: str) -> str:
    """The frame's `detections` list as MegaDetector writes it."""
    rows = world["detections"][world["detections"].file == file]
    rows = rows[rows.detection >= 0].sort_values("detection")
    return json.dumps([{"category": CATEGORY_IDS[r.category], "conf": r.conf, "bbox": [r.x, r.y, r.w, r.h]}
                       for r in rows.itertuples()])


def box_of(world, file: str, detection: int) -> str:
    row = world["detections"][(world["detections"].file == file) & (world["detections"].detection == detection)]
    return ",".join(str(v) for v in row[["x", "y", "w", "h"]].iloc[0])


def enrollable(world) -> dict[str, tuple[str, int, str, str]]:
    """identity -> (file, detection, species, viewpoint) of its first box (every box of these scenes is large
    enough)."""
    animals = world["truth"][world["truth"].category == "animal"].drop_duplicates("identity")
    return {row.identity: (row.file, int(row.detection), row.species, row.viewpoint) for row in animals.itertuples()}


@pytest.fixture(scope="module")
def client(world, tmp_path_factory):
    settings = Settings(store_dir=tmp_path_factory.mktemp("store"), routes=world["routes"])
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {client.app.state.service.store.create_key('field')[1]}"
        yield client


@pytest.fixture(scope="module")
def enrolled(world, client) -> dict[str, dict]:
    """Each individual enrolled from a full frame, with the bbox and the viewpoint of its box there."""
    out = {}
    for identity, (file, detection, species, viewpoint) in enrollable(world).items():
        r = client.post("/v1/individuals", data={"name": identity, "species": species,
                                                 "bbox": box_of(world, file, detection), "viewpoint": viewpoint},
                        files=[frame(world, file)])
        assert r.status_code == 201, r.text
        assert r.json()["images"][0]["viewpoint"] == viewpoint
        out[identity] = {**r.json(), "file": file, "detection": detection, "viewpoint": viewpoint}
    return out


def test_each_species_has_its_own_model_and_gallery(world, client, enrolled):
    ready = client.get("/ready").json()
    models = {m["species"]: m for m in ready["models"]}
    assert set(models) == {CAT, ANTELOPE} and models[CAT]["model"] != models[ANTELOPE]["model"]
    assert models[CAT]["model"] == embedding_model(Embedder.from_checkpoint(world["root"] / "cat.pt").fingerprint,
                                                   CropSettings())
    species = world["truth"][world["truth"].category == "animal"].drop_duplicates("identity")
    assert ready["galleries"] == species.groupby("species").size().to_dict()
    assert ready["foreign_images"] == 0
    # a species no route names has no model: it cannot be enrolled, and is unknown to identify
    file = next(iter(enrolled.values()))["file"]
    r = client.post("/v1/individuals", data={"name": "Z", "species": "zebra"}, files=[frame(world, file)])
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_reid_model"
    r = client.post("/v1/identify", data={"species": "zebra"}, files=[frame(world, file)])
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_species"


def test_full_frames_with_detections_find_the_enrolled_individuals(world, client, enrolled):
    truth = world["truth"]
    models = {m["species"]: m["model"] for m in client.get("/ready").json()["models"]}
    for identity, info in enrolled.items():
        file = info["file"]
        in_frame = truth[truth.file == file]
        # the request's species applies to every animal of the frame: these scenes have one species per frame
        (species,) = set(in_frame.loc[in_frame.category == "animal", "species"])
        r = client.post("/v1/identify", data={"species": species, "detections": detections_of(world, file)},
                        files=[frame(world, file)])
        assert r.status_code == 200, r.text
        result = r.json()
        (photo,) = result["photos"]
        assert photo["outcome"] == "animal" and photo["humans"] == (in_frame.category == "person").sum()
        assert photo["vehicles"] == (in_frame.category == "vehicle").sum()
        animals = {tuple(a["bboxes"][0]): a for a in result["animals"]}
        box = tuple(float(v) for v in box_of(world, file, info["detection"]).split(","))
        animal = animals[box]
        assert animal["detector"] == "detections" and animal["detection_conf"] is not None
        assert animal["decision"] == "match" and animal["candidates"][0]["individual_id"] == info["id"]
        assert animal["candidates"][0]["score"] >= 0.9999  # the query is cut as the gallery image was
        assert animal["candidates"][0]["viewpoint"] == info["viewpoint"]
        assert animal["model"] == models[info["species"]] and len(result["animals"]) == len(animals)


def test_blank_people_and_vehicles_are_counted_not_identified(world, client, enrolled):
    truth = world["truth"]
    categories = truth.groupby("file")["category"].agg(set)
    blank = next(f for f, c in categories.items() if c == {""})
    people = next(f for f, c in categories.items() if "person" in c and "animal" not in c)
    r = client.post("/v1/identify", data={"species": CAT, "detections": [detections_of(world, blank),
                                                                          detections_of(world, people)]},
                    files=[frame(world, blank), frame(world, people)])
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["animals"] == []
    assert [p["outcome"] for p in result["photos"]] == ["blank", "human"] and result["photos"][1]["humans"] >= 1


def test_one_animal_per_photo_is_fused_across_the_encounter(world, client, enrolled):
    identity, info = next((i, e) for i, e in enrolled.items() if e["species"] == CAT)
    one = json.dumps([{"category": "1", "conf": 0.9, "bbox": [float(v) for v in box_of(
        world, info["file"], info["detection"]).split(",")]}])
    r = client.post("/v1/identify", data={"species": CAT, "detections": [one, one]},
                    files=[frame(world, info["file"]), frame(world, info["file"])])
    assert r.status_code == 200, r.text
    (animal,) = r.json()["animals"]
    assert animal["query_images"] == 2 and animal["images"] == [0, 1]
    assert animal["candidates"][0]["individual_id"] == info["id"] and animal["decision"] == "match"


def test_enrolling_needs_one_animal_per_photo_and_stores_the_detected_box(world, client, enrolled):
    truth = world["truth"]
    counts = truth[truth.category == "animal"].groupby("file").size()
    crowded = counts[counts > 1].index[0]
    r = client.post("/v1/individuals", data={"name": "Crowd", "species": CAT,
                                             "detections": detections_of(world, crowded)},
                    files=[frame(world, crowded)])
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_one_animal"
    assert "bbox" in r.json()["error"]["message"]
    single = counts[counts == 1].index[0]
    species = truth.loc[(truth.file == single) & (truth.category == "animal"), "species"].iloc[0]
    r = client.post("/v1/individuals", data={"name": "Single", "species": species,
                                             "detections": detections_of(world, single)},
                    files=[frame(world, single)])
    assert r.status_code == 201, r.text
    (image,) = r.json()["images"]
    detected = world["detections"][(world["detections"].file == single) & (world["detections"].detection >= 0)]
    animal = detected[detected.category == "animal"].iloc[0]
    assert [float(v) for v in image["bbox"].split(",")] == pytest.approx([animal.x, animal.y, animal.w, animal.h],
                                                                          abs=1e-5)
    client.delete(f"/v1/individuals/{r.json()['id']}")


@pytest.mark.parametrize("field, value, code", [
    ("detections", "not json", "invalid_detections"),
    ("detections", '{"category": "1"}', "invalid_detections"),
    ("detections", '[{"category": "7", "conf": 0.9, "bbox": [0, 0, 1, 1]}]', "invalid_detections"),
    ("detections", '[{"category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.9, 0.1]}]', "invalid_detections"),
])
def test_malformed_detections_are_refused_with_their_position(world, client, field, value, code):
    file = world["truth"].file.iloc[0]
    r = client.post("/v1/identify", data={"species": CAT, field: value}, files=[frame(world, file)])
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == code, r.text
    assert "detections[0]" in r.json()["error"]["message"]


def test_detections_must_match_the_photos_and_exclude_bboxes(world, client):
    file = world["truth"].file.iloc[0]
    r = client.post("/v1/identify", data={"species": CAT, "detections": ["[]", "[]"]}, files=[frame(world, file)])
    assert r.status_code == 422 and "one per image" in r.json()["error"]["message"]
    r = client.post("/v1/identify", data={"species": CAT, "detections": "[]", "bbox": "0,0,1,1"},
                    files=[frame(world, file)])
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]


def test_the_species_classifier_routes_each_animal(world, tmp_path, enrolled):
    from reid.species.classifier import species_table, train_species_classifier

    table = species_table(world["images"].parent / "ground_truth.csv", world["images"])
    classifier = train_species_classifier(tiny_config("train.epochs=1"), table, tmp_path / "species",
                                          val_fraction=0.25, batch_size=8)
    store = tmp_path / "store"
    settings = Settings(store_dir=store, routes=world["routes"], species_classifier=classifier, species_threshold=0.0)
    truth = world["truth"]
    crowded = truth[truth.category == "animal"].groupby("file").size().idxmax()  # 3 animals
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {client.app.state.service.store.create_key('k')[1]}"
        ids = {}
        for identity, info in enrolled.items():
            r = client.post("/v1/individuals", data={"name": identity, "species": info["species"],
                                                     "bbox": box_of(world, info["file"], info["detection"])},
                            files=[frame(world, info["file"])])
            ids[r.json()["id"]] = info["species"]
        assert client.get("/ready").json()["species_classifier"] == str(classifier)
        r = client.post("/v1/identify", data={"detections": detections_of(world, crowded)},
                        files=[frame(world, crowded)])
        assert r.status_code == 200, r.text
        animals = r.json()["animals"]
        assert len(animals) == 3
        for animal in animals:
            assert animal["species_source"] == "classifier" and animal["species"] in (CAT, ANTELOPE)
            assert 0 < animal["species_score"] <= 1
            # searched in its predicted species' gallery only
            assert {ids[c["individual_id"]] for c in animal["candidates"]} == {animal["species"]}


def test_a_box_is_cut_from_the_full_resolution_photo(world, client):
    """JPEGs taken whole decode at a reduced scale; a box must not: its crop needs every pixel."""
    import io

    import numpy as np
    from PIL import Image

    from reid.store import blob_to_vector
    from service.testing import encode

    rng = np.random.default_rng(5)
    photo = np.kron(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))  # 1200x1600
    blob, box = encode(photo, "JPEG", quality=95), (0.42, 0.4, 0.1, 0.12)
    r = client.post("/v1/individuals", data={"name": "Small", "species": CAT, "bbox": ",".join(map(str, box))},
                    files=[("images", ("big.jpg", blob, "image/jpeg"))])
    assert r.status_code == 201, r.text
    image_id = r.json()["images"][0]["id"]
    stored = next(row for row in client.app.state.service.store.gallery_rows(None)[1] if row.image_id == image_id)
    full = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    expected = Embedder.from_checkpoint(world["root"] / "cat.pt").embed_images([CropSettings().cut(full, box)])[0]
    assert np.allclose(blob_to_vector(stored.embedding), expected, atol=1e-5)
    client.delete(f"/v1/individuals/{r.json()['id']}")


def test_identify_batch_reads_what_the_service_enrolled_without_embedding_again(world, client, enrolled, tmp_path):
    """One crop pipeline: the batch run cuts the frames' boxes as the service cut the enrolled ones."""
    from reid.species.batch import SpeciesNetFile, identify_batch
    from reid.species.routing import Router
    from tests.test_identify_batch import speciesnet_file

    species = SpeciesNetFile(speciesnet_file(tmp_path / "speciesnet.json", world["truth"]), world["images"])
    result = identify_batch(world["images"], tmp_path / "results.csv", Router.from_file(world["routes"]),
                            client.app.state.service.settings.store_dir, species_source=species,
                            detections=world["images"].parent / "detections.json", progress=False)
    assert result.reembedded == 0  # the stored vectors' stamp is the batch run's own
    rows = result.rows
    for identity, info in enrolled.items():
        row = rows[(rows.file == info["file"]) & (rows.detection == info["detection"])].iloc[0]
        assert (row.decision, int(row.individual_id)) == ("match", info["id"]) and float(row.score) >= 0.9999
        assert row.matched_viewpoint == info["viewpoint"]


def test_identify_batch_and_the_service_give_the_same_answers(world, client, enrolled, tmp_path):
    """One identification core: for every animal of the frames, identify-batch and /v1/identify name the same
    individual with the same score and decision. The routes file of the batch run writes the species in
    another case ("Spotted-Cat"): it still finds the store's spotted-cat gallery."""
    from reid.species.batch import SpeciesNetFile, identify_batch
    from reid.species.routing import Router
    from tests.test_identify_batch import speciesnet_file

    routes = tmp_path / "routes.yaml"
    routes.write_text(f"species:\n  Spotted-Cat: {world['root'] / 'cat.pt'}\n  ' Striped-Antelope': "
                      f"{world['root'] / 'antelope.pt'}\n")
    species = SpeciesNetFile(speciesnet_file(tmp_path / "speciesnet.json", world["truth"]), world["images"])
    result = identify_batch(world["images"], tmp_path / "results.csv", Router.from_file(routes),
                            client.app.state.service.settings.store_dir, species_source=species,
                            detections=world["images"].parent / "detections.json", progress=False)
    identified = result.rows[result.rows.decision.isin(["match", "uncertain", "new"])]
    assert len(identified) >= 10 and set(identified.species) == {CAT, ANTELOPE}
    for row in identified.itertuples():
        box = f"{row.x},{row.y},{row.w},{row.h}"
        r = client.post("/v1/identify", data={"species": row.species, "bbox": box}, files=[frame(world, row.file)])
        assert r.status_code == 200, r.text
        (animal,) = r.json()["animals"]
        assert animal["decision"] == row.decision
        assert animal["candidates"][0]["individual_id"] == int(row.individual_id)
        assert animal["candidates"][0]["viewpoint"] == (row.matched_viewpoint or None)  # the CSV: "" for none
        assert animal["best_score"] == pytest.approx(float(row.score), abs=2e-6)


def test_a_routes_file_naming_species_in_another_case_serves_the_stores_galleries(world, client, enrolled, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"species:\n  Spotted-Cat: {world['root'] / 'cat.pt'}\n  STRIPED-ANTELOPE: "
                      f"{world['root'] / 'antelope.pt'}\n")
    settings = Settings(store_dir=client.app.state.service.settings.store_dir, routes=routes)
    with TestClient(create_app(settings)) as other:
        ready = other.get("/ready").json()
        assert {m["species"] for m in ready["models"]} == {CAT, ANTELOPE}
        assert ready["galleries"] == client.get("/ready").json()["galleries"] and ready["foreign_images"] == 0
        species_of = {identity: species for identity, (_, _, species, _) in enrollable(world).items()}
        info = next(info for identity, info in enrolled.items() if species_of[identity] == CAT)
        box = box_of(world, info["file"], info["detection"])
        answers = [c.post("/v1/identify", data={"species": "Spotted-Cat" if c is other else CAT, "bbox": box},
                          files=[frame(world, info["file"])]).json()["animals"][0] for c in (client, other)]
    assert answers[0]["candidates"] == answers[1]["candidates"]
    assert answers[1]["species"] == CAT and answers[1]["candidates"][0]["individual_id"] == info["id"]
