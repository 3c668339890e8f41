"""Extraction throughput: one pass over all layers vs one pass per layer, and store read speed.

Prints two tables:

1. images/s of `saekit.activations.extract` reading every layer of a miniature in ONE forward
   pass, vs running one extraction per layer (the naive way); the ratio is the speed-up.
2. the training iterator's read throughput (`ActivationStore.batches`, shuffled) as a fraction
   of a raw sequential read of the same shard files (np.load of each file, the reference).

    python benchmarks/extract.py [--quick] [--model dinov2|vit|clip|resnet] [--images N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from saekit.activations import extract  # noqa: E402
from saekit.data import ImageList  # noqa: E402
from saekit.mini.miniatures import miniature  # noqa: E402
from saekit.models import load_encoder  # noqa: E402


def make_images(root: Path, n: int) -> ImageList:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        path = root / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        pairs.append((path, i % 10))
    return ImageList.from_pairs(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test)")
    parser.add_argument("--model", default="dinov2")
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()
    n_images = 256 if args.quick else args.images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_images(tmp, n_images)
        encoder = load_encoder(miniature(args.model, tmp / "model"))
        layers = list(range(encoder.n_layers))

        start = time.perf_counter()
        store = extract(
            encoder,
            dataset,
            layers="all",
            tokens="both",
            out=tmp / "all",
            shard_images=256,
            progress=False,
        )
        one_pass = time.perf_counter() - start
        start = time.perf_counter()
        for layer in layers:
            extract(
                encoder,
                dataset,
                layers=[layer],
                tokens="both",
                out=tmp / f"L{layer}",
                shard_images=256,
                progress=False,
            )
        per_layer = time.perf_counter() - start

        print(f"\nExtraction, {args.model} miniature, {encoder.n_layers} layers, {n_images} images")
        print(f"{'method':<28}{'seconds':>10}{'images/s':>12}")
        print(f"{'one pass, all layers':<28}{one_pass:>10.2f}{n_images / one_pass:>12.1f}")
        print(f"{'one pass per layer':<28}{per_layer:>10.2f}{n_images / per_layer:>12.1f}")
        print(f"ratio (per-layer time / one-pass time): {per_layer / one_pass:.2f}x")

        files = sorted((tmp / "all").glob("shard_*/L*_patch.npy"))
        layer_files = [f for f in files if f.name.startswith(f"L{layers[-1]}_")]
        start = time.perf_counter()
        raw_bytes = sum(np.load(f).nbytes for f in layer_files)
        raw = time.perf_counter() - start
        start = time.perf_counter()
        rows = sum(len(b) for b in store.batches(layers[-1], 4096, tokens="patch", seed=0))
        shuffled = time.perf_counter() - start
        row_bytes = raw_bytes / rows
        print(
            f"\nReading layer {layers[-1]} patch tokens ({rows} rows, {raw_bytes / 2**20:.1f} MiB fp16)"
        )
        print(f"{'method':<34}{'MiB/s':>10}")
        print(f"{'raw sequential np.load (reference)':<34}{raw_bytes / raw / 2**20:>10.1f}")
        print(
            f"{'store.batches (shuffled, float32)':<34}{rows * row_bytes / shuffled / 2**20:>10.1f}"
        )
        print(f"ratio (iterator / raw): {raw / shuffled:.2f}")


if __name__ == "__main__":
    main()
