"""Chapter 04, patch features (paper 002): a patch SAE, its exemplars, where its features fire
on the planted parts, and two encoders matched.

The generic pieces (the streaming exemplar scan and facts, exemplar grids, the feature browser,
the cross-encoder correlation) live in `saekit.analysis`; this module holds what only the
chapter needs: its settings, the patch SAE request, the choice of features to show (with a
fallback when nothing passes the density filter), and the mask ground truth of the toy world
(the share of each feature's activation that lands on each planted part).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from sae_lens import SAE
from transformers import BaseImageProcessor

from saekit.activations import Store
from saekit.analysis.exemplars import ExemplarScan, model_label, select_features
from saekit.data import ImageDataset
from saekit.masks import load_masks, patch_coverage
from saekit.plan import SAENeed, StoreNeed
from saekit.sae import SAEMetrics, SAESpec, evaluate, get_recipe, metrics_table, train_or_load
from saekit.sae.codes import check_sae_matches_store, iter_codes
from saekit.studies.settings import StudySettings

RECIPE = "stevens2025"
"""Paper 002's training recipe (`saekit.sae.recipes`)."""


@dataclasses.dataclass(frozen=True)
class PatchFeaturesSettings(StudySettings):
    """Chapter 04's parameters; field defaults are the mini profile's, ``PAPER`` the paper's."""

    family: str = "toyvit"
    """Encoder of the patch SAE: the toy-world ViT (mini) or DINOv2 (paper)."""
    layer: int | None = None
    """Its layer; None: the encoder's default (`default_layer`: toy ViT 3 of 0..5, any other
    encoder its second-to-last), filled in by `for_encoders`."""
    family_b: str = "toyvit"
    """Encoder to compare with: the toy ViT at another layer (mini) or CLIP (paper)."""
    layer_b: int | None = None
    """Its layer; None: the encoder's default as a comparison partner (toy ViT 5, the last;
    any other encoder its second-to-last)."""
    expansion: int = 8
    """SAE width as a multiple of the layer width (paper 002: 32)."""
    lam: float = 0.3
    """λ of the ReLU SAEs (recipe stevens2025; the paper profile uses the recipe's own)."""
    epochs: int = 20
    """Passes over the training patches."""
    batch_size: int = 512
    """Patches per training step."""
    seed: int = 0
    """Seeds the SAEs' initialisation and the batch order (B's SAE uses seed + 1)."""
    n_features: int = 8
    """Strongest features: facts table, exemplars, browser, export."""
    n_exemplars: int = 8
    """Top images per feature."""
    max_image_freq: float = 0.5
    """Features firing on more of the images count as dense and are not shown."""
    n_part_features: int = 4
    """Mini profile: features most tied to the planted parts, shown too."""
    min_fire_frac: float = 0.5
    """A class joins a feature's class set if the feature fires on at least this share of the
    class's images..."""
    min_rel_mean_act: float = 0.5
    """...and scores at least this share of its best class's mean there."""
    n_browse_images: int = 4
    """Images in the browser's patch tab."""
    n_pairs: int = 4
    """Matched feature pairs drawn side by side."""
    min_match_freq: float = 0.05
    """Features matched across encoders fire on at least this share of the images."""
    imagenet_train: str | None = None
    """Paper profile: ImageNet-1k train folder (one sub-folder per wnid)."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k validation folder, same layout."""
    device: str | None = None
    """Where the SAEs train and encode; None: cuda when available, else cpu."""

    PAPER: ClassVar[dict[str, Any]] = {
        "family": "dinov2",
        "family_b": "clip",
        "expansion": 32,
        "lam": get_recipe(RECIPE).l1,
        "epochs": 1,
        "batch_size": 16384,
    }
    TILE: ClassVar[dict[str, float]] = {"mini": 1.5, "paper": 1.8}
    """Inches per exemplar image in figures: the toy world's images are 48 pixels."""

    @property
    def tile(self) -> float:
        """Inches per exemplar image in this profile's figures."""
        return self.TILE[self.profile]

    def for_encoders(self, n_layers: int, n_layers_b: int) -> PatchFeaturesSettings:
        """These settings with the layers left to the encoders filled in (`default_layer`)."""
        return self.replace(
            layer=default_layer(self.family, n_layers) if self.layer is None else self.layer,
            layer_b=(
                default_layer(self.family_b, n_layers_b, partner=True)
                if self.layer_b is None
                else self.layer_b
            ),
        )

    @property
    def labels(self) -> tuple[str, str]:
        """Model labels of A and B for feature names; two layers of one model are told apart
        by their layer ('ToyViT-L3', 'ToyViT-L5')."""
        a, b = model_label(self.family), model_label(self.family_b)
        if self.family == self.family_b:
            return f"{a}-L{self.layer}", f"{b}-L{self.layer_b}"
        return a, b


def default_layer(family: str, n_layers: int, *, partner: bool = False) -> int:
    """The layer chapter 04 reads by default: in the toy ViT a middle layer (3) and, for the
    comparison partner, the last (5); in any other encoder the second-to-last (paper 002 §9)."""
    if family == "toyvit":
        return n_layers - 1 if partner else n_layers // 2
    return n_layers - 2


def train_patch_sae(
    store: Store,
    layer: int,
    root: str | Path,
    *,
    arch: str = "relu",
    expansion: int | None = None,
    l1: float | None = None,
    k: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    recipe: str = RECIPE,
    seed: int = 0,
    device: str = "cpu",
) -> SAE:
    """Paper 002's patch SAE: one SAE on every patch token of ``layer`` (recipe ``stevens2025``;
    ``None`` takes the recipe's value), trained once and loaded from the SAE cache under
    ``root`` whenever the same store, settings and seed ask again (`saekit.sae.train_or_load`)."""
    if "patch" not in store.manifest["tokens"]:
        raise ValueError(
            f"the store at {store.root} holds no patch tokens; extract it with tokens='both'"
        )
    spec = SAESpec(arch=arch, expansion=expansion, l1=l1, k=k, layer=layer, recipe=recipe,
                   seed=seed)  # fmt: skip
    return train_or_load(
        spec, store, root=root, tokens="patch", epochs=epochs, batch_size=batch_size,
        seed=seed, device=device,
    )  # fmt: skip


def resource_needs(settings: PatchFeaturesSettings) -> dict[str, list]:
    """What the chapter will store and train, as `saekit.book.Chapter.plan`'s ``stores`` and
    ``saes``: both encoders' patch stores (train and validation) and the SAEs of A (and of A at
    the recipe's λ, when the chapter's differs) and B. Needs the layers (`for_encoders`)."""
    a = StoreNeed(settings.family, "train", (settings.layer,), "both")
    b = StoreNeed(settings.family_b, "train", (settings.layer_b,), "both")
    training = dict(epochs=settings.epochs, batch_size=settings.batch_size, tokens="patch")
    spec = SAESpec(arch="relu", expansion=settings.expansion, l1=settings.lam,
                   layer=settings.layer, recipe=RECIPE, seed=settings.seed)  # fmt: skip
    spec_b = dataclasses.replace(spec, layer=settings.layer_b, seed=settings.seed + 1)
    saes = [SAENeed(spec, on=a, **training), SAENeed(spec_b, on=b, **training)]
    if settings.lam != get_recipe(RECIPE).l1:
        recipe_spec = dataclasses.replace(spec, l1=get_recipe(RECIPE).l1)
        saes.insert(1, SAENeed(recipe_spec, on=a, **training))
    stores = [a, dataclasses.replace(a, split="val"), b, dataclasses.replace(b, split="val")]
    return {"stores": list(dict.fromkeys(stores)), "saes": saes}


def eval_patches(store: Store, layer: int, max_patches: int = 2**16) -> np.ndarray:
    """The patches ``[N·P, D]`` of the store's first images, at most ``max_patches`` of them
    (whole images; at least one): what the metrics table scores. A paper-profile patch store
    would not fit in memory whole."""
    acts = store.patches(layer)
    n_images = max(1, max_patches // acts.shape[1])
    return np.asarray(acts[:n_images], np.float32).reshape(-1, acts.shape[-1])


def patch_metrics(sae: SAE, store: Store, layer: int, max_patches: int = 2**16) -> SAEMetrics:
    """Paper 002's metrics of a patch SAE on `eval_patches`, in the space it was trained in,
    after checking that the SAE was trained on this store's model, layer and patch tokens."""
    check_sae_matches_store(sae, store, layer, "patch")
    return evaluate(sae, eval_patches(store, layer, max_patches), normalized=True)


def recipe_lambda_check(
    settings: PatchFeaturesSettings, train: Store, val: Store, root: str | Path
) -> pd.DataFrame:
    """Paper 002's metrics (`saekit.sae.metrics_table`) of the chapter's patch SAE and of the same
    SAE at the recipe's λ, on the validation patches (`eval_patches`): why the mini profile does
    not use the recipe's λ. Rows 'chosen' and 'recipe'; empty when the chapter runs at the
    recipe's λ. Both SAEs come from the SAE cache when trained before."""
    recipe_lam = get_recipe(RECIPE).l1
    if settings.lam == recipe_lam:
        return pd.DataFrame()
    options = dict(expansion=settings.expansion, epochs=settings.epochs,
                   batch_size=settings.batch_size, seed=settings.seed, device=settings.device)  # fmt: skip
    metrics = {
        name: patch_metrics(train_patch_sae(train, settings.layer, root, l1=lam, **options),
                            val, settings.layer)  # fmt: skip
        for name, lam in (("chosen", settings.lam), ("recipe", recipe_lam))
    }
    return metrics_table(metrics).assign(λ=[settings.lam, recipe_lam])


def lambda_note(check: pd.DataFrame, settings: PatchFeaturesSettings, d_sae: int) -> str:
    """`recipe_lambda_check` in words, every number from its table."""
    if check.empty:
        return f"This run trains at the recipe's λ ({settings.lam:.3g})."
    chosen, recipe = check.loc["chosen"], check.loc["recipe"]
    return (
        f"At the recipe's λ = {recipe['λ']:.2g} the SAE keeps an L0 of {recipe['L0']:.0f} of "
        f"its {d_sae} features active on every patch ({recipe['L0'] / d_sae:.0%}), "
        f"{recipe['Dense']:.0f} of them dense; at this chapter's λ = {chosen['λ']:.2g} the L0 is "
        f"{chosen['L0']:.1f} ({chosen['Dense']:.0f} dense), at a normalised MSE of "
        f"{chosen['MSE']:.3g} against {recipe['MSE']:.3g}."
    )


# --------------------------------------------------------------------------- which features


def browsable_features(scan: ExemplarScan, n: int, *, max_image_freq: float) -> list[int]:
    """Up to ``n`` features to show (`select_features`: alive, not dense, strongest first).
    When none passes the density filter, the strongest live features, dense ones included;
    when none fires at all, the first ``n``. Each fallback prints a note saying so."""
    features = select_features(scan, n, max_image_freq=max_image_freq)
    if features:
        return features
    features = select_features(scan, n, max_image_freq=1.0)
    if features:
        print(
            f"Note: no feature fires on at most {max_image_freq:.0%} of the {scan.n_images} "
            f"images, so the {len(features)} strongest features are shown, dense ones included."
        )
        return features
    print(
        f"Note: no feature of the SAE fires on any of the {scan.n_images} images (train longer "
        f"or lower λ); its first {min(n, scan.d_sae)} features are shown, blank."
    )
    return list(range(min(n, scan.d_sae)))


def matchable_features(scan: ExemplarScan, min_freq: float, fallback: Sequence[int]) -> np.ndarray:
    """The features firing on at least ``min_freq`` of the images (the ones worth matching
    across encoders); ``fallback`` (e.g. the browsed features), with a printed note, when none
    does."""
    common = np.flatnonzero(scan.image_freq_S >= min_freq)
    if len(common):
        return common
    print(
        f"Note: no feature fires on at least {min_freq:.0%} of the images; the "
        f"{len(fallback)} browsed features are matched instead."
    )
    return np.asarray(list(fallback), dtype=np.int64)


# --------------------------------------------------------------------------- ground truth


def store_patch_fractions(
    store: Store,
    dataset: ImageDataset,
    grid: tuple[int, int],
    n_labels: int,
    *,
    processor: BaseImageProcessor | None = None,
    masks_dir: str | Path | None = None,
) -> np.ndarray:
    """How much of each patch every label covers: ``[N, P, n_labels]`` pixel fractions for
    every store row, patches in row-major order.

    The masks are read and cropped as the encoder saw the image by `saekit.masks.load_masks`
    (default folder: the image folder's sibling ``<root>_masks``, as the toy world exports
    them) and split per patch by `saekit.masks.patch_coverage`; unlabelled pixels (255) count
    for no label. Fractions rather than one label per patch, because at ViT resolution most
    patches that touch a small part are mostly background: a majority vote would hand nearly
    every patch to the background.
    """
    masks_NHW = load_masks(store, dataset, processor, masks_dir)
    labelled = masks_NHW[masks_NHW != 255]
    if labelled.size and labelled.max() >= n_labels:
        raise ValueError(
            f"the masks hold label {int(labelled.max())} but n_labels is {n_labels}; pass the "
            "number of labels (e.g. len(saekit.mini.toyworld.PART_NAMES))"
        )
    per_label = [patch_coverage(masks_NHW, grid, [label]) for label in range(n_labels)]
    return np.stack(per_label, axis=-1).reshape(len(masks_NHW), -1, n_labels)


def part_shares(
    store: Store,
    sae: SAE,
    layer: int,
    features: Sequence[int],
    fractions_NPL: np.ndarray,
    label_names: Sequence[str],
    *,
    tokens_per_chunk: int = 4096,
    progress: bool = True,
) -> pd.DataFrame:
    """Where features fire: for each feature, the share of its activation (summed over every
    patch of the store) that lands on each label, a patch's activation split by the fractions
    of the patch each label covers (`store_patch_fractions`). Rows sum to 1 (NaN for a feature
    that never fires); ``.attrs["base"]`` maps each label to its share of all pixels, the share a
    feature that ignores the labels would show. One streaming pass, as `scan_store`."""
    acts = store.patches(layer)
    fractions_NPL = np.asarray(fractions_NPL, dtype=np.float64)
    expected = (*acts.shape[:2], len(label_names))
    if fractions_NPL.shape != expected:
        raise ValueError(
            f"fractions_NPL must be [N, P, labels] = {expected}, one row of label fractions per "
            f"store patch; got {fractions_NPL.shape}"
        )
    index = torch.as_tensor(list(features), dtype=torch.int64)
    chunk = max(1, tokens_per_chunk // int(acts.shape[1]))
    mass_FL = torch.zeros(len(index), len(label_names), dtype=torch.float64)
    for start, codes_bPS in iter_codes(sae, acts, chunk, progress=progress, desc="part shares"):
        codes_bPF = codes_bPS[..., index.to(codes_bPS.device)].double().cpu()
        fractions_bPL = torch.from_numpy(fractions_NPL[start : start + len(codes_bPS)])
        mass_FL += torch.einsum("bpf,bpl->fl", codes_bPF, fractions_bPL)
    total_F1 = mass_FL.sum(1, keepdim=True)
    shares = torch.where(total_F1 > 0, mass_FL / total_F1.clamp(min=1e-300), torch.nan)
    frame = pd.DataFrame(
        shares.numpy(), index=pd.Index(list(features), name="feature"), columns=list(label_names)
    )
    # a plain dict: pandas compares attrs when it combines frames, which a Series cannot survive
    frame.attrs["base"] = dict(zip(label_names, fractions_NPL.mean((0, 1)).tolist(), strict=True))
    return frame


def object_features(
    shares: pd.DataFrame, candidates: Sequence[int], n: int, exclude: Sequence[int]
) -> list[int]:
    """The ``n`` features of ``candidates`` (rows of `part_shares`) with the largest share of
    their activation on the object, i.e. off the background label, leaving out ``exclude``."""
    on_object = 1 - shares.loc[list(candidates), "background"]
    ranked = on_object.nlargest(n + len(exclude)).index
    return [int(f) for f in ranked if f not in set(exclude)][:n]


def dominant_part(shares: pd.DataFrame) -> pd.Series:
    """Each feature's label with the largest share, as 'body (62%, 3.1x its pixel share)'."""
    base = pd.Series(shares.attrs["base"])

    def describe(row: pd.Series) -> str:
        if row.isna().all():
            return "never fires"
        part = row.idxmax()
        lift = row[part] / base[part] if base[part] > 0 else np.inf
        return f"{part} ({row[part]:.0%}, {lift:.1f}x its pixel share)"

    return pd.Series([describe(row) for _, row in shares.iterrows()], index=shares.index,
                     dtype=object)  # fmt: skip


def ground_truth_note(
    shares: pd.DataFrame, strongest: Sequence[int], object_tied: Sequence[int]
) -> str:
    """Where the shown features fire, in words, from `part_shares` (with a 'background'
    label): how many of the strongest features put most of their activation on the
    background, and how much of theirs the object-tied features put on the object's parts."""
    background = shares.loc[list(strongest), "background"]
    base = shares.attrs["base"]["background"]
    text = (
        f"Of the {len(strongest)} strongest features, {int((background > 0.5).sum())} put most of "
        f"their activation on the background ({background.min():.0%} to {background.max():.0%} "
        f"of their activation, where the background covers {base:.0%} of all pixels)."
    )
    if len(object_tied):
        on_object = 1 - shares.loc[list(object_tied), "background"]
        text += (
            f" The {len(object_tied)} features most tied to the object put {on_object.min():.0%} "
            f"to {on_object.max():.0%} of their activation on its parts, against "
            f"{1 - base:.0%} of the pixels."
        )
    return text


def plot_part_shares(
    shares: pd.DataFrame, names: Sequence[str] | None = None, *, ax: plt.Axes | None = None
) -> Figure:
    """Heat map of `part_shares`: one row per feature, one column per label, the labels' pixel
    shares as the first row, so a feature tied to a part stands out against how common it is."""
    base = pd.Series(shares.attrs["base"])
    table = pd.concat([base.to_frame("all pixels").T, shares])
    table.index = ["all pixels", *(names if names is not None else map(str, shares.index))]
    table = table.loc[:, (table.fillna(0) > 0).any()]  # labels no patch carries
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.7 * table.shape[1] + 2.5, 0.32 * len(table) + 1.2))
    else:
        fig = ax.figure
    sns.heatmap(table, ax=ax, cmap="rocket_r", vmin=0, vmax=1, annot=True, fmt=".0%",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "share of activation"})  # fmt: skip
    ax.axhline(1, color="white", lw=3)
    ax.set_ylabel("")
    ax.set_xlabel("planted part under the patch")
    ax.set_title("Where each feature fires: its activation mass by part", fontsize=10)
    return fig
