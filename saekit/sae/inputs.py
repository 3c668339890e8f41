"""What the SAE trainer feeds each SAE: batches split by source layer, moved to the device (in
the batch's own dtype, cast to float32 there), checked for NaN/Inf and normalised; and the statistics (input normalisations, b_dec inits) fitted
on the first rows of epoch 0 before training.

A batch is a tensor ``[B, D]`` (every SAE reads it) or a dict ``{layer: [B, D]}``; SAEs that
read the same source with the same normalisation share one prepared tensor. `tensor_batches`
makes the batch source of rows held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from saekit.sae.architectures import SAESpec
from saekit.sae.finite import check_finite
from saekit.sae.recipes import InputNormalizer, Recipe

#: ``batches(epoch)`` -> that epoch's minibatches: tensors [B, D] or dicts {layer: [B, D]}.
BatchSource = Callable[[int], Iterable[Any]]


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


def split_batch(batch: Any, specs: Sequence[SAESpec]) -> dict[Any, torch.Tensor]:
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


def prepare_inputs(
    batch: Any,
    specs: Sequence[SAESpec],
    normalizers: Mapping[Any, InputNormalizer],
    device: torch.device,
    epoch: int,
    batch_index: int,
    check: bool = True,
) -> list[torch.Tensor]:
    """Each SAE's (normalised) float32 input for this batch; SAEs with the same source share a
    tensor.

    A batch crosses to the device in its own dtype (a float16 store's: half the bytes over PCIe)
    and is cast to float32 there; on a CPU that is the cast ``.to(dtype=float32)`` always was.
    The copy to a GPU is ``non_blocking``: from page-locked memory (``pin_memory``) the host
    goes on without waiting for it (the caching host allocator keeps the page-locked block
    until the copy is done).
    """
    split = split_batch(batch, specs)
    raw: dict[Any, torch.Tensor] = {}
    for source, x in split.items():
        x = x.to(device, non_blocking=device.type == "cuda").to(torch.float32)
        if check:
            check_finite(x, source, epoch, batch_index)
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
        key = norm_key(spec)
        if key is None:
            out.append(x)
            continue
        if key not in prepared:
            prepared[key] = normalizers[key](x)
        out.append(prepared[key])
    return out


def stack_members(inputs: list[torch.Tensor], members: list[int]) -> torch.Tensor:
    first = inputs[members[0]]
    if all(inputs[i] is first for i in members):
        return first.unsqueeze(0).expand(len(members), *first.shape)
    return torch.stack([inputs[i] for i in members])


def norm_key(spec: SAESpec) -> tuple[Any, float] | None:
    recipe: Recipe = spec.recipe  # type: ignore[assignment]
    return (spec.layer, recipe.input_norm) if recipe.normalize_inputs else None


def fit_inputs(
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
        split = split_batch(batch, specs)
        for source in sources:
            x = split[source].float()
            check_finite(x, source, 0, b)
            parts[source].append(x)
        seen += len(next(iter(split.values())))
        if seen >= n_rows:
            break
    samples = {s: torch.cat(p)[:n_rows] for s, p in parts.items()}
    normalizers: dict[Any, InputNormalizer] = {}
    b_dec_init: dict[int, torch.Tensor] = {}
    for i in needs:
        spec = specs[i]
        key = norm_key(spec)
        if key is not None and key not in normalizers:
            normalizers[key] = InputNormalizer.fit(samples[spec.layer], key[1])
        if spec.recipe.init_b_dec_to_mean:  # type: ignore[union-attr]
            norm = normalizers.get(key, InputNormalizer.identity(spec.d_in))  # type: ignore[arg-type]
            b_dec_init[i] = norm(samples[spec.layer]).double().mean(0).float()
    return normalizers, b_dec_init
