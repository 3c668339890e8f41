"""Chapter 03, the ontology study: per-layer SAEs, hierarchy counts, the most hierarchical
features with their top images, and the planted ground truth (paper 000 Fig. 2, paper 003 Fig. 3
and Table 2).

`saekit.analysis.ontology` scores class sets (LCH, height, coverage, baselines, Table 2); this module
strings those scores into the study a chapter tells, in reading order (figures and views are in
`saekit.studies.ontology_figures`):

1. `OntologySettings`: the chapter's parameters with their profile defaults.
2. `layer_saes`: one ReLU SAE per layer's CLS token (recipe ``olson2025``, λ given), the layer
   sweep's request (`saekit.studies.layer_sweep.train_layer_saes`), so the book trains them once;
   `lambda_comparison` sets the chosen λ beside others, measured.
3. `hierarchy_by_layer` and `table2_by_layer`: how many features per layer are superordinate
   (several classes, not all) with high coverage, for the SAE and for the baselines.
4. `most_hierarchical` and `top_images`: the multi-class, coverage-1 features with the largest
   class sets, their automatic labels and the images they fire on most.
5. `chapter_synsets`, `synset_recovery` and `recovery_summary`: for chosen synsets (the toy
   world's planted groups and mids, or a few ImageNet synsets in the paper profile, those absent
   from the data skipped with a note), whether some feature of a layer covers exactly their
   leaves. A feature "covers synset h fully" when its class set C_k equals L(h): then
   coverage(C_k) = 1 and LCH(C_k) has the leaves of h. The LCH may be another synset with the
   same leaves (with the toy world's 30 classes, the 6 dogs' LCH is *hunting dog*, which sits
   below *dog* and holds the same leaves), so the match is on leaves, not wnids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from saekit.activations import Store
from saekit.analysis.ontology import ClassSetRule, class_sets_from_store, table2
from saekit.plan import SAENeed, StoreNeed
from saekit.sae import SAESpec, evaluate, get_recipe
from saekit.sae.codes import iter_codes, merge_top_k
from saekit.studies import layer_sweep
from saekit.studies.settings import StudySettings
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
#: Their names, for the note that lists those absent from the data at hand.
PAPER_SYNSET_NAMES = {
    "n01482071": "elasmobranch",
    "n02062744": "whale",
    "n04598582": "woodwind",
    "n04552696": "warship",
    "n02084071": "dog",
    "n01503061": "bird",
}


@dataclass(frozen=True)
class OntologySettings(StudySettings):
    """Chapter 03's parameters (mini defaults; `PAPER` holds the paper profile's). The SAE
    request (encoder, λ, epochs, seed; ReLU, olson2025, expansion 8, every layer's CLS token of
    the training store) is the one chapters 01 and 05 make by default, so the book trains them
    once."""

    encoder: str = "toyvit"
    """Encoder family: "toyvit" (mini) or "dinov2" (paper: facebook/dinov2-giant)."""
    lam: float = 3.0
    """λ of the ReLU SAEs (recipe olson2025; paper 10)."""
    epochs: int = 100
    """Passes over the training store (the mini store has 1,800 images; paper 3)."""
    seed: int = 0
    """Seeds the SAEs' initialisation and the batch order."""
    min_fire_frac: float = 0.5
    """A class joins C_k when the feature fires on at least this share of its images."""
    figure_layers: tuple[int, ...] | None = None
    """Layers of the static histogram figure; None: every layer (paper: 24, 28, 32, 36)."""
    n_features: int = 6
    """Most hierarchical features shown with their top images."""
    n_images: int = 6
    """Top images per feature."""
    compare_lambdas: tuple[float, ...] = (0.3, 10.0)
    """Other λ whose SAEs the page compares with ``lam`` (cached like any layer SAE); empty:
    none (paper)."""
    device: str | None = None
    """Where the SAEs train; None: "cuda" when available, else "cpu"."""
    imagenet_train: str | None = None
    """Paper profile: ImageNet-1k train folder (one sub-folder per wnid)."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k validation folder, same layout."""

    PAPER: ClassVar[dict[str, Any]] = {
        "encoder": "dinov2",
        "lam": 10.0,
        "epochs": 3,
        "figure_layers": (24, 28, 32, 36),
        "compare_lambdas": (),
    }

    def layers_to_draw(self, layers: Sequence[int]) -> list[int]:
        """``figure_layers``, or every layer of ``layers`` where it is None."""
        return list(layers if self.figure_layers is None else self.figure_layers)


# --------------------------------------------------------------------------- SAEs



def resource_needs(settings: OntologySettings) -> dict[str, list]:
    """What the chapter stores and trains, for `saekit.book.Chapter.plan`: every layer's CLS
    store of both splits, one SAE per layer (the layer sweep's) at λ and each compared λ."""
    train = StoreNeed(settings.encoder, "train")
    saes = [
        SAENeed(SAESpec(arch="relu", l1=float(lam), expansion=8, recipe="olson2025",
                        seed=settings.seed),
                on=train, epochs=settings.epochs, per_layer=True)  # fmt: skip
        for lam in dict.fromkeys((settings.lam, *settings.compare_lambdas))
    ]
    return {"stores": [train, StoreNeed(settings.encoder, "val")], "saes": saes}

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
    how many superordinate ones (several classes, not all) have coverage above each threshold
    (Table 2's first reading); and the mean LCH height of the multi-class ones. One row per
    layer, in the table's layer order."""
    n_no_class = table.attrs.get("n_no_class", {})
    layers = list(dict.fromkeys(list(n_no_class) + list(pd.unique(table["layer"]))))
    rows = {}
    for layer in layers:
        part = table[table["layer"] == layer]
        multi = part[part["n_classes"] >= 2]
        superordinate = multi[multi["n_classes"] < n_classes]
        row = {
            "no class": int(n_no_class.get(layer, 0)),
            "1 class": int((part["n_classes"] == 1).sum()),
            "multi-class": len(multi),
            "every class": int((part["n_classes"] == n_classes).sum()),
        }
        for t in thresholds:
            row[f"multi, coverage > {t:g}"] = int((superordinate["coverage"] > t).sum())
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


def lambda_comparison(
    train: Store,
    val: Store,
    saes: Mapping[int, SAE],
    settings: OntologySettings,
    root: str | Path,
    taxonomy: Taxonomy,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """The chapter's SAEs (``saes``, at ``settings.lam``) beside the same SAEs at every λ of
    ``settings.compare_lambdas`` (from the SAE cache, where chapter 01's λ comparison put them),
    one row per λ over all layers: the mean share of latents active per image, the mean number of
    classes a feature that fires on some class fires on, and Table 2's superordinate count (more
    than one class, not all, coverage > 0.99) by the chapter's class-set rule."""
    by_lam = {settings.lam: dict(saes)}
    for lam in settings.compare_lambdas:
        if not np.isclose(lam, settings.lam):
            by_lam[lam] = layer_saes(
                train, root, lam=lam, epochs=settings.epochs, seed=settings.seed,
                device=settings.device, progress=progress,
            )  # fmt: skip
    rule = ClassSetRule(min_fire_frac=settings.min_fire_frac)
    rows = {}
    for lam, layer_sae in sorted(by_lam.items()):
        shares, sets = [], {}
        for layer, sae in layer_sae.items():
            shares.append(evaluate(sae, val.cls(layer)).l0 / sae.cfg.d_sae)
            sets[layer] = class_sets_from_store(val, sae, layer, rule, progress=False)
        n_classes_F = np.concatenate([block.sum(1) for block in sets.values()])
        fired = n_classes_F[n_classes_F > 0]
        rows[lam] = {
            "active latents per image": float(np.mean(shares)),
            "classes per feature": float(fired.mean()) if len(fired) else 0.0,
            "superordinate, coverage > 0.99": int(
                table2({"SAE": sets}, taxonomy, thresholds=(0.99,)).loc["SAE", "> 0.99"]
            ),
        }
    comparison = pd.DataFrame.from_dict(rows, orient="index").rename_axis("λ")
    comparison.attrs["d_sae"] = int(next(iter(saes.values())).cfg.d_sae)
    return comparison


def lambda_text(comparison: pd.DataFrame, lam: float) -> str:
    """One line per λ of `lambda_comparison`, the chosen one in bold."""
    d_sae = comparison.attrs["d_sae"]
    lines = []
    for value, row in comparison.iterrows():
        mark = "**" if np.isclose(value, lam) else ""
        lines.append(
            f"- {mark}λ = {value:g}{mark}: {row['active latents per image']:.0%} of the {d_sae} "
            f"latents active per image on average; a feature fires on "
            f"{row['classes per feature']:.1f} classes on average; "
            f"{int(row['superordinate, coverage > 0.99'])} superordinate features with coverage "
            "> 0.99 over all layers"
        )
    return "\n".join(lines)


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


def top_images(
    store: Store,
    sae: SAE,
    layer: int,
    features: Sequence[int],
    k: int = 6,
    *,
    batch_size: int = 4096,
    progress: bool = True,
) -> TopImages:
    """Top-``k`` store rows per feature by the SAE's code on the CLS token, in one streaming
    pass (`saekit.sae.codes.iter_codes` chunks folded into a running top-k with `merge_top_k`),
    so any store size works. Equal activations keep the earlier row. (`saekit.analysis.exemplars.scan_store` ranks patch tokens for
    every feature; here only a handful of features and the CLS token are needed.)"""
    features = [int(f) for f in features]
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise IndexError(f"features {bad} are out of range for an SAE of width {d_sae}")
    index = torch.tensor(features, dtype=torch.long)
    values_FK = torch.empty(len(features), 0)
    rows_FK = torch.empty(len(features), 0, dtype=torch.long)
    codes = iter_codes(
        sae, store.cls(layer), batch_size, progress=progress, desc=f"layer {layer} top images"
    )
    for start, codes_BS in codes:
        scores_FB = codes_BS[:, index.to(codes_BS.device)].T.cpu()
        rows_B = torch.arange(start, start + len(codes_BS))
        values_FK, rows_FK = merge_top_k(values_FK, rows_FK, scores_FB, rows_B, k)
    return TopImages(layer, features, rows_FK.numpy(), values_FK.clamp(min=0).numpy())


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


def chapter_synsets(profile: str, taxonomy: Taxonomy) -> dict[str, str]:
    """The synsets the recovery heat map lists: the toy world's planted groups and mids (mini)
    or `PAPER_SYNSETS` (paper), keeping those above at least one class of ``taxonomy`` (the data
    at hand); the others are skipped with a printed note, since a folder with some of ImageNet's
    classes has no leaves under, say, *whale*."""
    wanted = toyworld_synsets() if profile == "mini" else PAPER_SYNSETS
    present = {wnid: level for wnid, level in wanted.items() if wnid in taxonomy}
    absent = [wnid for wnid in wanted if wnid not in present]
    if absent:
        names = ", ".join(f"{PAPER_SYNSET_NAMES.get(w, w)} ({w})" for w in absent)
        print(
            f"Skipped {len(absent)} of {len(wanted)} synsets that are above none of this data's "
            f"{len(taxonomy.leaves)} classes: {names}."
        )
    return present


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
    columns = ["layer", "synset", "name", "level", "n_leaves", "n_exact", "best_jaccard"]
    return pd.DataFrame.from_records(records, columns=[*columns, "best_feature"])


def recovery_summary(recovery: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Which layers cover each synset exactly, per kind of feature: ``recovery`` maps a name
    (e.g. Table 2's rows) to a `synset_recovery` table; the result has one row per synset
    ('name (level)', in the tables' order), one column per name, and the layers as text
    ('2, 3, 5'; '' where no feature of any layer does). ``attrs['found']`` counts, per name and
    level, the synsets covered at some layer."""
    first = next(iter(recovery.values()))
    if first.empty:
        summary = pd.DataFrame(columns=list(recovery), index=pd.Index([], name="synset (level)"))
        summary.attrs["found"] = pd.DataFrame(columns=list(recovery)).rename_axis("level")
        return summary
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


def recovery_text(recovery: Mapping[str, pd.DataFrame], synsets: Mapping[str, str]) -> str:
    """The recovery in two sentences: per level, how many of the listed synsets SAE features
    cover exactly at some layer, and per kind of feature how many features cover one."""
    if not synsets:
        return "No listed synset is above this data's classes: nothing to recover."
    found = recovery_summary(recovery).attrs["found"]
    sae = found["SAE features"] if "SAE features" in found else pd.Series(dtype=int)
    of = pd.Series(list(synsets.values())).value_counts()
    levels = "; ".join(
        f"{int(sae.get(level, 0))} of {of[level]} {level} synsets"
        for level in dict.fromkeys(synsets.values())
    )
    exact = ", ".join(f"{row} {int(rec['n_exact'].sum())}" for row, rec in recovery.items())
    return (
        f"At some layer, SAE features cover exactly {levels}.\n"
        f"Features that cover one of these synsets exactly, summed over layers: {exact}."
    )
