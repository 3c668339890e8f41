"""Segmentation masks as the encoder sees the image: cropped like the image, tiled on its patches.

Masks live beside an image folder (`MASK_LAYOUT`; the toy world's export writes it). The
segmentation head of the interventions study, the relevancy check against objects and the
exemplars' "where does it fire" all read masks through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

    from saekit.activation_store import Store
    from saekit.data import ImageDataset


def model_view_mask(
    mask_HW: np.ndarray, processor: BaseImageProcessor | None = None
) -> np.ndarray:
    """A segmentation mask resized and cropped exactly as ``processor`` treats the image
    (nearest neighbour, so labels stay labels), ``uint8 [H', W']``; unchanged without one."""
    mask_HW = np.asarray(mask_HW)
    if processor is None:
        return mask_HW.astype(np.uint8)
    rgb = Image.fromarray(np.repeat(mask_HW.astype(np.uint8)[..., None], 3, axis=-1))
    pixels = processor(
        images=[rgb],
        do_rescale=False,
        do_normalize=False,
        resample=Image.Resampling.NEAREST,
        return_tensors="np",
    )["pixel_values"][0]
    return np.rint(pixels[0]).astype(np.uint8)


def masks_root(root: str | Path) -> Path:
    """The mask folder that goes with an image folder (`MASK_LAYOUT`)."""
    root = Path(root)
    return root.with_name(root.name + "_masks")


UNLABELLED = 255
"""Mask value of pixels with no label (ADE20K-style); never counted as object."""

MASK_LAYOUT = """Masks sit in a sibling folder with the images' relative paths, as PNG:
    {root}/<class>/<name>.jpg      the image
    {root}_masks/<class>/<name>.png  its mask; pixel value = class index (255 = unlabelled)
(saekit.mini.toyworld.export_imagefolder writes this layout; convert ADE20K the same way)."""


def load_masks(
    store: Store,
    dataset: ImageDataset,
    processor: BaseImageProcessor | None = None,
    masks_dir: str | Path | None = None,
) -> np.ndarray:
    """The segmentation mask of every store row, as the encoder saw the image
    (`model_view_mask`), ``uint8 [N, H, W]``. Masks are read from ``masks_dir`` (default: the
    image folder's sibling ``<root>_masks``) under each image's relative path, as PNG."""
    if masks_dir is None:
        folder = getattr(dataset, "root", None)
        if folder is None:
            raise ValueError(
                "this dataset is not an image folder, so it has no sibling mask folder: pass "
                "masks_dir (laid out as MASK_LAYOUT says)"
            )
        masks_dir = masks_root(folder)
    root = Path(masks_dir)
    masks = []
    for row, image_id in zip(store.rows, store.image_ids, strict=True):
        if dataset.image_ids[int(row)] != image_id:
            raise ValueError(
                f"store row of image {image_id!r} does not match the dataset's image {int(row)}"
                f" ({dataset.image_ids[int(row)]!r}): pass the dataset the store was made from"
            )
        path = (root / image_id).with_suffix(".png")
        if not path.is_file():
            raise FileNotFoundError(
                f"No mask {path} for image {image_id!r}.\n"
                + MASK_LAYOUT.format(root=getattr(dataset, "root", "images"))
            )
        masks.append(model_view_mask(np.asarray(Image.open(path)), processor))
    return np.stack(masks)


def patch_coverage(
    masks_NHW: np.ndarray, grid: tuple[int, int], classes: int | Sequence[int] | None = None
) -> np.ndarray:
    """Fraction of each patch's pixels whose mask value is in ``classes`` (None: any value but
    0 and 255, i.e. the labelled object), ``[N, h, w]``; the mask must tile the patch grid."""
    masks = np.asarray(masks_NHW)
    n, height, width = masks.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"masks of {height}x{width} pixels do not tile a {h}x{w} patch grid")
    if classes is None:
        hit = (masks != 0) & (masks != UNLABELLED)  # object = any labelled, non-background pixel
    else:
        hit = np.isin(masks, np.atleast_1d(np.asarray(classes)))
    return hit.reshape(n, h, height // h, w, width // w).mean(axis=(2, 4))
