"""Running one saekit command over several processes with ``torch.distributed``.

saekit writes no scheduler: ``torchrun`` starts the processes (one per GPU, or several on a
CPU) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; `init_from_env`
joins the process group it describes (NCCL on GPUs, gloo otherwise). Work is split by a fixed
rule (`owns`: item ``i`` belongs to rank ``i % world``), so a rerun gives every rank the same
part and each resumes its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int
    """Global rank, 0 to world - 1."""
    world: int
    """Number of processes."""
    local_rank: int = 0
    """Rank on this node (which GPU it drives)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what is shared (manifests, sweep files)."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item `index` (a shard, an SAE) is this rank's to do."""
        return index % self.world == self.rank


def current() -> Ranks:
    """The running job's ranks (one process, rank 0, when no process group is up)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks(0, 1)


def launched_by_torchrun() -> bool:
    """Whether torchrun (or Slurm through it) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> Ranks:
    """Join the process group torchrun describes (no-op for a single process); returns the
    ranks. NCCL when `device` is a CUDA device, else gloo."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RuntimeError(
            "torchrun started several processes but this torch build has no torch.distributed; "
            "install a torch with distributed support or run one process."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def rank_device(device: str | None, ranks: Ranks) -> str | None:
    """The device this rank drives: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process job."""
    if ranks.world > 1 and device == "cuda":
        return f"cuda:{ranks.local_rank}"
    return device


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(ranks: Ranks, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 alone (checking and locking a shared folder, starting a manifest)
    and return its result on every rank; if it raised, every rank raises that error, so no
    rank goes on to wait for a rank 0 that stopped."""
    result: Any = None
    if ranks.is_main:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - every rank raises it, not only rank 0
            result = err
    result = broadcast(result, ranks)
    if isinstance(result, Exception):
        raise result
    return result


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if ranks.world == 1:
        return [obj]
    boxes: list[Any] = [None] * ranks.world
    dist.all_gather_object(boxes, obj)
    return boxes


@contextlib.contextmanager
def all_or_none(ranks: Ranks, what: str) -> Iterator[None]:
    """Run the block on every rank, then make every rank stop if any rank's block failed.

    Without it, a rank that raises leaves the others waiting at their next collective until the
    backend's timeout (NCCL's default is 30 minutes) and then reporting a lost peer instead of
    the cause. Leaving the block is a synchronisation point (as a barrier is): the failing rank
    re-raises its own error, every other rank raises `RankFailedError` naming it.
    """
    if ranks.world == 1:
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
        failure = err
    said = gather(None if failure is None else f"{type(failure).__name__}: {failure}", ranks)
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, message in enumerate(said) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailedError(
            f"Rank {rank} failed while {what} ({message}); this rank stopped with it. Fix the "
            "cause and rerun the same command: finished work is kept."
        )


class RankFailedError(RuntimeError):
    """Another rank of the job failed; this one stopped with it (the message names the cause)."""


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here."""
    if ranks.world > 1:
        dist.barrier()


def slice_rows(inputs: list[torch.Tensor], ranks: Ranks | None) -> tuple[list[torch.Tensor], float]:
    """This rank's contiguous slice of each input's rows (tensors shared between inputs stay
    shared) and its share of the global batch's rows, the weight of its gradients."""
    if ranks is None or ranks.world == 1:
        return inputs, 1.0
    sliced: dict[int, torch.Tensor] = {}
    for x in inputs:
        if id(x) not in sliced:
            sliced[id(x)] = torch.tensor_split(x, ranks.world)[ranks.rank]
    return [sliced[id(x)] for x in inputs], len(sliced[id(inputs[0])]) / len(inputs[0])


def sum_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (sum) each parameter's gradient in place: with each rank's loss weighted by
    its share of the rows, the sum is the gradient of the global batch."""
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise: true where `mask` is true on any rank."""
    flags = mask.to(torch.uint8)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on every rank), in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def min_over_ranks_(tensor: torch.Tensor) -> None:
    """Replace `tensor` in place by its element-wise minimum over the ranks."""
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)


def threads_for(shapes: list[tuple[int, int]], batch_rows: int, cores: int | None = None) -> int:
    """CPU threads for a training step of SAEs shaped (d_in, d_sae): one while a step is small
    (under ~1 GFLOP, where threads cost more than they save: the mini book's SAEs), else the
    cores this process may use, shared with the other processes torchrun started on this node
    (a paper-size step runs ~1.9x faster on two cores than on one)."""
    # forward (encode, decode) and backward (two products each) = 6 matmuls of 2*B*D*S flops
    flops = sum(12 * batch_rows * d_in * d_sae for d_in, d_sae in shapes)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cores = (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return 1 if flops < 1e9 else max(1, int(cores or 1))


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
