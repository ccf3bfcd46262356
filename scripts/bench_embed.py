"""Embedding throughput through the cache against a bare model forward on the same batches and TTA,
for the PyTorch model and for its ONNX export run by ONNX Runtime, in the same run.

`reid embed` adds file hashing, reduced-scale decoding and letterboxing (one batch ahead of the model,
in a thread on the CPU, in DataLoader workers beside an accelerator), normalisation of the uint8 batch,
chunked compressed writes and the manifest; the bare loop runs the model on ready tensors of the
same batch size with the same flip views. Their ratio is the share of the hardware the real
embedding path gets (target >= 0.95). Both run in this one process, so the ratio holds on a noisy
machine. The model is the config's architecture with random weights (speed does not depend on them).
`onnx_vs_pytorch` is ONNX Runtime's bare forward throughput over PyTorch's (> 1: ONNX Runtime is
faster; PyTorch may be on a GPU, ONNX Runtime is always on the CPU), with torch's thread setting
for both. Each engine is measured forward, embed, forward, and its embed is set against the mean of
its two forwards, so a machine that drifts during the run cancels out of each ratio; `--rounds`
repeats that and reports the median ratio beside each round's.

ONNX Runtime embeds as `reid embed` loads it: one single-threaded batch a core, side by side
(`onnx_streams`), each decoded by the thread that runs it. Its bare forward is measured that way and
as a service loads it (one batch on every core), and its embedding is set against the faster of the two.

    python scripts/bench_embed.py                                      # nyala-mobilenet on synthetic images
    python scripts/bench_embed.py --data ../shared/data/nyala-dev/metadata.csv --tta flip4

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.checkpoint import save_untrained  # noqa: E402
from reid.config import load_config  # noqa: E402
from reid.data.synth import make_synthetic_dataset  # noqa: E402
from reid.data.table import load_table  # noqa: E402
from reid.embedding import EmbeddingCache, Embedder, embed_batch  # noqa: E402
from reid.embedding.compute import model_streams, stream_batch_size  # noqa: E402
from reid.export.onnx import export_onnx  # noqa: E402


def bare_images_per_s(embedder: Embedder, n: int) -> float:
    """The model's throughput on a ready batch of what it takes: normalised floats for PyTorch, the
    uint8 pixels for an ONNX export, which normalises them in its graph. A model run as streams
    side by side (an ONNX export for batch jobs) runs its share of a batch in each, as it embeds."""
    streams = model_streams(embedder.model)
    shape = (stream_batch_size(embedder.batch_size, streams), 3, embedder.image_size, embedder.image_size)
    normalizes = getattr(embedder.model, "normalizes_input", False)
    batch = torch.randint(0, 256, shape, dtype=torch.uint8) if normalizes else torch.randn(shape)

    def forward(_: int) -> None:
        embed_batch(embedder.model, batch, embedder.device, embedder.tta)

    batches = -(-n // len(batch))
    # one stream runs in this thread, as the embedding runs it: another would start a second OpenMP team
    with ThreadPoolExecutor(streams) if streams > 1 else nullcontext() as pool:
        run = pool.map if pool else map
        list(run(forward, range(streams)))  # warm-up of every stream
        started = time.perf_counter()
        list(run(forward, range(batches)))
        return batches * len(batch) / (time.perf_counter() - started)


def one_round(embedder: Embedder, references: list[Embedder], table, cache: Path, chunk: int) -> tuple[float, float]:
    """(embedding img/s through an empty cache, bare forward img/s): each reference's bare forward is
    measured before and after the embedding and averaged, so drift cancels; the fastest is the bar."""
    before = [bare_images_per_s(reference, len(table)) for reference in references]
    started = time.perf_counter()
    EmbeddingCache(cache).update(embedder, table, chunk, progress=False, log=lambda m: None)
    embedded = len(table) / (time.perf_counter() - started)
    after = [bare_images_per_s(reference, len(table)) for reference in references]
    return embedded, max((a + b) / 2 for a, b in zip(before, after))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="nyala-mobilenet")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", help="CSV of images (default: 400 synthetic images)")
    parser.add_argument("--tta", default="hflip")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the embedder's, none on a CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per engine; ratios are their median")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "model.pretrained=false", "model.weights=null"])
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_synthetic_dataset(Path(tmp) / "data", identities=50, images_per_identity=8,
                                                   seed=0, image_size=256, progress=False)
        table = load_table(data)
        checkpoint = save_untrained(Path(tmp) / "best.pt", cfg)
        exported = export_onnx(checkpoint, Path(tmp) / "best.onnx")
        # as `reid embed` loads them: the ONNX export one single-threaded batch a core
        embedders = {name: Embedder.from_checkpoint(path, tta=args.tta, num_workers=args.workers, side_by_side=True)
                     for name, path in (("pytorch", checkpoint), ("onnx", exported.path))}
        # the ONNX export's bar is also its bare forward as a service loads it, every core on one batch
        references = {"pytorch": [embedders["pytorch"]],
                      "onnx": [embedders["onnx"], Embedder.from_checkpoint(exported.path, tta=args.tta,
                                                                           num_workers=args.workers)]}
        rounds = {name: [one_round(embedder, references[name], table, Path(tmp) / f"cache-{name}-{r}", args.chunk)
                         for r in range(args.rounds)] for name, embedder in embedders.items()}
    ratios = {name: [e / f for e, f in runs] for name, runs in rounds.items()}
    median = {name: statistics.median(values) for name, values in ratios.items()}
    embed = {name: statistics.median(e for e, _ in runs) for name, runs in rounds.items()}
    forward = {name: statistics.median(f for _, f in runs) for name, runs in rounds.items()}
    embedder = embedders["pytorch"]
    result = {"images": len(table), "model": cfg["model"]["backbone"], "image_size": cfg["data"]["image_size"],
              "tta": args.tta, "batch_size": embedder.batch_size, "workers": embedder.num_workers,
              "device": embedder.device.type, "rounds": args.rounds,
              "embed_img_per_s": round(embed["pytorch"], 1), "forward_img_per_s": round(forward["pytorch"], 1),
              "ratio": round(median["pytorch"], 3), "ratios": [round(r, 3) for r in ratios["pytorch"]],
              "onnx_embed_img_per_s": round(embed["onnx"], 1), "onnx_forward_img_per_s": round(forward["onnx"], 1),
              "onnx_ratio": round(median["onnx"], 3), "onnx_ratios": [round(r, 3) for r in ratios["onnx"]],
              "onnx_streams": embedders["onnx"].model.streams,
              "onnx_vs_pytorch": round(forward["onnx"] / forward["pytorch"], 3),
              "onnx_vs_pytorch_embed": round(embed["onnx"] / embed["pytorch"], 3),
              "onnx_parity_min_cosine": round(exported.parity_min_cosine, 7), "cpu_threads": torch.get_num_threads()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
