"""`identify-batch --export camtrap-dp` writes a Camtrap DP 1.0 package that frictionless validates
against the 1.0 profile and table schemas (local copies in tests/data/camtrap-dp-1.0: nothing is
downloaded), on synthetic scenes identified against a store enrolled from their ground truth.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd
import pytest

from reid.species import batch
from reid.species.batch import SpeciesNetFile, enroll_ground_truth, identify_batch, list_photos
from reid.species.camtrap import (DEPLOYMENT_COLUMNS, MEDIA_COLUMNS, OBSERVATION_COLUMNS, PROFILE_URL,
                                  TABLE_SCHEMA_URLS, open_package, validate_package)
from reid.species.routing import Router
from reid.species.scenes import make_synthetic_scenes
from tests.conftest import write_checkpoint

SCHEMAS = Path(__file__).parent / "data" / "camtrap-dp-1.0"
CAT, ANTELOPE = "spotted-cat", "striped-antelope"


def speciesnet_from_truth(path: Path, truth: pd.DataFrame) -> Path:
    """A SpeciesNet predictions file naming each photo's first true species (blank when none)."""
    taxa = {CAT: "u1;mammalia;carnivora;felidae;felis;maculata;spotted-cat",
            ANTELOPE: "u2;mammalia;artiodactyla;bovidae;tragelaphus;striata;striped-antelope", "blank": "u6;;;;;;blank"}
    predictions = [{"filepath": file, "prediction": taxa[([s for s in rows["species"] if s in taxa] or ["blank"])[0]],
                    "prediction_score": 0.9} for file, rows in truth.groupby("file", sort=True)]
    path.write_text(json.dumps({"predictions": predictions}))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = batch.main(["identify-batch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def file_of(file_path: str, package: Path) -> Path:
    """The photo a media.filePath names: a file: URL, or a path relative to the package folder."""
    parsed = urlparse(file_path)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else package / file_path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("camtrap")
    paths = make_synthetic_scenes(root / "scenes", frames=12, individuals_per_species=2, seed=3, progress=False)
    truth = pd.read_csv(paths.ground_truth, keep_default_na=False)
    checkpoint = write_checkpoint(root / "best.pt", seed=0)
    routes = root / "routes.yaml"
    routes.write_text(f"species:\n  {CAT}: {{checkpoint: best.pt}}\n  {ANTELOPE}: {{checkpoint: best.pt}}\n")
    enroll_ground_truth(root / "scenes", root / "store", Router.from_file(routes))
    cameras = sorted({p.camera for p in list_photos(paths.images)})
    deployments = root / "deployments.csv"
    pd.DataFrame({"camera": cameras, "latitude": [52.70 + i / 100 for i in range(len(cameras))],
                  "longitude": [23.84 + i / 100 for i in range(len(cameras))],
                  "locationName": [f"site {c}" for c in cameras], "cameraModel": "Reconyx-HF2X"}
                 ).to_csv(deployments, index=False)
    base = ["--images", str(paths.images), "--detections", str(paths.detections),
            "--speciesnet", str(speciesnet_from_truth(root / "speciesnet.json", truth)), "--routes", str(routes),
            "--store", str(root / "store"), "--utc-offset", "+02:00", "--no-progress"]
    return {"root": root, "paths": paths, "truth": truth, "routes": routes, "cameras": cameras,
            "deployments": deployments, "base": base}


@pytest.fixture(scope="module")
def package(scenes):
    """The package of one real run with a deployments file and a named contributor."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = scenes["root"] / "run" / "results.csv"
    printed, err = io.StringIO(), io.StringIO()
    with redirect_stdout(printed), redirect_stderr(err):
        code = batch.main(["identify-batch", *scenes["base"], "--out", str(out), "--export", "camtrap-dp",
                           "--deployments", str(scenes["deployments"]),
                           "--contributor", "Ana Silva:principalInvestigator", "--contributor", "Ben Okafor",
                           "--project-title", "Synthetic cats and antelopes"])
    assert code == 0, err.getvalue()
    return {"folder": out.with_name("results-camtrap-dp"), "results": pd.read_csv(out, keep_default_na=False),
            "printed": printed.getvalue(), "err": err.getvalue()}


# ------------------------------------------------------------------------------------ the package
def test_shipped_schemas_are_the_four_camtrap_dp_files():
    names = {p.name for p in SCHEMAS.glob("*.json")}
    assert names == {"camtrap-dp-profile.json", "deployments-table-schema.json", "media-table-schema.json",
                     "observations-table-schema.json"}
    for table, columns in (("deployments", DEPLOYMENT_COLUMNS), ("media", MEDIA_COLUMNS),
                           ("observations", OBSERVATION_COLUMNS)):
        schema = json.loads((SCHEMAS / f"{table}-table-schema.json").read_text(encoding="utf-8"))
        assert [f["name"] for f in schema["fields"]] == columns  # we write every column, in the schema's order


def test_a_real_run_writes_a_package_that_validates(package):
    folder = package["folder"]
    for name in ("deployments.csv", "media.csv", "observations.csv", "datapackage.json"):
        assert f"wrote {folder / name}" in package["printed"]
    assert "no coordinates" not in package["err"]
    assert validate_package(folder, SCHEMAS) == []

    descriptor = json.loads((folder / "datapackage.json").read_text())
    assert descriptor["profile"] == PROFILE_URL  # what users get keeps the real URLs
    assert {r["name"]: r["schema"] for r in descriptor["resources"]} == TABLE_SCHEMA_URLS
    assert descriptor["contributors"] == [{"title": "Ana Silva", "role": "principalInvestigator"},
                                          {"title": "Ben Okafor", "role": "contributor"}]
    assert descriptor["project"]["title"] == "Synthetic cats and antelopes"
    assert descriptor["project"]["individualAnimals"] is True and descriptor["project"]["observationLevel"] == ["media"]
    assert "coordinates are missing" not in descriptor["description"]

    deployments = pd.read_csv(folder / "deployments.csv", keep_default_na=False)
    media = pd.read_csv(folder / "media.csv", keep_default_na=False)
    observations = pd.read_csv(folder / "observations.csv", keep_default_na=False)
    assert sorted(deployments["deploymentID"]) == package_cameras(media)
    assert (deployments["cameraModel"] == "Reconyx-HF2X").all() and deployments["deploymentComments"].eq("").all()
    ring = descriptor["spatial"]["coordinates"][0]
    assert descriptor["spatial"]["type"] == "Polygon" and ring[0] == ring[-1]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    assert (min(lons), max(lons), min(lats), max(lats)) == (deployments.longitude.min(), deployments.longitude.max(),
                                                            deployments.latitude.min(), deployments.latitude.max())
    stamps = media["timestamp"]
    assert descriptor["temporal"] == {"start": min(stamps)[:10], "end": max(stamps)[:10]}
    assert deployments["deploymentStart"].min() == min(stamps)  # the first photo, without a start in the file
    names = {t["scientificName"] for t in descriptor["taxonomic"]}
    assert names == set(observations["scientificName"]) - {""} and "Homo sapiens" in names
    assert all(file_of(p, folder).resolve().is_file() for p in media["filePath"])


def package_cameras(media: pd.DataFrame) -> list[str]:
    return sorted(set(media["deploymentID"]))


def test_the_package_reads_back_with_what_was_written(package):
    from frictionless import system

    results, folder = package["results"], package["folder"]
    with system.use_context(trusted=True):
        loaded = open_package(folder, SCHEMAS)
        tables = {r.name: r.read_rows() for r in loaded.resources}
    assert len(tables["media"]) == results["file"].nunique()
    assert len(tables["observations"]) == len(results)
    assert len(tables["deployments"]) == results["camera"].nunique()
    written = sorted(str(i) for i, d in zip(results["individual_id"], results["decision"]) if d == "match")
    read = sorted(row["individualID"] for row in tables["observations"] if row["individualID"] is not None)
    assert read == written and written  # every match carries its individual, nothing else does
    assert {row["observationLevel"] for row in tables["observations"]} == {"media"}
    assert all(row["timestamp"].utcoffset().total_seconds() == 7200 for row in tables["media"])


# ------------------------------------------------------------------------------------ a broken package
def broken_copy(package, tmp_path: Path, table: str, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(package["folder"], folder)
    frame = pd.read_csv(folder / f"{table}.csv", dtype=str, keep_default_na=False)
    edit(frame).to_csv(folder / f"{table}.csv", index=False)
    return folder


def test_a_bad_enum_value_is_named_by_the_validator(package, tmp_path):
    def cat_type(frame):
        frame.loc[2, "observationType"] = "cat"
        return frame

    errors = validate_package(broken_copy(package, tmp_path, "observations", cat_type), SCHEMAS)
    assert len(errors) == 1
    assert errors[0].startswith("observations.csv row 4, field observationType:")
    assert '"cat"' in errors[0] and "enum" in errors[0]


def test_a_missing_required_column_is_named_by_the_validator(package, tmp_path):
    errors = validate_package(broken_copy(package, tmp_path, "media", lambda f: f.drop(columns=["filePublic"])),
                              SCHEMAS)
    assert errors and any("media.csv" in e and "filePublic" in e for e in errors)


def test_package_metadata_is_checked_against_the_profile(package, tmp_path):
    folder = tmp_path / "meta"
    shutil.copytree(package["folder"], folder)
    descriptor = json.loads((folder / "datapackage.json").read_text())
    descriptor["project"]["samplingDesign"] = "random"
    descriptor["contributors"][0]["role"] = "author"
    (folder / "datapackage.json").write_text(json.dumps(descriptor))
    errors = validate_package(folder, SCHEMAS)
    assert any("'random' is not one of" in e and "project/samplingDesign" in e for e in errors)
    assert any("'author' is not one of" in e for e in errors)


# ------------------------------------------------------------------------------------ without coordinates
def test_without_deployments_the_package_says_coordinates_are_missing(scenes, capsys):
    out = scenes["root"] / "bare" / "results.csv"
    code, printed, err = run_cli([*scenes["base"], "--out", str(out), "--export", "camtrap-dp"], capsys)
    assert code == 0, err
    folder = out.with_name("results-camtrap-dp")
    assert "deployments.csv has no coordinates (Camtrap DP requires them): pass --deployments" in err
    deployments = pd.read_csv(folder / "deployments.csv", keep_default_na=False)
    assert sorted(deployments["deploymentID"]) == scenes["cameras"]
    assert (deployments[["latitude", "longitude"]] == "").all().all()
    assert deployments["deploymentComments"].str.contains("latitude and longitude are unknown").all()
    descriptor = json.loads((folder / "datapackage.json").read_text())
    assert "Deployment coordinates are missing" in descriptor["description"]
    assert descriptor["spatial"] == {"type": "GeometryCollection", "geometries": []}
    assert descriptor["contributors"][0]["role"] == "contributor" and descriptor["contributors"][0]["title"]
    # what the validator says is exactly what is missing: every deployment's coordinates, nothing else
    errors = validate_package(folder, SCHEMAS)
    assert len(errors) == 2 * len(scenes["cameras"])
    assert all("deployments.csv row" in e and ("latitude" in e or "longitude" in e) and "required" in e
               for e in errors)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("content, message", [
    ("camera,latitude\nCAM01,52.1\n", "missing column 'longitude'"),
    ("site,latitude,longitude\nCAM01,52.1,4.3\n", "missing column 'deploymentID' (or 'camera'"),
    ("deploymentID,latitude,longitude,elevation\nCAM01,52.1,4.3,12\n", "unknown column(s) 'elevation'"),
    ("deploymentID,latitude,longitude\nCAM01,north,4.3\n", "line 2: latitude 'north' is not a number"),
    ("deploymentID,latitude,longitude\nCAM01,52.1,200\n", "line 2: longitude 200.0 is outside -180..180"),
    ("deploymentID,latitude,longitude,deploymentStart\nCAM01,52.1,4.3,May 1st\n", "deploymentStart 'May 1st'"),
])
def test_a_malformed_deployments_file_is_refused_before_the_run(scenes, tmp_path, capsys, content, message):
    bad = tmp_path / "deployments.csv"
    bad.write_text(content)
    out = tmp_path / "results.csv"
    code, _, err = run_cli([*scenes["base"], "--out", str(out), "--export", "camtrap-dp", "--deployments", str(bad)],
                           capsys)
    assert code == 2 and "Traceback" not in err
    assert str(bad) in err and message in err
    assert not out.exists() and not out.with_name("results.csv.partial").exists()  # refused before the run


def test_a_deployments_file_must_cover_every_camera(scenes, tmp_path, capsys):
    some = tmp_path / "deployments.csv"
    pd.read_csv(scenes["deployments"]).iloc[1:].to_csv(some, index=False)
    out = tmp_path / "r.csv"
    code, _, err = run_cli([*scenes["base"], "--out", str(out), "--export", "camtrap-dp", "--deployments", str(some)],
                           capsys)
    assert code == 2 and f"no row for the camera folder(s) {scenes['cameras'][0]}" in err and str(some) in err
    assert not out.exists() and not out.with_name("r.csv.partial").exists()  # refused before the run


@pytest.mark.parametrize("extra, message", [
    (["--deployments", "d.csv"], "--deployments describe the Camtrap DP package: add --export camtrap-dp"),
    (["--export", "camtrap-dp", "--contributor", "Ana:author"], "role 'author' is not one of contact"),
    (["--export", "camtrap-dp", "--deployments", "missing.csv"], "--deployments 'missing.csv': no such file"),
])
def test_bad_camtrap_options_are_clear_errors(scenes, tmp_path, capsys, extra, message):
    code, _, err = run_cli([*scenes["base"], "--out", str(tmp_path / "r.csv"), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ resume
def test_an_interrupted_run_resumes_and_then_exports_a_valid_package(scenes, tmp_path):
    paths = scenes["paths"]

    class Stop(Exception):
        pass

    def stop_after_five(file, done):
        if done == 5:
            raise Stop

    options = dict(store=scenes["root"] / "store", detections=paths.detections, chunk=4, progress=False,
                   species_source=SpeciesNetFile(scenes["root"] / "speciesnet.json", paths.images),
                   export="camtrap-dp", utc_offset="+02:00", deployments=scenes["deployments"])
    out = tmp_path / "resumed.csv"
    with pytest.raises(Stop):
        identify_batch(paths.images, out, Router.from_file(scenes["routes"]), on_image=stop_after_five, **options)
    assert not (tmp_path / "resumed-camtrap-dp").exists()  # nothing exported from a run cut short
    result = identify_batch(paths.images, out, Router.from_file(scenes["routes"]), **options)
    assert result.processed < result.photos  # it did resume
    folder = tmp_path / "resumed-camtrap-dp"
    assert [p.name for p in result.exported] == ["deployments.csv", "media.csv", "observations.csv",
                                                 "datapackage.json"]
    assert validate_package(folder, SCHEMAS) == []
    assert len(pd.read_csv(folder / "media.csv")) == result.photos
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary files
