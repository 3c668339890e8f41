"""The ontology chapter's study steps: per-layer SAEs, hierarchy counts, the most hierarchical
features with their top images, and the planted ground truth (paper 000 Fig. 2, paper 003 Fig. 3
and Table 2).

`saekit.analysis.ontology` scores class sets (LCH, height, coverage, baselines, Table 2); this module
strings those scores into the study a chapter tells, in reading order:

1. `layer_saes`: one ReLU SAE per layer's CLS token (recipe ``olson2025``, λ given), trained in
   one sweep and cached on disk, so the layer-sweep chapter's SAE specs are reused as they are.
2. `hierarchy_by_layer` and `table2_by_layer`: how many features per layer are multi-class with
   high coverage, for the SAE and for the baselines.
3. `most_hierarchical`, `top_images` and `plot_top_images`: the multi-class, coverage-1 features
   with the largest class sets, their automatic labels and the images they fire on most.
4. `synset_recovery` and `plot_synset_recovery`: for chosen synsets (the toy world's planted
   groups and mids, or a few ImageNet synsets in the paper profile), whether some feature of a
   layer covers exactly their leaves. A feature "covers synset h fully" when its class set C_k
   equals L(h): then coverage(C_k) = 1 and LCH(C_k) has the leaves of h. The LCH may be another
   synset with the same leaves (with the toy world's 30 classes, the 6 dogs' LCH is *hunting
   dog*, which sits below *dog* and holds the same leaves), so the match is on leaves, not wnids.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.activations import Store
from saekit.analysis.ontology import TABLE2_ROWS, plot_height_vs_coverage, table2
from saekit.sae import SAESpec, get_recipe
from saekit.studies import layer_sweep
from saekit.taxonomy import Taxonomy

#: A few ImageNet synsets paper 000 names among layer 36's coverage-1 features, plus two broad
#: ones; the paper profile's stand-in for the toy world's planted groups (wnid -> level).
PAPER_SYNSETS = {
    "n01482071": "paper 000",  # elasmobranch
    "n02062744": "paper 000",  # whale
    "n04598582": "paper 000",  # woodwind
    "n04552696": "paper 000",  # warship
    "n02084071": "broad",  # dog
    "n01503061": "broad",  # bird
}


# --------------------------------------------------------------------------- SAEs


def layer_specs(layers: Sequence[int], lam: float, seed: int = 0) -> list[SAESpec]:
    """The layer sweep's SAEs (`saekit.studies.layer_sweep.layer_specs`): ReLU, recipe
    olson2025 with its expansion (8), sparsity λ = ``lam``."""
    return layer_sweep.layer_specs(
        layers, lam, expansion=get_recipe("olson2025").expansion, seed=seed
    )


def layer_saes(
    store: Store,
    root: str | Path,
    *,
    lam: float = 10.0,
    epochs: int | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[int, SAE]:
    """One SAE per layer of ``store`` (CLS tokens), {layer: SAE}: the layer-sweep chapter's
    SAEs (`saekit.studies.layer_sweep.train_layer_saes` at the recipe's expansion, 8), loaded
    from the SAE cache under ``root`` where an equal request was trained (by this chapter, the
    layer sweep or the relevancy chapter), the rest trained together in one pass.
    ``epochs`` defaults to the recipe's (3)."""
    return layer_sweep.train_layer_saes(
        store,
        root,
        lam=lam,
        epochs=epochs,
        expansion=get_recipe("olson2025").expansion,
        layers=layers,
        seed=seed,
        device=device,
        progress=progress,
    )


# --------------------------------------------------------------------------- counts


def hierarchy_by_layer(
    table: pd.DataFrame, n_classes: int, thresholds: Sequence[float] = (0.99, 0.75)
) -> pd.DataFrame:
    """Per layer of a `saekit.analysis.ontology.feature_table`: features that fire on no class, on one,
    on several and on all ``n_classes`` (coverage 1 at the root, but no concept: counted apart);
    how many multi-class ones have coverage above each threshold (those on every class
    included, as in Table 2); and the mean LCH height of the multi-class ones. One row per
    layer, in the table's layer order."""
    n_no_class = table.attrs.get("n_no_class", {})
    layers = list(dict.fromkeys(list(n_no_class) + list(pd.unique(table["layer"]))))
    rows = {}
    for layer in layers:
        part = table[table["layer"] == layer]
        multi = part[part["n_classes"] >= 2]
        row = {
            "no class": int(n_no_class.get(layer, 0)),
            "1 class": int((part["n_classes"] == 1).sum()),
            "multi-class": len(multi),
            "every class": int((part["n_classes"] == n_classes).sum()),
        }
        for t in thresholds:
            row[f"multi, coverage > {t:g}"] = int((multi["coverage"] > t).sum())
        row["mean height (multi)"] = float(multi["height"].mean()) if len(multi) else np.nan
        rows[layer] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("layer")


def table2_by_layer(
    class_sets: Mapping[str, Mapping[int, np.ndarray]],
    taxonomy: Taxonomy,
    *,
    threshold: float = 0.99,
    min_classes: int = 2,
) -> pd.DataFrame:
    """Table 2's high-coverage count, one column per row of ``class_sets`` (SAE features and the
    baselines, as `saekit.analysis.ontology.class_sets_with_baselines` returns them), one row per layer."""
    rows = list(class_sets)
    layers = list(next(iter(class_sets.values())))
    column = f"> {threshold:g}"
    counts = {
        layer: table2(
            {row: class_sets[row][layer] for row in rows},
            taxonomy,
            thresholds=(threshold,),
            min_classes=min_classes,
        )[column]
        for layer in layers
    }
    return pd.DataFrame(counts).T.rename_axis("layer")[rows]


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


# --------------------------------------------------------------------------- hierarchical features


def most_hierarchical(
    table: pd.DataFrame,
    n: int = 6,
    *,
    min_coverage: float = 0.99,
    min_classes: int = 2,
    max_classes: int | None = None,
    one_per_lch: bool = True,
) -> pd.DataFrame:
    """The ``n`` features of a `feature_table` with ``min_classes`` to ``max_classes`` classes
    and coverage ≥ ``min_coverage``, most classes first (ties: greater LCH height, later layer,
    lower index). Pass ``max_classes`` = number of classes - 1 to leave out features that fire
    on every class: their coverage is trivially 1. With ``one_per_lch`` a synset appears once,
    by its best feature, so that one concept learnt at every late layer does not fill the list."""
    n_classes = table["n_classes"]
    many = n_classes >= min_classes
    if max_classes is not None:
        many &= n_classes <= max_classes
    keep = table[many & (table["coverage"] >= min_coverage)]
    keep = keep.assign(_layer=pd.to_numeric(keep["layer"], errors="coerce"))
    keep = keep.sort_values(
        ["n_classes", "height", "_layer", "feature"],
        ascending=[False, False, False, True],
        kind="stable",
    )
    if one_per_lch:
        keep = keep.drop_duplicates("lch", keep="first")
    return keep.drop(columns="_layer").head(n).reset_index(drop=True)


@dataclass
class TopImages:
    """The images of a store that some features fire on most (CLS token), best first."""

    layer: int
    """Store layer the SAE reads."""
    features: list[int]
    """SAE feature indices, one per row of the arrays."""
    rows_FK: np.ndarray
    """Store rows of the top images, [features, k], highest activation first."""
    values_FK: np.ndarray
    """The features' activations on those rows (0 where a feature fires on fewer than k)."""


@torch.no_grad()
def top_images(
    store: Any,
    sae: Any,
    layer: int,
    features: Sequence[int],
    k: int = 6,
    *,
    batch_size: int = 4096,
    progress: bool = True,
) -> TopImages:
    """Top-``k`` store rows per feature by the SAE's code on the CLS token, in one streaming
    pass (chunks of ``store.cls(layer)``, a running [k, F] top list), so any store size works.
    Equal activations keep the earlier row. (`saekit.analysis.exemplars.scan_store` ranks patch tokens for
    every feature; here only a handful of features and the CLS token are needed.)"""
    features = [int(f) for f in features]
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise IndexError(f"features {bad} are out of range for an SAE of width {d_sae}")
    acts_ND = store.cls(layer)
    n_rows = len(acts_ND)
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    index = torch.tensor(features, dtype=torch.long)
    best_KF = torch.full((0, len(features)), -torch.inf)
    rows_KF = torch.zeros((0, len(features)), dtype=torch.long)
    for start in tqdm(
        range(0, n_rows, batch_size), desc=f"layer {layer} top images", disable=not progress
    ):
        chunk_BD = torch.from_numpy(np.asarray(acts_ND[start : start + batch_size], np.float32))
        codes_BF = sae.encode(chunk_BD.to(device, dtype))[:, index.to(device)].float().cpu()
        rows_B = torch.arange(start, start + len(chunk_BD))
        values = torch.cat([best_KF, codes_BF])
        rows = torch.cat([rows_KF, rows_B[:, None].expand(-1, len(features))])
        # A stable sort keeps earlier rows ahead of later ones with the same activation.
        order = torch.sort(values, dim=0, descending=True, stable=True).indices[:k]
        best_KF, rows_KF = values.gather(0, order), rows.gather(0, order)
    return TopImages(layer, features, rows_KF.T.numpy(), best_KF.T.clamp(min=0).numpy())


def _check_dataset(store: Any, dataset: Any) -> None:
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
    store: Any,
    dataset: Any,
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


# --------------------------------------------------------------------------- planted synsets


def toyworld_synsets() -> dict[str, str]:
    """The toy world's planted synsets, wnid -> level ('group' or 'mid'), each group followed
    by its mids (the order the heat map lists them in)."""
    from saekit.mini.toyworld.taxonomy import TREE

    out: dict[str, str] = {}
    for group, mids in TREE:
        out[group.wnid] = "group"
        for mid, _ in mids:
            out[mid.wnid] = "mid"
    return out


def synset_recovery(
    class_sets: Mapping[int, np.ndarray],
    taxonomy: Taxonomy,
    synsets: Mapping[str, str],
) -> pd.DataFrame:
    """For every layer and synset h: how many features have class set C_k = L(h) exactly
    (``n_exact``: coverage 1 and an LCH with the leaves of h), and the best Jaccard overlap
    |C_k ∩ L(h)| / |C_k ∪ L(h)| of any feature (``best_jaccard``, 1 iff ``n_exact`` > 0) with
    the feature that reaches it (``best_feature``). ``class_sets`` is {layer: class_sets_SC} in
    the taxonomy's class order; ``synsets`` maps wnid -> a level name shown with it."""
    missing = [h for h in synsets if h not in taxonomy]
    if missing:
        raise KeyError(
            f"synsets {missing} are not above any class of this taxonomy ({taxonomy!r}); "
            "choose ancestors of the store's classes"
        )
    wnids = list(synsets)
    leaves_HC = taxonomy.leaves_HC[[taxonomy.synset_index[h] for h in wnids]].astype(np.float32)
    records = []
    for layer, sets in class_sets.items():
        sets_SC = np.asarray(sets, dtype=bool)
        if sets_SC.ndim != 2 or sets_SC.shape[1] != len(taxonomy.leaves):
            raise ValueError(
                f"layer {layer}: class sets must be [features, {len(taxonomy.leaves)}], "
                f"got {sets_SC.shape}"
            )
        inter_SH = sets_SC.astype(np.float32) @ leaves_HC.T
        union_SH = sets_SC.sum(1, keepdims=True) + leaves_HC.sum(1)[None, :] - inter_SH
        jaccard_SH = np.divide(inter_SH, union_SH, out=np.zeros_like(inter_SH), where=union_SH > 0)
        for h, wnid in enumerate(wnids):
            # No feature overlapping the synset at all is "no best feature", not feature 0.
            has_overlap = len(sets_SC) and jaccard_SH[:, h].max() > 0
            best = int(np.argmax(jaccard_SH[:, h])) if has_overlap else -1
            records.append(
                {
                    "layer": layer,
                    "synset": wnid,
                    "name": taxonomy.name(wnid),
                    "level": synsets[wnid],
                    "n_leaves": int(leaves_HC[h].sum()),
                    "n_exact": int(np.sum(jaccard_SH[:, h] == 1.0)),
                    "best_jaccard": float(jaccard_SH[best, h]) if best >= 0 else 0.0,
                    "best_feature": best,
                }
            )
    return pd.DataFrame.from_records(records)


def recovery_summary(recovery: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Which layers cover each synset exactly, per kind of feature: ``recovery`` maps a name
    (e.g. Table 2's rows) to a `synset_recovery` table; the result has one row per synset
    ('name (level)', in the tables' order), one column per name, and the layers as text
    ('2, 3, 5'; '' where no feature of any layer does). ``attrs['found']`` counts, per name and
    level, the synsets covered at some layer."""
    first = next(iter(recovery.values()))
    synsets = list(dict.fromkeys(first["synset"]))
    labels = first.drop_duplicates("synset").set_index("synset")
    index = [f"{labels.loc[h, 'name']} ({labels.loc[h, 'level']})" for h in synsets]
    columns, found = {}, {}
    for name, rec in recovery.items():
        hits = rec[rec["n_exact"] > 0]
        layers = hits.groupby("synset", sort=False)["layer"].agg(lambda ls: ", ".join(map(str, ls)))
        columns[name] = [layers.get(h, "") for h in synsets]
        found[name] = hits.drop_duplicates("synset").groupby("level")["synset"].size()
    summary = pd.DataFrame(columns, index=pd.Index(index, name="synset (level)"))
    levels = list(dict.fromkeys(labels["level"]))
    summary.attrs["found"] = (
        pd.DataFrame(found).reindex(levels).fillna(0).astype(int).rename_axis("level")
    )
    return summary


def plot_synset_recovery(recovery: pd.DataFrame) -> Figure:
    """Heat map synset × layer of `synset_recovery`: colour = best Jaccard overlap of any
    feature's class set with the synset's leaves, number = features that cover it exactly."""
    import seaborn as sns

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


def layer_view(table: pd.DataFrame, layer: Any, n: int = 5, max_classes: int | None = None) -> str:
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
