"""The toy world's introductory figures: the discriminant view and the per-group picks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from saekit.mini.toyworld import GROUP_OF_CLASS, N_CLASSES, ToyWorld  # noqa: E402
from saekit.mini.toyworld.figures import (  # noqa: E402
    _discriminant_view,
    classes_per_group,
    group_separation,
    sample_grid,
)


def test_classes_per_group_picks_each_group_in_order():
    picks = classes_per_group(2)
    groups = [GROUP_OF_CLASS[c] for c in picks]
    assert groups == sorted(groups) and all(groups.count(g) == 2 for g in set(groups))
    assert len(set(groups)) == len(set(GROUP_OF_CLASS))


def test_discriminant_view_finds_the_planted_direction_under_louder_noise():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.array(["a", "b", "c"]), 100)
    acts = rng.normal(size=(300, 10)) * np.r_[10.0, 10.0, np.ones(8)]  # loud nuisance dims
    acts[:, 5] += np.select([groups == "a", groups == "b"], [-3.0, 3.0], 0.0)
    acts[:, 6] += np.where(groups == "c", 3.0, 0.0)
    view = _discriminant_view(acts, groups)
    centroids = np.stack([view[groups == g].mean(0) for g in "abc"])
    spread = np.mean([view[groups == g].std(0).mean() for g in "abc"])
    gaps = [np.linalg.norm(centroids[i] - centroids[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 3 * spread  # a PCA view would be dominated by the loud dims instead


def test_figures_have_one_panel_per_layer_and_column_per_view():
    rng = np.random.default_rng(0)
    labels = np.arange(60) % N_CLASSES
    figure = group_separation({0: rng.normal(size=(60, 8)), 3: rng.normal(size=(60, 8))}, labels)
    assert [ax.get_title() for ax in figure.axes] == ["layer 0", "layer 3"]
    grid = sample_grid(ToyWorld(0), [0, 5])
    assert len(grid.axes) == 2 * 6 and grid.axes[1].get_title() == "mask"
