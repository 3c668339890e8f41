"""Drawing exemplars: each image as the model saw it, the feature's activation on every patch
as a translucent heat map over that patch (paper 002 Fig. 2).

* :func:`model_view`: an image resized and cropped by the encoder's own processor, so patch
  overlays land on the pixels the patches came from;
* :func:`exemplar_figure` / :func:`plot_exemplars`: one feature's exemplar grid, from an
  `saekit.analysis.exemplars.ExemplarScan`; :func:`exemplar_rows`: several features, one row
  each;
* :func:`patch_features`: the features active at every patch of one image, strongest first
  (what the feature browser's patch tab lists).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from sae_lens import SAE
from transformers import BaseImageProcessor

from saekit.activations import Store
from saekit.analysis.exemplars import ExemplarScan
from saekit.data import ImageDataset
from saekit.sae.codes import check_sae_matches_store, iter_codes


def model_view(image: Image.Image, processor: BaseImageProcessor | None = None) -> Image.Image:
    """The image as the encoder saw it: the processor's resize and crop, without normalising.

    Patch overlays must line up with the pixels the patches came from. Without a processor the
    image is centre-cropped to a square, which is what resize-shortest-edge-then-centre-crop
    processors (DINOv2, CLIP) do up to scale.
    """
    image = image.convert("RGB")
    if processor is not None:
        pixels = processor(
            images=[image], do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def exemplar_patch_acts(
    scan: ExemplarScan, store: Store, sae: SAE, feature: int, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(store rows, image scores, the feature's activation on every patch ``[K, P]``) of its
    exemplars, re-encoding only those K images' patches."""
    rows, values = scan.exemplars(feature, k)
    if "patch" not in store.manifest["tokens"]:
        return rows, values, np.zeros((len(rows), 0), np.float32)
    check_sae_matches_store(sae, store, scan.layer, "patch")
    order = np.argsort(rows)  # memory-mapped reads in store order
    patches_KPD = np.empty((len(rows), *store.patches(scan.layer).shape[1:]), np.float32)
    patches_KPD[order] = np.asarray(store.patches(scan.layer)[rows[order]], np.float32)
    acts_KP = np.zeros(patches_KPD.shape[:2], np.float32)
    for start, codes_bPS in iter_codes(sae, patches_KPD, max(1, len(rows))):
        acts_KP[start : start + len(codes_bPS)] = codes_bPS[..., feature].cpu().numpy()
    return rows, values, acts_KP


def overlay_patches(
    ax: plt.Axes,
    image: Image.Image,
    acts_P: np.ndarray,
    grid: tuple[int, int],
    *,
    vmax: float | None = None,
    cmap: str = "inferno",
    max_alpha: float = 0.75,
) -> None:
    """Draw ``image`` with each patch's activation as a heat square whose opacity grows with it.

    The ``[h, w]`` activation grid is stretched over the image (``extent``), so every patch
    covers exactly its pixel block, as paper 002 draws patch predictions.
    """
    ax.imshow(image)
    if acts_P.size:
        acts_hw = np.asarray(acts_P, np.float32).reshape(grid)
        top = float(vmax if vmax is not None else acts_hw.max())
        level_hw = np.clip(acts_hw / top, 0.0, 1.0) if top > 0 else np.zeros_like(acts_hw)
        ax.imshow(
            level_hw,
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            alpha=level_hw * max_alpha,
            extent=(0, image.width, image.height, 0),
            interpolation="nearest",
        )
    ax.set_xticks([])
    ax.set_yticks([])


def plot_exemplars(
    images: Sequence[Image.Image],
    acts_KP: np.ndarray,
    grid: tuple[int, int],
    *,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    ncols: int = 4,
    axes: Sequence[plt.Axes] | None = None,
    tile: float = 1.8,
) -> Figure:
    """An exemplar grid: ``images`` (already as the model saw them, see `model_view`) with the
    feature's patch activations ``acts_KP`` overlaid, all on one colour scale (the largest
    activation among them) so brightness compares across tiles."""
    if len(images) != len(acts_KP):
        raise ValueError(f"{len(images)} images but {len(acts_KP)} rows of patch activations")
    n = max(len(images), 1)
    if axes is None:
        ncols = min(ncols, n)
        nrows = -(-n // ncols)
        fig, grid_axes = plt.subplots(
            nrows,
            ncols,
            figsize=(tile * ncols, tile * nrows + (0.4 if title else 0)),
            squeeze=False,
        )
        axes = list(grid_axes.ravel())
    else:
        fig = axes[0].figure
    vmax = float(np.max(acts_KP)) if np.size(acts_KP) else None
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.axis("off")
            continue
        overlay_patches(ax, images[i], acts_KP[i], grid, vmax=vmax)
        if captions is not None:
            ax.set_title(captions[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def row_images(
    store: Store,
    dataset: ImageDataset,
    rows: Sequence[int],
    processor: BaseImageProcessor | None = None,
) -> list[Image.Image]:
    """The images of store ``rows``, loaded from the dataset the store was extracted from."""
    images = []
    for row in rows:
        index = int(store.rows[row])
        if dataset.image_ids[index] != store.image_ids[row]:
            raise ValueError(
                f"store row {row} is image {store.image_ids[row]!r} but the dataset's image "
                f"{index} is {dataset.image_ids[index]!r}: pass the dataset the store was "
                "extracted from"
            )
        images.append(model_view(dataset.load(index), processor))
    return images


def exemplar_figure(
    scan: ExemplarScan,
    store: Store,
    sae: SAE,
    dataset: ImageDataset,
    feature: int,
    *,
    k: int | None = None,
    processor: BaseImageProcessor | None = None,
    ncols: int = 4,
    title: str | None = None,
    axes: Sequence[plt.Axes] | None = None,
    tile: float = 1.8,
) -> Figure:
    """`plot_exemplars` for one feature of a scan: its top images with their patch overlays,
    captioned with the image score and class, titled with the feature's name; ``tile`` is each
    image's size in inches."""
    rows, values, acts_KP = exemplar_patch_acts(scan, store, sae, feature, k)
    images = row_images(store, dataset, rows, processor)
    grid = store.grid(scan.layer) if acts_KP.size else (1, 1)
    captions = [
        f"{scan.class_names[store.labels[row]]} {value:.2g}"
        for row, value in zip(rows, values, strict=True)
    ]
    if title is None:
        title = f"{scan.name(feature)} ({scan.rank_by} activation)"
    return plot_exemplars(
        images, acts_KP, grid, captions=captions, title=title, ncols=ncols, axes=axes, tile=tile
    )


def patch_features(
    sae: SAE, acts_PD: torch.Tensor | np.ndarray, top: int = 10
) -> list[list[tuple[int, float]]]:
    """For every patch, the features active there as (feature, activation), strongest first
    (at most ``top``)."""
    acts_PD = np.asarray(acts_PD, np.float32)
    codes_PS = torch.cat([c.cpu() for _, c in iter_codes(sae, acts_PD, max(1, len(acts_PD)))])
    values_PT, index_PT = torch.sort(codes_PS, dim=1, descending=True, stable=True)
    out = []
    for values_T, index_T in zip(values_PT[:, :top], index_PT[:, :top], strict=True):
        out.append([(int(i), float(v)) for v, i in zip(values_T, index_T, strict=True) if v > 0])
    return out


def exemplar_rows(
    scan: ExemplarScan,
    store: Store,
    sae: SAE,
    dataset: ImageDataset,
    features: Sequence[int],
    *,
    k: int = 6,
    processor: BaseImageProcessor | None = None,
    names: Sequence[str] | None = None,
    tile: float = 1.3,
) -> Figure:
    """Several features at a glance, paper 002 Fig. 2 style: one row per feature (labelled with
    its name, or ``names``), its top ``k`` exemplars with their patch overlays."""
    if not features:
        raise ValueError("no features to draw; pick some with select_features(scan, n)")
    fig, axes = plt.subplots(
        len(features), k, figsize=(tile * k + 1.2, tile * len(features)), squeeze=False
    )
    for row, feature in enumerate(features):
        exemplar_figure(scan, store, sae, dataset, int(feature), k=k, processor=processor,
                        axes=list(axes[row]), title="")  # fmt: skip
        label = names[row] if names is not None else scan.name(int(feature))
        axes[row, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig
