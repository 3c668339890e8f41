"""Train one SAE or a sweep of many in a single pass over the data, with resumable checkpoints.

The trainer never touches an activation store: it consumes a callable ``batches(epoch)`` that
returns the epoch's minibatches, each either a tensor ``[B, D]`` (every SAE reads it) or a dict
``{layer: tensor [B, D]}`` with the same rows in every layer (each SAE reads its ``layer``).
Calling it again with the same epoch must give the same batches in the same order; that is what
makes a resumed run equal an uninterrupted one. :func:`train_from_store` and
:func:`sweep_from_store` build that callable from an activation store.

Each batch is read once and fed to every SAE. SAEs that share architecture, shape and recipe are
trained as one stacked module (:mod:`saekit.sae.stacked`: one ``bmm`` forward and backward and
one fused Adam update for all of them), so the per-step overheads are paid once per group rather
than once per SAE. With the same seed and batch order, every SAE of a sweep ends where it would
have ended trained alone (``benchmarks/train.py`` measures the speed against SAELens).

Checkpoints are a single ``checkpoint.safetensors`` (weights, Adam moments, dead-latent counters,
input normalisation) whose metadata holds the JSON state (step, specs); it is written to a
temporary file and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import saekit
from saekit.sae.architectures import (
    SAESpec,
    build_training_sae,
    load_sae,
    save_sae,
    to_inference,
)
from saekit.sae.recipes import (
    InputNormalizer,
    Recipe,
    remove_parallel_grad_,
    renormalize_decoder_,
)
from saekit.sae.stacked import StackedSAEs

#: ``batches(epoch)`` -> that epoch's minibatches: tensors [B, D] or dicts {layer: [B, D]}.
BatchSource = Callable[[int], Iterable[Any]]

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "saekit-sweep-checkpoint/1"
SWEEP_MANIFEST = "sweep.json"


class NonFiniteActivationsError(ValueError):
    """Activations contain NaN or Inf; the message says where."""


@dataclass
class _Group:
    """SAEs trained as one stacked module: same architecture, shape and recipe."""

    recipe: Recipe
    """The recipe every member follows."""
    members: list[int]
    """Indices of the members in the sweep's spec list, in stacking order."""
    model: StackedSAEs
    """The members' weights, stacked."""
    optimizer: torch.optim.Adam
    """One Adam over the stacked weights (element-wise, so per member)."""
    since_fired_nS: torch.Tensor
    """Steps since each latent last fired, per member [n, S]."""


def tensor_batches(acts_ND: torch.Tensor, batch_size: int, seed: int = 0) -> BatchSource:
    """``batches(epoch)`` over rows held in memory: every row once per epoch, in an order fixed
    by (seed, epoch) alone, so a resumed or repeated run sees the same batches."""

    def batches(epoch: int) -> Iterable[torch.Tensor]:
        # SeedSequence mixes the pair, so (seed 0, epoch 1) and (seed 1, epoch 0) differ.
        mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        order = torch.randperm(len(acts_ND), generator=torch.Generator().manual_seed(mixed))
        for start in range(0, len(acts_ND), batch_size):
            yield acts_ND[order[start : start + batch_size]]

    return batches


def train_on_tensor(
    spec: SAESpec,
    acts_ND: torch.Tensor | np.ndarray,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> SAE:
    """Train one SAE on an in-memory ``[N, D]`` matrix (text tokens, LLaVA responses, ...)
    rather than an activation store; batch size defaults to the spec's recipe. Keyword
    arguments as for :func:`sweep`."""
    acts_ND = torch.as_tensor(acts_ND, dtype=torch.float32)
    if acts_ND.ndim != 2 or len(acts_ND) < 2:
        raise ValueError(
            f"Expected activations [N, D] with N >= 2, got shape {tuple(acts_ND.shape)}."
        )
    spec = dataclasses.replace(spec, d_in=acts_ND.shape[1]).resolved()
    batch_size = batch_size or spec.recipe.batch_size
    steps = math.ceil(len(acts_ND) / batch_size)
    return train_sae(spec, tensor_batches(acts_ND, batch_size, seed), steps, **kwargs)


def train_sae(spec: SAESpec, batches: BatchSource, steps_per_epoch: int, **kwargs: Any) -> SAE:
    """Train one SAE; keyword arguments as for :func:`sweep`."""
    return sweep([spec], batches, steps_per_epoch, **kwargs)[0]


def sweep(
    specs: Sequence[SAESpec],
    batches: BatchSource,
    steps_per_epoch: int,
    *,
    epochs: int | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> list[SAE]:
    """Train every spec in one pass over ``batches``; returns SAELens SAEs in spec order.

    ``steps_per_epoch`` is the number of batches each epoch yields (it fixes the schedules);
    ``epochs`` defaults to the recipes' (which must then agree). With ``checkpoint_dir`` a
    checkpoint is written every ``checkpoint_every`` steps and, when ``resume`` is true, an
    existing checkpoint of the same sweep is picked up where it stopped. ``metadata`` is stored
    with each SAE (under ``cfg.metadata.saekit``). ``on_step``, if given, is called after every
    step with ``{"step", "epoch", "lr", "sparsity", "mse"}`` (``lr``/``sparsity``: the values
    each SAE's update used; ``mse``: its reconstruction error), e.g. to plot loss curves.
    """
    specs = [_resolve(spec) for spec in specs]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two SAEs in one sweep share a name: {labels}; set SAESpec.name")
    epochs = _common(specs, "epochs") if epochs is None else epochs
    total = steps_per_epoch * epochs
    if total <= 0:
        raise ValueError(f"nothing to train: steps_per_epoch={steps_per_epoch}, epochs={epochs}")
    device = torch.device(device)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None

    saved = None
    if ckpt is not None and resume and ckpt.exists():
        saved = _read_checkpoint(ckpt, specs, steps_per_epoch, epochs)
        normalizers = saved["normalizers"]
        b_dec_init: dict[int, torch.Tensor] = {}
    else:
        normalizers, b_dec_init = _fit_inputs(specs, batches)
    groups = _build_groups(specs, b_dec_init, device)
    step = 0
    if saved is not None:
        _load_state(groups, saved["tensors"], device)
        step = saved["step"]

    pbar = tqdm(
        total=total, initial=step, desc=f"training {len(specs)} SAE(s)", disable=not progress
    )
    for epoch in range(step // steps_per_epoch, epochs):
        stream = iter(batches(epoch))
        position = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch: skip those
        for batch in itertools.islice(stream, position, steps_per_epoch):
            inputs = _inputs(batch, specs, normalizers, device, epoch, position)
            mse = [_train_step(g, _stack(inputs, g.members), step, total) for g in groups]
            if on_step is not None:
                on_step(_step_record(step, epoch, total, groups, mse, labels, specs))
            step += 1
            position += 1
            pbar.update(1)
            if progress and step % 50 == 0:
                pbar.set_postfix(mse=f"{torch.cat(mse).mean().item():.4g}")
            if ckpt is not None and step % checkpoint_every == 0 and step < total:
                _write_checkpoint(ckpt, step, specs, steps_per_epoch, epochs, groups, normalizers)
        _check_epoch_length(stream, position, steps_per_epoch, epoch)
    pbar.close()

    info = {"epochs": epochs, "steps": total, **(metadata or {})}
    return [_export(groups, i, spec, normalizers, info) for i, spec in enumerate(specs)]


def _step_record(
    step: int,
    epoch: int,
    total: int,
    groups: list[_Group],
    mse: list[torch.Tensor],
    labels: list[str],
    specs: Sequence[SAESpec],
) -> dict[str, Any]:
    """What ``on_step`` receives: the lr and λ each SAE's update used, and its MSE."""
    record: dict[str, Any] = {"step": step, "epoch": epoch, "lr": {}, "sparsity": {}, "mse": {}}
    for group, mse_n in zip(groups, mse, strict=True):
        lr = group.optimizer.param_groups[0]["lr"]
        for j, i in enumerate(group.members):
            coef = specs[i].l1 if specs[i].l1 is not None else 0.0
            record["lr"][labels[i]] = lr
            record["sparsity"][labels[i]] = coef * group.recipe.sparsity_at(step, total)
            record["mse"][labels[i]] = mse_n[j].item()
    return record


def _check_epoch_length(stream: Any, seen: int, steps_per_epoch: int, epoch: int) -> None:
    """The schedules assume ``steps_per_epoch`` batches per epoch; say so when that is wrong."""
    if seen == steps_per_epoch and next(stream, None) is None:
        return
    amount = f"more than {steps_per_epoch}" if seen == steps_per_epoch else str(seen)
    raise ValueError(
        f"batches({epoch}) yielded {amount} batches but steps_per_epoch is {steps_per_epoch}; "
        "pass the number of batches one epoch really has"
    )


# --- set-up ---------------------------------------------------------------------------------


def _resolve(spec: SAESpec) -> SAESpec:
    spec = spec.resolved()
    if spec.d_in is None:
        raise ValueError(
            f"SAESpec {spec.label!r} has no d_in; set it to the activations' width "
            "(or use train_from_store / sweep_from_store, which read it from the store)"
        )
    return spec


def _common(specs: Sequence[SAESpec], field: str) -> Any:
    values = {getattr(spec.recipe, field) for spec in specs}
    if len(values) != 1:
        raise ValueError(
            f"the SAEs' recipes disagree on {field} ({sorted(values)}); one data pass needs one "
            f"value: pass {field}= explicitly"
        )
    return values.pop()


def _norm_key(spec: SAESpec) -> tuple[Any, float] | None:
    recipe: Recipe = spec.recipe  # type: ignore[assignment]
    return (spec.layer, recipe.input_norm) if recipe.normalize_inputs else None


def _fit_inputs(
    specs: Sequence[SAESpec], batches: BatchSource
) -> tuple[dict[Any, InputNormalizer], dict[int, torch.Tensor]]:
    """Estimate input normalisations and b_dec inits from the first rows of epoch 0."""
    needs = [
        i
        for i, spec in enumerate(specs)
        if spec.recipe.normalize_inputs or spec.recipe.init_b_dec_to_mean  # type: ignore[union-attr]
    ]
    if not needs:
        return {}, {}
    n_rows = max(specs[i].recipe.norm_sample_rows for i in needs)  # type: ignore[union-attr]
    sources = {specs[i].layer for i in needs}
    parts: dict[Any, list[torch.Tensor]] = {s: [] for s in sources}
    seen = 0
    for b, batch in enumerate(batches(0)):
        split = _split(batch, specs)
        for source in sources:
            x = split[source].float()
            _check_finite(x, source, 0, b)
            parts[source].append(x)
        seen += len(next(iter(split.values())))
        if seen >= n_rows:
            break
    samples = {s: torch.cat(p)[:n_rows] for s, p in parts.items()}
    normalizers: dict[Any, InputNormalizer] = {}
    b_dec_init: dict[int, torch.Tensor] = {}
    for i in needs:
        spec = specs[i]
        key = _norm_key(spec)
        if key is not None and key not in normalizers:
            normalizers[key] = InputNormalizer.fit(samples[spec.layer], key[1])
        if spec.recipe.init_b_dec_to_mean:  # type: ignore[union-attr]
            norm = normalizers.get(key, InputNormalizer.identity(spec.d_in))  # type: ignore[arg-type]
            b_dec_init[i] = norm(samples[spec.layer]).double().mean(0).float()
    return normalizers, b_dec_init


def _build_groups(
    specs: Sequence[SAESpec], b_dec_init: Mapping[int, torch.Tensor], device: torch.device
) -> list[_Group]:
    by_key: dict[Any, list[int]] = {}
    for i, spec in enumerate(specs):
        by_key.setdefault((spec.arch, spec.d_in, spec.d_sae, spec.recipe), []).append(i)
    groups = []
    for (_, _, d_sae, recipe), members in by_key.items():
        saes = []
        for i in members:
            sae = build_training_sae(specs[i])
            if i in b_dec_init:
                with torch.no_grad():
                    sae.b_dec.copy_(b_dec_init[i])
            saes.append(sae)
        model = StackedSAEs(saes).to(device)
        optimizer = _adam(model, recipe)
        since_fired = torch.zeros(len(members), d_sae, device=device)
        groups.append(_Group(recipe, members, model, optimizer, since_fired))
    return groups


def _adam(model: StackedSAEs, recipe: Recipe) -> torch.optim.Adam:
    """Adam with PyTorch's fused kernel where the device has one (on CPU it is ~10x faster than
    the per-tensor loop SAELens's trainer runs); the update rule is the same."""
    try:
        return torch.optim.Adam(
            model.parameters(), lr=recipe.lr, betas=recipe.adam_betas, fused=True
        )
    except (RuntimeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.adam_betas)


# --- one step ---------------------------------------------------------------------------------


def _split(batch: Any, specs: Sequence[SAESpec]) -> dict[Any, torch.Tensor]:
    """A batch as {source: tensor}; a bare tensor feeds every SAE."""
    if isinstance(batch, Mapping):
        missing = {spec.layer for spec in specs} - set(batch)
        if missing:
            raise KeyError(
                f"SAEs want layers {sorted(map(str, missing))} but the batches carry only "
                f"{sorted(map(str, batch))}"
            )
        return {spec.layer: torch.as_tensor(batch[spec.layer]) for spec in specs}
    tensor = torch.as_tensor(batch)
    return {spec.layer: tensor for spec in specs}


def _check_finite(x: torch.Tensor, source: Any, epoch: int, batch_index: int) -> None:
    if not torch.isfinite(x).all():
        rows = (~torch.isfinite(x)).any(-1).nonzero().flatten().tolist()
        where = "" if source is None else f" of layer {source}"
        raise NonFiniteActivationsError(
            f"NaN/Inf in activations{where}: epoch {epoch}, batch {batch_index}, rows {rows[:10]} "
            "of that batch. Fix or drop those rows in the store (sweep_from_store's "
            "check_data=True names the store rows) before training."
        )


def _inputs(
    batch: Any,
    specs: Sequence[SAESpec],
    normalizers: Mapping[Any, InputNormalizer],
    device: torch.device,
    epoch: int,
    batch_index: int,
) -> list[torch.Tensor]:
    """Each SAE's (normalised) input for this batch; SAEs with the same source share a tensor."""
    split = _split(batch, specs)
    raw: dict[Any, torch.Tensor] = {}
    for source, x in split.items():
        x = x.to(device=device, dtype=torch.float32)
        _check_finite(x, source, epoch, batch_index)
        raw[source] = x
    prepared: dict[Any, torch.Tensor] = {}
    out = []
    for spec in specs:
        x = raw[spec.layer]
        if x.shape[-1] != spec.d_in:
            raise ValueError(
                f"SAE {spec.label!r} expects d_in={spec.d_in} but the activations"
                f"{'' if spec.layer is None else f' of layer {spec.layer}'} are {x.shape[-1]} wide; "
                "set d_in to the store's width (d_model) or pick the matching layer"
            )
        key = _norm_key(spec)
        if key is None:
            out.append(x)
            continue
        if key not in prepared:
            prepared[key] = normalizers[key](x)
        out.append(prepared[key])
    return out


def _stack(inputs: list[torch.Tensor], members: list[int]) -> torch.Tensor:
    first = inputs[members[0]]
    if all(inputs[i] is first for i in members):
        return first.unsqueeze(0).expand(len(members), *first.shape)
    return torch.stack([inputs[i] for i in members])


def _train_step(group: _Group, x_nBD: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """One update of every SAE in the group; returns the per-SAE reconstruction error."""
    recipe, model = group.recipe, group.model
    dead_nS = group.since_fired_nS > recipe.dead_feature_window
    out = model.forward_loss(x_nBD, recipe.sparsity_at(step, total), dead_nS)
    out.loss_n.sum().backward()
    with torch.no_grad():
        group.since_fired_nS += 1
        # codes are never negative, so "fired on some row" is a max > 0 (10x cheaper than any())
        group.since_fired_nS[out.codes_nBS.amax(dim=1) > 0] = 0
    if recipe.remove_parallel_grads:
        remove_parallel_grad_(model.W_dec)
    if recipe.max_grad_norm is not None:
        _clip_per_member_(list(model.parameters()), recipe.max_grad_norm)
    for param_group in group.optimizer.param_groups:
        param_group["lr"] = recipe.lr_at(step, total)
    group.optimizer.step()
    group.optimizer.zero_grad(set_to_none=True)
    if recipe.unit_norm_decoder:
        renormalize_decoder_(model.W_dec)
    return out.mse_n.detach()


@torch.no_grad()
def _clip_per_member_(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each member's parameters separately."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads]
    norm_n = torch.linalg.vector_norm(torch.stack(norms), dim=0)
    factor_n = (max_norm / (norm_n + 1e-6)).clamp(max=1.0)
    if (factor_n < 1).any():  # multiplying by exactly 1 would change nothing
        for g in grads:
            g.mul_(factor_n.view(-1, *[1] * (g.dim() - 1)))


# --- export ------------------------------------------------------------------------------------


def _export(
    groups: list[_Group],
    index: int,
    spec: SAESpec,
    normalizers: Mapping[Any, InputNormalizer],
    info: Mapping[str, Any],
) -> SAE:
    group = next(g for g in groups if index in g.members)
    sae = to_inference(group.model.export(group.members.index(index)))
    normalization: dict[str, Any] = {"folded": False}
    key = _norm_key(spec)
    if key is not None:
        norm = normalizers[key]
        norm.fold_into(sae)
        normalization = {"folded": True, "scale": norm.scale, "input_norm": key[1]}
    sae.cfg.metadata.saekit = {
        "version": saekit.__version__,
        "name": spec.label,
        "spec": spec.to_dict(),
        "input_normalization": normalization,
        **info,
    }
    return sae


# --- checkpoints ---------------------------------------------------------------------------------


def _write_checkpoint(
    path: Path,
    step: int,
    specs: Sequence[SAESpec],
    steps_per_epoch: int,
    epochs: int,
    groups: list[_Group],
    normalizers: Mapping[Any, InputNormalizer],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for g, group in enumerate(groups):
        for name, p in group.model.named_parameters():
            tensors[f"g{g}.param.{name}"] = p.detach()
            for key, value in group.optimizer.state.get(p, {}).items():
                tensors[f"g{g}.adam.{name}.{key}"] = torch.as_tensor(value).reshape(-1)
        for name, b in group.model.named_buffers():
            tensors[f"g{g}.buffer.{name}"] = b
        tensors[f"g{g}.since_fired"] = group.since_fired_nS
    norms = []
    for j, (key, norm) in enumerate(normalizers.items()):
        tensors[f"norm{j}.mean"] = norm.mean_D
        norms.append({"source": key[0], "input_norm": key[1], "scale": norm.scale})
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "specs": [spec.to_dict() for spec in specs],
        "normalizers": norms,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
        str(tmp),
        metadata={"saekit_state": json.dumps(state)},
    )
    os.replace(tmp, path)


def _read_checkpoint(
    path: Path, specs: Sequence[SAESpec], steps_per_epoch: int, epochs: int
) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {}).get("saekit_state", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a saekit sweep checkpoint")
    same = (
        state["specs"] == json.loads(json.dumps([s.to_dict() for s in specs]))
        and state["steps_per_epoch"] == steps_per_epoch
        and state["epochs"] == epochs
    )
    if not same:
        raise ValueError(
            f"the checkpoint {path} was written by a different sweep (other SAEs, data size or "
            "epochs); delete it, point checkpoint_dir elsewhere, or pass resume=False"
        )
    normalizers = {
        (n["source"], n["input_norm"]): InputNormalizer(tensors[f"norm{j}.mean"], n["scale"])
        for j, n in enumerate(state["normalizers"])
    }
    return {"step": state["step"], "tensors": tensors, "normalizers": normalizers}


def _load_state(
    groups: list[_Group], tensors: Mapping[str, torch.Tensor], device: torch.device
) -> None:
    with torch.no_grad():
        for g, group in enumerate(groups):
            for name, p in group.model.named_parameters():
                p.copy_(tensors[f"g{g}.param.{name}"])
                adam = {
                    key.rsplit(".", 1)[1]: value
                    for key, value in tensors.items()
                    if key.startswith(f"g{g}.adam.{name}.")
                }
                if adam:
                    fused = group.optimizer.defaults.get("fused")
                    group.optimizer.state[p] = {
                        "step": adam["step"].reshape(()).to(device if fused else "cpu"),
                        "exp_avg": adam["exp_avg"].reshape(p.shape).to(device),
                        "exp_avg_sq": adam["exp_avg_sq"].reshape(p.shape).to(device),
                    }
            for name, b in group.model.named_buffers():
                b.copy_(tensors[f"g{g}.buffer.{name}"])
            group.since_fired_nS.copy_(tensors[f"g{g}.since_fired"])


# --- activation stores ---------------------------------------------------------------------------


def train_from_store(store: Any, spec: SAESpec, **kwargs: Any) -> SAE:
    """Train one SAE on a store's layer ``spec.layer``; keyword arguments as for
    :func:`sweep_from_store`."""
    return sweep_from_store(store, [spec], **kwargs)[0]


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
    **kwargs: Any,
) -> list[SAE]:
    """Train SAEs on an activation store's layers, reading each batch of every layer once.

    Uses only the store contract: ``manifest`` (``layers``, ``d_model`` or per-layer ``widths``,
    ``model``), ``cls(layer)`` / ``patches(layer)`` and ``batches(layer or [layers], batch_size,
    tokens=, seed=, epoch=)``; with several layers one call yields ``{layer: batch}`` with the same
    rows in every layer. ``tokens`` is ``cls`` or ``patch`` (one row per image patch). A spec
    without ``layer`` takes the store's only layer; ``d_in`` is filled from the store.
    ``batch_size`` defaults to the recipes'. With ``check_data`` every layer is scanned for
    NaN/Inf first so an error can name the store rows. With ``out_dir`` the SAEs are saved there
    (one folder each plus ``sweep.json``), checkpoints go to ``out_dir/.checkpoint`` and are
    removed once everything is saved. Other keywords go to :func:`sweep`.
    """
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
    resolved = [spec.resolved() for spec in filled]
    batch_size = batch_size or _common(resolved, "batch_size")
    used = list(dict.fromkeys(spec.layer for spec in filled))
    if check_data:
        for layer in used:
            _check_store_layer(store, layer, tokens)
    n_rows = _n_token_rows(store, used[0], tokens)
    steps_per_epoch = math.ceil(n_rows / batch_size)

    def batches(epoch: int) -> Iterable[Any]:
        if len(used) == 1:  # a bare tensor: every spec reads it
            return store.batches(used[0], batch_size, tokens=tokens, seed=seed, epoch=epoch)
        return store.batches(used, batch_size, tokens=tokens, seed=seed, epoch=epoch)

    if checkpoint_dir is None and out_dir is not None:
        checkpoint_dir = Path(out_dir) / ".checkpoint"
    info = {
        "store": str(getattr(store, "path", getattr(store, "root", ""))) or None,
        "model": manifest.get("model"),
        "tokens": tokens,
        "batch_size": batch_size,
        "data_seed": seed,
    }
    saes = sweep(
        filled, batches, steps_per_epoch, checkpoint_dir=checkpoint_dir, metadata=info, **kwargs
    )
    if out_dir is not None:
        save_sweep(saes, filled, out_dir)
        if checkpoint_dir is not None:
            (Path(checkpoint_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    return saes


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


# --- saving a sweep ---------------------------------------------------------------------------------


def save_sweep(saes: Sequence[SAE], specs: Sequence[SAESpec], out_dir: str | Path) -> Path:
    """Save each SAE to ``out_dir/<spec.label>`` and list them in ``out_dir/sweep.json``."""
    out_dir = Path(out_dir)
    entries = []
    for sae, spec in zip(saes, specs, strict=True):
        save_sae(sae, out_dir / spec.label)
        entries.append({"name": spec.label, "spec": spec.resolved().to_dict()})
    manifest = {"produced_by": f"saekit {saekit.__version__} saekit.sae.sweep", "saes": entries}
    tmp = out_dir / (SWEEP_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / SWEEP_MANIFEST)
    return out_dir


def load_sweep(out_dir: str | Path, device: str = "cpu") -> dict[str, SAE]:
    """The SAEs :func:`save_sweep` wrote, by name, in sweep order."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / SWEEP_MANIFEST).read_text())
    return {e["name"]: load_sae(out_dir / e["name"], device=device) for e in manifest["saes"]}
