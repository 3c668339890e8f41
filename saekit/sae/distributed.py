"""Sweeps and single SAEs trained by several processes (under torchrun); see
`saekit.distributed` for the process group and `saekit.sae.train` for the one-process protocol
these follow (folder claims, checkpoints, atomic saves)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from sae_lens import SAE

from saekit import distributed
from saekit.durable import check_writable, folder_lock, write_json_atomic
from saekit.sae.architectures import SAESpec, load_sae
from saekit.sae.train import (
    CHECKPOINT_DIR,
    SWEEP_MANIFEST,
    TRAINING_MANIFEST,
    _claim,
    _drop_checkpoint,
    _entries,
    _save_atomically,
    _train_on_store,
    load_sweep,
    save_sweep,
    sweep_from_store,
)


def _rank0_claims(ranks: distributed.Ranks, out: Path, what: str, claim: Any, held: Any) -> bool:
    """Rank 0 checks, locks and claims `out`; every rank learns whether it already holds the
    finished run (or raises rank 0's error)."""

    def check_lock_claim() -> Any:
        check_writable(out, "SAE")
        held.enter_context(folder_lock(out, what))
        return claim()

    return bool(distributed.on_rank0(ranks, check_lock_claim))


def sweep_on_ranks(
    store: Any,
    filled: list[SAESpec],
    settings: dict[str, Any],
    out_dir: Path,
    overwrite: bool,
    ranks: distributed.Ranks,
    kwargs: dict[str, Any],
) -> list[SAE]:
    """One rank's part of a partitioned sweep: rank 0 holds and claims ``out_dir``; each rank
    trains its share as a sweep of its own under ``out_dir/.checkpoint/ranks-W/rank-R`` (so it
    resumes alone); rank 0 then saves every SAE into ``out_dir`` and removes the shares."""
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    shares = checkpoint_dir / f"ranks-{ranks.world}"
    record = {"settings": settings, "saes": _entries(filled)}
    device = str(kwargs.get("device", "cpu"))
    with contextlib.ExitStack() as held:
        claim = lambda: _claim(out_dir, SWEEP_MANIFEST, record, overwrite, checkpoint_dir, True)  # noqa: E731
        what = f"training {len(filled)} SAE(s) on {ranks.world} ranks"
        finished = _rank0_claims(ranks, out_dir, what, claim, held)
        if not finished:
            share = [spec for i, spec in enumerate(filled) if ranks.owns(i)]
            with distributed.all_or_none(ranks, "training its share of the sweep"):
                if share:
                    sweep_from_store(
                        store, share, tokens=settings["tokens"], batch_size=settings["batch_size"],
                        seed=settings["data_seed"], epochs=settings["epochs"],
                        out_dir=shares / f"rank-{ranks.rank}", ranks=distributed.Ranks(0, 1),
                        **kwargs,
                    )  # fmt: skip
            with distributed.all_or_none(ranks, "gathering the sweep"):
                if ranks.is_main:
                    saes: dict[str, SAE] = {}
                    for rank in range(min(ranks.world, len(filled))):
                        saes.update(load_sweep(shares / f"rank-{rank}", device=device))
                    save_sweep([saes[s.label] for s in filled], filled, out_dir, settings=settings)
                    _drop_checkpoint(checkpoint_dir, out_dir)
        distributed.barrier(ranks)
    saved = load_sweep(out_dir, device=device)
    return [saved[spec.label] for spec in filled]


def train_on_ranks(
    store: Any,
    filled: SAESpec,
    out: Path,
    overwrite: bool,
    ranks: distributed.Ranks,
    run: tuple[dict[str, Any], dict[str, Any], Path, bool],
    kwargs: dict[str, Any],
) -> tuple[SAE, bool]:
    """One rank's part of data-parallel training of one SAE into `out` (see `train_to_folder`):
    rank 0 claims the folder and saves; every rank trains on its slice of each global batch."""
    settings, record, checkpoint_dir, check_data = run
    device = str(kwargs.get("device", "cpu"))
    with contextlib.ExitStack() as held:
        claim = lambda: _claim(out, TRAINING_MANIFEST, record, overwrite, checkpoint_dir, False)  # noqa: E731
        if _rank0_claims(ranks, out, f"training 1 SAE on {ranks.world} ranks", claim, held):
            if ranks.is_main:
                _drop_checkpoint(checkpoint_dir, out)  # left if killed right after the save
            distributed.barrier(ranks)
            return load_sae(out, device=device), False
        (sae,) = _train_on_store(
            store, [filled], settings, checkpoint_dir, check_data,
            {**kwargs, "data_parallel": ranks},
        )  # fmt: skip
        if ranks.is_main:
            _save_atomically(sae, out, inside=True)
            write_json_atomic(out / TRAINING_MANIFEST, {**record, "complete": True})
            _drop_checkpoint(checkpoint_dir, out)
        distributed.barrier(ranks)
    return sae, True
