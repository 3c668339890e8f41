"""Where an SAE feature fires on the patch grid, and how that changes between two depths.

Paper 003 §5.2 (Fig. 7): encode the image tokens read at an earlier point of a model (LLaVA's
projector output) and a later one (a language-model block) each with its own SAE, show every
image through each SAE's dominant feature laid out on the vision patch grid, and overlay the two
maps of active patches: which patches persist, which the later layer recruits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE

from saekit.sae.codes import iter_codes


@torch.no_grad()
def patch_maps(
    sae: SAE,
    acts_BPD: torch.Tensor,
    grid: tuple[int, int],
    feature: int | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAE feature's activation on every patch, laid out on the grid, [B, rows, cols].

    With `feature=None` each image uses its own dominant feature (largest total activation over
    its patches), since SAEs trained at different points share no feature indices. Returns the
    maps and the feature used per image, [B]. Images are encoded about ``chunk`` patch rows at a
    time (`iter_codes`), so the [B, P, S] codes never exist at once.
    """
    n_images, n_patches, _ = acts_BPD.shape
    if n_patches != grid[0] * grid[1]:
        raise ValueError(f"{n_patches} patches do not fill a {grid[0]}x{grid[1]} grid.")
    maps_BP = torch.zeros(n_images, n_patches)
    features_B = torch.zeros(n_images, dtype=torch.long)
    images_per_chunk = max(1, chunk // n_patches)
    for start, codes_bPS in iter_codes(sae, acts_BPD, images_per_chunk):
        codes_bPS = codes_bPS.cpu()
        if feature is None:
            chosen_b = codes_bPS.sum(dim=1).argmax(dim=1)
        else:
            chosen_b = torch.full((len(codes_bPS),), int(feature))
        stop = start + len(codes_bPS)
        maps_BP[start:stop] = codes_bPS[torch.arange(len(codes_bPS)), :, chosen_b]
        features_B[start:stop] = chosen_b
    return maps_BP.reshape(n_images, *grid), features_B


@dataclass
class Evolution:
    """Activated patches at two points of the model and how they relate (Fig. 7)."""

    early_BHW: torch.Tensor
    """Patches active at the earlier point (e.g. the projector), bool."""
    late_BHW: torch.Tensor
    """Patches active at the later point (e.g. block 6), bool."""
    overlay_BHW: torch.Tensor
    """0 neither, 1 early only, 2 late only, 3 both."""
    persistence_B: torch.Tensor
    """Fraction of early-active patches still active later (NaN when none were active)."""
    new_B: torch.Tensor
    """Number of patches active only at the later point."""


def compare_patch_maps(
    early_BHW: torch.Tensor, late_BHW: torch.Tensor, threshold: float = 0.0
) -> Evolution:
    """Threshold two sets of patch maps (active = activation > threshold) and overlay them."""
    early, late = early_BHW > threshold, late_BHW > threshold
    overlay = early.to(torch.int64) + 2 * late.to(torch.int64)
    kept_B = (early & late).flatten(1).sum(1).float()
    n_early_B = early.flatten(1).sum(1).float()
    persistence_B = torch.where(n_early_B > 0, kept_B / n_early_B.clamp(min=1), torch.nan)
    new_B = (late & ~early).flatten(1).sum(1)
    return Evolution(early, late, overlay, persistence_B, new_B)
