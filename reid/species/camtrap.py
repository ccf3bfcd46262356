"""Camera Trap Data Package (Camtrap DP 1.0) from a batch identification run.

`write_camtrap_dp` writes a complete package to a folder: `deployments.csv`, `media.csv`,
`observations.csv` and `datapackage.json`, each table with every column of its Camtrap DP 1.0
table schema, in order (validators compare the header to the schema by position).

- observations: one media-level observation per detection row of the results (a blank photo gets
  one `blank` observation, a photo that could not be read one `unclassified`); `individualID` is
  the store's individual id of a `match`. Events are the encounters.
- media: one row per photo. `filePath` is relative to the package folder when the photo is inside
  it, else a `file:` URL: Camtrap DP allows only URLs and paths inside the package (no `..`).
- deployments: the camera folders. Their coordinates and details come from a deployments CSV
  (`--deployments`); start and end default to the camera's first and last photo. Without that
  file the package is still written, but Camtrap DP requires coordinates: deployments.csv leaves
  latitude/longitude empty and says so in `deploymentComments`, `spatial` is an empty GeoJSON
  GeometryCollection, and the package description and a warning say what to fill in.
- datapackage.json: the Camtrap DP 1.0 profile and table schema URLs, contributors, project,
  temporal, spatial and taxonomic coverage.

`validate_package` checks a written package with frictionless against local copies of the 1.0
profile and table schemas (tests/data/camtrap-dp-1.0) and returns readable errors.
See https://camtrap-dp.tdwg.org.
"""
from __future__ import annotations

import copy
import getpass
import json
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from reid.errors import DataError, ReidError
from reid.io import atomic_path, to_json, write_text

CAMTRAP_DP_VERSION = "1.0"
SPEC_BASE_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_DP_VERSION}/"
PROFILE_URL = SPEC_BASE_URL + "camtrap-dp-profile.json"
TABLES = ("deployments", "media", "observations")
TABLE_SCHEMA_URLS = {name: f"{SPEC_BASE_URL}{name}-table-schema.json" for name in TABLES}

DEPLOYMENT_COLUMNS = ["deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
                      "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay",
                      "cameraHeight", "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance",
                      "timestampIssues", "baitUse", "featureType", "habitat", "deploymentGroups", "deploymentTags",
                      "deploymentComments"]
MEDIA_COLUMNS = ["mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
                 "fileMediatype", "exifData", "favorite", "mediaComments"]
OBSERVATION_COLUMNS = ["observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd",
                       "observationLevel", "observationType", "cameraSetupType", "scientificName", "count",
                       "lifeStage", "sex", "behavior", "individualID", "individualPositionRadius",
                       "individualPositionAngle", "individualSpeed", "bboxX", "bboxY", "bboxWidth", "bboxHeight",
                       "classificationMethod", "classifiedBy", "classificationTimestamp", "classificationProbability",
                       "observationTags", "observationComments"]
OBSERVATION_TYPES = {"match": "animal", "new": "animal", "uncertain": "animal", "species-only": "animal",
                     "human": "human", "vehicle": "vehicle", "blank": "blank", "failed": "unclassified"}
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
HUMAN_SCIENTIFIC_NAME = "Homo sapiens"
NOT_A_SPECIES = {"", "unknown", "failed", "blank", "animal", "human", "vehicle"}
CONTRIBUTOR_ROLES = ("contact", "principalInvestigator", "rightsHolder", "publisher", "contributor")
# the profile requires a sampling design and capture method; a batch run cannot know them, so the
# package says these are defaults to review (see package_description)
DEFAULT_SAMPLING_DESIGN = "opportunistic"
DEFAULT_CAPTURE_METHOD = "activityDetection"
NO_COORDINATES_COMMENT = ("written by wildreid without a deployments file: latitude and longitude are unknown and "
                          "must be filled in; start and end are the camera's first and last photo")
# where frictionless would fetch what the 1.0 profile refers to; validate_package serves local copies
DATA_PACKAGE_PROFILE_URL = "https://frictionlessdata.io/schemas/data-package.json"
GEOJSON_PROFILE_URL = "http://json.schemastore.org/geojson.json"


@dataclass
class WrittenPackage:
    folder: Path
    paths: tuple[Path, ...]                       # the files written, datapackage.json last
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ values
def valid_utc_offset(text: str) -> bool:
    """`Z`, or +HH:MM / -HH:MM: what Camtrap DP timestamps end with."""
    return text == "Z" or (len(text) == 6 and text[0] in "+-" and text[1:3].isdigit() and text[3] == ":"
                           and text[4:].isdigit())


def timestamp(value: str, utc_offset: str | None) -> str:
    """An ISO 8601 local time with the UTC offset appended when known ("" stays "")."""
    if not value:
        return ""
    return value + (utc_offset or "") if not _has_offset(value) else value


def _has_offset(value: str) -> bool:
    return value.endswith("Z") or (len(value) > 19 and value[19] in "+-")


def _number(value) -> float | str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) or value == "" else value


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


# ------------------------------------------------------------------------------------ observations
def observations_table(results: pd.DataFrame, utc_offset: str | None = None) -> pd.DataFrame:
    """observations.csv from the result rows (batch.RESULT_COLUMNS)."""
    events = results.groupby("encounter")["datetime"].agg(["min", "max"])
    rows = []
    for row in results.itertuples(index=False):
        kind = OBSERVATION_TYPES.get(row.decision, "unclassified")
        species = str(row.species or "")
        name = HUMAN_SCIENTIFIC_NAME if kind == "human" else (species if kind == "animal" and species not in
                                                              NOT_A_SPECIES else "")
        detection = int(row.detection)
        boxed = detection >= 0
        probability = _number(row.species_score) if kind == "animal" else _number(row.conf)
        comment = row.decision + (f": {row.note}" if row.note else "")
        if row.decision in ("match", "uncertain", "new") and row.score != "" and not pd.isna(row.score):
            comment += f" (re-ID score {float(row.score):.4f})"
        rows.append({column: "" for column in OBSERVATION_COLUMNS} | {
            "observationID": f"{row.file}#{detection}" if boxed else f"{row.file}#-",
            "deploymentID": row.camera, "mediaID": row.file, "eventID": row.encounter,
            "eventStart": timestamp(events.at[row.encounter, "min"], utc_offset),
            "eventEnd": timestamp(events.at[row.encounter, "max"], utc_offset),
            "observationLevel": "media", "observationType": kind, "scientificName": name,
            "count": 1 if boxed and kind in ("animal", "human", "vehicle") else "",
            "individualID": str(row.individual_id) if row.decision == "match" else "",
            "bboxX": _number(row.x) if boxed else "", "bboxY": _number(row.y) if boxed else "",
            "bboxWidth": _number(row.w) if boxed else "", "bboxHeight": _number(row.h) if boxed else "",
            "classificationMethod": "machine", "classifiedBy": "wildreid",
            "classificationProbability": probability, "observationComments": comment,
        })
    return pd.DataFrame(rows, columns=OBSERVATION_COLUMNS)


# ------------------------------------------------------------------------------------ media
def media_file_path(photo: Path, package: Path | None) -> str:
    """Camtrap DP `filePath`: relative to the package folder for a photo inside it, else a file: URL
    (the pattern of the 1.0 schema refuses paths that start with '.', '/' or '~' or contain '..')."""
    photo = photo.resolve()
    if package is not None:
        try:
            return photo.relative_to(Path(package).resolve()).as_posix()
        except ValueError:
            pass
    return photo.as_uri()


def media_table(results: pd.DataFrame, images: str | Path, utc_offset: str | None = None,
                package: str | Path | None = None) -> pd.DataFrame:
    """media.csv: one row per photo (see media_file_path for `filePath`)."""
    photos = results.drop_duplicates("file")
    images = Path(images).resolve()
    sources = photos["datetime_source"] if "datetime_source" in photos else pd.Series("exif", index=photos.index)
    unknown = {column: "" for column in ("captureMethod", "exifData", "favorite")}
    return pd.DataFrame(unknown | {
        "mediaID": photos["file"], "deploymentID": photos["camera"],
        "timestamp": [timestamp(t, utc_offset) for t in photos["datetime"]],
        "filePath": [media_file_path(images / f, Path(package) if package is not None else None)
                     for f in photos["file"]],
        "filePublic": "false",
        "fileName": [Path(f).name for f in photos["file"]],
        "fileMediatype": [MEDIA_TYPES.get(Path(f).suffix.lower(), "image/" + Path(f).suffix.lower().lstrip("."))
                          for f in photos["file"]],
        "mediaComments": ["time from the file's modification time (no EXIF DateTimeOriginal)" if s == "mtime" else ""
                          for s in sources],
    }, columns=MEDIA_COLUMNS)


# ------------------------------------------------------------------------------------ deployments
def read_deployments(path: str | Path) -> pd.DataFrame:
    """A user's deployments CSV: a `deploymentID` (or `camera`: the camera folder name) column, `latitude`
    and `longitude`, and optionally any other Camtrap DP deployments column. DataError naming the file
    and the column or row otherwise."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"--deployments '{path}': no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"--deployments '{path}' is not a readable CSV file: {error}") from None
    table.columns = [c.strip() for c in table.columns]
    if "deploymentID" not in table.columns and "camera" in table.columns:
        table = table.rename(columns={"camera": "deploymentID"})
    for column in ("deploymentID", "latitude", "longitude"):
        if column not in table.columns:
            also = " (or 'camera', the camera folder name)" if column == "deploymentID" else ""
            raise DataError(f"--deployments '{path}': missing column '{column}'{also}; it has "
                            f"{', '.join(table.columns) or 'no columns'}")
    unknown = [c for c in table.columns if c not in DEPLOYMENT_COLUMNS]
    if unknown:
        raise DataError(f"--deployments '{path}': unknown column(s) {', '.join(map(repr, unknown))}; the Camtrap "
                        f"DP deployments columns are {', '.join(DEPLOYMENT_COLUMNS)}")
    table = table.apply(lambda column: column.str.strip())
    for line, row in zip(range(2, len(table) + 2), table.itertuples(index=False)):
        _check_deployment_row(path, line, row._asdict())
    duplicated = table["deploymentID"][table["deploymentID"].duplicated()]
    if len(duplicated):
        raise DataError(f"--deployments '{path}': deploymentID '{duplicated.iloc[0]}' is listed twice")
    return table


def _check_deployment_row(path: Path, line: int, row: dict) -> None:
    where = f"--deployments '{path}' line {line}"
    if not row["deploymentID"]:
        raise DataError(f"{where}: empty deploymentID")
    for column, limit in (("latitude", 90), ("longitude", 180)):
        try:
            value = float(row[column])
        except ValueError:
            raise DataError(f"{where}: {column} '{row[column]}' is not a number (decimal degrees, WGS84)") from None
        if not -limit <= value <= limit:
            raise DataError(f"{where}: {column} {value} is outside -{limit}..{limit}")
    for column in ("deploymentStart", "deploymentEnd"):
        if row.get(column):
            try:
                datetime.fromisoformat(row[column].replace("Z", "+00:00"))
            except ValueError:
                raise DataError(f"{where}: {column} '{row[column]}' is not an ISO 8601 time such as "
                                "2024-05-01T08:00:00+02:00") from None


def require_every_camera(supplied: pd.DataFrame, cameras, source: str | Path = "--deployments") -> None:
    """DataError unless the supplied deployments have a row for each camera folder."""
    missing = sorted(set(cameras) - set(supplied["deploymentID"]))
    if missing:
        raise DataError(f"{source}: no row for the camera folder(s) {', '.join(missing)} (deploymentID must "
                        "be the camera folder, as in the results' `camera` column)")


def deployments_table(results: pd.DataFrame, utc_offset: str | None = None,
                      supplied: pd.DataFrame | None = None, source: str | Path = "--deployments") -> pd.DataFrame:
    """deployments.csv: one row per camera folder of the results (plus any other deployment the supplied
    table lists, which then needs its own start and end). Start and end default to the camera's first
    and last photo; coordinates come only from `supplied`."""
    photos = results.drop_duplicates("file")
    spans = photos.groupby("camera")["datetime"].agg(["min", "max"])
    given = {row["deploymentID"]: row for row in (supplied.to_dict("records") if supplied is not None else [])}
    if supplied is not None:
        require_every_camera(supplied, spans.index, source)
    rows = []
    for camera in list(spans.index) + [d for d in given if d not in spans.index]:
        row = {column: "" for column in DEPLOYMENT_COLUMNS}
        row.update({k: v for k, v in given.get(camera, {}).items() if v != ""})
        row["deploymentID"] = camera
        for column, which in (("deploymentStart", "min"), ("deploymentEnd", "max")):
            if not row[column]:
                if camera not in spans.index:
                    raise DataError(f"{source}: deployment '{camera}' has no photos in --images and no {column}")
                row[column] = spans.at[camera, which]
            row[column] = timestamp(row[column], utc_offset)
        if not utc_offset and not row["timestampIssues"]:
            row["timestampIssues"] = "true"  # local times of an unknown timezone
        if supplied is None:
            row["deploymentComments"] = NO_COORDINATES_COMMENT
        rows.append(row)
    return pd.DataFrame(rows, columns=DEPLOYMENT_COLUMNS)


def has_coordinates(deployments: pd.DataFrame) -> bool:
    return bool(len(deployments)) and not deployments[["latitude", "longitude"]].map(_blank).any().any()


# ------------------------------------------------------------------------------------ datapackage.json
def spatial_coverage(deployments: pd.DataFrame) -> dict:
    """GeoJSON of the deployments' coordinates: a Point for one location, else their bounding box.
    Without coordinates an empty GeometryCollection, valid GeoJSON that claims no location."""
    if not has_coordinates(deployments):
        return {"type": "GeometryCollection", "geometries": []}
    lon, lat = deployments["longitude"].astype(float), deployments["latitude"].astype(float)
    west, east, south, north = lon.min(), lon.max(), lat.min(), lat.max()
    if west == east and south == north:
        return {"type": "Point", "coordinates": [west, south]}
    return {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                [west, south]]]}


def temporal_coverage(deployments: pd.DataFrame) -> dict:
    """First deployment's start date and last deployment's end date (YYYY-MM-DD, the cameras' local dates)."""
    return {"start": min(deployments["deploymentStart"])[:10], "end": max(deployments["deploymentEnd"])[:10]}


def taxonomic_coverage(observations: pd.DataFrame) -> list[dict]:
    names = sorted({n for n in observations["scientificName"] if n})
    return [{"scientificName": name} for name in names]


def parse_contributor(text: str) -> dict:
    """'NAME' or 'NAME:ROLE' (a Camtrap DP role) as a Data Package contributor."""
    title, _, role = text.rpartition(":") if ":" in text else (text, "", "contributor")
    title, role = title.strip(), role.strip() or "contributor"
    if not title:
        raise ReidError(f"--contributor '{text}': give a name, e.g. --contributor 'Ana Silva:principalInvestigator'")
    if role not in CONTRIBUTOR_ROLES:
        raise ReidError(f"--contributor '{text}': role '{role}' is not one of {', '.join(CONTRIBUTOR_ROLES)}")
    return {"title": title, "role": role}


def default_contributor() -> dict:
    """The user running the export, so that `contributors` (required) is never empty."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (some containers)
        name = "unknown"
    return {"title": name, "role": "contributor"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "package"


def _wildreid_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wildreid")
    except PackageNotFoundError:
        return "unknown"


def package_description(coordinates: bool, utc_offset: str | None) -> str:
    """What the package is, and what a user must fill in before publishing it."""
    notes = ["Camera trap photos identified by wildreid identify-batch: one media-level observation per "
             "detection; individualID is the wildreid store's individual id of a match."]
    if not coordinates:
        notes.append("Deployment coordinates are missing: wildreid was not given a deployments file, so "
                     "deployments.csv leaves latitude and longitude empty (Camtrap DP requires them) and spatial "
                     "is empty. Fill them in (or rerun with --deployments) before publishing.")
    if not utc_offset:
        notes.append("The cameras' UTC offset is unknown: timestamps are local times without a timezone designator "
                     "(Camtrap DP requires one); rerun with --utc-offset.")
    notes.append(f"project.samplingDesign ({DEFAULT_SAMPLING_DESIGN}) and captureMethod ({DEFAULT_CAPTURE_METHOD}) "
                 "are defaults: review them. Media files are referenced on the machine that ran the batch "
                 "(file: URLs unless inside the package) and are not public.")
    return " ".join(notes)


def package_descriptor(folder: Path, deployments: pd.DataFrame, observations: pd.DataFrame,
                       utc_offset: str | None, contributors: list[dict] | None = None,
                       project_title: str | None = None, identity: str = "") -> dict:
    """datapackage.json. `identity` (e.g. the images and output paths) makes the package and project
    ids stable across reruns of the same job."""
    key = identity or str(folder.resolve())
    title = project_title or f"wildreid identify-batch of {folder.name}"
    return {
        "profile": PROFILE_URL,
        "name": _slug(f"wildreid-{folder.name}"),
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "wildreid-package:" + key)),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "title": title,
        "description": package_description(has_coordinates(deployments), utc_offset),
        "contributors": contributors or [default_contributor()],
        "sources": [{"title": "wildreid", "version": _wildreid_version()}],
        "project": {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "wildreid-project:" + key)),
            "title": title,
            "samplingDesign": DEFAULT_SAMPLING_DESIGN,
            "captureMethod": [DEFAULT_CAPTURE_METHOD],
            "individualAnimals": True,
            "observationLevel": ["media"],
        },
        "spatial": spatial_coverage(deployments),
        "temporal": temporal_coverage(deployments),
        "taxonomic": taxonomic_coverage(observations),
        "resources": [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource", "format": "csv",
                       "mediatype": "text/csv", "encoding": "utf-8", "schema": TABLE_SCHEMA_URLS[name]}
                      for name in TABLES],
    }


# ------------------------------------------------------------------------------------ writing
def write_camtrap_dp(folder: str | Path, results: pd.DataFrame, images: str | Path, utc_offset: str | None = None,
                     deployments: str | Path | None = None, contributors: list[dict] | None = None,
                     project_title: str | None = None, identity: str = "") -> WrittenPackage:
    """Write the package; `deployments` is the user's deployments CSV, if any. Each file is written
    atomically, datapackage.json last: a package interrupted mid-export keeps the previous descriptor
    or none, never a descriptor for tables that are not there."""
    folder = Path(folder)
    supplied = read_deployments(deployments) if deployments is not None else None
    deployment_rows = deployments_table(results, utc_offset, supplied, deployments or "--deployments")
    observation_rows = observations_table(results, utc_offset)
    tables = {"deployments": deployment_rows, "media": media_table(results, images, utc_offset, folder),
              "observations": observation_rows}
    written = []
    for name in TABLES:
        with atomic_path(folder / f"{name}.csv") as tmp:
            tables[name].to_csv(tmp, index=False)
        written.append(folder / f"{name}.csv")
    descriptor = package_descriptor(folder, deployment_rows, observation_rows, utc_offset, contributors,
                                    project_title, identity)
    write_text(folder / "datapackage.json", to_json(descriptor, indent=2) + "\n")
    written.append(folder / "datapackage.json")
    warnings = []
    if supplied is None:
        warnings.append(f"{folder / 'deployments.csv'} has no coordinates (Camtrap DP requires them): pass "
                        "--deployments FILE with deploymentID (the camera folder), latitude and longitude, or fill "
                        "them in before publishing")
    return WrittenPackage(folder, tuple(written), warnings)


# ------------------------------------------------------------------------------------ validation
def validate_package(folder: str | Path, schemas_dir: str | Path) -> list[str]:
    """Errors of the Camtrap DP package in `folder` (empty when it is valid), checked with frictionless
    against the local 1.0 profile and table schemas in `schemas_dir`, with no download.

    Two passes: the descriptor as written (the real 1.0 URLs) against the profile, then the tables against
    the table schemas named by their URLs, read from `schemas_dir` instead."""
    _require_frictionless()
    folder, schemas_dir = Path(folder), Path(schemas_dir)
    try:
        descriptor = json.loads((folder / "datapackage.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{folder}: no datapackage.json"]
    except json.JSONDecodeError as error:
        return [f"{folder / 'datapackage.json'}: not JSON ({error})"]
    with tempfile.TemporaryDirectory(prefix="camtrap-dp-") as scratch:
        errors = _profile_errors(descriptor, schemas_dir, Path(scratch))
        return errors + _table_errors(descriptor, folder, schemas_dir)


def _require_frictionless() -> None:
    try:
        import frictionless  # noqa: F401
    except ImportError:
        raise ReidError("validating a Camtrap DP package needs frictionless: pip install frictionless "
                        "(or wildreid[dev])") from None


def _local_copy(url: object, schemas_dir: Path) -> Path | None:
    """The file of schemas_dir that a Camtrap DP 1.0 URL names, if we ship it."""
    if not isinstance(url, str) or not url.startswith(SPEC_BASE_URL):
        return None
    path = schemas_dir / url[len(SPEC_BASE_URL):]
    return path if path.is_file() else None


def _offline_profile(profile: Path, scratch: Path) -> Path:
    """A copy of the 1.0 profile that frictionless can use without a network.

    - `#$defs/version` becomes `#/$defs/version`: the same fix Camtrap DP 1.0.1 made, without which
      frictionless 5.17 and later cannot resolve the reference.
    - The generic Data Package profile it includes is dropped: frictionless checks those rules itself
      (the second pass opens the package as a Data Package).
    - The GeoJSON schema is the copy frictionless ships (the one schemastore served), minus its `id`,
      which would make its inner references point at the network.
    """
    from frictionless import settings

    text = profile.read_text(encoding="utf-8").replace('"#$defs/version"', '"#/$defs/version"')
    schema = json.loads(text)
    schema["allOf"] = [part for part in schema["allOf"] if part != {"$ref": DATA_PACKAGE_PROFILE_URL}]
    geojson = {k: v for k, v in copy.deepcopy(settings.GEOJSON_PROFILE).items() if k != "id"}
    (scratch / "geojson.json").write_text(json.dumps(geojson), encoding="utf-8")
    text = json.dumps(schema).replace(json.dumps(GEOJSON_PROFILE_URL), json.dumps("geojson.json"))
    local = scratch / "camtrap-dp-profile.json"
    local.write_text(text, encoding="utf-8")
    return local


def _profile_errors(descriptor: dict, schemas_dir: Path, scratch: Path) -> list[str]:
    from frictionless import FrictionlessException, Metadata, system

    profile = _local_copy(descriptor.get("profile"), schemas_dir)
    if profile is None:
        return [f"datapackage.json: profile {descriptor.get('profile')!r} is not the Camtrap DP "
                f"{CAMTRAP_DP_VERSION} profile ({PROFILE_URL})"]
    local = _offline_profile(profile, scratch)
    try:
        with system.use_context(trusted=True):  # our own files: local $refs outside the working directory
            # the base class checks against the given profile only (Package's own would open resources)
            errors = list(Metadata.metadata_validate(descriptor, profile=str(local)))
    except FrictionlessException as error:
        return [f"datapackage.json: {error.error.note}"]
    return [f"datapackage.json: {error.note}" for error in errors]


def open_package(folder: str | Path, schemas_dir: str | Path):
    """The package in `folder` as a frictionless Package whose Camtrap DP table schemas are read from
    `schemas_dir` (no download). Use it inside `frictionless.system.use_context(trusted=True)`: the
    schemas and the media's file: URLs lie outside the working directory. ReidError when a resource's
    schema is not a Camtrap DP 1.0 table schema we ship."""
    _require_frictionless()
    from frictionless import Package

    folder, schemas_dir = Path(folder), Path(schemas_dir)
    descriptor = json.loads((folder / "datapackage.json").read_text(encoding="utf-8"))
    return Package(_local_descriptor(descriptor, schemas_dir), basepath=str(folder))


def _local_descriptor(descriptor: dict, schemas_dir: Path) -> dict:
    local = copy.deepcopy(descriptor)
    local.pop("profile", None)  # checked by _profile_errors; here the package is a plain Data Package
    for resource in local.get("resources", []):
        schema = _local_copy(resource.get("schema"), schemas_dir)
        if resource.get("name") in TABLES and schema is None:
            raise ReidError(f"datapackage.json: resource {resource.get('name')!r} has schema "
                            f"{resource.get('schema')!r}, not a Camtrap DP {CAMTRAP_DP_VERSION} table schema")
        if schema is not None:
            resource["schema"] = json.loads(schema.read_text(encoding="utf-8"))
    return local


def _table_errors(descriptor: dict, folder: Path, schemas_dir: Path) -> list[str]:
    from frictionless import FrictionlessException, Package, system

    try:
        local = _local_descriptor(descriptor, schemas_dir)
        with system.use_context(trusted=True):
            report = Package(local, basepath=str(folder)).validate()
    except ReidError as error:
        return [str(error)]
    except FrictionlessException as error:
        return [f"datapackage.json: {error.error.note}"]
    return [_readable(task.name, error) for task in report.tasks for error in task.errors] + \
        [f"datapackage.json: {error.message}" for error in report.errors]


def _readable(resource: str, error) -> str:
    """'observations.csv row 3, field observationType: ...' from a frictionless error."""
    where = f"{resource}.csv"
    row, field_name = getattr(error, "row_number", None), getattr(error, "field_name", None)
    if row:
        where += f" row {row}"
    if field_name:
        where += f", field {field_name}"
    return f"{where}: {error.message}"
