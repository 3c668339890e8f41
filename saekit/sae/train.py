"""Training SAEs on activation stores, into output folders that are never silently overwritten.

`sweep_from_store` (and `train_from_store`, one SAE) build the batches the trainer
(:mod:`saekit.sae.trainer`) consumes from a store's layers, reading each batch of every layer
once. With an output folder, a run:

1. checks the folder is writable and locks it (a second run into it gets `FolderLockedError`);
2. claims it with a manifest (``sweep.json``; ``training.json`` for `train_to_folder`) naming the
   SAEs and everything else that determines them (the store's identity, token kind, batch size,
   epochs, data seed). A folder holding SAEs made with other settings, or unrelated files, is
   refused (`OutputExistsError`) unless ``overwrite=True`` (``--overwrite``); the same finished
   run is loaded, not retrained;
3. trains with checkpoints in ``.checkpoint`` (resumed only under the same settings), saves each
   SAE folder atomically, then marks the manifest complete and drops the checkpoint.

A run killed at any of those steps resumes to the same SAEs when run again.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE

import saekit
from saekit import distributed
from saekit.durable import (
    LOCK_FILE,
    check_writable,
    folder_lock,
    remove_file,
    remove_tree,
    replace_durably,
    write_json_atomic,
)
from saekit.sae.architectures import SAE_CFG_FILE, SAE_WEIGHTS_FILE, SAESpec, load_sae, save_sae
from saekit.sae.checkpoint import CHECKPOINT_FILE, CheckpointMismatchError
from saekit.sae.codes import NonFiniteActivationsError
from saekit.sae.recipes import get_recipe
from saekit.sae.trainer import (
    BatchSource,
    _common,
    sweep,
    tensor_batches,
    train_on_tensor,
    train_sae,
)

__all__ = [
    "CHECKPOINT_FILE",
    "SWEEP_MANIFEST",
    "TRAINING_MANIFEST",
    "BatchSource",
    "CheckpointMismatchError",
    "NonFiniteActivationsError",
    "OutputExistsError",
    "find_nonfinite_rows",
    "layer_width",
    "load_sweep",
    "save_sweep",
    "store_identity",
    "sweep",
    "sweep_from_store",
    "tensor_batches",
    "train_from_store",
    "train_on_tensor",
    "train_sae",
    "train_to_folder",
]

SWEEP_MANIFEST = "sweep.json"
TRAINING_MANIFEST = "training.json"
CHECKPOINT_DIR = ".checkpoint"


class OutputExistsError(FileExistsError):
    """The output folder holds SAEs made with other settings, or files saekit did not write."""


# --- activation stores ---------------------------------------------------------------------------


def train_from_store(store: Any, spec: SAESpec, **kwargs: Any) -> SAE:
    """Train one SAE on a store's layer ``spec.layer``; keyword arguments as for
    :func:`sweep_from_store`."""
    return sweep_from_store(store, [spec], **kwargs)[0]


def store_identity(store: Any) -> Any:
    """What identifies a store's content (its manifest ``identity``: model, layers, tokens,
    dtype, dataset), or for a store-like object without one its model, layers and size."""
    manifest = store.manifest
    return manifest.get("identity") or {
        k: manifest.get(k) for k in ("model", "layers", "d_model", "n_rows")
    }


def fill_specs(store: Any, specs: Sequence[SAESpec]) -> list[SAESpec]:
    """Specs with ``layer`` and ``d_in`` taken from the store (and checked against it)."""
    manifest = store.manifest
    layers = list(manifest["layers"])
    filled = []
    for spec in specs:
        layer = spec.layer
        if layer is None:
            if len(layers) != 1:
                raise ValueError(f"SAESpec needs a layer: the store has layers {layers}")
            layer = layers[0]
        if layer not in layers:
            raise ValueError(f"layer {layer!r} is not in the store; it has layers {layers}")
        width = layer_width(manifest, layer)
        if spec.d_in is not None and spec.d_in != width:
            raise ValueError(
                f"SAE {spec.label!r} expects d_in={spec.d_in} but the store's layer {layer} is "
                f"{width} wide (model {manifest.get('model')!r}); drop d_in or use another store"
            )
        filled.append(dataclasses.replace(spec, layer=layer, d_in=width))
    return filled


def _run_settings(
    store: Any, specs: Sequence[SAESpec], tokens: str, batch_size: int, epochs: int, seed: int
) -> dict[str, Any]:
    """Everything besides the specs that determines the SAEs (recorded and compared)."""
    settings = {
        "data": store_identity(store),
        "tokens": tokens,
        "batch_size": int(batch_size),
        "epochs": int(epochs),
        "data_seed": int(seed),
    }
    return json.loads(json.dumps(settings))


def _entries(specs: Sequence[SAESpec]) -> list[dict[str, Any]]:
    return json.loads(
        json.dumps([{"name": s.label, "spec": s.resolved().to_dict()} for s in specs])
    )


def sweep_from_store(
    store: Any,
    specs: Sequence[SAESpec],
    *,
    tokens: str = "cls",
    batch_size: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    check_data: bool = True,
    checkpoint_dir: str | Path | None = None,
    overwrite: bool = False,
    ranks: distributed.Ranks | None = None,
    **kwargs: Any,
) -> list[SAE]:
    """Train SAEs on an activation store's layers, reading each batch of every layer once.

    Uses only the store contract: ``manifest`` (``layers``, ``d_model`` or per-layer ``widths``,
    ``model``), ``cls(layer)`` / ``patches(layer)`` and ``batches(layer or [layers], batch_size,
    tokens=, seed=, epoch=)``; with several layers one call yields ``{layer: batch}`` with the same
    rows in every layer. ``tokens`` is ``cls`` or ``patch`` (one row per image patch). A spec
    without ``layer`` takes the store's only layer; ``d_in`` is filled from the store.
    ``batch_size`` defaults to the recipes'. With ``check_data`` every layer is scanned for
    NaN/Inf first so an error can name the store rows.

    With ``out_dir`` the SAEs are saved there (one folder each plus ``sweep.json``) following
    the module's protocol: a folder holding another run is refused unless ``overwrite``, the
    same finished run is loaded instead of retrained, checkpoints go to
    ``out_dir/.checkpoint`` and are removed once everything is saved. Each SAE's metadata
    records the store, model identity, layer and token kind it was trained on. Other keywords
    go to :func:`~saekit.sae.trainer.sweep`, except ``pin_memory`` (None: page-locked batches
    exactly when ``device`` is CUDA; True without CUDA is an error): a store whose ``batches``
    accepts ``dtype`` and ``pin_memory`` hands over batches in its own dtype, assembled off
    the training thread into page-locked memory, which the trainer copies to the GPU without
    blocking and casts to float32 there (see `_batch_options`).

    Under torchrun (or with `ranks` of several processes) and an ``out_dir``, the SAEs are
    dealt to the ranks (SAE ``i`` to rank ``i % world``), each rank trains its share on the same
    store, resumably, and rank 0 saves them all into ``out_dir`` as one process would.
    """
    filled = fill_specs(store, specs)
    resolved = [spec.resolved() for spec in filled]
    batch_size = batch_size or _common(resolved, "batch_size")
    epochs = kwargs.pop("epochs", None) or _common(resolved, "epochs")
    settings = _run_settings(store, filled, tokens, batch_size, epochs, seed)
    ranks = distributed.current() if ranks is None else ranks
    if ranks.world > 1 and out_dir is not None:
        from saekit.sae.distributed import sweep_on_ranks

        return sweep_on_ranks(store, filled, settings, Path(out_dir), overwrite, ranks, kwargs)
    if out_dir is None:
        return _train_on_store(store, filled, settings, checkpoint_dir, check_data, kwargs)
    out_dir = check_writable(out_dir, "SAE")
    with folder_lock(out_dir, f"training {len(filled)} SAE(s)"):
        checkpoint_dir = Path(checkpoint_dir or out_dir / CHECKPOINT_DIR)
        record = {"settings": settings, "saes": _entries(filled)}
        if _claim(out_dir, SWEEP_MANIFEST, record, overwrite, checkpoint_dir, sweep_layout=True):
            _drop_checkpoint(checkpoint_dir, out_dir)  # left if killed right after the save
            saved = load_sweep(out_dir, device=str(kwargs.get("device", "cpu")))
            return [saved[spec.label] for spec in filled]
        saes = _train_on_store(store, filled, settings, checkpoint_dir, check_data, kwargs)
        save_sweep(saes, filled, out_dir, settings=settings)
        _drop_checkpoint(checkpoint_dir, out_dir)
        return saes


def train_to_folder(
    store: Any,
    spec: SAESpec,
    out: str | Path,
    *,
    overwrite: bool = False,
    ranks: distributed.Ranks | None = None,
    **kwargs: Any,
) -> tuple[SAE, bool]:
    """Train one SAE on a store and save it SAELens style in ``out`` itself (what ``saekit
    train`` does), following the module's protocol with ``training.json`` as the manifest.

    Returns the SAE and whether it was trained now (False: ``out`` already held this exact
    finished run, which is loaded). Keyword arguments as for :func:`sweep_from_store`. Under
    torchrun (or with `ranks` of several processes) the SAE is trained data-parallel on every
    rank (`saekit.sae.trainer.sweep`'s ``data_parallel``) and rank 0 saves it.
    """
    (filled,) = fill_specs(store, [spec])
    resolved = filled.resolved()
    recipe = get_recipe(resolved.recipe)
    tokens = kwargs.pop("tokens", "cls")
    batch_size = kwargs.pop("batch_size", None) or recipe.batch_size
    epochs = kwargs.pop("epochs", None) or recipe.epochs
    seed = kwargs.pop("seed", 0)
    check_data = kwargs.pop("check_data", True)
    checkpoint_dir = kwargs.pop("checkpoint_dir", None)
    checkpoint_dir = Path(checkpoint_dir or Path(out).expanduser() / CHECKPOINT_DIR)
    settings = _run_settings(store, [filled], tokens, batch_size, epochs, seed)
    record = {"settings": settings, "saes": _entries([filled])}
    ranks = distributed.current() if ranks is None else ranks
    if ranks.world > 1:
        from saekit.sae.distributed import train_on_ranks

        run = (settings, record, checkpoint_dir, check_data)
        return train_on_ranks(store, filled, Path(out), overwrite, ranks, run, kwargs)
    out = check_writable(out, "SAE")
    with folder_lock(out, "training 1 SAE"):
        if _claim(out, TRAINING_MANIFEST, record, overwrite, checkpoint_dir, sweep_layout=False):
            _drop_checkpoint(checkpoint_dir, out)  # left if killed right after the save
            return load_sae(out, device=str(kwargs.get("device", "cpu"))), False
        (sae,) = _train_on_store(store, [filled], settings, checkpoint_dir, check_data, kwargs)
        _save_atomically(sae, out, inside=True)
        write_json_atomic(out / TRAINING_MANIFEST, {**record, "complete": True})
        _drop_checkpoint(checkpoint_dir, out)
        return sae, True


def _drop_checkpoint(checkpoint_dir: Path, out: Path) -> None:
    """A finished run's checkpoint is spent: the folder is removed when it is the output's own,
    else just the file."""
    if checkpoint_dir == out / CHECKPOINT_DIR:
        if checkpoint_dir.exists():
            remove_tree(checkpoint_dir)
    else:
        remove_file(checkpoint_dir / CHECKPOINT_FILE)


#: Names the order `ActivationStore.batches` yields rows in, recorded with checkpoints.
BATCH_ORDER = "block-shuffle/1"


def _train_on_store(
    store: Any,
    filled: list[SAESpec],
    settings: dict[str, Any],
    checkpoint_dir: str | Path | None,
    check_data: bool,
    kwargs: dict[str, Any],
) -> list[SAE]:
    tokens, batch_size, seed = settings["tokens"], settings["batch_size"], settings["data_seed"]
    kwargs = dict(kwargs)
    fast = _batch_options(store, kwargs.get("device", "cpu"), kwargs.pop("pin_memory", None))
    used = list(dict.fromkeys(spec.layer for spec in filled))
    if check_data:
        for layer in used:
            _check_store_layer(store, layer, tokens)
    n_rows = _n_token_rows(store, used[0], tokens)
    steps_per_epoch = math.ceil(n_rows / batch_size)

    def batches(epoch: int) -> Iterable[Any]:
        layers = used[0] if len(used) == 1 else used  # one layer: a bare tensor, read by all
        return store.batches(layers, batch_size, tokens=tokens, seed=seed, epoch=epoch, **fast)

    data = settings["data"]
    identity = data.get("model") if isinstance(data, dict) else None
    info = {
        "store": str(getattr(store, "path", getattr(store, "root", ""))) or None,
        "model": store.manifest.get("model"),
        "model_identity": identity if isinstance(identity, dict) else None,
        "tokens": tokens,
        "batch_size": batch_size,
        "data_seed": seed,
        # The store's batch order (bounded-memory block shuffle); a checkpoint written under
        # another order does not resume into this one.
        "batch_order": BATCH_ORDER,
    }
    return sweep(
        filled,
        batches,
        steps_per_epoch,
        epochs=settings["epochs"],
        checkpoint_dir=checkpoint_dir,
        metadata=info,
        run=settings,
        **kwargs,
    )


def _batch_options(store: Any, device: Any, pin_memory: bool | None) -> dict[str, Any]:
    """Keywords for ``store.batches``, where it names them: ``dtype=None`` (batches in the
    store's dtype, cast to float32 by the trainer on the device: half the bytes over PCIe and in
    the batches assembled ahead for a float16 store) and ``pin_memory`` (None: exactly when
    training on CUDA). Same batches, same order either way."""
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    pin = on_cuda if pin_memory is None else bool(pin_memory)
    if pin and not torch.cuda.is_available():
        raise ValueError(
            "pin_memory=True needs CUDA (page-locked batches only speed up copies to a GPU) and "
            "torch.cuda.is_available() is False: pass pin_memory=None (pins exactly when "
            "training on CUDA) or False."
        )
    params = inspect.signature(store.batches).parameters
    options: dict[str, Any] = {"dtype": None} if "dtype" in params else {}
    if pin and "pin_memory" in params:
        options["pin_memory"] = True
    return options


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    found = []
    old_settings, new_settings = old.get("settings") or {}, new["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        a, b = old_settings.get(key), new_settings.get(key)
        if a != b:
            plain = not isinstance(a, dict) and not isinstance(b, dict)
            found.append(f"{key}: {a!r} there, {b!r} now" if plain else f"{key} (another store)")
    if old.get("saes") != new["saes"]:
        names = [e.get("name") for e in old.get("saes") or []]
        found.append(
            f"the SAEs ({', '.join(map(str, names[:4]))}{' ...' if len(names) > 4 else ''})"
        )
    return found or ["an older saekit's manifest"]


def _claim(
    folder: Path,
    marker: str,
    record: dict[str, Any],
    overwrite: bool,
    checkpoint_dir: Path,
    sweep_layout: bool,
) -> bool:
    """Make ``folder`` this run's output; True when it already holds this run, finished.

    Refuses another run's SAEs or unrelated files unless ``overwrite`` (which deletes the SAEs a
    previous manifest lists, and a stale checkpoint, but never unrelated files).
    """
    path = folder / marker
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == record["settings"] and old.get("saes") == record["saes"]:
            return bool(old.get("complete"))
        if not overwrite:
            raise OutputExistsError(
                f"{folder} holds SAEs trained with other settings "
                f"({'; '.join(_differences(old, record))}). Choose another output folder, or "
                "pass --overwrite (overwrite=True) to replace them."
            )
        if sweep_layout:
            for entry in old.get("saes") or []:
                if entry.get("name") and (folder / entry["name"]).is_dir():
                    remove_tree(folder / entry["name"])
        else:
            for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE):
                remove_file(folder / name)
        remove_file(checkpoint_dir / CHECKPOINT_FILE)
    else:
        ours = {LOCK_FILE, CHECKPOINT_DIR, marker + ".tmp"}
        foreign = sorted(
            p.name
            for p in folder.iterdir()
            if p.name not in ours and not p.name.startswith((".saekit-probe-", ".staging"))
        )
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"{folder} is not empty ({shown}) and holds no saekit {marker}. Choose a new or "
                "empty output folder, or pass --overwrite (overwrite=True) to write into it."
            )
        if overwrite:
            remove_file(checkpoint_dir / CHECKPOINT_FILE)
    write_json_atomic(path, {**record, "complete": False})
    return False


def layer_width(manifest: Mapping[str, Any], layer: Any) -> int:
    """A layer's width: a CNN's stages differ, so prefer the manifest's per-layer widths."""
    return int(manifest.get("widths", {}).get(str(layer), manifest["d_model"]))


def _token_array(store: Any, layer: Any, tokens: str) -> Any:
    if tokens == "cls":
        return store.cls(layer)
    if tokens == "patch":
        return store.patches(layer)
    raise ValueError(f"tokens must be 'cls' or 'patch', got {tokens!r}")


def _n_token_rows(store: Any, layer: Any, tokens: str) -> int:
    """Rows one epoch yields: images, or images × patches."""
    return int(np.prod(_token_array(store, layer, tokens).shape[:-1]))


def _check_store_layer(store: Any, layer: Any, tokens: str, chunk: int = 8192) -> None:
    bad = find_nonfinite_rows(_token_array(store, layer, tokens), chunk)
    if len(bad):
        raise NonFiniteActivationsError(
            f"layer {layer} of the store has NaN/Inf in {len(bad)} image row(s) (first: "
            f"{bad[:10].tolist()}); re-extract those images or drop them before training"
        )


def find_nonfinite_rows(array: Any, chunk: int = 8192) -> np.ndarray:
    """Indices of rows (first axis) of ``array`` that hold any NaN or Inf, read in chunks."""
    bad = []
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start : start + chunk])
        rows = ~np.isfinite(block.reshape(len(block), -1)).all(-1)
        bad.extend((np.flatnonzero(rows) + start).tolist())
    return np.asarray(bad, dtype=np.int64)


# --- saving ------------------------------------------------------------------------------------


def _save_atomically(sae: SAE, folder: Path, inside: bool = False) -> None:
    """Save an SAE so a crash never leaves half of one: into a staging folder, then renamed
    into place (``inside``: the SAE files are moved into ``folder`` itself, one by one)."""
    staging = folder.parent / f".staging-{folder.name}" if not inside else folder / ".staging"
    if staging.exists():
        remove_tree(staging)
    save_sae(sae, staging)
    if inside:
        for name in sorted(p.name for p in staging.iterdir()):
            replace_durably(staging / name, folder / name)
        remove_tree(staging)
        return
    if folder.exists():  # an earlier, interrupted save of this same run
        remove_tree(folder)
    replace_durably(staging, folder)


def save_sweep(
    saes: Sequence[SAE],
    specs: Sequence[SAESpec],
    out_dir: str | Path,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Save each SAE to ``out_dir/<spec.label>`` and list them, with the run's ``settings``,
    in ``out_dir/sweep.json`` (marked complete)."""
    out_dir = check_writable(out_dir, "SAE")
    for sae, spec in zip(saes, specs, strict=True):
        _save_atomically(sae, out_dir / spec.label)
    manifest = {
        "produced_by": f"saekit {saekit.__version__} saekit.sae.sweep",
        "settings": dict(settings) if settings is not None else None,
        "saes": _entries(specs),
        "complete": True,
    }
    write_json_atomic(out_dir / SWEEP_MANIFEST, manifest)
    return out_dir


def load_sweep(out_dir: str | Path, device: str = "cpu") -> dict[str, SAE]:
    """The SAEs :func:`save_sweep` wrote, by name, in sweep order."""
    out_dir = Path(out_dir)
    path = out_dir / SWEEP_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"No sweep at {out_dir} (no {SWEEP_MANIFEST}); train one first.")
    manifest = json.loads(path.read_text())
    if manifest.get("complete") is False:
        raise RuntimeError(f"The sweep in {out_dir} has not finished; run it again to resume it.")
    return {e["name"]: load_sae(out_dir / e["name"], device=device) for e in manifest["saes"]}
