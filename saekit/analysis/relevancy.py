"""Relevancy maps: where in the image an SAE feature's CLS activation comes from (paper 000 §3.3).

Chefer et al. (2021) weight each layer's attention probabilities by their gradient. For an SAE
feature ``f`` reading the CLS token of layer ``L``, with ``A_i`` the attention probabilities of
block ``i`` (``[H, T, T]``, every token incl. CLS and registers):

* Eq. 8: ``Ā_i = E_h[(∇A_i ⊙ A_i)^+]``, where ``∇A_i = ∂ z_f / ∂ A_i``, the positive part
  taken before the mean over heads;
* Eq. 9: ``R_0 = I``, ``R_i = R_{i-1} + Ā_i · R_{i-1}`` for the blocks ``0..L``;
* the CLS row of ``R_L`` minus the identity's 1 on the diagonal, restricted to the patch
  tokens and normalised to sum to one, reshaped to the patch grid.

The gradients come from autograd through the real model: transformers' eager attention returns
the very probability tensor it multiplies with V (dropout is the identity in eval mode), so
``torch.autograd.grad(z_f, attentions)`` is ∂z_f/∂A_i along every path, including the paths
through later layers' softmaxes, as Chefer's attention hooks see it. No library ships Eq. 8-9
for an arbitrary scalar such as an SAE code (Chefer's reference code is tied to its own ViT), so
the propagation is written here, in a dozen lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from sae_lens import SAE
from transformers import BaseImageProcessor

from saekit.analysis.exemplar_plots import model_view, overlay_patches
from saekit.models import Encoder
from saekit.sae.codes import check_width, device_dtype


def propagate_relevancy(
    attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Eq. 8-9: the relevancy matrix ``R [B, T, T]`` after the given blocks, first to last.

    ``attentions[i]`` and ``gradients[i]`` are block i's probabilities and their gradients,
    ``[B, H, T, T]`` each.
    """
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError(
            f"need one gradient per attention map and at least one block; got "
            f"{len(attentions)} maps and {len(gradients)} gradients"
        )
    batch, _, tokens, _ = attentions[0].shape
    eye_TT = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)
    relevancy_BTT = eye_TT.expand(batch, tokens, tokens).clone()
    for attn_BHTT, grad_BHTT in zip(attentions, gradients, strict=True):
        weighted_BTT = (grad_BHTT * attn_BHTT).clamp(min=0).mean(dim=1)
        relevancy_BTT = relevancy_BTT + weighted_BTT @ relevancy_BTT
    return relevancy_BTT


def cls_patch_relevancy(
    relevancy_BTT: torch.Tensor, first_patch: int, grid: tuple[int, int]
) -> torch.Tensor:
    """The CLS row without the identity's contribution, over the patch tokens only (from
    ``first_patch``, i.e. after CLS and registers), normalised to sum to one: ``[B, h, w]``.
    A row with no relevancy at all (the feature is off) stays zero."""
    eye_T = torch.zeros_like(relevancy_BTT[0, 0])
    eye_T[0] = 1.0
    row_BP = (relevancy_BTT[:, 0] - eye_T)[:, first_patch:]
    if row_BP.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{row_BP.shape[1]} patch tokens do not fill a {grid} grid")
    total_B1 = row_BP.sum(dim=1, keepdim=True)
    row_BP = torch.where(total_B1 > 0, row_BP / total_B1.clamp(min=1e-30), torch.zeros_like(row_BP))
    return row_BP.reshape(-1, *grid)


@dataclass
class RelevancyMaps:
    """Relevancy maps of SAE features for a batch of images."""

    maps_FBhw: np.ndarray
    """Per feature and image: patch relevancy on the grid, summing to one (zero where off)."""
    activations_FB: np.ndarray
    """Each feature's activation on each image's CLS token."""
    features: list[int]
    """The SAE features, in the order of the first axis."""
    layer: int
    """Encoder layer the SAE reads."""
    grid: tuple[int, int]
    """Patch grid (rows, cols)."""

    def subset(self, images: Sequence[int]) -> RelevancyMaps:
        """The maps of some of the images, in the given order."""
        index = list(images)
        return RelevancyMaps(
            self.maps_FBhw[:, index], self.activations_FB[:, index], self.features, self.layer,
            self.grid,
        )  # fmt: skip


def relevancy_maps(
    encoder: Encoder,
    images: Sequence[Image.Image] | torch.Tensor,
    sae: SAE,
    layer: int,
    features: int | Sequence[int],
) -> RelevancyMaps:
    """Relevancy maps of ``features`` of an SAE that reads the CLS token of ``layer``.

    ``images`` are PIL images or preprocessed ``pixel_values [B, 3, H, W]``. One forward pass
    with eager attention, then one backward pass per feature (the activation summed over the
    batch: images never attend to each other, so each image gets its own gradient).
    """
    if encoder.family == "resnet":
        raise ValueError("relevancy maps need attention; a CNN has none. Use a ViT encoder.")
    (layer,) = encoder.resolve_layers([layer])
    features = [features] if isinstance(features, int) else [int(f) for f in features]
    d_sae = int(sae.cfg.d_sae)
    if not features or not all(0 <= f < d_sae for f in features):
        raise IndexError(f"features must be indices in [0, {d_sae}); got {features}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "relevancy maps need gradients, which torch.inference_mode() forbids; call "
            "relevancy_maps outside an inference_mode block (torch.no_grad() is fine)."
        )
    pixels = images if torch.is_tensor(images) else encoder.preprocess(images)
    with torch.enable_grad():
        out = encoder.forward_pixels(pixels, layers=list(range(layer + 1)), attentions=True)
        attentions = [out.attentions[i] for i in range(layer + 1)]
        cls_BD = out.cls[layer]
        check_width(sae, cls_BD.shape[-1])
        # Not `iter_codes`: that encodes without gradients, and the map needs ∂z_f/∂A_i.
        codes_BS = sae.encode(cls_BD.to(*device_dtype(sae)))
        maps, acts = [], []
        for position, feature in enumerate(features):
            activation_B = codes_BS[:, feature]
            gradients = torch.autograd.grad(
                activation_B.sum(),
                attentions,
                retain_graph=position + 1 < len(features),
                allow_unused=True,
            )
            gradients = [
                torch.zeros_like(a) if g is None else g
                for a, g in zip(attentions, gradients, strict=True)
            ]
            relevancy = propagate_relevancy(
                [a.detach() for a in attentions], [g.detach() for g in gradients]
            )
            first_patch = 1 + encoder.n_registers
            maps.append(cls_patch_relevancy(relevancy, first_patch, out.grids[layer]))
            acts.append(activation_B.detach())
    return RelevancyMaps(
        maps_FBhw=torch.stack(maps).float().cpu().numpy(),
        activations_FB=torch.stack(acts).float().cpu().numpy(),
        features=features,
        layer=layer,
        grid=tuple(out.grids[layer]),
    )


def plot_relevancy(
    images: Sequence[Image.Image],
    maps: RelevancyMaps,
    *,
    processor: BaseImageProcessor | None = None,
    feature_names: Sequence[str] | None = None,
    tile: float = 2.0,
) -> Figure:
    """Paper 000 Fig. 3: one row per image, its picture then one overlay per feature.

    Each map is scaled to its own maximum; the title gives the feature's CLS activation.
    """
    names = list(feature_names) if feature_names is not None else [f"#{f}" for f in maps.features]
    n_features, n_images = maps.maps_FBhw.shape[:2]
    if len(images) != n_images:
        raise ValueError(f"{len(images)} images for maps of {n_images} images")
    fig, axes = plt.subplots(
        n_images, n_features + 1, figsize=(tile * (n_features + 1), tile * n_images), squeeze=False
    )
    for b, image in enumerate(images):
        view = model_view(image, processor)
        axes[b, 0].imshow(view)
        axes[b, 0].set_axis_off()
        for f in range(n_features):
            ax = axes[b, f + 1]
            overlay_patches(ax, view, maps.maps_FBhw[f, b].ravel(), maps.grid, cmap="jet")
            ax.set_title(f"{names[f]}: {maps.activations_FB[f, b]:.2g}", fontsize=8)
    return fig


def relevancy_share(maps_Bhw: np.ndarray, coverage_Bhw: np.ndarray) -> np.ndarray:
    """Share of each image's relevancy that falls on a region, ``[B]``.

    ``coverage_Bhw`` is the fraction of each patch the region covers (e.g.
    `saekit.masks.patch_coverage` of the object). A map spread evenly over the patches
    scores the region's share of the image, so that is the chance level to compare with.
    """
    maps_Bhw, coverage_Bhw = np.asarray(maps_Bhw), np.asarray(coverage_Bhw)
    if maps_Bhw.shape != coverage_Bhw.shape:
        raise ValueError(f"maps {maps_Bhw.shape} and coverage {coverage_Bhw.shape} differ")
    return (maps_Bhw * coverage_Bhw).sum(axis=(1, 2))


def plot_relevancy_rows(
    rows: Sequence[tuple[str, Sequence[Image.Image], RelevancyMaps]],
    *,
    processor: BaseImageProcessor | None = None,
    tile: float = 1.5,
) -> Figure:
    """One row per feature, each with its own images (e.g. its top images) overlaid with its
    relevancy map; ``rows`` holds (label, images, that feature's `RelevancyMaps`). Paper 000
    Fig. 3 shows one feature this way across whale species."""
    n_cols = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(tile * n_cols, tile * len(rows) + 0.2), squeeze=False
    )
    for r, (label, images, maps) in enumerate(rows):
        if maps.maps_FBhw.shape[:2] != (1, len(images)):
            raise ValueError(f"row {label!r}: need one feature's maps for {len(images)} images")
        for c, ax in enumerate(axes[r]):
            if c >= len(images):
                ax.axis("off")
                continue
            view = model_view(images[c], processor)
            overlay_patches(ax, view, maps.maps_FBhw[0, c].ravel(), maps.grid, cmap="jet")
            ax.set_title(f"{maps.activations_FB[0, c]:.2g}", fontsize=7, pad=2)
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig
