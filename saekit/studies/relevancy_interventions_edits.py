"""Chapter 05's edits: the segmentation data, the parts to edit and the effect tables.

The six-step edit itself is `saekit.analysis.interventions`; here it is applied as the chapter
does: to a CLS probe after the edited layer (`classification_table`, `suppression_curve`) and to
a linear segmentation head on the part's patches (`edit_part`, `part_effects`), each next to its
controls; `segmentation_data` gathers the head's patches and masks (the toy world's, or the
paper profile's folders) and `part_features` picks the feature tied to each part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.activations import Store, extract
from saekit.analysis.interventions import Comparison, Edit, compare, compare_in_encoder
from saekit.analysis.probes import SegmentationHead
from saekit.data import ImageDataset, ImageFolder
from saekit.masks import MASK_LAYOUT, load_masks, patch_coverage
from saekit.mini.toyworld import PART_NAMES
from saekit.models import Encoder
from saekit.studies.relevancy_interventions import RelevancySettings, tie_scores

# --------------------------------------------------------------------------- segmentation


@dataclass
class SegmentationData:
    """The patch tokens and masks the segmentation head trains and is edited on."""

    train: Store
    """Patch tokens of the training images at the edited layer."""
    val: Store
    """The same for the validation images."""
    train_images: ImageDataset
    """Images of ``train`` (with masks in a sibling folder, `saekit.masks.MASK_LAYOUT`)."""
    val_images: ImageDataset
    """Images of ``val``."""
    train_masks: np.ndarray
    """Each training row's mask as the encoder saw the image, ``[N, H, W]``."""
    val_masks: np.ndarray
    """The same for validation."""
    class_names: list[str]
    """Name of each mask value."""
    edited_classes: range
    """Mask classes whose patches are edited (the toy world's background, 0, is not)."""


def segmentation_data(
    settings: RelevancySettings,
    encoder: Encoder,
    train_patch: Store,
    val_patch: Store,
    train_images: ImageDataset,
    val_images: ImageDataset,
    stores_root: str | Path,
) -> SegmentationData:
    """Mini: the toy world's own images and part masks (the patch stores already extracted).
    Paper: the folders ``settings.segmentation_train`` / ``segmentation_val`` (e.g. ADE20K in
    `saekit.masks.MASK_LAYOUT`), their patch tokens extracted once under ``stores_root``."""
    if settings.mini:
        names, edited = list(PART_NAMES), range(1, len(PART_NAMES))
    else:
        folders = {split: _folder(settings, f"segmentation_{split}") for split in ("train", "val")}
        train_images, val_images = (ImageFolder(folders[split]) for split in ("train", "val"))
        train_patch, val_patch = (
            extract(encoder, images, layers=[settings.patch_layer], tokens="patch",
                    dtype="float16",
                    out=Path(stores_root)
                    / f"{settings.family}-segmentation-{split}-{settings.patch_layer}")
            for split, images in (("train", train_images), ("val", val_images))
        )  # fmt: skip
        names = [f"class {i}" for i in range(settings.segmentation_classes)]
        edited = range(len(names))
    return SegmentationData(
        train_patch, val_patch, train_images, val_images,
        load_masks(train_patch, train_images, encoder.processor),
        load_masks(val_patch, val_images, encoder.processor),
        names, edited,
    )  # fmt: skip


def _folder(settings: RelevancySettings, name: str) -> Path:
    value = getattr(settings, name)
    if not value or not Path(value).expanduser().is_dir():
        raise FileNotFoundError(
            f"Parameter {name}={value!r} is not a folder; the paper profile needs segmentation "
            f"images with masks.\n" + MASK_LAYOUT.format(root=value or f"/data/ade20k/{name}")
        )
    return Path(value).expanduser()


def part_features(
    sae: SAE, data: SegmentationData, layer: int, min_region_patches: int
) -> tuple[dict[int, int], list[int]]:
    """({part: its most tied feature}, parts left out). A part's region is the patches it
    covers at least half of; parts with fewer than ``min_region_patches`` such validation
    patches (or no such training patch) are left out; the feature tied to a part is the one
    whose mean activation on the part's training patches exceeds its mean on all other patches
    by the most (`tie_scores`)."""
    grid = data.train.grid(layer)
    chosen, left_out = {}, []
    for part in data.edited_classes:
        region_NP = (patch_coverage(data.train_masks, grid, part) >= 0.5).reshape(
            len(data.train_masks), -1
        )
        small = (patch_coverage(data.val_masks, grid, part) >= 0.5).sum() < min_region_patches
        if small or not region_NP.any() or region_NP.all():
            left_out.append(part)
            continue
        chosen[part] = int(np.argmax(tie_scores(sae, data.train.patches(layer), region_NP)))
    return chosen, left_out


# --------------------------------------------------------------------------- effects


def classification_table(
    comparison: Comparison, labels_B: np.ndarray, group: Sequence[int] | None = None
) -> pd.DataFrame:
    """Per condition of a classification `Comparison` whose outputs are class logits
    ``[B, C]``: the mean probability of each image's true class, of the classes in ``group``
    taken together (e.g. a synset's leaves), top-1 accuracy and the share of changed
    predictions."""
    labels = torch.as_tensor(np.asarray(labels_B)).long()
    before = comparison.outputs["original"].argmax(-1)
    rows = {}
    for condition, logits_BC in comparison.outputs.items():
        if logits_BC.ndim != 2:
            raise ValueError("classification_table needs class logits [B, C] from the head")
        probs_BC = logits_BC.float().softmax(-1)
        row = {"p(true class)": float(probs_BC[torch.arange(len(labels)), labels].mean())}
        if group is not None:
            row["p(group)"] = float(probs_BC[:, list(group)].sum(-1).mean())
        row["accuracy"] = float((probs_BC.argmax(-1) == labels).float().mean())
        row["changed predictions"] = float((probs_BC.argmax(-1) != before).float().mean())
        rows[condition] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def suppression_curve(
    encoder: Encoder,
    images: Sequence[Image.Image] | torch.Tensor,
    sae: SAE,
    layer: int,
    ranked_features: Sequence[int],
    head: Callable[[torch.Tensor], torch.Tensor],
    labels_B: np.ndarray,
    group: Sequence[int],
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """`classification_table` after suppressing the first 1, 2, ... of ``ranked_features`` in
    every patch of ``layer``, with the controls of the same size: a dose-response table with
    columns n_features, condition and the table's columns."""
    pixels = images if torch.is_tensor(images) else encoder.preprocess(images)
    tables = []
    for n in tqdm(range(1, len(ranked_features) + 1), desc="suppression curve", leave=False):
        edit = Edit(tuple(ranked_features[:n]))
        comparison = compare_in_encoder(encoder, pixels, sae, layer, edit, head, seed=seed)
        table = classification_table(comparison, labels_B, group)
        tables.append(table.rename_axis("condition").reset_index().assign(n_features=n))
    return pd.concat(tables, ignore_index=True)


@dataclass
class PartEdit:
    """A feature suppressed on the patches a segmentation class covers, with its controls."""

    part: int
    """The class (e.g. a toy-world part) whose patches were edited."""
    feature: int
    """The SAE feature suppressed there."""
    images: np.ndarray
    """Indices of the images that have such patches (the rows of ``comparison``)."""
    region_BP: torch.Tensor
    """Bool, the edited patches of those images."""
    comparison: Comparison
    """Head outputs for the original, the edit and the controls."""


def edit_part(
    patches_NPD: np.ndarray,
    masks_NHW: np.ndarray,
    sae: SAE,
    head: SegmentationHead,
    part: int,
    feature: int,
    *,
    min_cover: float = 0.5,
    seed: int = 0,
) -> PartEdit:
    """Suppress ``feature`` on the patches at least ``min_cover`` covered by class ``part``, in
    every image that has such a patch, and run the segmentation head's ``patch_logits``."""
    coverage_Nhw = patch_coverage(masks_NHW, head.grid, part)
    region_NP = torch.as_tensor(coverage_Nhw.reshape(len(coverage_Nhw), -1) >= min_cover)
    images = np.flatnonzero(region_NP.any(1).numpy())
    if not len(images):
        raise ValueError(f"no patch is {min_cover:.0%} covered by class {part}; lower min_cover")
    patches = torch.as_tensor(np.asarray(patches_NPD[images], np.float32))
    region_BP = region_NP[images]
    edit = Edit(feature, patches=region_BP)
    comparison = compare(patches, sae, edit, head.patch_logits, seed=seed)
    return PartEdit(part, feature, images, region_BP, comparison)


def part_effects(
    edits: Sequence[PartEdit], masks_NHW: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """One row per `PartEdit`: the edited patches, the share of them whose predicted class
    changed and the mean logit change there, under the edit and each control, and the part's
    IoU and the mIoU over all classes (pixels of the edited images), for the original and under
    each condition."""
    rows = []
    for e in edits:
        region_Bhw = e.region_BP.reshape(len(e.images), *e.comparison.outputs["original"].shape[2:])
        summary = e.comparison.summary(region_Bhw)
        iou = e.comparison.iou(masks_NHW[e.images], class_names)[class_names[e.part]]
        row = {"part": class_names[e.part], "feature": e.feature, "patches": int(e.region_BP.sum())}
        for condition in summary.index:
            row[f"changed: {condition}"] = summary.loc[condition, "changed in region"]
        for condition in summary.index:
            row[f"|Δ|: {condition}"] = summary.loc[condition, "mean |Δ| in region"]
        for condition, value in iou.items():
            row[f"IoU: {condition}"] = value
        miou = e.comparison.miou(masks_NHW[e.images], len(class_names))
        for condition, value in miou.items():
            row[f"mIoU: {condition}"] = value
        rows.append(row)
    return pd.DataFrame(rows).set_index("part")
