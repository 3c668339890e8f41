"""Extraction from streamed inputs (`saekit.streams`: WebDataset tar shards, Hugging Face
streaming) into the same store `saekit.activations.extract` writes.

The unit of work is a source. Each source is cut into chunks of ``shard_images`` samples, and
chunk ``c`` of source ``s`` becomes store shard ``s * CHUNK_STRIDE + c``, whatever the number of
ranks and workers. Rank ``r`` of a torchrun job reads the sources ``s % world == r``; with
``decode_workers`` each DataLoader worker reads its own sources of this rank (an
``IterableDataset``), decodes and preprocesses them, and hands forward batches (``batch_size``
consecutive samples of one chunk, the readable ones encoded) to the process that runs the model.
That process commits each finished chunk as a shard with the commit protocol of
`saekit.activations`, and records in it the chunk's sample ids and whether it ends its source.

The number of images is known only at the end: rank 0 then writes ``image_ids.json`` (every
sample id, unreadable ones included, in shard order), each shard's ``row_offset`` (its first
sample's place in that list; `ActivationStore` adds it to ``rows.npy``) and the skipped list.
The store is therefore the one a single process writes, byte for byte on a CPU. A rerun skips
committed chunks (their samples are passed over undecoded, sources that ended are not opened)
and writes the rest.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saekit import distributed
from saekit.activation_store import ActivationStore, StoreMismatchError
from saekit.activations import (
    _default_shard_images,
    _read_shard_record,
    _save_manifest,
    existing_manifest,
    locked_output,
    manifest_head,
)
from saekit.data import UnreadableImageError, as_pil_images
from saekit.durable import remove_tree, write_json_atomic
from saekit.models import Encoder
from saekit.shard_writer import ShardParts, ShardWriter
from saekit.streams import StreamingImages, StreamSample

#: Shard index of chunk c of source s: s * CHUNK_STRIDE + c (store order = source, then chunk).
CHUNK_STRIDE = 1_000_000
#: What a shard record adds for a streamed store (kept in the manifest's shard entries too).
_STREAM_FIELDS = ("source", "chunk", "last")


def shard_index(source: int, chunk: int) -> int:
    """The store shard that holds chunk `chunk` of source `source`."""
    if chunk >= CHUNK_STRIDE:
        raise ValueError(
            f"Source {source} has more than {CHUNK_STRIDE} chunks of shard_images samples; "
            "raise --shard-images or split the source into smaller shards."
        )
    return source * CHUNK_STRIDE + chunk


def _lookahead(items: Iterator[StreamSample]) -> Iterator[tuple[StreamSample, bool]]:
    """Each item with whether it is the last (one item read ahead, not decoded)."""
    items = iter(items)
    try:
        previous = next(items)
    except StopIteration:
        return
    for item in items:
        yield previous, False
        previous = item
    yield previous, True


def _decode(samples: list[StreamSample], pool: ThreadPoolExecutor | None) -> tuple[list, list]:
    """(positions-in-batch of readable samples with their images, [(position, error)])."""

    def one(sample: StreamSample) -> Any:
        try:
            return sample.image()
        except (UnreadableImageError, OSError) as err:
            return err

    results = pool.map(one, samples) if pool is not None else map(one, samples)
    kept, errors = [], []
    for position, image in enumerate(results):
        if isinstance(image, Exception):
            errors.append((position, str(image)))
        else:
            kept.append((position, image))
    return kept, errors


def source_batches(
    images: StreamingImages,
    source: int,
    shard_images: int,
    batch_size: int,
    done: dict[int, list[str]],
    prepare: Callable[[list[StreamSample]], dict],
) -> Iterator[dict]:
    """The forward batches of one source's unfinished chunks, in order: ``batch_size``
    consecutive samples of a chunk, prepared by `prepare` (decoded, maybe preprocessed).

    `done` maps committed shards to their sample ids: their samples are passed over undecoded,
    after checking each id against the shard's, so a source changed since (same name, other
    samples) is refused rather than resumed into a store that would mix the two."""
    batch: list[StreamSample] = []
    for n, (sample, last) in enumerate(_lookahead(images.iter_source(source))):
        chunk, position = divmod(n, shard_images)
        committed = done.get(shard_index(source, chunk))
        if committed is not None:
            stored = committed[position] if position < len(committed) else None
            if stored != sample.image_id:
                raise StoreMismatchError(
                    f"Source {images.sources[source]} changed since this store's shard "
                    f"{shard_index(source, chunk)} was written: its sample {n} is "
                    f"{sample.image_id}, the shard holds {stored}. Restore the source as it "
                    "was and rerun, or extract to a new --out folder."
                )
            continue
        batch.append(sample)
        chunk_end = last or position == shard_images - 1
        if len(batch) == batch_size or chunk_end:
            prepared = prepare(batch)
            prepared.update(
                source=source, chunk=chunk, start=position + 1 - len(batch),
                ids=[s.image_id for s in batch], labels=[s.label for s in batch],
                chunk_end=chunk_end, source_end=last,
            )  # fmt: skip
            yield prepared
            batch = []


class _PreparedSources(torch.utils.data.IterableDataset):
    """A rank's sources dealt to DataLoader workers (worker w of W: its w-th, (w+W)-th, ...),
    each decoded and preprocessed with the model's processor in the worker."""

    def __init__(self, images, sources, shard_images, batch_size, done, processor) -> None:
        self.images, self.sources, self.done, self.processor = images, sources, done, processor
        self.shard_images, self.batch_size = shard_images, batch_size

    def _prepare(self, samples: list[StreamSample]) -> dict:
        kept, errors = _decode(samples, None)
        pixels = None
        if kept:
            pil = as_pil_images([image for _, image in kept])
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        return {"kept": [p for p, _ in kept], "errors": errors, "pixels": pixels, "pil": None}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.sources if info is None else self.sources[info.id :: info.num_workers]
        for source in mine:
            yield from source_batches(
                self.images, source, self.shard_images, self.batch_size, self.done, self._prepare
            )


def extract_stream(
    encoder: Encoder,
    images: StreamingImages,
    layer_ids: list[int],
    kinds: tuple[str, ...],
    out: Path,
    dtype: str,
    batch_size: int,
    shard_images: int | None,
    workers: tuple[int, int],
    progress: bool,
) -> ActivationStore:
    """`saekit.activations.extract` for a `StreamingImages` (which calls this; see there and
    the module docstring). `workers`: (decoding threads, DataLoader decode processes)."""
    if not images.sources:
        raise ValueError("The stream has no sources: nothing to extract.")
    ranks = distributed.current()
    args = (encoder, images, layer_ids, kinds, out, dtype, batch_size, shard_images)
    with contextlib.ExitStack() as held:

        def lock_and_prepare() -> tuple[dict, int]:
            locked_output(out, held, ranks)
            prepared = _prepare(*args)
            _warn_idle(len(images.sources), ranks.world, workers[1])
            return prepared

        manifest, shard_images = distributed.on_rank0(ranks, lock_and_prepare)
        if manifest["identity"]["dataset"] != images.fingerprint:
            # Each rank expanded the pattern (or resolved the dataset) itself: a shard that
            # appeared meanwhile would deal the sources differently, overlapping or missing some.
            raise StoreMismatchError(
                f"Rank {ranks.rank} sees other sources than rank 0 ({len(images.sources)} "
                "sources; the set changed while the job started). Rerun once the input is "
                "complete and unchanged."
            )
        if not manifest["complete"]:
            with distributed.all_or_none(ranks, "extracting its sources"):
                _extract_sources(args, manifest, shard_images, workers, progress, ranks)
            with distributed.all_or_none(ranks, "finishing the store"):
                if ranks.is_main:
                    _recover(out, manifest)  # enters the other ranks' shards
                    _finish(out, manifest, images)
    return ActivationStore.open(out)


def _warn_idle(n_sources: int, world: int, decode_workers: int) -> None:
    readers = world * max(1, decode_workers)
    if n_sources < readers:
        warnings.warn(
            f"{n_sources} sources for {world} rank(s) x {max(1, decode_workers)} decode "
            f"worker(s): {readers - n_sources} reader(s) sit idle, since a source is read by one "
            "reader. Re-shard the collection into at least as many files as readers (e.g. "
            "webdataset's `widsindex`/`tarp split`, or Dataset.to_parquet per shard), or use "
            "fewer --workers.",
            stacklevel=4,
        )


def _prepare(
    encoder: Encoder,
    images: StreamingImages,
    layer_ids: list[int],
    kinds: tuple[str, ...],
    out: Path,
    dtype: str,
    batch_size: int,
    shard_images: int | None,
) -> tuple[dict, int]:
    """The store's manifest, checked against these arguments or started, after recovering an
    interrupted run; and the samples per shard."""
    if shard_images is None:
        shard_images = _default_shard_images(
            encoder, layer_ids, kinds, np.dtype(dtype).itemsize, batch_size
        )
    identity = {
        "model": encoder.identity,
        "layers": layer_ids,
        "tokens": list(kinds),
        "dtype": dtype,
        "dataset": images.fingerprint,
        "input": "stream",
        "n_sources": len(images.sources),
        "shard_images": int(shard_images),
    }
    manifest = existing_manifest(out, identity)
    if manifest is not None:
        if manifest["complete"]:
            return manifest, shard_images
    else:
        manifest = {
            **manifest_head(identity, encoder, layer_ids, kinds, dtype),
            "class_names": images.class_names,
            "wnids": images.wnids,
            "n_images": None,
            "sources": list(images.sources),
            "chunk_stride": CHUNK_STRIDE,
            "shards": [],
            "skipped": [],
            "grids": {},
            "complete": False,
        }
        write_json_atomic(out / "manifest.json", manifest)
    _recover(out, manifest)
    return manifest, int(shard_images)


def _ended_sources(manifest: dict) -> set[int]:
    """Sources whose every chunk is committed, through the one that ends the source."""
    chunks: dict[int, set[int]] = {}
    ends: dict[int, int] = {}
    for shard in manifest["shards"]:
        chunks.setdefault(shard["source"], set()).add(shard["chunk"])
        if shard["last"]:
            ends[shard["source"]] = shard["chunk"]
    return {s for s, end in ends.items() if chunks[s] >= set(range(end + 1))}


def _extract_sources(
    args: tuple, manifest: dict, shard_images: int, workers: tuple[int, int], progress: bool,
    ranks: distributed.Ranks,
) -> None:  # fmt: skip
    """Write this rank's unfinished chunks; rank 0 enters each shard as it commits it."""
    encoder, images, layer_ids, kinds, out, dtype, batch_size, _ = args
    ended = _ended_sources(manifest)
    done = {  # the committed shards of sources still to read, with their sample ids
        shard["index"]: _shard_record(out, shard["index"])["ids"]
        for shard in manifest["shards"]
        if shard["source"] not in ended
    }
    mine = [s for s in range(len(images.sources)) if ranks.owns(s) and s not in ended]
    with ThreadPoolExecutor(max_workers=max(1, workers[0])) as pool:
        if workers[1] > 0 and mine:
            stream = _PreparedSources(
                images, mine, shard_images, batch_size, done, encoder.processor
            )
            # iter() forks the workers now, before the progress bar starts tqdm's monitor
            # thread: a fork while a thread is being started can deadlock the child.
            batches: Any = iter(
                torch.utils.data.DataLoader(
                    stream, batch_size=None, num_workers=min(workers[1], len(mine)),
                    pin_memory=torch.device(encoder.device).type == "cuda",
                )
            )  # fmt: skip
        else:

            def prepare(samples: list[StreamSample]) -> dict:
                kept, errors = _decode(samples, pool)
                return {"kept": [p for p, _ in kept], "errors": errors, "pixels": None,
                        "pil": [image for _, image in kept]}  # fmt: skip

            batches = (
                batch
                for source in mine
                for batch in source_batches(images, source, shard_images, batch_size, done, prepare)
            )
        rank = f" [rank {ranks.rank}/{ranks.world}]" if ranks.world > 1 else ""
        bar = tqdm(desc=f"extract {Path(encoder.model_id).name}{rank}", unit="img",
                   disable=not progress)  # fmt: skip
        writer = ShardWriter(encoder, None, layer_ids, kinds, np.dtype(dtype), batch_size, out, bar)
        _encode_and_commit(writer, batches, layer_ids, kinds, manifest, out, ranks)
        bar.close()


def _encode_and_commit(writer, batches, layer_ids, kinds, manifest, out, ranks) -> None:
    """Run the model over each batch, and commit a chunk's shard when its last batch is in
    (batches of several chunks may interleave: one chunk per decode worker is open)."""
    open_chunks: dict[tuple[int, int], tuple[ShardParts, list[str]]] = {}
    for batch in batches:
        key = (int(batch["source"]), int(batch["chunk"]))
        parts, ids = open_chunks.setdefault(key, (ShardParts(layer_ids, kinds), []))
        start = int(batch["start"])
        ids.extend(batch["ids"])
        for position, error in batch["errors"]:
            parts.skipped.append(
                {"index": start + int(position), "id": batch["ids"][position], "error": error}
            )
        kept = [int(p) for p in batch["kept"]]
        writer.add_batch(
            parts, [start + p for p in kept], [int(batch["labels"][p]) for p in kept],
            images=batch["pil"], pixels_BCHW=batch["pixels"],
        )  # fmt: skip
        writer.bar.update(len(batch["ids"]))
        if batch["chunk_end"]:
            del open_chunks[key]
            extra = {"source": key[0], "chunk": key[1], "last": bool(batch["source_end"]),
                     "ids": ids}  # fmt: skip
            record = writer.commit(shard_index(*key), parts, extra)
            if ranks.is_main:
                _enter(manifest, record)
                _save_manifest(out, manifest)


def _enter(manifest: dict, record: dict) -> None:
    """Enter a committed shard in the manifest (index order, however it arrived)."""
    entry = {k: record[k] for k in ("index", "rows", "grids", *_STREAM_FIELDS)}
    entry["samples"] = len(record["ids"])
    manifest["shards"] = sorted(
        [s for s in manifest["shards"] if s["index"] != entry["index"]] + [entry],
        key=lambda shard: shard["index"],
    )


def _shard_record(out: Path, index: int) -> dict:
    """A committed shard's ``shard.json``."""
    return json.loads((out / f"shard_{index:05d}" / "shard.json").read_text())


def _recover(out: Path, manifest: dict) -> None:
    """Bring the folder and the manifest into agreement after an interrupted run (as
    `saekit.activations._recover_shards`): unfinished ``.tmp`` folders go, a committed shard
    the manifest missed is entered from its record, a listed shard whose folder has gone is
    written again."""
    for leftover in out.glob("shard_*.tmp"):
        remove_tree(leftover)
    changed = False
    for shard in list(manifest["shards"]):
        if not (out / f"shard_{shard['index']:05d}").is_dir():
            warnings.warn(
                f"{out}: shard {shard['index']} is listed in the manifest but its folder is "
                "missing; extracting it again.",
                stacklevel=3,
            )
            manifest["shards"].remove(shard)
            changed = True
    listed = {shard["index"] for shard in manifest["shards"]}
    for folder in sorted(out.glob("shard_*")):
        suffix = folder.name.removeprefix("shard_")
        if not suffix.isdigit() or int(suffix) in listed:
            continue
        record = _read_shard_record(folder, int(suffix))
        if record is None:
            remove_tree(folder)
        else:
            _enter(manifest, record)
            changed = True
    if changed:
        _save_manifest(out, manifest)


def _finish(out: Path, manifest: dict, images: StreamingImages) -> None:
    """Number the samples (``image_ids.json``, each shard's ``row_offset``, the skipped list in
    store order), name the classes if the stream did not, and mark the store complete."""
    ids: list[str] = []
    skipped: list[dict] = []
    grids: dict[str, list[int]] = {}
    max_label = -1
    for shard in manifest["shards"]:
        folder = out / f"shard_{shard['index']:05d}"
        record = json.loads((folder / "shard.json").read_text())
        shard["row_offset"] = len(ids)
        skipped += [{**s, "index": len(ids) + s["index"]} for s in record["skipped"]]
        ids += record["ids"]
        grids.update(record["grids"])
        if record["rows"]:
            max_label = max(max_label, int(np.load(folder / "labels.npy").max()))
    write_json_atomic(out / "image_ids.json", ids)
    manifest["skipped"], manifest["grids"], manifest["n_images"] = skipped, grids, len(ids)
    if manifest["class_names"] is None:
        manifest["class_names"] = [str(c) for c in range(max_label + 1)]
    manifest["n_rows"] = sum(shard["rows"] for shard in manifest["shards"])
    if manifest["n_rows"] == 0:
        first = "; ".join(f"{s['id']}: {s['error']}" for s in skipped[:3])
        raise ValueError(
            f"None of the {len(ids)} samples of the {len(images.sources)} sources could be read"
            + (f" ({first} ...)." if first else ".")
        )
    manifest["complete"] = True
    _save_manifest(out, manifest)
