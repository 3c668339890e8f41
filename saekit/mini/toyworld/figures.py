"""Figures that introduce the toy world: samples per group and shift, and how layers separate it."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from saekit.mini.toyworld.shifts import SHIFTS
from saekit.mini.toyworld.taxonomy import GROUPS, LEAVES, N_CLASSES
from saekit.mini.toyworld.world import ToyWorld


def sample_grid(world: ToyWorld, classes: list[int], show_masks: bool = True) -> Figure:
    """One row per class: the in-domain image, its part mask, then the image under each shift."""
    columns = ["in-domain", *(["mask"] if show_masks else []), *SHIFTS]
    figure, axes = plt.subplots(
        len(classes), len(columns), figsize=(1.3 * len(columns), 1.35 * len(classes)), squeeze=False
    )
    for row, label in enumerate(classes):
        clean = world.render(label, split="val")
        views = [np.asarray(clean.image)]
        if show_masks:
            views.append(clean.mask)
        views += [np.asarray(world.render(label, split="val", shift=s).image) for s in SHIFTS]
        for col, view in enumerate(views):
            axis = axes[row, col]
            axis.imshow(view, cmap="tab10" if view.ndim == 2 else None, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[col], fontsize=9)
        leaf = LEAVES[label]
        axes[row, 0].set_ylabel(f"{leaf.name}\n({GROUPS[leaf.group].name})", fontsize=7)
    figure.tight_layout()
    return figure


def group_separation(cls_by_layer: dict[int, np.ndarray], labels: np.ndarray) -> Figure:
    """Each layer's CLS activations, coloured by planted group, on the two directions that best
    spread the group means (the top principal components of the five centroids, after whitening
    by the within-group spread, i.e. a two-component linear discriminant view).

    The planted top level (shape family) should separate more cleanly in later layers.
    """
    layers = sorted(cls_by_layer)
    figure, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers), 2.6), squeeze=False)
    group_names = [GROUPS[LEAVES[int(c)].group].name for c in labels]
    for axis, layer in zip(axes[0], layers, strict=True):
        projected_N2 = _discriminant_view(cls_by_layer[layer], np.asarray(group_names))
        sns.scatterplot(
            x=projected_N2[:, 0],
            y=projected_N2[:, 1],
            hue=group_names,
            s=8,
            ax=axis,
            legend=layer == layers[-1],
            palette="deep",
            linewidth=0,
        )
        axis.set_title(f"layer {layer}", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    if axes[0, -1].get_legend() is not None:
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1), fontsize=7, title="group")
    figure.tight_layout()
    return figure


def _discriminant_view(acts_ND: np.ndarray, groups_N: np.ndarray) -> np.ndarray:
    acts_ND = acts_ND - acts_ND.mean(0)
    names = np.unique(groups_N)
    centroids_GD = np.stack([acts_ND[groups_N == g].mean(0) for g in names])
    within_ND = acts_ND - centroids_GD[np.searchsorted(names, groups_N)]
    # Whiten by the within-group covariance (ridge-regularised), then PCA on the centroids.
    cov_DD = within_ND.T @ within_ND / len(acts_ND)
    cov_DD += 1e-3 * np.trace(cov_DD) / len(cov_DD) * np.eye(len(cov_DD))
    evals, evecs = np.linalg.eigh(cov_DD)
    whiten_DD = evecs / np.sqrt(evals)
    _, _, axes_2D = np.linalg.svd(centroids_GD @ whiten_DD, full_matrices=False)
    return acts_ND @ whiten_DD @ axes_2D[:2].T


def classes_per_group(n_per_group: int = 1) -> list[int]:
    """The first `n_per_group` classes of every planted group, for sample figures."""
    picked: dict[int, list[int]] = {}
    for label in range(N_CLASSES):
        picked.setdefault(LEAVES[label].group, [])
        if len(picked[LEAVES[label].group]) < n_per_group:
            picked[LEAVES[label].group].append(label)
    return [label for group in sorted(picked) for label in picked[group]]
