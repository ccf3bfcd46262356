"""Detectors: the whole-image fallback, and MegaDetector's real loading and inference path on
untrained networks of its v6 family (ultralytics YOLOv9, YOLOv10, RT-DETR), offline."""
from __future__ import annotations

import socket
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from reid.errors import ReidError
from reid.species.detector import ULTRALYTICS_ENV, MegaDetector, WholeImageDetector, detect_images
from reid.species.megadetector import NO_DETECTION


def test_whole_image_detector_makes_every_readable_image_one_animal(tmp_path):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    table = detect_images(WholeImageDetector(), ["a.jpg", "broken.jpg"], root=tmp_path)
    assert table.loc[0, ["file", "detection", "category", "conf", "x", "y", "w", "h"]].tolist() == [
        "a.jpg", 0, "animal", 1.0, 0.0, 0.0, 1.0, 1.0]
    assert table.loc[1, "detection"] == NO_DETECTION and "cannot read image" in table.loc[1, "failure"]


def test_without_ultralytics_the_error_names_the_extra(tmp_path, monkeypatch):
    weights = tmp_path / "md.pt"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import fails as if not installed
    with pytest.raises(ReidError, match=r'pip install "wildreid\[detector\]"'):
        MegaDetector(weights)


def test_missing_weights_are_refused_before_ultralytics_could_download_them(tmp_path):
    with pytest.raises(ReidError, match="MegaDetector weights file .*md_v6.pt' not found"):
        MegaDetector(tmp_path / "md_v6.pt")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Any attempt to reach the network fails the test; ultralytics' settings stay in tmp.

    The test builds its network with ultralytics before MegaDetector imports it, so the settings
    MegaDetector gives ultralytics on import are set here already.
    """
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    for name, value in ULTRALYTICS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics-settings"))
    monkeypatch.chdir(tmp_path)


def _untrained_megadetector(path, arch: str) -> None:
    """A MegaDetector-shaped network (3 classes), untrained, saved as ultralytics saves checkpoints."""
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    network = tasks.RTDETRDetectionModel if arch.startswith("rtdetr") else tasks.DetectionModel
    model = network(arch, nc=3, verbose=False)
    model.names = {0: "animal", 1: "person", 2: "vehicle"}
    torch.save({"model": model, "train_args": {"imgsz": 160}}, path)


@pytest.mark.parametrize("arch", ["yolov9t.yaml", "yolov10n.yaml", "rtdetr-l.yaml"])
def test_megadetector_loads_a_local_network_and_returns_normalised_boxes(offline, tmp_path, arch):
    weights = tmp_path / "mdv6-untrained.pt"
    _untrained_megadetector(weights, arch)
    before = set(tmp_path.iterdir())
    detector = MegaDetector(weights, threshold=0.001, image_size=160)
    assert type(detector.model).__name__ == ("RTDETR" if arch.startswith("rtdetr") else "YOLO")
    image = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    found = detector.detect(image)
    assert found, "an untrained network still scores some boxes above 0.001"
    for detection in found:
        assert detection.category in {"animal", "person", "vehicle"} and 0.001 <= detection.conf <= 1
        x, y, w, h = detection.bbox
        assert 0 <= x <= 1 and 0 <= y <= 1 and w >= 0 and h >= 0 and x + w <= 1 + 1e-6 and y + h <= 1 + 1e-6
    assert set(tmp_path.iterdir()) - before <= {tmp_path / "ultralytics-settings"}  # no runs/ folder, no downloads


def test_a_megadetector_v5_file_gets_a_clear_error(offline, tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    # MDv5 files pickle classes of the yolov5 repository (models.yolo.Model), absent here
    models, yolo = types.ModuleType("models"), types.ModuleType("models.yolo")
    yolo.Model = type("Model", (torch.nn.Module,), {"__module__": "models.yolo"})
    monkeypatch.setitem(sys.modules, "models", models)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    torch.save({"model": yolo.Model()}, tmp_path / "md_v5a.0.0.pt")
    monkeypatch.delitem(sys.modules, "models")
    monkeypatch.delitem(sys.modules, "models.yolo")
    with pytest.raises(ReidError, match="is a MegaDetector v5 .* use a MegaDetector v6 file"):
        MegaDetector(tmp_path / "md_v5a.0.0.pt")


def test_the_service_runs_megadetector_on_full_frames(offline, tmp_path, tiny_checkpoint):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from service.testing import encode

    weights = tmp_path / "mdv6-untrained.pt"
    _untrained_megadetector(weights, "yolov9t.yaml")
    # every box an untrained network scores is kept, so that animals, people and vehicles all occur
    settings = Settings(store_dir=tmp_path / "store", checkpoint=tiny_checkpoint, detector=weights,
                        detection_thresholds={"animal": 0.001, "person": 0.001, "vehicle": 0.001}, min_crop_px=0)
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service
        assert client.get("/ready").json()["detector"] == "megadetector"
        expected = service.models.detector.detect(image)
        headers = {"Authorization": f"Bearer {service.store.create_key('k')[1]}"}
        r = client.post("/v1/individuals", data={"name": "A", "species": "zebra", "bbox": "0.1,0.1,0.5,0.5"},
                        files=[("images", ("a.png", encode(image, "PNG"), "image/png"))], headers=headers)
        assert r.status_code == 201, r.text
        r = client.post("/v1/identify", data={"species": "zebra"},
                        files=[("images", ("frame.png", encode(image, "PNG"), "image/png"))])
        assert r.status_code == 200, r.text
        result = r.json()
        animals = [d for d in expected if d.category == "animal"]
        assert animals, "an untrained network still scores some animal boxes above 0.001"
        assert len(result["animals"]) == len(animals) and result["photos"][0]["animals"] == len(animals)
        assert result["photos"][0]["humans"] == sum(d.category == "person" for d in expected)
        assert all(a["detector"] == "megadetector" for a in result["animals"])
        # ultralytics patches PIL.Image.open to install a plugin on unreadable files: still a clear 4xx
        r = client.post("/v1/identify", data={"species": "zebra"},
                        files=[("images", ("x.jpg", b"not an image at all", "image/jpeg"))])
        assert r.status_code == 415, r.text
