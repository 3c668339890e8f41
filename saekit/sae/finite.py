"""NaN/Inf checks of the training inputs that need not stop the device every step.

Checking ``isfinite(x).all()`` on the host each step forces a device synchronisation. `FiniteWatch`
accumulates the check on the device and looks at it every ``every`` steps (and before each
checkpoint and at each epoch's end); when it trips, the batches since the last look are read
again (``batches(epoch)`` gives the same batches on every call, the trainer's contract) to name
the batch and rows, as the per-step check does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from saekit.sae.codes import NonFiniteActivationsError


def check_finite(x: torch.Tensor, source: Any, epoch: int, batch_index: int) -> None:
    """Raise `NonFiniteActivationsError` naming the batch and rows if `x` holds NaN/Inf."""
    if not torch.isfinite(x).all():
        rows = (~torch.isfinite(x)).any(-1).nonzero().flatten().tolist()
        where = "" if source is None else f" of layer {source}"
        raise NonFiniteActivationsError(
            f"NaN/Inf in activations{where}: epoch {epoch}, batch {batch_index}, rows {rows[:10]} "
            "of that batch. Fix or drop those rows in the store (sweep_from_store's "
            "check_data=True names the store rows) before training."
        )


def default_stride(device: torch.device) -> int:
    """Every step on a CPU (its check costs no synchronisation), every 64 steps elsewhere."""
    return 1 if device.type == "cpu" else 64


class FiniteWatch:
    """The strided check over one epoch at a time (see the module)."""

    def __init__(
        self,
        batches: Callable[[int], Iterable[Any]],
        split: Callable[[Any], dict[Any, torch.Tensor]],
        every: int,
    ) -> None:
        self.batches, self.split, self.every = batches, split, max(1, every)
        self.epoch, self.start = 0, 0
        self.flag: torch.Tensor | None = None

    def start_epoch(self, epoch: int, position: int) -> None:
        self.epoch, self.start, self.flag = epoch, position, None

    def see(self, inputs: list[torch.Tensor]) -> None:
        """Accumulate this step's check on the device (no synchronisation)."""
        unique = {id(t): t for t in inputs}.values()
        bad = torch.stack([~torch.isfinite(t).all() for t in unique]).any()
        self.flag = bad if self.flag is None else self.flag | bad

    def check(self, position: int) -> None:
        """Look at the accumulated flag (one synchronisation); name the culprit if it tripped."""
        flag, start = self.flag, self.start
        self.flag, self.start = None, position
        if flag is None or not bool(flag):
            return
        stream = itertools.islice(self.batches(self.epoch), start, position)
        for index, batch in enumerate(stream, start=start):
            for source, x in self.split(batch).items():
                check_finite(torch.as_tensor(x).float(), source, self.epoch, index)
        raise NonFiniteActivationsError(
            f"NaN/Inf in the training inputs of epoch {self.epoch}, batches {start}-{position - 1}, "
            "but reading those batches again found none: batches(epoch) must give the same "
            "batches on every call."
        )
