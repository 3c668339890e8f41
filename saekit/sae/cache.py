"""One cache for trained SAEs: train a request once, load it every later time it is made.

A request is an `SAESpec` (resolved: recipe, width, sparsity, seed) plus everything else that
determines the weights: the data (an activation store's identity, or a hash of an in-memory
matrix), the layer and token kind, the epochs, the batch size, the data-order seed and the
version of the batch order. Its hash
names the folder (``<root>/<spec label>-<hash>``), so two chapters that ask for the same SAE get
the same folder and nobody types a cache path. Where the device is does not change the weights
and is not part of the request.

Each folder is a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) plus ``request.json``;
it appears atomically (written beside, then renamed) so an interrupted run never leaves a
half-written SAE that a later run would trust. A folder whose ``request.json`` disagrees with
its name is refused, never reused.

Several missing SAEs on one store are trained together in one pass by the sweep trainer (which
equals training each alone), so a sweep costs one read of the store however many SAEs it holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE

from saekit.sae.architectures import SAE_CFG_FILE, SAESpec, load_sae, save_sae
from saekit.sae.recipes import get_recipe
from saekit.sae.train import BATCH_ORDER, fill_specs, sweep_from_store, train_on_tensor

REQUEST_FILE = "request.json"
TENSOR_ORDER = "tensor-batches/1"
"""Version of `saekit.sae.tensor_batches`' order for in-memory matrices."""


class CacheMismatchError(RuntimeError):
    """A cache folder holds an SAE trained for another request than its name says."""


def data_fingerprint(acts_ND: torch.Tensor | np.ndarray) -> str:
    """A hash of an in-memory activation matrix (shape and float32 bytes)."""
    array = torch.as_tensor(acts_ND).detach().float().cpu().contiguous().numpy()
    digest = hashlib.sha256(str(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _data_identity(data: Any) -> Any:
    manifest = getattr(data, "manifest", None)
    if manifest is not None:
        return manifest.get("identity") or {k: manifest.get(k) for k in ("model", "layers")}
    return {"tensor": data_fingerprint(data)}


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything that determines one SAE's weights."""

    spec: SAESpec
    """The SAE, resolved (recipe looked up; layer and d_in filled from the data)."""
    data: Any
    """The store's manifest identity, or ``{"tensor": hash}`` for an in-memory matrix."""
    tokens: str
    """``cls`` or ``patch`` rows of a store (``rows`` for a matrix)."""
    epochs: int
    """Passes over the data."""
    batch_size: int
    """Rows per step."""
    seed: int
    """Seed of the data order."""
    order: str
    """How batches are drawn from the data for a seed (the store iterator's or the in-memory
    shuffle's version): a new order trains new SAEs."""

    def to_json(self) -> dict[str, Any]:
        """The request as JSON-ready data (what ``request.json`` holds)."""
        fields = dataclasses.asdict(self)
        fields["spec"] = self.spec.to_dict()
        return json.loads(json.dumps(fields))

    @property
    def key(self) -> str:
        """A short hash of the request: the folder name's suffix."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def folder(self, root: str | Path) -> Path:
        """Where this request's SAE lives under ``root``."""
        return Path(root) / f"{self.spec.label}-{self.key}"


def make_request(
    spec: SAESpec,
    data: Any,
    *,
    tokens: str = "cls",
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Request:
    """The request for training ``spec`` on ``data`` (an activation store or an ``[N, D]``
    matrix); ``None`` takes the recipe's epochs and batch size."""
    manifest = getattr(data, "manifest", None)
    if manifest is not None:
        (spec,) = fill_specs(data, [spec])
    else:
        if data.ndim != 2:
            raise ValueError(f"expected an [N, D] matrix, got shape {tuple(data.shape)}")
        spec = dataclasses.replace(spec, d_in=int(data.shape[1]))
        tokens = "rows"
    order = BATCH_ORDER if manifest is not None else TENSOR_ORDER
    spec = spec.resolved()
    recipe = get_recipe(spec.recipe)
    return Request(
        spec=spec,
        data=_data_identity(data),
        tokens=tokens,
        epochs=int(epochs if epochs is not None else recipe.epochs),
        batch_size=int(batch_size if batch_size is not None else recipe.batch_size),
        seed=int(seed),
        order=order,
    )


def cached(request: Request, root: str | Path, device: str = "cpu") -> SAE | None:
    """The SAE ``request`` names under ``root``, or None when it has not been trained."""
    folder = request.folder(root)
    if not (folder / SAE_CFG_FILE).exists():
        return None
    saved = folder / REQUEST_FILE
    if not saved.exists() or json.loads(saved.read_text()) != request.to_json():
        raise CacheMismatchError(
            f"{folder} does not hold the SAE its name promises (its {REQUEST_FILE} is missing "
            "or differs). Delete the folder and the SAE will be trained again."
        )
    return load_sae(folder, device=device)


def _store_atomically(sae: SAE, request: Request, root: Path) -> None:
    folder = request.folder(root)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    save_sae(sae, staging)
    (staging / REQUEST_FILE).write_text(json.dumps(request.to_json(), indent=1))
    os.replace(staging, folder)


def train_or_load(
    specs: SAESpec | Sequence[SAESpec],
    data: Any,
    *,
    root: str | Path,
    tokens: str = "cls",
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Any:
    """Train ``specs`` on ``data`` or load them from ``root`` where the same request was trained.

    ``data`` is an activation store (``tokens`` picks its ``cls`` or ``patch`` rows) or an
    in-memory ``[N, D]`` matrix. One spec returns one SAE; a sequence returns ``{spec.label:
    SAE}`` in spec order. The SAEs not yet cached are trained together in one pass (the sweep
    trainer checkpoints under ``root/.training`` and resumes after an interruption) and saved,
    each in its own folder named by its request.
    """
    single = isinstance(specs, SAESpec)
    spec_list: list[SAESpec] = [specs] if isinstance(specs, SAESpec) else list(specs)
    root = Path(root)
    requests = [
        make_request(s, data, tokens=tokens, epochs=epochs, batch_size=batch_size, seed=seed)
        for s in spec_list
    ]
    labels = [r.spec.label for r in requests]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two requested SAEs share a name: {labels}; set SAESpec.name")
    found = {r.key: cached(r, root, device) for r in requests}
    missing = [r for r in requests if found[r.key] is None]
    # The sweep trainer shares one schedule length and batch size per pass.
    groups: dict[tuple[int, int], list[Request]] = {}
    for request in missing:
        groups.setdefault((request.epochs, request.batch_size), []).append(request)
    root.mkdir(parents=True, exist_ok=True)
    for (group_epochs, group_batch), group in groups.items():
        group_key = hashlib.sha256("".join(r.key for r in group).encode()).hexdigest()[:12]
        if getattr(data, "manifest", None) is not None:
            trained = sweep_from_store(
                data,
                [r.spec for r in group],
                tokens=tokens,
                batch_size=group_batch,
                seed=seed,
                epochs=group_epochs,
                device=device,
                progress=progress,
                checkpoint_dir=root / ".training" / group_key,
            )
        else:
            trained = [
                train_on_tensor(
                    r.spec,
                    data,
                    batch_size=group_batch,
                    seed=seed,
                    epochs=group_epochs,
                    device=device,
                    progress=progress,
                )
                for r in group
            ]
        for request, sae in zip(group, trained, strict=True):
            _store_atomically(sae, request, root)
            found[request.key] = sae
        shutil.rmtree(root / ".training" / group_key, ignore_errors=True)
    saes = {r.spec.label: found[r.key] for r in requests}
    return next(iter(saes.values())) if single else saes
