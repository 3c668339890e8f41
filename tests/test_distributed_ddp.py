"""Data-parallel training of one SAE on 2 gloo processes equals one process training on the
same global batches (within float tolerance), uneven last slices included."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from saekit.distributed import Ranks
from saekit.sae.architectures import SAESpec
from saekit.sae.trainer import sweep, tensor_batches

SPECS = {
    "relu": SAESpec(arch="relu", d_in=12, expansion=4, l1=0.3, recipe="olson2025"),
    "topk": SAESpec(arch="topk", d_in=12, expansion=4, k=3, recipe="stevens2025"),
    "batchtopk": SAESpec(arch="batchtopk", d_in=12, expansion=4, k=3, recipe="stevens2025"),
    "matryoshka": SAESpec(arch="matryoshka", d_in=12, expansion=4, k=3, recipe="stevens2025"),
}
N_ROWS, BATCH = 250, 40  # the last batch (10 rows) is split unevenly 5/5; 40 rows 20/20


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, 12, generator=generator) * torch.linspace(0.5, 2, 12)


def _train(name: str, ranks: Ranks | None):
    steps = -(-N_ROWS // BATCH)
    batches = tensor_batches(_data(), BATCH, seed=1)
    (sae,) = sweep([SPECS[name]], batches, steps, epochs=2, progress=False, data_parallel=ranks)
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def _worker(rank: int, world: int, init: str, name: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_train(name, Ranks(rank, world)), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_ranks_equal_one_process_on_the_same_global_batches(name, tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg", name, out), nprocs=2, join=True)
    reference = _train(name, None)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)  # in lockstep
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5)
    # The slices really trained on different rows: one rank alone would end elsewhere.
    alone = _train_on_half(name)
    assert any(not torch.allclose(alone[k], reference[k], atol=1e-4) for k in reference)


def _train_on_half(name: str):
    steps = -(-N_ROWS // BATCH)
    data = _data()
    halves = tensor_batches(data, BATCH, seed=1)

    def first_half(epoch: int):
        return [b[: -(-len(b) // 2)] for b in halves(epoch)]

    (sae,) = sweep([SPECS[name]], first_half, steps, epochs=2, progress=False)
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# --- BatchTopK's batch-wide top-k over the global batch -----------------------------------------

TOPK_SPECS = [  # two members with different k: each gets its own cut
    SAESpec(arch="batchtopk", d_in=12, expansion=4, k=3, recipe="stevens2025"),
    SAESpec(arch="batchtopk", d_in=12, expansion=4, k=5, recipe="stevens2025"),
]


def _batchtopk_model(arch: str):
    from saekit.sae.architectures import build_training_sae
    from saekit.sae.stacked import StackedSAEs

    torch.manual_seed(3)
    specs = [SAESpec(**{**s.to_dict(), "arch": arch}) for s in TOPK_SPECS]
    return StackedSAEs([build_training_sae(s) for s in specs])


def _batchtopk_pass(arch: str, ranks: Ranks | None, rows: slice):
    """Codes and row-weighted gradients of one forward/backward on ``rows`` of a 9-row batch."""
    model = _batchtopk_model(arch)
    model.data_parallel, model.global_rows = ranks, 9
    x_BD = _data()[:9]
    x_nBD = x_BD[rows].unsqueeze(0).expand(2, -1, -1)
    dead_nS = torch.zeros(2, model.d_sae, dtype=torch.bool)
    out = model.forward_loss(x_nBD, 1.0, dead_nS)
    (out.loss_n.sum() * (x_nBD.shape[1] / 9)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.codes_nBS.detach(), grads


def _batchtopk_worker(rank: int, world: int, init: str, arch: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rows = slice(0, 5) if rank == 0 else slice(5, 9)  # uneven slices: 5 and 4 rows
        codes, grads = _batchtopk_pass(arch, Ranks(rank, world), rows)
        for g in grads.values():
            torch.distributed.all_reduce(g)
        torch.save({"codes": codes, "grads": grads}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_picks_its_codes_over_the_global_batch(arch, tmp_path):
    out = str(tmp_path / "codes")
    mp.spawn(_batchtopk_worker, args=(2, f"file://{tmp_path}/pg", arch, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    codes, grads = _batchtopk_pass(arch, None, slice(0, 9))
    torch.testing.assert_close(torch.cat([p["codes"] for p in parts], dim=1), codes)
    active_n = (codes > 0).sum(dim=(1, 2))
    assert active_n.tolist() == [27, 45]  # k·B over all 9 rows, not k·B per slice
    for name, grad in grads.items():
        torch.testing.assert_close(parts[0]["grads"][name], grad, rtol=1e-5, atol=1e-6)
    # Per-slice top-k (what each rank picked before) keeps other codes: the test can tell.
    alone, _ = _batchtopk_pass(arch, None, slice(0, 5))
    assert not torch.equal(alone, parts[0]["codes"])
