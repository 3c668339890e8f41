"""The SAE training loop: one SAE or a sweep of many in a single pass over the data.

The trainer never touches an activation store: it consumes a callable ``batches(epoch)`` that
returns the epoch's minibatches, each either a tensor ``[B, D]`` (every SAE reads it) or a dict
``{layer: tensor [B, D]}`` with the same rows in every layer (each SAE reads its ``layer``).
Calling it again with the same epoch must give the same batches in the same order; that is what
makes a resumed run equal an uninterrupted one. `saekit.sae.train.train_from_store` and
`saekit.sae.train.sweep_from_store` build that callable from an activation store.

Each batch is read once and fed to every SAE. SAEs that share architecture, shape and recipe are
trained as one stacked module (:mod:`saekit.sae.stacked`: one ``bmm`` forward and backward and
one fused Adam update for all of them), so the per-step overheads are paid once per group rather
than once per SAE. With the same seed and batch order, every SAE of a sweep ends where it would
have ended trained alone (``benchmarks/train.py`` measures the speed against SAELens).

With a checkpoint folder, the run is resumable (`saekit.sae.checkpoint`): the folder is checked
for writability and locked before any work, a checkpoint is written every ``checkpoint_every``
steps and once more at the end, and a checkpoint is resumed only by the run that wrote it (same
SAEs, schedule and ``run`` settings such as the data seed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

import saekit
from saekit import distributed
from saekit.durable import check_writable, folder_lock
from saekit.sae.architectures import SAESpec, build_training_sae, to_inference
from saekit.sae.checkpoint import CHECKPOINT_FILE, load_state, read_checkpoint, write_checkpoint
from saekit.sae.finite import FiniteWatch, default_stride
from saekit.sae.inputs import (
    BatchSource,
    fit_inputs,
    norm_key,
    prepare_inputs,
    split_batch,
    stack_members,
    tensor_batches,
)
from saekit.sae.recipes import (
    InputNormalizer,
    Recipe,
    get_recipe,
    remove_parallel_grad_,
    renormalize_decoder_,
)
from saekit.sae.stacked import StackedSAEs


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
    forward: Callable[..., Any] | None = None
    """The compiled ``model.forward_loss`` (``compile=True``); None: the eager one."""


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
    batch_size = batch_size or get_recipe(spec.recipe).batch_size
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
    run: Mapping[str, Any] | None = None,
    data_parallel: distributed.Ranks | None = None,
    finite_check_every: int | None = None,
    autocast: str | None = None,
    threads: int | str | None = "auto",
    compile: bool = False,
) -> list[SAE]:
    """Train every spec in one pass over ``batches``; returns SAELens SAEs in spec order.

    ``steps_per_epoch`` is the number of batches each epoch yields (it fixes the schedules);
    ``epochs`` defaults to the recipes' (which must then agree). With ``checkpoint_dir`` a
    checkpoint is written every ``checkpoint_every`` steps and, when ``resume`` is true, an
    existing checkpoint of the same sweep is picked up where it stopped. ``metadata`` is stored
    with each SAE (under ``cfg.metadata.saekit``). ``on_step``, if given, is called after every
    step with ``{"step", "epoch", "lr", "sparsity", "mse"}`` (``lr``/``sparsity``: the values
    each SAE's update used; ``mse``: its reconstruction error), e.g. to plot loss curves.
    ``run`` names what else determines the result (the data's identity, the data-order seed,
    ...): it is recorded in checkpoints, and a checkpoint written under other ``run`` values is
    refused rather than resumed. The checkpoint folder is checked for writability and locked
    against a second trainer before any work starts.

    ``data_parallel`` (the ranks of a process group, e.g. ``saekit.distributed.current()``)
    trains the same SAEs on every rank, data-parallel: every rank reads the same global batches
    and trains on its slice of the rows; gradients are all-reduced weighted by rows, so the
    update is the one-process update on the global batch; latents count as fired when they fire
    on any rank, and the TopK inference threshold takes the minimum over ranks (what one process
    computes), and BatchTopK/Matryoshka pick their k·B codes over the global batch
    (`saekit.sae.stacked`); every loss is a mean over rows, weighted by the slice's share, so
    auxiliary losses are the global ones too. Rank 0 alone writes checkpoints; every rank
    resumes them.

    Inputs are checked for NaN/Inf every ``finite_check_every`` steps (default: every step on
    a CPU, where it costs nothing; every 64 on a GPU, so the device is not stopped each step),
    always before a checkpoint is written; the error names the batch and rows either way.
    ``autocast="bfloat16"`` runs the forward and backward passes under ``torch.autocast`` (bf16
    matmuls) while the weights, Adam moments and update stay float32 (None: float32 throughout).
    ``threads`` sets torch's CPU threads for the run (restored after): ``"auto"`` picks them by
    the step's size (`saekit.distributed.threads_for`), None leaves torch's setting alone.
    ``compile=True`` runs each group's batched forward and loss (``StackedSAEs.forward_loss``;
    its backward too, through AOTAutograd) under ``torch.compile`` (inductor): the same SAEs
    within float rounding; the first step pays the compilation (tens of seconds per group on a
    CPU), and where compiling fails the run warns once and goes on eagerly. Off by default: on
    a CPU at paper size (d_in 768, x8, minibatch 4096) it was slower (``benchmarks/fast_paths.py``:
    eager 1.48 s, compiled 1.97 s per step, median ratio 0.77x); on a GPU, measure it with
    ``--device cuda``.
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
    precision = _autocast(device, autocast)
    ckpt = None
    lock: Any = contextlib.nullcontext()
    dp = data_parallel if data_parallel is not None and data_parallel.world > 1 else None
    writes = dp is None or dp.is_main
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE
        if writes:
            checkpoint_dir = check_writable(checkpoint_dir, "checkpoint")
            lock = folder_lock(checkpoint_dir, f"training {len(specs)} SAE(s)")
    threads_set = threads is None or device.type != "cpu"
    with lock, contextlib.ExitStack() as restore:
        saved = None
        if ckpt is not None and resume and ckpt.exists():
            saved = read_checkpoint(ckpt, specs, steps_per_epoch, epochs, run)
            normalizers = saved["normalizers"]
            b_dec_init: dict[int, torch.Tensor] = {}
        else:
            normalizers, b_dec_init = fit_inputs(specs, batches)
        groups = _build_groups(specs, b_dec_init, device)
        for group in groups if compile else []:
            group.forward = _Compiled(group.model)
        if dp is not None:  # every rank starts from rank 0's weights, as DDP does
            for group in groups:
                group.model.data_parallel = dp
                for tensor in [*group.model.parameters(), *group.model.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)
        step = 0
        if saved is not None:
            load_state(groups, saved["tensors"], device)
            step = saved["step"]

        pbar = tqdm(
            total=total,
            initial=step,
            desc=f"training {len(specs)} SAE(s)",
            disable=not progress or not writes,
        )
        every = default_stride(device) if finite_check_every is None else finite_check_every
        watch = FiniteWatch(batches, lambda batch: split_batch(batch, specs), every)
        for epoch in range(step // steps_per_epoch, epochs):
            stream = iter(batches(epoch))
            position = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch: skip those
            watch.start_epoch(epoch, position)
            for batch in itertools.islice(stream, position, steps_per_epoch):
                inputs = prepare_inputs(
                    batch, specs, normalizers, device, epoch, position, every <= 1
                )
                if not threads_set:  # at the first step, when the batch size is known
                    threads_set = True
                    size = [(int(s.d_in or 0), int(s.d_sae or 0)) for s in specs]
                    chosen = (
                        threads
                        if threads != "auto"
                        else distributed.threads_for(size, len(inputs[0]))
                    )
                    restore.callback(torch.set_num_threads, torch.get_num_threads())
                    torch.set_num_threads(int(chosen))  # type: ignore[arg-type]
                if every > 1:
                    watch.see(inputs)
                if dp is not None:  # BatchTopK picks k·B codes over the global batch's B rows
                    for group in groups:
                        group.model.global_rows = len(inputs[0])
                inputs, weight = distributed.slice_rows(inputs, dp)
                mse = [
                    _train_step(
                        g, stack_members(inputs, g.members), step, total, dp, weight, precision
                    )
                    for g in groups
                ]
                if on_step is not None:
                    on_step(_step_record(step, epoch, total, groups, mse, labels, specs))
                step += 1
                position += 1
                pbar.update(1)
                if progress and step % 50 == 0:
                    pbar.set_postfix(mse=f"{torch.cat(mse).mean().item():.4g}")
                due = ckpt is not None and step % checkpoint_every == 0 and step < total
                if every > 1 and (due or step % every == 0):
                    watch.check(position)
                if writes and due and ckpt is not None:
                    write_checkpoint(
                        ckpt, step, specs, steps_per_epoch, epochs, groups, normalizers, run
                    )
            if every > 1:
                watch.check(position)
            _check_epoch_length(stream, position, steps_per_epoch, epoch)
        pbar.close()
        if writes and ckpt is not None and (saved is None or saved["step"] < total):
            # The finished state too: a crash while the caller saves the SAEs costs no retraining.
            write_checkpoint(ckpt, total, specs, steps_per_epoch, epochs, groups, normalizers, run)

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
            l1 = specs[i].l1
            coef = l1 if l1 is not None else 0.0
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


def _autocast(device: torch.device, dtype: str | None) -> Any:
    """``torch.autocast`` to `dtype` on `device` (None: full float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"autocast must be 'bfloat16', 'float16' or None, not {dtype!r}.")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


#: The backend of ``compile=True``. Tests use "aot_eager" (the same traced forward and backward
#: graphs run by eager kernels): it compiles in about a second, where inductor takes a minute.
_COMPILE_BACKEND: Any = "inductor"


class _Compiled:
    """``forward_loss`` under ``torch.compile``; where compiling fails (no C++ compiler for
    inductor, a Python that torch.compile does not support, ...) it warns once, naming the
    error, and runs eagerly: the same losses without the speed-up."""

    def __init__(self, model: StackedSAEs) -> None:
        self.eager = model.forward_loss
        self.compiled: Callable[..., Any] | None = None
        # torch._dynamo loads only when compiling is asked for (it slows every import).
        from torch._dynamo.exc import TorchDynamoException

        self.compile_errors = TorchDynamoException
        try:
            self.compiled = torch.compile(model.forward_loss, backend=_COMPILE_BACKEND)
        except Exception as err:  # torch.compile cannot run here at all
            self._give_up(err)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        # Any call may (re)compile: a new batch shape (a short last batch, uneven data-parallel
        # slices) traces again. Tracing runs on fake tensors, so a failed compilation has moved
        # no state and the step can run eagerly; errors of the step itself (out of memory, bad
        # data) are not compilation errors and are raised as they are.
        try:
            out = self.compiled(*args)
        except self.compile_errors as err:
            self._give_up(err)
            return self.eager(*args)
        return out

    def _give_up(self, err: Exception) -> None:
        self.compiled = None
        cause = getattr(err, "inner_exception", None) or err  # a backend's own error
        said = (str(cause).strip().splitlines() or [""])[0][:300]
        warnings.warn(
            f"compile=True: torch.compile failed ({type(cause).__name__}: {said}); training "
            "eagerly instead (the same SAEs, without the compiled speed-up). Inductor needs a "
            "working C++ compiler on a CPU (a CUDA toolchain on a GPU); pass compile=False to "
            "skip compiling.",
            RuntimeWarning,
            stacklevel=4,
        )


def _train_step(
    group: _Group,
    x_nBD: torch.Tensor,
    step: int,
    total: int,
    dp: distributed.Ranks | None = None,
    weight: float = 1.0,
    precision: Any = None,
) -> torch.Tensor:
    """One update of every SAE in the group; returns the per-SAE reconstruction error."""
    recipe, model = group.recipe, group.model
    dead_nS = group.since_fired_nS > recipe.dead_feature_window
    forward = group.forward or model.forward_loss
    with precision if precision is not None else contextlib.nullcontext():
        out = forward(x_nBD, recipe.sparsity_at(step, total), dead_nS)
    (out.loss_n.sum() * weight if dp is not None else out.loss_n.sum()).backward()
    with torch.no_grad():
        group.since_fired_nS += 1
        # codes are never negative, so "fired on some row" is a max > 0 (10x cheaper than any())
        fired_nS = out.codes_nBS.amax(dim=1) > 0
        if dp is not None:  # the global gradient and "fired on any rank's rows"
            distributed.sum_grads(model.parameters())
            fired_nS = distributed.any_rank(fired_nS)
        group.since_fired_nS[fired_nS] = 0
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
    if dp is not None and hasattr(model, "topk_threshold"):
        # Each rank's EMA moved toward its own smallest positive code; one process moves it
        # toward the smallest of them all, which is the minimum over ranks.
        distributed.min_over_ranks_(model.topk_threshold)
    return out.mse_n.detach()


@torch.no_grad()
def _clip_per_member_(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each member's parameters separately."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads]
    norm_n = torch.linalg.vector_norm(torch.stack(norms), dim=0)
    factor_n = (max_norm / (norm_n + 1e-6)).clamp(max=1.0)
    # Multiplying by exactly 1 changes nothing: a CPU skips the pass when no member clips; a
    # GPU multiplies always rather than wait for the device to answer `any()`.
    if grads and (grads[0].device.type != "cpu" or (factor_n < 1).any()):
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
    key = norm_key(spec)
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
