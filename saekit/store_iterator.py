"""Training batches from an activation store in bounded memory.

`StoreBatches` reads the rows of one or more layers in blocks of contiguous rows with plain
file reads (no memory map, so pages read stay out of the process's resident set), in a
background thread, and serves shuffled batches from a window of blocks:

1. the store's rows (one per image, or per (image, patch)) are cut into blocks of
   `block_rows` contiguous rows that never cross a shard;
2. the blocks are permuted by ``(seed, epoch)`` and taken in that order in windows of whole
   blocks up to `window_rows` rows;
3. each window's rows, plus the fewer-than-a-batch left over from the previous window, are
   permuted and served as batches.

Every row appears exactly once per epoch, and the order is a function of ``(seed, epoch,
block_rows, window_rows)``. Memory is one window array per layer (the store's dtype), a
read-ahead queue of at most `readahead_blocks` blocks and the batches assembled ahead of the
caller: the window is sized so that all of it fits the byte budget (the batches a caller keeps
are its own).

Batches of at least `BACKGROUND_BYTES` are assembled (gathered from the window into fresh
arrays) in a second background thread, so a trainer's thread only takes finished batches; at
most as many wait, built or being built, as fit the bytes the plan sets aside for one float32
batch (one float32 batch, or two in float16). Smaller batches are built on the caller's thread:
there a hand-over between threads costs more than the gather (``benchmarks/fast_paths.py`` on a
2-core CPU: 0.91x steps/s off-thread for 64 x 128 batches, 1.03x for 1024 x 768). The
``background`` switch forces either way; the batches and their order are the same. Two switches
serve a trainer on a GPU: ``dtype=None`` keeps the store's dtype (a float16 store sends half the
bytes over PCIe; the trainer casts on the device) and ``pin_memory=True`` assembles into
page-locked memory, so the copy to the device can be ``non_blocking``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Default byte budget of `ActivationStore.batches` across all layers read together.
DEFAULT_BUDGET = 512 << 20
#: Blocks read ahead of the window at most.
READAHEAD_BLOCKS = 8
#: Rows gathered from the window per copy into a float32 batch (bounds the temporary).
GATHER_ROWS = 1024
#: Default rows per block (one sequential read per layer).
DEFAULT_BLOCK_ROWS = 256
#: Upper bound on the window's rows (shuffle quality grows little past it).
MAX_WINDOW_ROWS = 1 << 18
#: Batches of at least this many bytes (all layers) are assembled off the caller's thread.
BACKGROUND_BYTES = 1 << 20


@dataclass(frozen=True)
class NpyRows:
    """Where the rows of one ``.npy`` file lie on disk, read without memory-mapping."""

    path: Path
    """The file."""
    offset: int
    """Byte offset of the first row (after the header)."""
    n_rows: int
    """Rows once every axis but the last is flattened (images x tokens)."""
    width: int
    """Values per row (the last axis)."""
    dtype: np.dtype
    """Stored dtype."""

    @classmethod
    def open(cls, path: Path) -> NpyRows:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{path} is not a C-ordered numeric array; extract the store again.")
        width = int(shape[-1])
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 0
        return cls(Path(path), offset, n_rows, width, np.dtype(dtype))

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as an array ``[stop - start, width]`` (into `out` if given)."""
        if out is None:
            out = np.empty((stop - start, self.width), self.dtype)
        row_bytes = self.width * self.dtype.itemsize
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.offset + start * row_bytes)
            view = memoryview(out).cast("B")  # type: ignore[arg-type]
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    raise OSError(f"{self.path} ended early: the store is truncated.")
                got += n
        return out


def plan_window(
    row_bytes: int, f32_row_bytes: int, batch_size: int, budget: int, block_rows: int,
    readahead_blocks: int,
) -> tuple[int, int]:  # fmt: skip
    """(window rows, read-ahead blocks) that fit `budget` bytes together with the block in
    transit and the float32 batch being built (the batches the caller keeps are its own).

    The read-ahead queue takes at most an eighth of the budget; the window the rest. The bytes of
    the float32 batch are what `StoreBatches` spends on the batches it assembles ahead (see
    `batches_ahead`), so the window, hence the batch order, does not depend on those switches.
    """
    block_bytes = block_rows * row_bytes
    readahead = max(1, min(readahead_blocks, budget // 8 // max(block_bytes, 1)))
    fixed = (readahead + 1) * block_bytes + batch_size * f32_row_bytes
    fixed += min(GATHER_ROWS, batch_size) * row_bytes
    window = (budget - fixed) // max(row_bytes, 1) - batch_size
    window = window // block_rows * block_rows
    if window < block_rows:
        raise ValueError(
            f"A byte budget of {budget / 2**20:.1f} MiB cannot hold one block of {block_rows} "
            f"rows plus a batch of {batch_size} ({row_bytes} bytes per row over the layers read "
            "together): raise budget, or lower batch_size or block_rows."
        )
    return int(min(window, MAX_WINDOW_ROWS // block_rows * block_rows)), int(readahead)


def batches_ahead(f32_row_bytes: int, out_row_bytes: int) -> int:
    """How many assembled batches may wait for the caller (built or being built): as many as fit
    the float32 batch `plan_window` reserves, at least one."""
    return max(1, f32_row_bytes // max(out_row_bytes, 1))


class StoreBatches:
    """One epoch's shuffled batches of rows read from per-shard ``.npy`` files.

    `files[layer][shard]` lists each layer's files in shard order; all layers of a shard have
    the same number of rows. Yields tensors ``[B, D]`` (or ``{layer: [B, D]}`` when `as_dict`)
    of `dtype` (float32; None: the store's own), in page-locked memory when `pin_memory` (which
    needs CUDA), assembled in a background thread when `background` (None: for batches of at
    least `BACKGROUND_BYTES`).
    """

    def __init__(
        self,
        files: dict[int, list[Path]],
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        drop_last: bool = False,
        budget: int = DEFAULT_BUDGET,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        window_rows: int | None = None,
        readahead_blocks: int = READAHEAD_BLOCKS,
        as_dict: bool = False,
        dtype: Any = np.float32,
        pin_memory: bool = False,
        background: bool | None = None,
    ) -> None:
        if batch_size < 1 or block_rows < 1:
            raise ValueError(f"batch_size ({batch_size}) and block_rows must be positive.")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError(
                "pin_memory=True needs CUDA (page-locked memory only speeds up copies to a GPU) "
                "and torch.cuda.is_available() is False: pass pin_memory=False."
            )
        self.pin_memory = pin_memory
        self.layers = list(files)
        self.sources = {ly: [NpyRows.open(p) for p in files[ly]] for ly in self.layers}
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.block_rows, self.as_dict = block_rows, as_dict
        first = self.sources[self.layers[0]]
        self.row_bytes = sum(s[0].width * s[0].dtype.itemsize for s in self.sources.values())
        f32_row_bytes = sum(s[0].width * 4 for s in self.sources.values())
        planned, readahead = plan_window(
            self.row_bytes, f32_row_bytes, batch_size, budget, block_rows, readahead_blocks
        )
        window_rows = planned if window_rows is None else window_rows
        self.readahead_blocks = readahead
        self.dtypes = {
            ly: np.dtype(self.sources[ly][0].dtype if dtype is None else dtype)
            for ly in self.layers
        }
        too_wide = sorted({str(d) for d in self.dtypes.values() if d.itemsize > 4})
        if too_wide:  # the plan reserves float32 batches; wider ones would break the budget
            raise ValueError(
                f"Batches of dtype {too_wide[0]} are wider than the float32 batches the memory "
                "budget reserves; ask for float32, float16 or None (the store's own)."
            )
        out_row_bytes = sum(s[0].width * self.dtypes[ly].itemsize for ly, s in self.sources.items())
        self.ahead = batches_ahead(f32_row_bytes, out_row_bytes)
        big = batch_size * out_row_bytes >= BACKGROUND_BYTES
        self.background = big if background is None else background
        self.blocks = [
            (shard, lo, min(lo + block_rows, part.n_rows))
            for shard, part in enumerate(first)
            for lo in range(0, part.n_rows, block_rows)
        ]
        self.n_rows = sum(part.n_rows for part in first)
        # A store smaller than the window needs no more than itself.
        whole = -(-self.n_rows // block_rows) * block_rows
        self.window_rows = max(block_rows, min(window_rows, whole) // block_rows * block_rows)
        self.rng = np.random.default_rng([seed, epoch])

    def _windows(self) -> list[list[tuple[int, int, int]]]:
        order = self.rng.permutation(len(self.blocks)) if self.shuffle else range(len(self.blocks))
        windows: list[list[tuple[int, int, int]]] = [[]]
        rows = 0
        for b in order:
            block = self.blocks[b]
            if rows + block[2] - block[1] > self.window_rows:
                windows.append([])
                rows = 0
            windows[-1].append(block)
            rows += block[2] - block[1]
        return [w for w in windows if w]

    def _read_ahead(self, windows, blocks: queue.Queue, stop: threading.Event) -> None:
        """Background reader: every block of every window, in order, then None."""
        try:
            for window in windows:
                for shard, lo, hi in window:
                    item = {ly: self.sources[ly][shard].read(lo, hi) for ly in self.layers}
                    if not _put(blocks, item, stop):
                        return
            _put(blocks, None, stop)
        except BaseException as err:  # handed to the consumer, which raises it
            _put(blocks, err, stop)

    def __iter__(self) -> Iterator[torch.Tensor | dict[int, torch.Tensor]]:
        windows = self._windows()
        blocks: queue.Queue = queue.Queue(maxsize=max(1, self.readahead_blocks))
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=self._read_ahead, args=(windows, blocks, stop), daemon=True,
                name="saekit-store-reader",
            )
        ]  # fmt: skip
        batches = self._assemble(windows, blocks, stop)
        if self.background:
            ready: queue.SimpleQueue = queue.SimpleQueue()  # bounded by the slots
            slots = threading.Semaphore(self.ahead)
            threads.append(
                threading.Thread(
                    target=_assemble_ahead, args=(batches, ready, slots, stop), daemon=True,
                    name="saekit-store-assembler",
                )
            )  # fmt: skip
            batches = _take(ready, slots)
        for thread in threads:
            thread.start()
        try:
            yield from batches
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def _assemble(self, windows, blocks: queue.Queue, stop: threading.Event) -> Iterator[Any]:
        """The epoch's batches, gathered from each window as the reader fills it."""
        capacity = self.window_rows + self.batch_size
        window = {
            ly: np.empty((capacity, self.sources[ly][0].width), self.sources[ly][0].dtype)
            for ly in self.layers
        }
        carried = 0  # rows left from the previous window, kept at the window's start
        for position, spec in enumerate(windows):
            filled = carried
            for _ in spec:
                item = _get(blocks, stop)
                if item is _STOPPED:
                    return
                if isinstance(item, BaseException):
                    raise item
                n = len(item[self.layers[0]])
                for ly in self.layers:
                    window[ly][filled : filled + n] = item[ly]
                filled += n
            perm = self.rng.permutation(filled) if self.shuffle else np.arange(filled)
            n_full = filled // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                yield self._batch(window, perm[start : start + self.batch_size])
            rest = perm[n_full:]
            if position + 1 == len(windows):
                if len(rest) and not self.drop_last:
                    yield self._batch(window, rest)
            else:
                for ly in self.layers:
                    window[ly][: len(rest)] = window[ly][rest]
                carried = len(rest)

    def _batch(self, window, picked) -> torch.Tensor | dict[int, torch.Tensor]:
        tensors = {}
        for ly in self.layers:
            shape = (len(picked), window[ly].shape[1])
            if self.pin_memory:
                tensor = torch.empty(shape, dtype=_torch_dtype(self.dtypes[ly]), pin_memory=True)
                batch = tensor.numpy()
            else:  # numpy's allocator, which tracemalloc sees (the budget test counts it)
                batch = np.empty(shape, self.dtypes[ly])
                tensor = torch.from_numpy(batch)
            for start in range(0, len(picked), GATHER_ROWS):  # a bounded temporary per copy
                batch[start : start + GATHER_ROWS] = window[ly][picked[start : start + GATHER_ROWS]]
            tensors[ly] = tensor
        return tensors if self.as_dict else tensors[self.layers[0]]


#: Handed over in place of an item when the consumer has stopped, or after the last batch.
_STOPPED, _END = object(), object()


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _assemble_ahead(
    batches: Iterator[Any], ready: queue.SimpleQueue, slots: threading.Semaphore,
    stop: threading.Event,
) -> None:  # fmt: skip
    """Background assembler: build each batch once a slot is free, hand it over, then `_END`
    (or the error that stopped it)."""
    try:
        while True:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            batch = next(batches, _END)
            ready.put(batch)
            if batch is _END:
                return
    except BaseException as err:  # handed to the consumer, which raises it
        ready.put(err)


def _take(ready: queue.SimpleQueue, slots: threading.Semaphore) -> Iterator[Any]:
    """The consumer's side of `_assemble_ahead`: each batch taken frees its slot."""
    while True:
        item = ready.get()
        slots.release()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _get(blocks: queue.Queue, stop: threading.Event) -> Any:
    """The next block, or `_STOPPED` once the consumer has stopped (the reader may be gone)."""
    while True:
        try:
            return blocks.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return _STOPPED


def _put(blocks: queue.Queue, item, stop: threading.Event) -> bool:
    """Queue `item` unless the consumer has stopped (then False, and the reader ends)."""
    while not stop.is_set():
        try:
            blocks.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def store_batches(
    files: dict[int, list[Path]], batch_size: int, **kwargs
) -> Iterator[torch.Tensor | dict[int, torch.Tensor]]:
    """A generator over `StoreBatches` (argument errors surface at the first ``next``)."""
    yield from StoreBatches(files, batch_size, **kwargs)


__all__: Sequence[str] = (
    "BACKGROUND_BYTES", "DEFAULT_BUDGET", "NpyRows", "StoreBatches", "batches_ahead",
    "plan_window",
)  # fmt: skip
