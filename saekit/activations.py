"""The activation store: extract once, read many times, survive interruption.

Layout of a store folder::

    manifest.json          what produced it (model id + config hash, layers, tokens, dtype,
                           dataset fingerprint), classes, completed shards, skipped images
    image_ids.json         one id per dataset image (rows point into it)
    shard_00000/           one folder per block of images, renamed into place when complete
        rows.npy           dataset index of each row (images that could not be read are absent)
        labels.npy         class index of each row
        L3_cls.npy         [rows, D]      one file per layer and token kind,
        L3_patch.npy       [rows, P, D]   memory-mapped when read

A shard is written to ``shard_XXXXX.tmp`` and renamed only once every file in it is on disk, and
the manifest is replaced atomically after each shard, so an interrupted extraction resumes at the
first unfinished shard and never rewrites a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from saekit.data import ImageDataset, UnreadableImageError
from saekit.models import Encoder, load_encoder

FORMAT_VERSION = 1
TOKEN_KINDS = ("cls", "patch")


@runtime_checkable
class Store(Protocol):
    """What an analysis needs of an activation store (`ActivationStore` is the real one; tests
    may pass any object with these members).

    Rows are images in store order; ``labels`` and ``image_ids`` are aligned with them.
    """

    root: Path
    """Folder the store lives in (named in error messages)."""
    manifest: dict
    """What produced the store: ``identity``, ``model``, ``layers``, ``tokens``, ``widths``,
    ``class_names``, ``wnids``, ..."""
    labels: np.ndarray
    """Class index of each row, ``[N]``."""
    rows: np.ndarray
    """Dataset index of each row, ``[N]`` (unreadable images are skipped)."""

    @property
    def layers(self) -> list[int]: ...

    @property
    def d_model(self) -> int: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def image_ids(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def cls(self, layer: int) -> Any:
        """CLS activations of ``layer``, ``[N, D]`` (array-like, possibly memory-mapped)."""
        ...

    def patches(self, layer: int) -> Any:
        """Patch activations of ``layer``, ``[N, P, D]`` (array-like, possibly memory-mapped)."""
        ...

    def batches(
        self, layer: int | Sequence[int], batch_size: int, *, tokens: str = "cls",
        seed: int = 0, epoch: int = 0,
    ) -> Iterator[Any]:  # fmt: skip
        """Shuffled training batches: every row once per epoch."""
        ...


class StoreMismatchError(ValueError):
    """A store exists but was made for another model, layer set, token kind or dataset."""


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _token_kinds(tokens: str) -> tuple[str, ...]:
    if tokens == "both":
        return TOKEN_KINDS
    if tokens not in TOKEN_KINDS:
        raise ValueError(f"tokens must be 'cls', 'patch' or 'both', not {tokens!r}.")
    return (tokens,)


def _dataset_fingerprint(dataset: ImageDataset) -> str:
    digest = hashlib.sha256()
    for image_id, label in zip(dataset.image_ids, dataset.labels, strict=True):
        digest.update(f"{image_id}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def _default_shard_images(
    encoder: Encoder,
    layers: list[int],
    kinds: tuple[str, ...],
    itemsize: int,
    batch_size: int,
    target_bytes: int = 256 << 20,
) -> int:
    """Images per shard so that a shard holds about `target_bytes` of activations."""
    # One probe image gives each layer's exact token count (CNN stages differ in size).
    probe = encoder([Image.new("RGB", (64, 64))], layers=layers)
    per_image = 0
    for layer in layers:
        tokens = (1 if "cls" in kinds else 0) + (
            probe.patches[layer].shape[1] if "patch" in kinds else 0
        )
        per_image += tokens * encoder.widths[layer] * itemsize
    images = max(batch_size, target_bytes // max(per_image, 1))
    return int(images // batch_size * batch_size)


def extract(
    encoder: Encoder | str,
    dataset: ImageDataset,
    layers: str | Sequence[int] = "all",
    tokens: str = "cls",
    out: str | os.PathLike = "activations",
    dtype: str = "float16",
    batch_size: int = 64,
    shard_images: int | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> ActivationStore:
    """Run `encoder` over `dataset` once and store each requested layer's tokens under `out`.

    Re-running with identical arguments returns the existing store (resuming it first if an
    earlier run was interrupted); a store made with different arguments is never overwritten.
    """
    if isinstance(encoder, str | os.PathLike):
        encoder = load_encoder(encoder)
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', not {dtype!r}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to extract.")
    kinds = _token_kinds(tokens)
    layer_ids = encoder.resolve_layers(layers)
    np_dtype = np.dtype(dtype)
    if shard_images is None:
        shard_images = _default_shard_images(
            encoder, layer_ids, kinds, np_dtype.itemsize, batch_size
        )
    out = Path(out)
    identity = {
        "model": encoder.model_id,
        "config_hash": encoder.config_hash,
        "layers": layer_ids,
        "tokens": list(kinds),
        "dtype": dtype,
        "dataset": _dataset_fingerprint(dataset),
        "n_images": len(dataset),
        "shard_images": int(shard_images),
    }
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["identity"] != identity:
            changed = sorted(k for k in identity if manifest["identity"].get(k) != identity[k])
            hint = (
                " (shard_images follows --batch-size unless given: resume with the first "
                "run's batch size)"
                if changed == ["shard_images"]
                else ""
            )
            raise StoreMismatchError(
                f"{out} already holds a store made with different {', '.join(changed)}{hint}. "
                "Choose another --out folder, or delete this one to start over."
            )
        if manifest["complete"]:
            return ActivationStore.open(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / "image_ids.json", list(dataset.image_ids))
        manifest = {
            "format": FORMAT_VERSION,
            "identity": identity,
            "model": encoder.model_id,
            "family": encoder.family,
            "layers": layer_ids,
            "tokens": list(kinds),
            "dtype": dtype,
            "widths": {str(layer): encoder.widths[layer] for layer in layer_ids},
            "d_model": encoder.widths[layer_ids[-1]],
            "class_names": list(dataset.class_names),
            "wnids": list(dataset.wnids) if dataset.wnids is not None else None,
            "n_images": len(dataset),
            "shards": [],
            "skipped": [],
            "complete": False,
        }
        _write_json_atomic(manifest_path, manifest)

    n_shards = -(-len(dataset) // shard_images)
    done = {shard["index"] for shard in manifest["shards"]}
    for leftover in out.glob("shard_*.tmp"):
        shutil.rmtree(leftover)  # a shard an interrupted run was still writing
    images_done = sum(min(shard_images, len(dataset) - i * shard_images) for i in done)
    bar = tqdm(
        total=len(dataset),
        initial=images_done,
        desc=f"extract {Path(encoder.model_id).name}",
        unit="img",
        disable=not progress,
    )
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for index in range(n_shards):
            if index in done:
                continue
            start, stop = index * shard_images, min((index + 1) * shard_images, len(dataset))
            record, skipped = _extract_shard(
                encoder,
                dataset,
                layer_ids,
                kinds,
                np_dtype,
                range(start, stop),
                batch_size,
                pool,
                out,
                index,
                bar,
            )
            manifest["shards"].append(record)
            manifest["skipped"].extend(skipped)
            manifest.setdefault("grids", {}).update(record.pop("grids"))
            _write_json_atomic(manifest_path, manifest)
    bar.close()
    manifest["shards"].sort(key=lambda shard: shard["index"])
    manifest["n_rows"] = sum(shard["rows"] for shard in manifest["shards"])
    if manifest["n_rows"] == 0:
        first = "; ".join(f"{s['id']}: {s['error']}" for s in manifest["skipped"][:3])
        raise ValueError(f"None of the {len(dataset)} images could be read ({first} ...).")
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    return ActivationStore.open(out)


def _load_or_skip(dataset: ImageDataset, index: int) -> tuple[int, Any]:
    try:
        return index, dataset.load(index)
    except (UnreadableImageError, OSError) as err:
        return index, err


def _extract_shard(
    encoder,
    dataset,
    layer_ids,
    kinds,
    np_dtype,
    image_range,
    batch_size,
    pool,
    out: Path,
    index: int,
    bar,
) -> tuple[dict, list[dict]]:
    chunks: dict[str, list[np.ndarray]] = {
        f"L{layer}_{kind}": [] for layer in layer_ids for kind in kinds
    }
    rows: list[int] = []
    skipped: list[dict] = []
    grids: dict[str, list[int]] = {}
    indices = list(image_range)
    for batch_start in range(0, len(indices), batch_size):
        loaded = list(
            pool.map(
                lambda i: _load_or_skip(dataset, i), indices[batch_start : batch_start + batch_size]
            )
        )
        images, kept = [], []
        for image_index, image in loaded:
            if isinstance(image, Exception):
                skipped.append(
                    {
                        "index": image_index,
                        "id": dataset.image_ids[image_index],
                        "error": str(image),
                    }
                )
            else:
                images.append(image)
                kept.append(image_index)
        bar.update(len(loaded))
        if not images:
            continue
        result = encoder(images, layers=layer_ids)
        rows.extend(kept)
        for layer in layer_ids:
            if "cls" in kinds:
                chunks[f"L{layer}_cls"].append(
                    result.cls[layer].float().cpu().numpy().astype(np_dtype)
                )
            if "patch" in kinds:
                chunks[f"L{layer}_patch"].append(
                    result.patches[layer].float().cpu().numpy().astype(np_dtype)
                )
                grids[str(layer)] = list(result.grids[layer])
    tmp = out / f"shard_{index:05d}.tmp"
    tmp.mkdir()
    np.save(tmp / "rows.npy", np.asarray(rows, dtype=np.int64))
    np.save(tmp / "labels.npy", np.asarray([dataset.labels[i] for i in rows], dtype=np.int64))
    for name, parts in chunks.items():
        if parts:
            np.save(tmp / f"{name}.npy", np.concatenate(parts))
    os.replace(tmp, out / f"shard_{index:05d}")
    return {"index": index, "rows": len(rows), "grids": grids}, skipped


class ShardedArray:
    """Rows of several memory-mapped shard arrays, indexed as one array without loading it."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            if isinstance(key[0], int | np.integer):
                return rows[key[1:]]
            return rows[(slice(None), *key[1:])]
        if isinstance(key, int | np.integer):
            key = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= key < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            shard = int(np.searchsorted(self.offsets, key, side="right") - 1)
            return self.parts[shard][key - self.offsets[shard]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                pieces = []
                for shard, part in enumerate(self.parts):
                    lo, hi = max(start, self.offsets[shard]), min(stop, self.offsets[shard + 1])
                    if lo < hi:
                        pieces.append(part[lo - self.offsets[shard] : hi - self.offsets[shard]])
                if not pieces:
                    return np.empty((0, *self.shape[1:]), self.dtype)
                return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            key = np.arange(start, stop, step)
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + len(self), index)
        result = np.empty((len(index), *self.shape[1:]), self.dtype)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        for shard in np.unique(shard_of):
            picked = shard_of == shard
            result[picked] = self.parts[shard][index[picked] - self.offsets[shard]]
        return result

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole.astype(dtype) if dtype is not None else np.asarray(whole)


class ActivationStore:
    """A finished store, opened read-only and memory-mapped."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.shard_dirs = [
            root / f"shard_{s['index']:05d}" for s in manifest["shards"] if s["rows"]
        ]
        self._image_ids: list[str] | None = None
        self.labels = np.concatenate([np.load(d / "labels.npy") for d in self.shard_dirs])
        self.rows = np.concatenate([np.load(d / "rows.npy") for d in self.shard_dirs])

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        model: str | None = None,
        layers: Sequence[int] | None = None,
        tokens: str | None = None,
    ) -> ActivationStore:
        """Open a finished store; refuse it if it was made for another model, layers or tokens."""
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"No activation store at {root} (no manifest.json). Create one with "
                "`saekit extract --model ... --data ... --out DIR` or saekit.activations.extract."
            )
        manifest = json.loads(manifest_path.read_text())
        if not manifest["complete"]:
            raise RuntimeError(
                f"The store at {root} is incomplete ({len(manifest['shards'])} shards done); rerun "
                "the same extraction to resume it."
            )
        if model is not None and model != manifest["model"]:
            raise StoreMismatchError(
                f"{root} holds activations of {manifest['model']!r}, not {model!r}."
            )
        if layers is not None and not set(layers) <= set(manifest["layers"]):
            raise StoreMismatchError(
                f"{root} holds layers {manifest['layers']}; asked for {sorted(layers)}."
            )
        if tokens is not None and not set(_token_kinds(tokens)) <= set(manifest["tokens"]):
            raise StoreMismatchError(
                f"{root} holds {manifest['tokens']} tokens; asked for {tokens!r}."
            )
        return cls(root, manifest)

    # -- what the store holds -------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def width(self, layer: int) -> int:
        return int(self.manifest["widths"][str(layer)])

    def grid(self, layer: int) -> tuple[int, int]:
        return tuple(self.manifest["grids"][str(layer)])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def wnids(self) -> list[str] | None:
        return self.manifest["wnids"]

    @property
    def skipped(self) -> list[dict]:
        """Images that could not be read: dataset index, id and the error."""
        return list(self.manifest["skipped"])

    @property
    def image_ids(self) -> list[str]:
        """Dataset id of each row."""
        if self._image_ids is None:
            all_ids = json.loads((self.root / "image_ids.json").read_text())
            self._image_ids = [all_ids[i] for i in self.rows]
        return self._image_ids

    def _array(self, layer: int, kind: str) -> ShardedArray:
        if layer not in self.manifest["layers"]:
            raise KeyError(
                f"Layer {layer} is not in this store; it holds {self.manifest['layers']}."
            )
        if kind not in self.manifest["tokens"]:
            raise KeyError(f"This store holds {self.manifest['tokens']} tokens, not {kind!r}.")
        return ShardedArray(
            [np.load(d / f"L{layer}_{kind}.npy", mmap_mode="r") for d in self.shard_dirs]
        )

    def cls(self, layer: int) -> ShardedArray:
        """CLS activations of `layer`, ``[N, D]``, memory-mapped."""
        return self._array(layer, "cls")

    def patches(self, layer: int) -> ShardedArray:
        """Patch activations of `layer`, ``[N, P, D]``, memory-mapped."""
        return self._array(layer, "patch")

    # -- reading for training -------------------------------------------------------------
    def batches(
        self,
        layer: int | Sequence[int],
        batch_size: int,
        *,
        tokens: str = "cls",
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        buffer_rows: int = 1 << 20,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[dict[int, torch.Tensor]]:
        """Shuffled float32 batches ``[B, D]`` (or ``{layer: [B, D]}`` for several layers).

        Every row appears exactly once per epoch. Shuffling is block-wise so reads stay
        sequential: shards are visited in a random order and pooled into a buffer of up to
        `buffer_rows` rows, which is permuted; the store is never loaded into RAM whole. Patch
        tokens are flattened, one row per (image, patch).
        """
        if tokens not in TOKEN_KINDS:
            raise ValueError(f"tokens must be 'cls' or 'patch', not {tokens!r}.")
        layers = [layer] if isinstance(layer, int | np.integer) else list(layer)
        arrays = {ly: self._array(ly, tokens) for ly in layers}
        rows_per_image = {ly: int(np.prod(arrays[ly].shape[1:-1])) for ly in layers}
        if len(set(rows_per_image.values())) > 1:
            raise ValueError(
                f"Layers {layers} have different numbers of {tokens} tokens per image "
                f"({rows_per_image}), so their rows cannot be batched together; ask for one "
                "layer at a time."
            )
        rng = np.random.default_rng([seed, epoch])
        order = (
            rng.permutation(len(self.shard_dirs)) if shuffle else np.arange(len(self.shard_dirs))
        )

        def shard_rows(ly: int, shard: int) -> np.ndarray:
            part = arrays[ly].parts[shard]
            return part.reshape(-1, part.shape[-1])

        pending: dict[int, np.ndarray] | None = None
        group: list[int] = []
        group_rows = 0
        for position, shard in enumerate(order):
            group.append(shard)
            group_rows += len(shard_rows(layers[0], shard))
            if group_rows < buffer_rows and position + 1 < len(order):
                continue
            buffer = {ly: np.concatenate([shard_rows(ly, s) for s in group]) for ly in layers}
            if pending is not None:  # rows left over from the previous buffer come first
                buffer = {ly: np.concatenate([pending[ly], buffer[ly]]) for ly in layers}
            perm = (
                rng.permutation(len(buffer[layers[0]]))
                if shuffle
                else np.arange(len(buffer[layers[0]]))
            )
            last = position + 1 == len(order)
            n_full = len(perm) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                yield self._as_batch(buffer, layers, perm[start : start + batch_size], layer)
            rest = perm[n_full:]
            if last:
                if len(rest) and not drop_last:
                    yield self._as_batch(buffer, layers, rest, layer)
            else:
                pending = {ly: buffer[ly][rest] for ly in layers}
            group, group_rows = [], 0

    @staticmethod
    def _as_batch(buffer, layers, picked, layer):
        tensors = {ly: torch.from_numpy(buffer[ly][picked].astype(np.float32)) for ly in layers}
        return tensors[layers[0]] if isinstance(layer, int | np.integer) else tensors

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.root)!r}, model={self.manifest['model']!r}, "
            f"layers={self.layers}, tokens={self.manifest['tokens']}, rows={self.n_rows})"
        )
