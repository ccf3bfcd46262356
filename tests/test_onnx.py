"""ONNX export (`reid export`) and ONNX Runtime serving: an exported model embeds the same photos as its
checkpoint to float rounding, carries the checkpoint's record and fingerprint, and answers the service
and identify-batch as the checkpoint does; a damaged or foreign .onnx is a clear error."""
from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from reid.checkpoint import inference_model, load_checkpoint, load_inference, save_checkpoint, save_untrained
from reid.cli import main
from reid.data.dataset import read_image
from reid.data.table import load_table
from reid.embedding import EmbeddingCache, Embedder
from reid.errors import ReidError
from reid.export import onnx as onnx_export
from reid.export.onnx import export_onnx
from reid.export.onnx_format import ONNX_KIND, PARITY_MIN_COSINE
from reid.embedding.onnx_runtime import OnnxModel, load_onnx
from reid.species.batch import enroll_ground_truth
from reid.species.routing import Router
from reid.species.scenes import make_synthetic_scenes
from service.app import create_app
from service.settings import Settings
from tests.conftest import tiny_config

CAT = "spotted-cat"
# what `reid calibrate` stores: flip TTA (which stays outside the ONNX graph), k-reciprocal re-ranking, thresholds
POSTPROCESSING = {"tta": "hflip", "rerank": {"dba": 0, "qe": 0, "qe_alpha": 3.0, "k_reciprocal": True, "k1": 3,
                                             "k2": 2, "lambda_value": 0.3}}
CALIBRATION = {"match_threshold": 0.95, "new_threshold": 0.6, "precision": 0.95}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny checkpoint as `reid calibrate` and learned whitening leave it, and its ONNX export."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = save_untrained(folder / "best.pt", tiny_config(), seed=3)
    state = load_checkpoint(checkpoint)
    state.update(calibration=CALIBRATION, postprocessing=POSTPROCESSING, identities=["ann", "bo", "cy"],
                 whitening={"images": 48, "shrink": 1.0, "before": {"mAP": 0.5}, "after": {"mAP": 0.6}})
    save_checkpoint(checkpoint, state)
    return checkpoint, export_onnx(checkpoint, folder / "best.onnx").path


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("backbone", ["test_resnet", "vit_tiny_patch16_224"])
def test_onnx_runtime_embeds_the_crops_as_pytorch_does(tmp_path, synth_csv, backbone):
    overrides = [f"model.backbone={backbone}"]
    if backbone.startswith("vit"):
        overrides.append("model.backbone_kwargs={img_size: 64}")  # the ViT at the test images' size
    checkpoint = save_untrained(tmp_path / "best.pt", tiny_config(*overrides), seed=1)
    exported = export_onnx(checkpoint, tmp_path / "model.onnx")
    assert exported.parity_min_cosine >= PARITY_MIN_COSINE
    paths = load_table(synth_csv)["path"].tolist()  # 48 photos: batches of 32 and 16, neither the traced 2
    for tta in ("none", "hflip"):
        reference = Embedder.from_checkpoint(checkpoint, tta=tta)
        runtime = Embedder.from_checkpoint(exported.path, tta=tta)
        assert isinstance(runtime.model, OnnxModel) and runtime.fingerprint == reference.fingerprint
        pytorch, ort = reference.embed_paths(paths), runtime.embed_paths(paths)
        assert ort.shape == pytorch.shape == (len(paths), 32)
        assert cosines(pytorch, ort).min() >= PARITY_MIN_COSINE
        crops = [read_image(p) for p in paths[:5]]  # decoded uploads, as the service embeds them
        assert cosines(reference.embed_images(crops), runtime.embed_images(crops)).min() >= PARITY_MIN_COSINE


# ------------------------------------------------------------------------------------ metadata
def test_the_export_carries_the_checkpoints_record_and_fingerprint(calibrated):
    checkpoint, exported = calibrated
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert props["kind"] == f'"{ONNX_KIND}"' and props["format"] == "2"
    state = load_checkpoint(checkpoint)
    _, record = load_onnx(exported)
    for key in ("config", "preprocessing", "calibration", "postprocessing", "whitening", "identities", "class_mode"):
        assert record[key] == state[key], key
    assert record["identity_count"] == 3 and record["source_checkpoint"] == str(checkpoint)

    pytorch, runtime = Embedder.from_checkpoint(checkpoint), Embedder.from_checkpoint(exported)
    assert runtime.describe() == pytorch.describe() and runtime.fingerprint == pytorch.fingerprint == \
        record["fingerprint"]
    assert runtime.tta == "hflip"  # the calibrated TTA, applied around the graph
    assert runtime.thresholds == pytorch.thresholds == {"match_threshold": 0.95, "new_threshold": 0.6}
    assert runtime.postprocessing == POSTPROCESSING
    assert (runtime.batch_size, runtime.num_workers) == (pytorch.batch_size, pytorch.num_workers)


def test_an_embedding_cache_of_the_checkpoint_goes_on_with_its_export(tmp_path, calibrated, synth_csv):
    checkpoint, exported = calibrated
    table = load_table(synth_csv)
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.update(Embedder.from_checkpoint(checkpoint), table.iloc[:8], chunk_size=4, progress=False)
    both = cache.update(Embedder.from_checkpoint(exported), table.iloc[:12], chunk_size=4, progress=False)
    assert np.array_equal(both[:8], first)  # kept, not embedded again: the same model
    fresh = Embedder.from_checkpoint(checkpoint).embed_paths(table["path"].iloc[8:12].tolist())
    assert cosines(both[8:], fresh).min() >= PARITY_MIN_COSINE


def test_the_graph_normalises_uint8_pixels_and_a_format_1_export_of_floats_is_still_read(tmp_path, calibrated,
                                                                                          synth_csv):
    checkpoint, exported = calibrated
    state = load_inference(checkpoint)
    size = state["preprocessing"]["image_size"]
    # what format 1 wrote: the bare model, on the normalised float batch
    graph = onnx.load_from_string(onnx_export._trace(inference_model(state).eval(), torch.randn(2, 3, size, size),
                                                     onnx_export.DEFAULT_OPSET, checkpoint))
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    onnx.helper.set_model_props(graph, {**props, "format": "1"})
    onnx.save(graph, str(tmp_path / "format1.onnx"))
    old, new = Embedder.from_checkpoint(tmp_path / "format1.onnx"), Embedder.from_checkpoint(exported)
    assert new.model.session.get_inputs()[0].type == "tensor(uint8)" and new.model.normalizes_input
    assert old.model.session.get_inputs()[0].type == "tensor(float)" and not old.model.normalizes_input
    paths = load_table(synth_csv)["path"].iloc[:6].tolist()
    reference = Embedder.from_checkpoint(checkpoint).embed_paths(paths)
    for runtime in (old, new):
        assert cosines(runtime.embed_paths(paths), reference).min() >= PARITY_MIN_COSINE
    with pytest.raises(ValueError, match="takes uint8 pixels"):
        new.model(torch.zeros(1, 3, size, size))


def test_an_export_that_disagrees_with_pytorch_is_not_written(tmp_path, calibrated, monkeypatch):
    monkeypatch.setattr(onnx_export, "_min_cosine", lambda *args: 0.5)
    with pytest.raises(ReidError, match="embeds differently from PyTorch.*nothing was written"):
        export_onnx(calibrated[0], tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ side by side
def test_streams_share_the_threads_and_embed_as_one_batch_on_every_core_does(calibrated, synth_csv):
    _, exported = calibrated
    model, record = load_onnx(exported, threads=4, streams=8)
    assert model.streams == 4  # never more streams than threads: each runs on at least one
    assert model.session.get_session_options().intra_op_num_threads == 1
    # loader workers decode in place of the streams' threads: one batch then takes every core
    assert Embedder.from_checkpoint(exported, num_workers=1, side_by_side=True).model.streams == 1
    paths = load_table(synth_csv)["path"].tolist()
    whole = Embedder.from_checkpoint(exported, batch_size=10)
    # 48 photos in batches of at most 5 a stream: ten batches of 4 or 5, nothing idles at the end
    streamed = Embedder.from_record(model, record, whole.fingerprint, None, 10, 0, torch.device("cpu"))
    for subset in (paths, paths[:1], paths[:7], []):
        reference, side_by_side = whole.embed_paths(subset), streamed.embed_paths(subset)
        assert side_by_side.shape == reference.shape == (len(subset), whole.embedding_dim)
        np.testing.assert_allclose(side_by_side, reference, atol=1e-6)  # in order, every photo once
    sizes = [len(batch) for batch in streamed.iter_paths(paths)]
    assert sum(sizes) == 48 and len(sizes) % 4 == 0 and max(sizes) - min(sizes) <= 1


def test_streams_raise_a_bad_photo_in_turn_and_stop_with_their_consumer(tmp_path, calibrated, synth_csv):
    from reid.embedding.compute import iter_embeddings
    from reid.errors import DataError

    _, exported = calibrated
    embedder = Embedder.from_checkpoint(exported, batch_size=4, side_by_side=True)
    embedder.model.streams = 2  # whatever this machine's thread count, two streams take turns
    paths = load_table(synth_csv)["path"].tolist()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        embedder.embed_paths(paths[:9] + [str(broken)] + paths[9:20])

    read = []

    class Counted(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            read.append(i)
            return self.dataset[i]

    batches = iter_embeddings(embedder.model, Counted(embedder._dataset(paths)), 4, torch.device("cpu"),
                              pixels=embedder.pixels)
    assert len(next(batches)) == 2  # a stream's share of the batch of 4
    batches.close()
    # the first batch and the four queued behind it at most (those not started are cancelled): not all 48
    assert len(read) <= 5 * 2


# ------------------------------------------------------------------------------------ command line
def test_export_command_and_a_clear_error_for_a_damaged_or_foreign_onnx(tmp_path, calibrated, synth_csv, capsys):
    checkpoint, _ = calibrated
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model {Embedder.from_checkpoint(checkpoint).fingerprint}, as the checkpoint's" in printed
    assert main(["embed", "--checkpoint", str(out), "--data", str(synth_csv), "--out", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    assert "TTA: hflip (chosen by `reid calibrate`" in capsys.readouterr().out

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model.pt")]) == 2
    assert "with the .onnx suffix" in capsys.readouterr().err

    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(out.read_bytes()[:4096])
    foreign = tmp_path / "foreign.onnx"
    tensor = onnx.helper.make_tensor_value_info
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(  # a valid ONNX model of someone else's
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "other", [tensor("x", onnx.TensorProto.FLOAT, [1, 3])],
        [tensor("y", onnx.TensorProto.FLOAT, [1, 3])])), str(foreign))
    for path, message in ((damaged, "is unreadable"), (foreign, "is an ONNX model but not one of wildreid")):
        for argv in (["embed", "--checkpoint", str(path), "--data", str(synth_csv), "--out", str(tmp_path / "c2")],
                     ["serve", "--store", str(tmp_path / "store"), "--checkpoint", str(path)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"'{path}'" in err and message in err and "reid export --checkpoint best.pt" in err
            assert "Traceback" not in err


# ------------------------------------------------------------------------------------ serving
def _identify(client, blob: bytes) -> dict:
    r = client.post("/v1/identify", data={"species": "zebra", "top_k": 3},
                    files=[("images", ("q.jpg", blob, "image/jpeg"))])
    assert r.status_code == 200, r.text
    return r.json()["animals"][0]


def test_the_service_answers_from_the_export_as_from_its_checkpoint(tmp_path, calibrated, synth_csv):
    """A store enrolled by the checkpoint is served by its export as it is (same model stamp: nothing is
    embedded again), with the checkpoint's thresholds, TTA and re-ranking, and the same candidates."""
    checkpoint, exported = calibrated
    table = pd.read_csv(synth_csv)
    photos = [[(synth_csv.parent / p).read_bytes() for p in group["path"]] for _, group in table.groupby("identity")]
    answers, ready = {}, {}
    for name, model in (("checkpoint", checkpoint), ("onnx", exported)):
        with TestClient(create_app(Settings(store_dir=tmp_path / "store", checkpoint=model))) as client:
            if name == "checkpoint":
                headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
                for n, blobs in enumerate(photos[:6]):
                    r = client.post("/v1/individuals", data={"name": f"ind{n}", "species": "zebra"},
                                    files=[("images", ("a.jpg", blobs[0], "image/jpeg"))], headers=headers)
                    assert r.status_code == 201, r.text
            ready[name] = client.get("/ready").json()["models"][0]
            answers[name] = [_identify(client, blobs[1]) for blobs in photos[:6]]
    assert ready["onnx"]["checkpoint"].endswith("best.onnx")
    for key in ("model", "tta", "embedding_dim", "thresholds", "rerank"):
        assert ready["onnx"][key] == ready["checkpoint"][key], key
    assert ready["onnx"]["thresholds"]["source"] == "checkpoint" and ready["onnx"]["tta"] == "hflip"
    for pytorch, runtime in zip(answers["checkpoint"], answers["onnx"]):
        assert runtime["decision"] == pytorch["decision"] and runtime["rerank"] == pytorch["rerank"]
        ids = [[c["individual_id"] for c in answer["candidates"]] for answer in (runtime, pytorch)]
        assert ids[0] == ids[1]
        for a, b in zip(runtime["candidates"], pytorch["candidates"]):
            assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-4)
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_identify_batch_with_the_export_gives_the_checkpoints_matches(tmp_path, calibrated, capsys):
    checkpoint, exported = calibrated
    scenes = make_synthetic_scenes(tmp_path / "scenes", frames=12, individuals_per_species=2, seed=3, progress=False)
    store = tmp_path / "store"
    assert enroll_ground_truth(tmp_path / "scenes", store, Router.single(checkpoint, CAT))
    results = {}
    for name, model in (("checkpoint", checkpoint), ("onnx", exported)):
        out = tmp_path / f"{name}.csv"
        capsys.readouterr()
        code = main(["identify-batch", "--images", str(scenes.images), "--detections", str(scenes.detections),
                     "--species", CAT, "--checkpoint", str(model), "--store", str(store), "--out", str(out),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "embedded by another model" not in err  # the store's vectors are the export's too
        results[name] = pd.read_csv(out, keep_default_na=False)
    pytorch, runtime = results["checkpoint"], results["onnx"]
    assert (pytorch["decision"] == "match").any()
    scored = ["score", "species_score", "conf"]
    exact = [c for c in pytorch.columns if c not in scored]
    pd.testing.assert_frame_equal(runtime[exact], pytorch[exact])
    numbers = lambda column: pd.to_numeric(column.replace("", np.nan))  # noqa: E731
    assert np.allclose(numbers(runtime["score"]), numbers(pytorch["score"]), atol=1e-4, equal_nan=True)
