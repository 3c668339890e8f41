"""Writing one shard of an activation store: decode a block of images (threads, or DataLoader
worker processes), run the encoder, and commit the shard folder by the protocol described in
`saekit.activations`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from saekit.data import DecodedBatches, ImageDataset, UnreadableImageError
from saekit.durable import commit_dir, make_dir, save_array, write_text_durably
from saekit.models import Encoder

SHARD_RECORD = "shard.json"


class StoreWriteError(OSError):
    """Writing a shard or the manifest failed (disk full, folder gone, ...); finished shards
    are kept and rerunning the same extraction resumes."""


def decoded_batches(
    encoder: Encoder, dataset: ImageDataset, ranges: list[range], batch_size: int, workers: int
) -> Iterator | None:
    """The forward batches of `ranges`, decoded and preprocessed in `workers` DataLoader
    processes, in order (None for ``workers == 0``: threads decode in this process)."""
    if workers <= 0 or not ranges:
        return None
    batches = [list(r[j : j + batch_size]) for r in ranges for j in range(0, len(r), batch_size)]
    loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(
        DecodedBatches(dataset, encoder.processor, batches),  # type: ignore[arg-type]
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.device(encoder.device).type == "cuda",
    )
    return iter(loader)


def _load_or_skip(dataset: ImageDataset, index: int) -> tuple[int, Any]:
    try:
        return index, dataset.load(index)
    except (UnreadableImageError, OSError) as err:
        return index, err


class ShardParts:
    """What one shard has accumulated so far: arrays per layer and token kind, row ids, labels,
    unreadable images, patch grids."""

    def __init__(self, layer_ids: list[int], kinds: tuple[str, ...]) -> None:
        self.chunks: dict[str, list[np.ndarray]] = {
            f"L{layer}_{kind}": [] for layer in layer_ids for kind in kinds
        }
        self.rows: list[int] = []
        self.labels: list[int] = []
        self.skipped: list[dict] = []
        self.grids: dict[str, list[int]] = {}


class ShardWriter:
    """Encodes a block of images and commits it as one shard folder."""

    def __init__(self, encoder, dataset, layer_ids, kinds, np_dtype, batch_size, out, bar):
        self.encoder, self.dataset, self.layer_ids, self.kinds = encoder, dataset, layer_ids, kinds
        self.np_dtype, self.batch_size, self.out, self.bar = np_dtype, batch_size, out, bar

    def write(
        self, index: int, image_range: range, pool: ThreadPoolExecutor, decoded: Iterator | None
    ) -> dict:
        """Encode the images of shard `index` and commit the shard; returns its record.
        `decoded` yields the shard's batches preprocessed by DataLoader workers (None: decode
        here with `pool`)."""
        return self.commit(index, self._encode(image_range, pool, decoded))

    def commit(self, index: int, parts: ShardParts, extra: dict | None = None) -> dict:
        """Commit `parts` as shard `index` (`extra` joins its record); returns the record."""
        try:
            return self._commit(index, parts, extra or {})
        except OSError as err:
            raise StoreWriteError(
                err.errno,
                f"Writing shard {index} of {self.out} failed ({err.strerror or err}). Free space "
                "or fix the folder, then rerun the same extraction: finished shards are kept.",
            ) from err

    def _forward_pixels(self, pixels_BCHW: torch.Tensor):
        dtype = next(self.encoder.model.parameters()).dtype
        with torch.inference_mode():
            # Pinned by the DataLoader on a GPU, so the copy overlaps with the forward pass.
            pixels_BCHW = pixels_BCHW.to(self.encoder.device, dtype=dtype, non_blocking=True)
            return self.encoder.forward_pixels(pixels_BCHW, layers=self.layer_ids)

    def add_batch(
        self,
        parts: ShardParts,
        kept: list[int],
        labels: list[int],
        images: list | None = None,
        pixels_BCHW: torch.Tensor | None = None,
    ) -> None:
        """Encode one forward batch (the readable images `kept` of it, as PIL `images` or as
        preprocessed `pixels_BCHW`) into `parts`."""
        if not kept:
            return
        if pixels_BCHW is not None:
            result = self._forward_pixels(pixels_BCHW)
        else:
            result = self.encoder(images, layers=self.layer_ids)
        parts.rows.extend(kept)
        parts.labels.extend(labels)
        for layer in self.layer_ids:
            if "cls" in self.kinds:
                parts.chunks[f"L{layer}_cls"].append(
                    result.cls[layer].float().cpu().numpy().astype(self.np_dtype)
                )
            if "patch" in self.kinds:
                parts.chunks[f"L{layer}_patch"].append(
                    result.patches[layer].float().cpu().numpy().astype(self.np_dtype)
                )
                parts.grids[str(layer)] = list(result.grids[layer])

    def _encode(
        self, image_range: range, pool: ThreadPoolExecutor, decoded: Iterator | None
    ) -> ShardParts:
        parts = ShardParts(self.layer_ids, self.kinds)
        indices = list(image_range)
        for batch_start in range(0, len(indices), self.batch_size):
            batch = indices[batch_start : batch_start + self.batch_size]
            images: list | None = None
            pixels_BCHW = None
            if decoded is not None:
                kept, errors, pixels_BCHW = next(decoded)
            else:
                kept, errors, images = [], [], []
                for index, image in pool.map(lambda i: _load_or_skip(self.dataset, i), batch):
                    if isinstance(image, Exception):
                        errors.append((index, str(image)))
                    else:
                        images.append(image)
                        kept.append(index)
            for index, error in errors:
                parts.skipped.append(
                    {"index": index, "id": self.dataset.image_ids[index], "error": error}
                )
            self.bar.update(len(batch))
            labels = [self.dataset.labels[i] for i in kept]
            self.add_batch(parts, kept, labels, images, pixels_BCHW)
        return parts

    def _commit(self, index: int, parts: ShardParts, extra: dict) -> dict:
        staging = self.out / f"shard_{index:05d}.tmp"
        make_dir(staging)
        arrays = {
            "rows.npy": np.asarray(parts.rows, dtype=np.int64),
            "labels.npy": np.asarray(parts.labels, dtype=np.int64),
        }
        arrays.update({f"{name}.npy": np.concatenate(p) for name, p in parts.chunks.items() if p})
        for name, array in arrays.items():
            save_array(staging / name, array)
        record = {
            "index": index,
            "rows": len(parts.rows),
            "grids": parts.grids,
            "skipped": parts.skipped,
            "files": sorted(arrays),
            **extra,
        }
        # Written last: a shard folder with a shard.json is whole.
        write_text_durably(staging / SHARD_RECORD, json.dumps(record, indent=1))
        commit_dir(staging, self.out / f"shard_{index:05d}")
        return record
