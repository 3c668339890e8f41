"""Reading SAE codes from activations that may not fit in memory.

Every analysis that scans a store (exemplars, class statistics, cross-encoder matching, feature
discovery, metrics) does the same three things: read rows in chunks (a memory-mapped store stays
on disk), move each chunk to the SAE's device and dtype, and encode it without gradients. They
all go through `iter_codes`; a scan that keeps each feature's strongest rows folds chunks into a
running top-k with `merge_top_k`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


def device_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    """Where a model's weights live and in what precision: an SAE's decoder, or the first
    parameter of any ``nn.Module`` (CPU float32 for an object without weights)."""
    weight = getattr(module, "W_dec", None)
    if weight is None and isinstance(module, torch.nn.Module):
        weight = next(module.parameters(), None)
    if torch.is_tensor(weight):
        return weight.device, weight.dtype
    return torch.device("cpu"), torch.float32


def read_rows(acts: Any, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of an array, memmap or tensor as a float32 tensor (a copy, since
    memory-mapped stores are read-only)."""
    chunk = acts[start:stop]
    if isinstance(chunk, torch.Tensor):
        return chunk.float()
    return torch.from_numpy(np.array(chunk, dtype=np.float32))


def check_width(sae: Any, width: int) -> None:
    """Raise a clear error when activations of ``width`` cannot feed ``sae``."""
    if width != sae.cfg.d_in:
        raise ValueError(
            f"activations are {width} wide but the SAE expects d_in={sae.cfg.d_in}; "
            "use the layer/model the SAE was trained on"
        )


def iter_codes(
    sae: Any,
    acts: Any,
    chunk: int = 4096,
    *,
    pre_activation: bool = False,
    progress: bool = False,
    desc: str = "encoding",
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, codes)`` for consecutive chunks of ``acts`` (``[N, D]``, or ``[N, P, D]`` patch
    rows), each chunk ``chunk`` rows long; ``codes`` is ``[b, S]`` (``[b, P, S]``), float32, on the
    SAE's device, computed without gradients.

    ``pre_activation=True`` yields what SAELens exposes at ``hook_sae_acts_pre`` instead: the
    encoder output before the sparsifying nonlinearity (paper 003 Fig. 12).
    """
    check_width(sae, int(acts.shape[-1]))
    device, dtype = device_dtype(sae)
    captured: list[torch.Tensor] = []
    handle = None
    if pre_activation:
        handle = sae.hook_sae_acts_pre.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output)
        )
    try:
        starts = range(0, len(acts), chunk)
        for start in tqdm(starts, desc=desc, disable=not progress):
            x = read_rows(acts, start, start + chunk).to(device, dtype)
            with torch.no_grad():
                codes = sae.encode(x)
            if pre_activation:
                codes = captured.pop()
            yield start, codes.float()
    finally:
        if handle is not None:
            handle.remove()


def merge_top_k(
    values_SK: torch.Tensor,
    rows_SK: torch.Tensor,
    scores_SB: torch.Tensor,
    rows_B: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a chunk's scores into a running top-k per feature, keeping exactly what a full sort
    of all rows would keep.

    The running entries come first and a stable descending sort keeps equal scores in their
    order, so ties go to the earlier row, as ``argsort(-scores, kind="stable")`` does
    (torch.topk promises no order among ties, which would make results depend on chunking).
    Start from ``torch.empty(S, 0)`` values and rows.
    """
    values = torch.cat([values_SK, scores_SB], dim=1)
    rows = torch.cat([rows_SK, rows_B.expand(len(scores_SB), -1)], dim=1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), rows.gather(1, order)
