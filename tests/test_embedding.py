"""Embedding: flip TTA, the chunked cache (reuse, new images only, model change, SIGKILL resume)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reid.data.dataset import read_image
from reid.data.table import load_table
from reid.embedding import EmbeddingCache, Embedder, flank_warning
from reid.embedding.tta import TTA_VIEWS, views
from tests.conftest import write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _square_images(n: int = 3, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_views_flip_the_right_axes():
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flipped = views(batch, "flip4")
    assert len(flipped) == 4 and torch.equal(flipped[0], batch)
    assert torch.equal(flipped[1], batch.flip(3)) and torch.equal(flipped[3], batch.flip(2).flip(3))


@pytest.mark.parametrize("tta,flip", [("hflip", np.fliplr), ("flip4", np.flipud)])
def test_flip_tta_makes_embeddings_flip_invariant(tiny_checkpoint, tta, flip):
    images = _square_images()
    mirrored = [np.ascontiguousarray(flip(image)) for image in images]
    plain = Embedder.from_checkpoint(tiny_checkpoint, tta="none")
    assert not np.allclose(plain.embed_images(images), plain.embed_images(mirrored), atol=1e-3)
    embedder = Embedder.from_checkpoint(tiny_checkpoint, tta=tta)
    np.testing.assert_allclose(embedder.embed_images(images), embedder.embed_images(mirrored), atol=1e-5)
    norms = np.linalg.norm(embedder.embed_images(images), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_uint8_batches_normalised_per_batch_embed_as_the_normalising_transform_does(tiny_checkpoint):
    from reid.data.transforms import build_transforms
    from reid.embedding import embed_batch

    embedder = Embedder.from_checkpoint(tiny_checkpoint, tta="hflip")
    images = _square_images(4, size=50)
    assert embedder.transform(image=images[0])["image"].dtype == torch.uint8
    normalising = build_transforms(embedder.image_size, embedder.mean, embedder.std, train=False, hflip=False)
    floats = torch.stack([normalising(image=image)["image"] for image in images])
    reference = embed_batch(embedder.model, floats, embedder.device, embedder.tta).numpy()
    np.testing.assert_allclose(embedder.embed_images(images), reference, atol=1e-5)
    with pytest.raises(ValueError, match="mean and std"):
        embed_batch(embedder.model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), embedder.device)


def test_large_jpegs_decode_at_a_reduced_scale_as_the_identification_core_decodes_them(tmp_path, tiny_checkpoint):
    from PIL import Image

    from reid.identify.photos import decode_upload

    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    rng = np.random.default_rng(1)
    photo = tmp_path / "big.jpg"
    size = 9 * embedder.draft_size  # big enough for the 1/8 DCT scale
    coarse = rng.integers(0, 255, (size // 40, size // 30, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((size * 4 // 3, size), Image.Resampling.BILINEAR).save(photo, quality=90)
    assert min(read_image(str(photo), draft_size=embedder.draft_size).shape[:2]) < size // 7
    upload = decode_upload(photo.read_bytes(), 0, photo.name, 10**9, ("JPEG",), embedder.draft_size)
    np.testing.assert_allclose(embedder.embed_paths([str(photo)]), embedder.embed_images([upload.array]), atol=1e-5)


def test_decoding_ahead_keeps_order_raises_errors_in_turn_and_stops_with_its_consumer():
    import threading

    from reid.embedding.compute import decoded_ahead

    assert list(decoded_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise OSError("broken.jpg")

    seen = []
    with pytest.raises(OSError, match="broken.jpg"):
        for item in decoded_ahead(failing()):
            seen.append(item)
    assert seen == [1, 2]

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    batches = decoded_ahead(endless())
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()
    assert len(produced) <= 6  # one batch ahead, not the whole source
    assert not any(t.name == "decode-ahead" for t in threading.enumerate())


def test_a_bad_image_met_while_decoding_ahead_names_the_file(tmp_path, tiny_checkpoint):
    from PIL import Image

    from reid.errors import DataError

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    embedder = Embedder.from_checkpoint(tiny_checkpoint, batch_size=1)
    assert embedder.num_workers == 0
    with pytest.raises(DataError, match="bad.jpg"):
        embedder.embed_paths([str(good), str(tmp_path / "bad.jpg")])


def test_fingerprint_depends_on_weights_and_tta(tmp_path, tiny_checkpoint):
    a = Embedder.from_checkpoint(tiny_checkpoint)
    assert a.fingerprint == Embedder.from_checkpoint(tiny_checkpoint).fingerprint
    assert a.fingerprint != Embedder.from_checkpoint(tiny_checkpoint, tta="hflip").fingerprint
    other = write_checkpoint(tmp_path / "other.pt", seed=1)
    assert a.fingerprint != Embedder.from_checkpoint(other).fingerprint


def test_flank_warning_only_when_flips_meet_flanks():
    table = pd.DataFrame({"path": ["a", "b"], "identity": ["x", "x"], "viewpoint": ["left", "right"]})
    assert "flank" in flank_warning(table, "hflip")
    assert flank_warning(table, "none") is None
    assert flank_warning(table.drop(columns="viewpoint"), "flip4") is None


def test_paths_and_images_give_the_same_embeddings(tiny_checkpoint, synth_csv):
    table = load_table(synth_csv).head(4)
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    from_paths = embedder.embed_paths(table["path"].tolist())
    from_images = embedder.embed_images([read_image(p) for p in table["path"]])
    np.testing.assert_allclose(from_paths, from_images, atol=1e-5)


def test_cache_reuses_vectors_and_embeds_only_new_images(tmp_path, tiny_checkpoint, synth_csv):
    table = load_table(synth_csv)
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    calls = []
    original = embedder.iter_paths
    embedder.iter_paths = lambda paths: calls.append(len(paths)) or original(paths)
    cache = EmbeddingCache(tmp_path / "cache")

    first = cache.update(embedder, table.iloc[:30], chunk_size=8, progress=False)
    assert calls == [30] and len(cache.chunk_files()) == 4  # one loader; chunks of 8, 8, 8, 6
    assert [len(np.load(p)["hashes"]) for p in cache.chunk_files()] == [8, 8, 8, 6]
    np.testing.assert_allclose(first, embedder.embed_paths(table["path"].iloc[:30].tolist()), atol=1e-6)

    calls.clear()
    again = cache.update(embedder, table, chunk_size=8, progress=False)  # 30 cached, the rest new
    assert sum(calls) == len(table) - 30
    np.testing.assert_array_equal(again[:30], first)

    moved = tmp_path / "moved.png"  # same content under another name: not embedded again
    moved.write_bytes(Path(table["path"].iloc[0]).read_bytes())
    calls.clear()
    renamed = cache.update(embedder, pd.DataFrame({"path": [str(moved)], "identity": ["x"]}), progress=False)
    assert calls == [] and np.array_equal(renamed[0], first[0])


def test_new_model_never_mixes_with_cached_vectors(tmp_path, tiny_checkpoint, synth_csv):
    table = load_table(synth_csv).head(10)
    cache = EmbeddingCache(tmp_path / "cache")
    old = cache.update(Embedder.from_checkpoint(tiny_checkpoint), table, chunk_size=4, progress=False)
    new_embedder = Embedder.from_checkpoint(write_checkpoint(tmp_path / "new.pt", seed=5))
    messages = []
    new = cache.update(new_embedder, table, chunk_size=4, progress=False, log=messages.append)
    assert any("another model" in m for m in messages)
    np.testing.assert_allclose(new, new_embedder.embed_paths(table["path"].tolist()), atol=1e-6)
    assert not np.allclose(new, old, atol=1e-3)
    assert len(cache.chunk_files()) == 3  # the old model's chunks are gone


def test_damaged_chunk_is_recomputed_not_trusted(tmp_path, tiny_checkpoint, synth_csv):
    table = load_table(synth_csv).head(8)
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    cache = EmbeddingCache(tmp_path / "cache")
    good = cache.update(embedder, table, chunk_size=4, progress=False)
    cache.chunk_files()[0].write_bytes(b"not a zip file")
    again = cache.update(embedder, table, chunk_size=4, progress=False)
    np.testing.assert_allclose(again, good, atol=1e-6)


def test_embed_resumes_after_sigkill_without_corrupt_chunks(tmp_path, synth_csv):
    # a model big enough that 48 single-image chunks take a few seconds on one thread
    ckpt = write_checkpoint(tmp_path / "best.pt", "model.backbone=resnet18", "data.image_size=160")
    out = tmp_path / "cache"
    args = [sys.executable, "-m", "reid.cli", "embed", "--checkpoint", str(ckpt), "--data", str(synth_csv),
            "--out", str(out), "--chunk", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("chunk_*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("chunk_*.npz")))
    total = len(load_table(synth_csv))
    assert 3 <= written < total, f"the kill should land mid-run ({written} of {total} chunks)"
    for chunk in out.glob("chunk_*.npz"):  # every chunk on disk is whole
        with np.load(chunk) as data:
            assert data["embeddings"].shape == (1, 32)

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"embedding {total - written} new images" in resumed.stdout
    assert not list(out.glob(".chunk_*.tmp"))
    table, emb = EmbeddingCache(out).load()
    reference = Embedder.from_checkpoint(ckpt).embed_paths(load_table(synth_csv)["path"].tolist())
    np.testing.assert_allclose(emb, reference, atol=1e-5)
    assert table["path"].tolist() == load_table(synth_csv)["path"].tolist()


def test_embed_names_a_missing_image(tmp_path, tiny_checkpoint):
    csv = tmp_path / "m.csv"
    csv.write_text("path,identity\nnope.jpg,a\n")
    proc = subprocess.run([sys.executable, "-m", "reid.cli", "embed", "--checkpoint", str(tiny_checkpoint),
                           "--data", str(csv), "--out", str(tmp_path / "c")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "nope.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_tta_choices_match_the_library():
    from reid import cli

    assert set(cli.TTA_CHOICES) == set(TTA_VIEWS)
