"""Chapter 05, relevancy maps and causal interventions (papers 000 §3.3 and 002 §3.3).

The generic methods live in `saekit.analysis.relevancy` (Chefer-style relevancy of an SAE
feature) and `saekit.analysis.interventions` (the six-step edit with the error term and its
controls). This module holds what the chapter builds on them: its settings and resource
plan, the groups it studies, relevancy on the object, which features to edit (`tie_scores` for
the patches of a segmentation class, `class_contrast` for a synset's classes) and the summary.
The edits (segmentation data, effect tables next to their controls) are
`saekit.studies.relevancy_interventions_edits`, the figures
`saekit.studies.relevancy_interventions_figures`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from saekit.activations import Store
from saekit.analysis.ontology import ClassStats
from saekit.analysis.relevancy import RelevancyMaps, relevancy_share
from saekit.masks import patch_coverage
from saekit.mini.toyworld import GROUPS
from saekit.plan import SAENeed, StoreNeed
from saekit.sae import SAESpec
from saekit.sae.codes import iter_codes
from saekit.studies.ontology import layer_specs
from saekit.studies.settings import StudySettings
from saekit.taxonomy import Taxonomy


@dataclasses.dataclass(frozen=True)
class RelevancySettings(StudySettings):
    """Chapter 05's parameters; field defaults are the mini profile's, ``PAPER`` the paper's.

    The relevancy SAE is chapter 03's: ``lam``, ``cls_epochs`` and ``seed`` default to chapter
    03's ``lam``, ``epochs`` and ``seed`` (mini 3, 100, 0; paper 10, 3, 0) and the SAE is asked
    of the same store (every layer's CLS token of the training split), so the SAE cache hands
    back the SAE chapter 03 trained.
    """

    seed: int = 0
    """Seeds the SAEs, the batch order, the heads and the controls."""
    synsets: tuple[str, ...] = tuple(group.wnid for group in GROUPS)
    """WordNet ids of the groups studied: the toy world's 5 groups (dog, bird, fish, vehicle,
    musical instrument; ordinary ImageNet synsets)."""
    relevancy_layer: int = 4
    """Layer of the relevancy CLS SAE (paper 000 Fig. 3: 36 of DINOv2-g's 40)."""
    lam: float = 3.0
    """λ of the CLS SAE (recipe olson2025), as chapter 03's."""
    cls_epochs: int = 100
    """Passes over the store for the CLS SAE, as chapter 03's epochs."""
    n_images: int = 6
    """Top images per feature in the relevancy figure (twice as many in the widget)."""
    patch_layer: int = 1
    """Layer of the edited patch SAE (paper 002: the second-to-last, 38 of DINOv2-g's 40)."""
    patch_arch: str = "topk"
    """Patch SAE architecture (paper 002: relu)."""
    patch_k: int = 8
    """Active latents per patch of a topk patch SAE."""
    patch_expansion: int = 4
    """Patch SAE width over model width (paper 002: 32)."""
    patch_epochs: int = 10
    """Passes over the patch store."""
    patch_batch: int = 512
    """Patch SAE minibatch (paper: the recipe's 16384)."""
    edit_images: int = 120
    """At most this many validation images of each group are edited."""
    n_suppress: int = 5
    """The dose-response curve suppresses up to this many of a group's features."""
    head_epochs: int = 20
    """Epochs of the linear segmentation head."""
    head_weight_decay: float = 1.0
    """AdamW weight decay of the segmentation head."""
    weak_weight_decay: float = 0.001
    """The weakly regularised head it is compared with."""
    min_region_patches: int = 50
    """Parts covering fewer validation patches are left out of the table."""
    segmentation_train: str | None = None
    """Paper profile: image folder with masks in a sibling <folder>_masks."""
    segmentation_val: str | None = None
    """Paper profile: the same layout, for evaluation."""
    segmentation_classes: int = 150
    """Paper profile: number of mask classes (ADE20K 150)."""
    imagenet_train: str | None = None
    """Paper profile: ImageNet-1k train folder (one sub-folder per wnid)."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k validation folder, same layout."""
    device: str | None = None
    """Where the encoder and the SAEs run; None: cuda when available, else cpu. The linear
    heads are small and train on the CPU."""

    PAPER: ClassVar[dict[str, Any]] = {
        "relevancy_layer": 36,
        "lam": 10.0,
        "cls_epochs": 3,
        "patch_layer": 38,
        "patch_arch": "relu",
        "patch_expansion": 32,
        "patch_epochs": 1,
        "patch_batch": 16384,
    }
    FAMILY: ClassVar[dict[str, str]] = {"mini": "toyvit", "paper": "dinov2"}
    """The encoder of each profile: the toy-world ViT, or DINOv2 ViT-g/14."""

    @property
    def family(self) -> str:
        """The encoder this profile studies."""
        return self.FAMILY[self.profile]

    @property
    def patch_spec(self) -> SAESpec:
        """The edited patch SAE (recipe stevens2025; ``patch_k`` only for a top-k SAE)."""
        return SAESpec(
            arch=self.patch_arch, layer=self.patch_layer, expansion=self.patch_expansion,
            recipe="stevens2025", seed=self.seed,
            k=self.patch_k if self.patch_arch in ("topk", "batchtopk") else None,
        )  # fmt: skip


def resource_needs(settings: RelevancySettings) -> dict[str, list]:
    """What the chapter will store and train, as `saekit.book.Chapter.plan`'s ``stores``,
    ``saes`` and ``notes``: every layer's CLS token (train and validation) and the edited
    layer's patch tokens; the relevancy CLS SAE (chapter 03's, cached when that chapter ran)
    and the patch SAE."""
    cls_train = StoreNeed(settings.family, "train", "all", "cls")
    patch_train = StoreNeed(settings.family, "train", (settings.patch_layer,), "patch")
    stores = [cls_train, dataclasses.replace(cls_train, split="val"), patch_train,
              dataclasses.replace(patch_train, split="val")]  # fmt: skip
    saes = [
        SAENeed(tuple(layer_specs([settings.relevancy_layer], settings.lam, settings.seed)),
                on=cls_train, epochs=settings.cls_epochs),
        SAENeed(settings.patch_spec, on=patch_train, epochs=settings.patch_epochs,
                batch_size=settings.patch_batch, tokens="patch"),
    ]  # fmt: skip
    notes = [
        f"the CLS SAE of layer {settings.relevancy_layer} is chapter 03's: reused when that "
        "chapter has run",
        "segmentation images and masks: the toy world's"
        if settings.mini
        else "segmentation: patch stores of segmentation_train and segmentation_val (not counted)",
    ]
    return {"stores": stores, "saes": saes, "notes": notes}


def synset_groups(store: Store, synsets: Sequence[str]) -> dict[str, list[int]]:
    """Each synset's name -> the class indices of its leaves among the store's classes. A
    synset with no class in the store is left out, with a printed note."""
    taxonomy = Taxonomy.from_store(store)
    present = [wnid for wnid in synsets if wnid in taxonomy and taxonomy.leaf_set(wnid)]
    missing = [wnid for wnid in synsets if wnid not in present]
    if not present:
        raise ValueError(f"no class of the store lies under any of {list(synsets)}")
    if missing:
        print(f"Note: no class of the store lies under {missing}; left out.")
    return {
        taxonomy.name(wnid): [store.wnids.index(leaf) for leaf in taxonomy.leaf_set(wnid)]
        for wnid in present
    }


def object_relevancy(
    maps: Mapping[str, tuple[np.ndarray, RelevancyMaps]],
    masks_NHW: np.ndarray,
    names: Mapping[str, str],
) -> pd.DataFrame:
    """Per group: the share of its feature's relevancy on the object's patches (weighted by how
    much of each patch the object covers) over its top images, next to the object's share of
    the image (what an even spread scores) and their ratio. ``maps`` holds each group's (store
    rows, `RelevancyMaps` of its feature), ``names`` each group's feature name."""
    rows = []
    for group, (store_rows, group_maps) in maps.items():
        coverage = patch_coverage(masks_NHW[store_rows], group_maps.grid)
        share = relevancy_share(group_maps.maps_FBhw[0], coverage)
        rows.append(
            {
                "group": group,
                "feature": names[group],
                "relevancy on the object": share.mean(),
                "object's share of the image": coverage.mean(),
                "ratio": share.mean() / coverage.mean(),
            }
        )
    return pd.DataFrame(rows).set_index("group")


# --------------------------------------------------------------------------- which features


def tie_scores(
    sae: SAE, acts: np.ndarray, inside: np.ndarray, *, batch_size: int = 64, progress: bool = False
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
    sum_in_S = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_all_S = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    chunks = iter_codes(sae, acts, batch_size, progress=progress, desc="feature ties")
    for start, codes in chunks:
        codes = codes.double().cpu()
        mark = torch.as_tensor(inside[start : start + len(codes)])
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
    stats: ClassStats, features: Mapping[str, int], groups: Mapping[str, Sequence[int]]
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


# --------------------------------------------------------------------------- summary


def summary(
    effects: pd.DataFrame,
    part_table: pd.DataFrame,
    head_table: pd.DataFrame,
    object_table: pd.DataFrame | None = None,
) -> str:
    """The chapter's findings in words, every number read off its tables: relevancy on the
    object (when masks scored it), the classification edits against their controls, the
    segmentation edits against theirs, and the head-regularisation check."""
    p_group = effects["p(group)"].unstack("condition")
    moved = p_group.eval("original - edited")
    control = p_group.eval("original - `random direction`")
    control_feature = p_group.eval("original - `random feature`")
    beats = (part_table["changed: edited"] > part_table["changed: random direction"]).sum()
    beats_feature = (part_table["changed: edited"] > part_table["changed: random feature"]).sum()
    lines = []
    if object_table is not None:
        ratio = object_table["ratio"]
        lines.append(
            f"Relevancy on the object: {ratio.min():.1f} to {ratio.max():.1f} times what an even "
            "spread over the patches would give."
        )
    lines += [
        f"Classification: suppressing one feature lowered p(group) by more than 0.1 for "
        f"{(moved > 0.1).sum()} of {len(moved)} groups (largest drop {moved.max():.2f}, for "
        f"{moved.idxmax()}); the random direction's largest drop was {control.max():.2f}, the "
        f"random feature's {control_feature.max():.2f}.",
        f"Segmentation: the edit changed the predicted class of more of the part's patches than "
        f"the random direction did for {beats} of {len(part_table)} parts, and than the random "
        f"feature did for {beats_feature}; patches outside the edited region never change (the "
        "head is per patch, and the edit touches only the region).",
        "Head regularisation: the edit moved the logits "
        + " and ".join(
            f"{r:.1f}x as far as a random direction ({head})"
            for (head, _), r in head_table["|Δ| edited ÷ random direction"].items()
        )
        + ".",
    ]
    return "\n".join(lines)
