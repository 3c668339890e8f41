"""The book's study of SAE interventions (chapter 05), built on `saekit.analysis.interventions`.

Which features to edit (`tie_scores` for the patches of a segmentation class, `class_contrast`
for a synset's classes), effect tables next to their controls (`classification_table`,
`suppression_curve`, `edit_part` and `part_effects`) and figures of original and edited
predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from tqdm.auto import tqdm

from saekit.analysis.interventions import Comparison, Edit, compare, compare_in_encoder
from saekit.masks import patch_coverage
from saekit.sae.codes import check_width

# --------------------------------------------------------------------------- which features


@torch.no_grad()
def tie_scores(
    sae: Any, acts: Any, inside: Any, *, batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """How strongly each feature is tied to the marked tokens: its mean code on them minus its
    mean code on all other tokens, ``[S]``.

    ``acts`` are patch tokens ``[N, P, D]`` with ``inside`` a bool ``[N, P]`` (e.g. the patches
    a planted part covers), or one token per image ``[N, D]`` with ``inside [N]``. Images are
    read ``batch_size`` at a time, so a memory-mapped store stays on disk.
    """
    inside = np.asarray(inside, dtype=bool)
    if inside.shape != tuple(acts.shape[:-1]):
        raise ValueError(
            f"inside must mark every token: shape {tuple(acts.shape[:-1])}, got {inside.shape}"
        )
    if inside.all() or not inside.any():
        raise ValueError("inside must mark some tokens but not all: a tie needs both sides")
    check_width(sae, acts.shape[-1])
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    sum_in_S = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_all_S = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    starts = range(0, len(acts), batch_size)
    for start in tqdm(starts, desc="feature ties", disable=not progress):
        x = torch.from_numpy(np.array(acts[start : start + batch_size], np.float32))
        codes = sae.encode(x.to(device, dtype)).double().cpu()
        mark = torch.as_tensor(inside[start : start + batch_size])
        sum_in_S += codes[mark].sum(0)
        sum_all_S += codes.reshape(-1, codes.shape[-1]).sum(0)
    n_in = int(inside.sum())
    return (sum_in_S / n_in - (sum_all_S - sum_in_S) / (inside.size - n_in)).float().numpy()


def class_contrast(mean_act_SC: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Per feature: its mean score over ``classes`` minus over the other classes, each class
    weighing the same, ``[S]``; e.g. from ``ExemplarScan.class_stats.mean_act_SC`` to find the
    features tied to a synset's leaves."""
    mask_C = np.zeros(mean_act_SC.shape[1], dtype=bool)
    mask_C[list(classes)] = True
    if mask_C.all() or not mask_C.any():
        raise ValueError("classes must hold some of the classes but not all of them")
    return mean_act_SC[:, mask_C].mean(1) - mean_act_SC[:, ~mask_C].mean(1)


def group_tie_table(
    stats: Any, features: Mapping[str, int], groups: Mapping[str, Sequence[int]]
) -> pd.DataFrame:
    """Per group: its feature, and the feature's mean image score and firing rate over the
    group's classes and over the other classes (class-weighted), from a `ClassStats` such as
    ``ExemplarScan.class_stats``."""
    rows = {}
    for name, feature in features.items():
        inside = np.zeros(stats.mean_act_SC.shape[1], dtype=bool)
        inside[list(groups[name])] = True
        act_C, fire_C = stats.mean_act_SC[feature], stats.fire_frac_SC[feature]
        rows[name] = {
            "feature": feature,
            "mean score: group": act_C[inside].mean(),
            "mean score: others": act_C[~inside].mean(),
            "fires: group": fire_C[inside].mean(),
            "fires: others": fire_C[~inside].mean(),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- effects


def classification_table(
    comparison: Comparison, labels_B: Any, group: Sequence[int] | None = None
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
    encoder: Any,
    images: Sequence[Image.Image] | torch.Tensor,
    sae: Any,
    layer: int,
    ranked_features: Sequence[int],
    head: Callable[[torch.Tensor], torch.Tensor],
    labels_B: Any,
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
    patches_NPD: Any,
    masks_NHW: np.ndarray,
    sae: Any,
    head: Any,
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


# --------------------------------------------------------------------------- figures


def class_colors(n_classes: int) -> ListedColormap:
    """One distinct colour per segmentation class (seaborn's husl palette beyond ten)."""
    palette = sns.color_palette("tab10" if n_classes <= 10 else "husl", n_classes)
    return ListedColormap(palette)


def plot_segmentation_edit(
    images: Sequence[Image.Image],
    masks_BHW: np.ndarray,
    edit: PartEdit,
    rows: Sequence[int],
    class_names: Sequence[str],
    *,
    tile: float = 1.6,
) -> Figure:
    """Paper 002 Fig. 7: one row per edited image (``rows`` index ``edit.images``): the image
    with the edited patches outlined, the ground truth, and the head's patch predictions (each
    patch's class painted over its pixel block, as paper 002 draws them) for every condition.

    ``images`` and ``masks_BHW`` hold those rows' images as the model saw them
    (`saekit.analysis.exemplars.model_view`, `model_view_mask`), in the order of ``rows``.
    """
    if not len(images) == len(masks_BHW) == len(rows):
        raise ValueError(f"{len(rows)} rows need as many images and masks")
    conditions = list(edit.comparison.outputs)
    cmap = class_colors(len(class_names))
    colours = dict(vmin=-0.5, vmax=len(class_names) - 0.5, cmap=cmap, interpolation="nearest")
    h, w = edit.comparison.outputs["original"].shape[2:]
    fig, axes = plt.subplots(
        len(rows), len(conditions) + 2, figsize=(tile * (len(conditions) + 2), tile * len(rows)),
        squeeze=False,
    )  # fmt: skip
    seen: set[int] = set()
    for r, b in enumerate(rows):
        view = images[r]
        extent = (0, view.width, view.height, 0)
        axes[r, 0].imshow(view)
        for p in np.flatnonzero(edit.region_BP[b].numpy()):
            y, x = divmod(int(p), w)
            cell_w, cell_h = view.width / w, view.height / h
            axes[r, 0].add_patch(
                Rectangle((x * cell_w, y * cell_h), cell_w, cell_h, fill=False, ec="white", lw=0.8)
            )
        axes[r, 1].imshow(masks_BHW[r], **colours)
        seen.update(np.unique(masks_BHW[r]).tolist())
        for c, condition in enumerate(conditions):
            pred_hw = edit.comparison.outputs[condition][b].argmax(0).numpy()
            axes[r, c + 2].imshow(pred_hw, extent=extent, **colours)
            seen.update(np.unique(pred_hw).tolist())
        for c, title in enumerate(["edited patches", "ground truth", *conditions]):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    handles = [
        Rectangle((0, 0), 1, 1, color=cmap(i), label=class_names[i])
        for i in sorted(seen)
        if i < len(class_names)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7,
               frameon=False, bbox_to_anchor=(0.5, -0.02 - 0.02 * (len(handles) > 6)))  # fmt: skip
    fig.suptitle(
        f"suppressing feature {edit.feature} on the {class_names[edit.part]} patches", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_class_probabilities(
    comparison: Comparison,
    index: int,
    class_names: Sequence[str],
    *,
    top: int = 5,
    min_probability: float = 0.01,
    image: Image.Image | None = None,
) -> Figure:
    """For one image of a classification `Comparison` (logit outputs): the probabilities of the
    classes that rank in the top ``top`` under any condition with at least ``min_probability``,
    one bar per condition; the image (as the model saw it) on the left when given."""
    probs = {c: out[index].float().softmax(-1) for c, out in comparison.outputs.items()}
    classes = {
        int(i) for p in probs.values() for i in p.topk(top).indices if p[i] >= min_probability
    }
    classes = sorted(classes, key=lambda i: (-float(probs["original"][i]), i))
    table = pd.DataFrame(
        [
            {"class": class_names[i], "condition": c, "probability": float(p[i])}
            for c, p in probs.items()
            for i in classes
        ]
    )
    height = max(2.2, 0.16 * len(classes) * len(probs) + 0.8)
    if image is None:
        fig, ax = plt.subplots(figsize=(5.5, height))
    else:
        fig, (ax_image, ax) = plt.subplots(
            1, 2, figsize=(7.5, height), gridspec_kw={"width_ratios": [1, 2.2]}
        )
        ax_image.imshow(image)
        ax_image.set_axis_off()
    sns.barplot(table, y="class", x="probability", hue="condition", ax=ax, orient="h")
    ax.set_xlim(0, 1)
    ax.set_ylabel("")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return fig


def plot_suppression_curves(curves: pd.DataFrame, metric: str = "p(group)") -> Figure:
    """Dose-response: ``metric`` against the number of suppressed features, one panel per
    group (column ``group``), one line per condition."""
    grid = sns.relplot(
        curves, x="n_features", y=metric, hue="condition", col="group", kind="line",
        marker="o", height=2.4, aspect=0.9, col_wrap=min(5, curves["group"].nunique()),
    )  # fmt: skip
    grid.set(ylim=(0, 1.02), xticks=sorted(curves["n_features"].unique()))
    grid.set_axis_labels("features suppressed", metric)
    grid.set_titles("{col_name}")
    return grid.figure
