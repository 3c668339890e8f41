"""Figures of chapter 05's interventions: original and edited predictions side by side.

Paper 002 Fig. 7's segmentation edits (`plot_segmentation_edit`), one image's class
probabilities under each condition (`plot_class_probabilities`) and dose-response curves
(`plot_suppression_curves`), for the results of `saekit.studies.relevancy_interventions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from saekit.analysis.interventions import Comparison
from saekit.studies.relevancy_interventions_edits import PartEdit


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
    (`saekit.analysis.exemplar_plots.model_view`, `saekit.masks.model_view_mask`), in the order of ``rows``.
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
