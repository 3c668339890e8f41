"""Chapter 03's figures and views: Table 2 layer by layer, the most hierarchical features' top
images, the planted-synset recovery heat map, and one layer's page for the layer widget."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from saekit.activations import Store
from saekit.analysis.ontology import TABLE2_ROWS, plot_height_vs_coverage
from saekit.data import ImageDataset
from saekit.studies.ontology import TopImages, most_hierarchical


def plot_table2_by_layer(counts: pd.DataFrame, threshold: float = 0.99) -> Figure:
    """Bars per layer of `table2_by_layer`: SAE features against neurons and random vectors."""
    import seaborn as sns

    long = counts.reset_index().melt(id_vars="layer", var_name="features", value_name="count")
    fig = Figure(figsize=(max(5.0, 0.5 * len(counts) + 3), 3.2), layout="constrained")
    ax = fig.subplots()
    order = [row for row in TABLE2_ROWS if row in counts.columns] + [
        row for row in counts.columns if row not in TABLE2_ROWS
    ]
    sns.barplot(long, x="layer", y="count", hue="features", hue_order=order, ax=ax, palette="mako")
    ax.set_ylabel(f"multi-class features\nwith coverage > {threshold:g}")
    ax.set_title("Ontological coverage per layer (Table 2, layer by layer)")
    return fig


def _check_dataset(store: Store, dataset: ImageDataset) -> None:
    ids = dataset.image_ids
    expected = store.manifest.get("n_images")
    if expected is not None and len(ids) != expected:
        raise ValueError(
            f"the dataset has {len(ids)} images but the store was extracted from {expected}; "
            "pass the dataset the store was made from"
        )
    for row in (0, len(store.rows) - 1):
        if ids[store.rows[row]] != store.image_ids[row]:
            raise ValueError(
                f"store row {row} is image {store.image_ids[row]!r} but the dataset has "
                f"{ids[store.rows[row]]!r} there; pass the dataset the store was made from"
            )


def plot_top_images(
    tops: Sequence[TopImages],
    store: Store,
    dataset: ImageDataset,
    titles: Sequence[str],
    *,
    image_size: float = 1.3,
) -> Figure:
    """A grid: one row per feature (all features of ``tops`` in order, titled by ``titles``),
    its top images left to right, each captioned with its class and activation. Images are
    read from ``dataset`` (the one the store was extracted from) via ``store.rows``; cells where
    the feature does not fire stay empty."""
    _check_dataset(store, dataset)
    rows = [(top, i) for top in tops for i in range(len(top.features))]
    if len(titles) != len(rows):
        raise ValueError(f"{len(rows)} features but {len(titles)} titles")
    if not rows:
        fig = Figure(figsize=(6, 0.8))
        fig.text(0.5, 0.5, "no feature to show", ha="center", va="center")
        return fig
    k = max(top.rows_FK.shape[1] for top in tops)
    fig = Figure(figsize=(image_size * k, (image_size + 0.45) * len(rows)), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(rows), 1))
    class_names = store.class_names
    for subfig, (top, i), title in zip(subfigs, rows, titles, strict=True):
        subfig.suptitle(title, fontsize=9, ha="left", x=0.01)
        axes = np.atleast_1d(subfig.subplots(1, k))
        for j, ax in enumerate(axes):
            ax.set_axis_off()
            if j >= top.rows_FK.shape[1] or top.values_FK[i, j] <= 0:
                continue
            row = int(top.rows_FK[i, j])
            ax.imshow(dataset.load(int(store.rows[row])).convert("RGB"))
            name = class_names[int(store.labels[row])]
            name = name if len(name) <= 18 else name[:17] + "…"
            ax.set_title(f"{name}\n{top.values_FK[i, j]:.2g}", fontsize=7)
    return fig


def plot_synset_recovery(recovery: pd.DataFrame) -> Figure:
    """Heat map synset × layer of `synset_recovery`: colour = best Jaccard overlap of any
    feature's class set with the synset's leaves, number = features that cover it exactly."""
    import seaborn as sns

    if recovery.empty:
        fig = Figure(figsize=(6, 0.8))
        fig.text(0.5, 0.5, "no synset of the list is above this data's classes", ha="center")
        return fig
    labels = (
        recovery["name"] + " (" + recovery["level"] + ", " + recovery["n_leaves"].astype(str) + ")"
    )
    frame = recovery.assign(row=labels)
    order = list(dict.fromkeys(frame["row"]))
    jaccard = frame.pivot(index="row", columns="layer", values="best_jaccard").loc[order]
    exact = frame.pivot(index="row", columns="layer", values="n_exact").loc[order]
    n_rows, n_cols = jaccard.shape
    fig = Figure(figsize=(1.6 + 0.6 * n_cols + 2.2, 0.9 + 0.38 * n_rows), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(
        jaccard, vmin=0, vmax=1, cmap="mako_r", annot=exact.to_numpy(), fmt="d", linewidths=0.5,
        cbar_kws={"label": "best Jaccard overlap"}, ax=ax,
    )  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel("")
    ax.set_title("features whose class set is exactly the synset's leaves", fontsize=10)
    return fig


# --------------------------------------------------------------------------- widget view


def layer_view(table: pd.DataFrame, layer: int, n: int = 5, max_classes: int | None = None) -> str:
    """One layer's page for a `saekit.analysis.widgets.switcher`: its height-vs-coverage histogram and
    its ``n`` most hierarchical features (`most_hierarchical`, one per LCH, with the number of
    the layer's features that share it), as one HTML string (an inline PNG and a table), so the
    static site shows it without a kernel."""
    from saekit.analysis.widgets import figure_png

    png = figure_png(plot_height_vs_coverage(table, [layer], ncols=1))
    part = table[table["layer"] == layer]
    every = most_hierarchical(part, len(part), max_classes=max_classes, one_per_lch=False)
    top = most_hierarchical(part, n, max_classes=max_classes)
    shown = top[["feature", "n_classes", "lch_name", "height", "coverage"]].assign(
        features_with_this_lch=top["lch"].map(every["lch"].value_counts())
    )
    listing = (
        shown.to_html(index=False, float_format="{:.2f}".format, border=0)
        if len(shown)
        else "<p>no multi-class feature with coverage ≥ 0.99 at this layer</p>"
    )
    image = base64.b64encode(png).decode()
    return (
        "<div style='display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap'>"
        f"<img style='max-width:420px' src='data:image/png;base64,{image}'/>"
        f"<div><b>most hierarchical features of layer {layer}</b>{listing}</div></div>"
    )
