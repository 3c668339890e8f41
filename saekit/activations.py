"""The activation store: extract once, read many times, survive interruption.

Layout of a store folder::

    manifest.json          what produced it (model identity: config, image processor and
                           weights fingerprints; layers, tokens, dtype, dataset fingerprint),
                           classes, completed shards, skipped images
    image_ids.json         one id per dataset image (rows point into it)
    shard_00000/           one folder per block of images, renamed into place when complete
        rows.npy           dataset index of each row (images that could not be read are absent;
                           a streamed store counts from the shard's first sample, and the
                           manifest's row_offset of the shard is added when read)
        labels.npy         class index of each row
        L3_cls.npy         [rows, D]      one file per layer and token kind,
        L3_patch.npy       [rows, P, D]   memory-mapped when read
        shard.json         the shard's record (rows, grids, skipped images), written last

The commit protocol (`saekit.storage`): a shard is written to ``shard_XXXXX.tmp``, every file
fsync'd, ``shard.json`` last; the folder is renamed into place (the commit) and then entered in
the manifest, which is replaced atomically. A run killed at any step resumes: unfinished
``.tmp`` folders are dropped, a committed shard the manifest missed is entered from its
``shard.json``, and a finished shard is never rewritten. One extraction at a time may write a
folder (a lock file; the second gets `FolderLockedError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from saekit import distributed
from saekit.activation_store import (
    TOKEN_KINDS,
    ActivationStore,
    ShardedArray,
    Store,
    StoreMismatchError,
    _token_kinds,
)
from saekit.data import ImageDataset
from saekit.durable import (
    LOCK_FILE,
    FolderLockedError,
    check_writable,
    folder_lock,
    remove_tree,
    write_json_atomic,
)
from saekit.models import Encoder, load_encoder
from saekit.shard_writer import (
    SHARD_RECORD,
    ShardWriter,
    StoreWriteError,
    decoded_batches,
)
from saekit.streams import StreamingImages

__all__ = [
    "TOKEN_KINDS",
    "ActivationStore",
    "FolderLockedError",
    "OutputNotEmptyError",
    "ShardedArray",
    "Store",
    "StoreMismatchError",
    "StoreWriteError",
    "extract",
]

FORMAT_VERSION = 2


class OutputNotEmptyError(FileExistsError):
    """The output folder holds files that are not an activation store."""


#: Names an output folder may hold before its manifest exists (a run killed while starting).
_STARTING_NAMES = {"image_ids.json", "image_ids.json.tmp", "manifest.json.tmp", LOCK_FILE}
_SHARD_NAME = re.compile(r"^shard_(\d{5,})$")


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


def check_output_folder(out: Path) -> None:
    """Refuse a folder that holds something other than a (possibly unfinished) store, then
    prove it is writable, before any model runs."""
    if out.is_dir() and not (out / "manifest.json").exists():
        foreign = sorted(
            p.name
            for p in out.iterdir()
            if p.name not in _STARTING_NAMES and not p.name.startswith(".saekit-probe-")
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise OutputNotEmptyError(
                f"{out} is not empty ({shown}) and holds no activation store (no "
                "manifest.json). Choose a new or empty --out folder."
            )
    check_writable(out, "activation store")


def _mismatch_message(out: Path, stored: dict, identity: dict) -> str:
    changed = sorted(k for k in identity if stored.get(k) != identity[k])
    if changed == ["shard_images"]:
        hint = (
            " (shard_images follows --batch-size unless given: resume with the first run's "
            "batch size)"
        )
    elif "model" in changed and not isinstance(stored.get("model"), dict):
        hint = " (the store was made by an older saekit, which named models by their path)"
    elif "model" in changed:
        parts = sorted(
            k for k in identity["model"] if stored["model"].get(k) != identity["model"][k]
        )
        hint = f" (the model's {', '.join(parts)} differ)"
    else:
        hint = ""
    return (
        f"{out} already holds a store made with different {', '.join(changed)}{hint}. "
        "Choose another --out folder, or delete this one to start over."
    )


def extract(
    encoder: Encoder | str,
    dataset: ImageDataset | StreamingImages,
    layers: str | Sequence[int] = "all",
    tokens: str = "cls",
    out: str | os.PathLike = "activations",
    dtype: str = "float16",
    batch_size: int = 64,
    shard_images: int | None = None,
    num_workers: int = 4,
    progress: bool = True,
    decode_workers: int = 0,
) -> ActivationStore:
    """Run `encoder` over `dataset` once and store each requested layer's tokens under `out`.

    Re-running with identical arguments returns the existing store (resuming it first if an
    earlier run was interrupted, whatever step it was killed at); a store made with different
    arguments is never overwritten. The model is identified by its config, image processor and
    weights, not by how its path was spelled. Images that cannot be read are skipped and listed
    in the manifest (``store.skipped``). A second extraction into the same folder while one runs
    gets `FolderLockedError`.

    Images are decoded by `num_workers` threads, or, with ``decode_workers > 0``, decoded and
    preprocessed by that many DataLoader worker processes (pinned memory and non-blocking
    copies on a GPU); the store is the same either way. Under ``torchrun`` each process writes
    its share of the shards (see `saekit.distributed`).

    `dataset` may also be a stream (`saekit.streams`: WebDataset tar shards, a Hugging Face
    dataset in streaming mode), read source by source into the same store format
    (`saekit.stream_extract`).
    """
    if isinstance(encoder, str | os.PathLike):
        encoder = load_encoder(encoder)
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', not {dtype!r}.")
    if batch_size < 1 or (shard_images is not None and shard_images < 1):
        raise ValueError(
            f"batch_size ({batch_size}) and shard_images ({shard_images}) must be positive."
        )
    kinds = _token_kinds(tokens)
    layer_ids = encoder.resolve_layers(layers)
    out = Path(out).expanduser()
    if isinstance(dataset, StreamingImages):
        from saekit.stream_extract import extract_stream

        return extract_stream(
            encoder, dataset, layer_ids, kinds, out, dtype, batch_size, shard_images,
            (num_workers, decode_workers), progress,
        )  # fmt: skip
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to extract.")
    ranks = distributed.current()
    args = (encoder, dataset, layer_ids, kinds, out, dtype, batch_size, shard_images)
    if ranks.world > 1:
        return _extract_on_ranks(ranks, args, (num_workers, decode_workers), progress)
    check_output_folder(out)
    with folder_lock(out, "saekit extract"):
        manifest, shard_images = _prepare(*args)
        if not manifest["complete"]:
            workers = (num_workers, decode_workers)
            _extract_shards(args, manifest, shard_images, workers, progress, ranks)
            _finish(out, manifest, len(dataset))
    return ActivationStore.open(out)


def _extract_on_ranks(
    ranks: distributed.Ranks, args: tuple, workers: tuple[int, int], progress: bool
) -> ActivationStore:
    """One rank's share of a multi-process extraction (under torchrun).

    Rank 0 holds the folder lock, checks or starts the manifest and recovers an interrupted
    run; every rank then writes the shards it owns (shard ``i`` is rank ``i % world``'s) and
    commits them by renaming, as one process would; rank 0 finally enters them all in the
    manifest from their ``shard.json``. The shards are the ones a single process writes (same
    images per shard), so the store is the same; a rerun resumes each rank's missing shards.
    """
    out = args[4]
    with contextlib.ExitStack() as held:

        def lock_and_prepare() -> tuple[dict, int]:
            locked_output(out, held, ranks)
            return _prepare(*args)

        manifest, shard_images = distributed.on_rank0(ranks, lock_and_prepare)
        if not manifest["complete"]:
            with distributed.all_or_none(ranks, "extracting its shards"):
                _extract_shards(args, manifest, shard_images, workers, progress, ranks)
            with distributed.all_or_none(ranks, "finishing the store"):
                if ranks.is_main:
                    _recover_shards(out, manifest, shard_images)  # enters the other ranks' shards
                    _finish(out, manifest, len(args[1]))
    return ActivationStore.open(out)


def _prepare(
    encoder: Encoder,
    dataset: ImageDataset,
    layer_ids: list[int],
    kinds: tuple[str, ...],
    out: Path,
    dtype: str,
    batch_size: int,
    shard_images: int | None,
) -> tuple[dict, int]:
    """The store's manifest, checked against these arguments or started, after recovering an
    interrupted run; and the images per shard."""
    np_dtype = np.dtype(dtype)
    if shard_images is None:
        shard_images = _default_shard_images(
            encoder, layer_ids, kinds, np_dtype.itemsize, batch_size
        )
    identity = {
        "model": encoder.identity,
        "layers": layer_ids,
        "tokens": list(kinds),
        "dtype": dtype,
        "dataset": _dataset_fingerprint(dataset),
        "n_images": len(dataset),
        "shard_images": int(shard_images),
    }
    manifest = existing_manifest(out, identity)
    if manifest is not None:
        if manifest["complete"]:
            return manifest, shard_images
    else:
        write_json_atomic(out / "image_ids.json", list(dataset.image_ids))
        manifest = {
            **manifest_head(identity, encoder, layer_ids, kinds, dtype),
            "class_names": list(dataset.class_names),
            "wnids": list(dataset.wnids) if dataset.wnids is not None else None,
            "n_images": len(dataset),
            "shards": [],
            "skipped": [],
            "grids": {},
            "complete": False,
        }
        write_json_atomic(out / "manifest.json", manifest)

    _recover_shards(out, manifest, shard_images)
    return manifest, shard_images


def locked_output(out: Path, held: contextlib.ExitStack, ranks: distributed.Ranks) -> None:
    """Check `out` can hold a store and hold its folder lock for the rest of `held`."""
    check_output_folder(out)
    what = "saekit extract" + (f" ({ranks.world} ranks)" if ranks.world > 1 else "")
    held.enter_context(folder_lock(out, what))


def existing_manifest(out: Path, identity: dict) -> dict | None:
    """The manifest in `out`, checked against this run's `identity` (`StoreMismatchError`
    saying what differs), or None when the folder has none yet."""
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest["identity"] != identity:
        raise StoreMismatchError(_mismatch_message(out, manifest["identity"], identity))
    return manifest


def manifest_head(
    identity: dict, encoder: Encoder, layer_ids: list[int], kinds: tuple[str, ...], dtype: str
) -> dict:
    """The start of a new store's manifest: its format and identity, the model and the layout
    (the same for folder and streamed extraction; the dataset's part follows)."""
    model_path = Path(encoder.model_id).expanduser()
    return {
        "format": FORMAT_VERSION,
        "identity": identity,
        "model": encoder.model_id,
        "model_path": str(model_path.resolve()) if model_path.is_dir() else None,
        "family": encoder.family,
        "layers": layer_ids,
        "tokens": list(kinds),
        "dtype": dtype,
        "widths": {str(layer): encoder.widths[layer] for layer in layer_ids},
        "d_model": encoder.widths[layer_ids[-1]],
    }


def _extract_shards(
    args: tuple, manifest: dict, shard_images: int, workers: tuple[int, int], progress: bool,
    ranks: distributed.Ranks,
) -> None:  # fmt: skip
    """Write this rank's missing shards (every shard in a single process); rank 0 enters
    each in the manifest as it commits it."""
    encoder, dataset, layer_ids, kinds, out, dtype, batch_size, _ = args
    n_shards = -(-len(dataset) // shard_images)
    done = {shard["index"] for shard in manifest["shards"]}
    mine = [i for i in range(n_shards) if ranks.owns(i)]
    images = {i: range(i * shard_images, min((i + 1) * shard_images, len(dataset))) for i in mine}
    todo = [i for i in mine if i not in done]
    # Decode workers fork here, before the progress bar starts tqdm's monitor thread: a fork
    # while a thread is being started can deadlock the child.
    decoded = decoded_batches(encoder, dataset, [images[i] for i in todo], batch_size, workers[1])
    rank = f" [rank {ranks.rank}/{ranks.world}]" if ranks.world > 1 else ""
    bar = tqdm(
        total=sum(len(r) for r in images.values()),
        initial=sum(len(images[i]) for i in mine if i in done),
        desc=f"extract {Path(encoder.model_id).name}{rank}",
        unit="img",
        disable=not progress,
    )
    writer = ShardWriter(encoder, dataset, layer_ids, kinds, np.dtype(dtype), batch_size, out, bar)
    with ThreadPoolExecutor(max_workers=max(1, workers[0])) as pool:
        for index in todo:
            record = writer.write(index, images[index], pool, decoded)
            if ranks.is_main:
                _add_shard(manifest, record)
                _save_manifest(out, manifest)
    bar.close()


def _finish(out: Path, manifest: dict, n_images: int) -> None:
    """Count the rows and mark the store complete."""
    manifest["n_rows"] = sum(shard["rows"] for shard in manifest["shards"])
    if manifest["n_rows"] == 0:
        first = "; ".join(f"{s['id']}: {s['error']}" for s in manifest["skipped"][:3])
        raise ValueError(f"None of the {n_images} images could be read ({first} ...).")
    manifest["complete"] = True
    _save_manifest(out, manifest)


def _add_shard(manifest: dict, record: dict) -> None:
    """Enter a finished shard in the manifest (kept in index order, however it arrived)."""
    manifest["shards"].append({k: record[k] for k in ("index", "rows", "grids")})
    manifest["skipped"].extend(record["skipped"])
    manifest["grids"].update(record["grids"])
    manifest["shards"].sort(key=lambda shard: shard["index"])
    manifest["skipped"].sort(key=lambda entry: entry["index"])


def _save_manifest(out: Path, manifest: dict) -> None:
    try:
        write_json_atomic(out / "manifest.json", manifest)
    except OSError as err:
        raise StoreWriteError(
            err.errno,
            f"Updating {out / 'manifest.json'} failed ({err.strerror or err}). Free space or fix "
            "the folder, then rerun the same extraction: finished shards are kept.",
        ) from err


def _read_shard_record(folder: Path, index: int) -> dict | None:
    """A committed shard's record, or None when the folder is not a whole shard."""
    try:
        record = json.loads((folder / SHARD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("index") != index or not all((folder / f).is_file() for f in record["files"]):
        return None
    return record


def _recover_shards(out: Path, manifest: dict, shard_images: int) -> None:
    """Bring the folder and the manifest into agreement after an interrupted run.

    A shard is committed by renaming its finished folder into place, then entered in the
    manifest; a run can be killed anywhere in between. Unfinished ``shard_*.tmp`` folders are
    removed, a committed shard the manifest missed is entered from its ``shard.json``, and a
    listed shard whose folder has gone is extracted again.
    """
    for leftover in out.glob("shard_*.tmp"):
        remove_tree(leftover)
    listed = {shard["index"] for shard in manifest["shards"]}
    changed = False
    for shard in list(manifest["shards"]):
        if not (out / f"shard_{shard['index']:05d}").is_dir():
            warnings.warn(
                f"{out}: shard {shard['index']} is listed in the manifest but its folder is "
                "missing; extracting it again.",
                stacklevel=3,
            )
            lo, hi = shard["index"] * shard_images, (shard["index"] + 1) * shard_images
            manifest["shards"].remove(shard)
            manifest["skipped"] = [s for s in manifest["skipped"] if not lo <= s["index"] < hi]
            changed = True
    for folder in sorted(out.iterdir()):
        match = _SHARD_NAME.match(folder.name)
        if not match or int(match.group(1)) in listed:
            continue
        record = _read_shard_record(folder, int(match.group(1)))
        if record is None:
            remove_tree(folder)
        else:
            _add_shard(manifest, record)
            changed = True
    if changed:
        _save_manifest(out, manifest)
