"""Reading an activation store: `ActivationStore` (the real one), the `Store` protocol an
analysis needs, and `ShardedArray`, the rows of many memory-mapped shard files seen as one array.

Stores are written by `saekit.activations.extract`; the layout is described there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from saekit.models import Encoder
from saekit.store_iterator import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_BUDGET,
    READAHEAD_BLOCKS,
    plan_window,
    store_batches,
)

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

    @property
    def wnids(self) -> list[str] | None:
        """WordNet id of each class, when the classes are WordNet synsets."""
        ...

    @property
    def n_rows(self) -> int:
        """Number of rows (images)."""
        ...

    def grid(self, layer: int) -> tuple[int, int]:
        """Patch grid (rows, columns) of ``layer``."""
        ...

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


def _token_kinds(tokens: str) -> tuple[str, ...]:
    if tokens == "both":
        return TOKEN_KINDS
    if tokens not in TOKEN_KINDS:
        raise ValueError(f"tokens must be 'cls', 'patch' or 'both', not {tokens!r}.")
    return (tokens,)


class ShardedArray:
    """Rows of several memory-mapped shard arrays, indexed as one array without loading it.

    Indexing follows numpy for the first axis: ints (negative count from the end), slices
    (any step), integer lists/arrays of any shape, boolean masks, and tuples whose first item is
    one of those. Out-of-range rows raise ``IndexError``. ``provenance`` (set by the store) says
    which model, layer and token kind the rows are, so SAE code can check what it is given.
    """

    def __init__(self, parts: list[np.ndarray], provenance: dict[str, Any] | None = None) -> None:
        if not parts:
            raise ValueError("ShardedArray needs at least one part")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.provenance = provenance
        """Where the rows come from: ``store``, ``model``, ``model_identity``, ``layer``,
        ``tokens`` (None for arrays built by hand)."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, key: int) -> np.ndarray:
        n = len(self)
        if not -n <= key < n:
            raise IndexError(f"row {key} is out of range for {n} rows")
        key %= n
        shard = int(np.searchsorted(self.offsets, key, side="right") - 1)
        return self.parts[shard][key - self.offsets[shard]]

    def _rows(self, index: np.ndarray) -> np.ndarray:
        """Rows at an integer index array of any shape (negative wrap), as numpy does."""
        n = len(self)
        flat = index.reshape(-1).astype(np.int64, copy=False)
        bad = (flat < -n) | (flat >= n)
        if bad.any():
            raise IndexError(f"row {int(flat[bad][0])} is out of range for {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        result = np.empty((len(flat), *self.shape[1:]), self.dtype)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for shard in np.unique(shard_of):
            picked = shard_of == shard
            result[picked] = self.parts[shard][flat[picked] - self.offsets[shard]]
        return result.reshape(*index.shape, *self.shape[1:])

    def _slice(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            return self._rows(np.arange(start, stop, step))
        pieces = []
        for shard, part in enumerate(self.parts):
            lo, hi = max(start, self.offsets[shard]), min(stop, self.offsets[shard + 1])
            if lo < hi:
                pieces.append(part[lo - self.offsets[shard] : hi - self.offsets[shard]])
        if not pieces:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _first_axis(self, key: Any) -> np.ndarray:
        if isinstance(key, bool | np.bool_):
            raise IndexError("a single boolean is not a row index; use a boolean mask array")
        if isinstance(key, int | np.integer):
            return self._row(int(key))
        if isinstance(key, slice):
            return self._slice(key)
        if key is Ellipsis:
            return self._slice(slice(None))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(
                    f"boolean mask of shape {index.shape} does not match {len(self)} rows"
                )
            return self._rows(np.flatnonzero(index))
        if index.size == 0:
            index = index.astype(np.int64)
        if not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"rows must be indexed by integers or booleans, not {index.dtype}")
        return self._rows(index)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if not key:
                return self._slice(slice(None))
            first, rest = key[0], key[1:]
            if first is Ellipsis:
                return self._slice(slice(None))[key]
            rows = self._first_axis(first)
            if not rest:
                return rows
            if isinstance(first, int | np.integer):
                return rows[rest]
            if isinstance(first, slice) or first is Ellipsis:
                return rows[(slice(None), *rest)]
            # An index array combines with the other axes' indices as numpy's advanced indexing
            # does: a[I, J] == a[I.ravel()][P, J] with P = arange reshaped like I.
            n_picked = int(np.prod(rows.shape[: rows.ndim - (self.ndim - 1)]))
            flat = rows.reshape(n_picked, *self.shape[1:])
            positions = np.arange(n_picked).reshape(rows.shape[: rows.ndim - (self.ndim - 1)])
            return flat[(positions, *rest)]
        return self._first_axis(key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole.astype(dtype) if dtype is not None else np.asarray(whole)

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"


def _same_model(model: str | os.PathLike | Encoder, manifest: dict) -> bool:
    if isinstance(model, Encoder):
        return manifest.get("identity", {}).get("model") == model.identity
    if str(model) == manifest["model"]:
        return True
    path = Path(model).expanduser()
    return path.is_dir() and str(path.resolve()) == manifest.get("model_path")


class ActivationStore:
    """A finished store, opened read-only and memory-mapped."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        shards = [s for s in manifest["shards"] if s["rows"]]
        self.shard_dirs = [root / f"shard_{s['index']:05d}" for s in shards]
        self._image_ids: list[str] | None = None
        self.labels = np.concatenate([np.load(d / "labels.npy") for d in self.shard_dirs])
        # A streamed store's shard numbers its rows from its own first sample (row_offset: that
        # sample's place in image_ids.json, known only when the stream ended).
        self.rows = np.concatenate(
            [
                np.load(d / "rows.npy") + s.get("row_offset", 0)
                for d, s in zip(self.shard_dirs, shards, strict=True)
            ]
        )

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        model: str | os.PathLike | Encoder | None = None,
        layers: Sequence[int] | None = None,
        tokens: str | None = None,
    ) -> ActivationStore:
        """Open a finished store; refuse it if it was made for another model, layers or tokens.

        ``model`` is an `Encoder` (compared by identity: config, processor and weights), a model
        folder (the same folder however its path is spelled) or the id the store was made with.
        """
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
        if model is not None and not _same_model(model, manifest):
            asked = model.model_id if isinstance(model, Encoder) else model
            raise StoreMismatchError(
                f"{root} holds activations of {manifest['model']!r}, not {asked!r}. Open the "
                "store made with that model, or extract one with `saekit extract`."
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
            [np.load(d / f"L{layer}_{kind}.npy", mmap_mode="r") for d in self.shard_dirs],
            provenance={
                "store": str(self.root),
                "model": self.manifest["model"],
                "model_identity": self.model_identity,
                "layer": layer,
                "tokens": kind,
            },
        )

    @property
    def model_identity(self) -> dict | None:
        """The model's identity (config, processor, weights fingerprints; None for stores made
        before saekit recorded it)."""
        model = self.manifest.get("identity", {}).get("model")
        return model if isinstance(model, dict) else None

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
        drop_last: bool = False,
        budget: int = DEFAULT_BUDGET,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        window_rows: int | None = None,
        dtype: Any = np.float32,
        pin_memory: bool = False,
    ) -> Iterator[torch.Tensor | dict[int, torch.Tensor]]:
        """Shuffled batches ``[B, D]`` (or ``{layer: [B, D]}`` for several layers), float32
        unless `dtype` says otherwise.

        ``dtype=None`` keeps the store's dtype (float16: half the bytes to a GPU, where the SAE
        trainer casts to float32); ``pin_memory=True`` (needs CUDA) assembles the batches in
        page-locked memory for non-blocking copies. Neither changes the rows or their order.

        Every row appears exactly once per epoch; patch tokens are flattened, one row per
        (image, patch). Memory stays within `budget` bytes across all layers whatever the
        store's size: rows are read in blocks of `block_rows` contiguous rows by a background
        thread, the blocks visited in a random order, and a window of blocks that fits the
        budget is permuted (see `saekit.store_iterator`). The order is a function of ``(seed,
        epoch)`` and of the window, which the budget sets from the bytes per row of ALL the
        store's layers, whichever are read: one layer read alone comes in the same order as
        with the others, so an SAE trained in a one-layer run equals the one trained in a sweep
        of every layer (the SAE cache relies on it). Give `window_rows` to set it yourself.
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
        files = {ly: [d / f"L{ly}_{tokens}.npy" for d in self.shard_dirs] for ly in layers}
        if window_rows is None:
            itemsize = np.dtype(self.manifest["dtype"]).itemsize
            widths = [self.width(ly) for ly in self.layers]
            window_rows, _ = plan_window(
                sum(widths) * itemsize, sum(widths) * 4, batch_size, budget, block_rows,
                READAHEAD_BLOCKS,
            )  # fmt: skip
        return store_batches(
            files, batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last,
            budget=budget, block_rows=block_rows, window_rows=window_rows,
            as_dict=not isinstance(layer, int | np.integer), dtype=dtype, pin_memory=pin_memory,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.root)!r}, model={self.manifest['model']!r}, "
            f"layers={self.layers}, tokens={self.manifest['tokens']}, rows={self.n_rows})"
        )
