"""Exemplars: the images a feature fires on most, drawn with its activating patches (paper 002).

A patch SAE (paper 002 §3) reads one layer's patch tokens. Each of its features gets

* a name, MODEL-WIDTH/INDEX such as ``DINOv2-24K/9823`` (:func:`feature_name`);
* its top-K exemplar images, found by :func:`scan_store` in ONE streaming pass over an
  activation store. Images are ranked by the feature's maximum patch activation, its mean over
  the patches, or its activation on the CLS token. The pass keeps a running ``[S, K]`` top-k,
  per-feature counters and per-class sums, never the codes of the whole store;
* facts (:func:`feature_facts`): how often it fires (per token and per image), its largest
  activation, the classes it fires on most, and the ontology label of the classes it fires on
  reliably (LCH and coverage from :mod:`saekit.analysis.ontology`);
* an exemplar grid (:func:`plot_exemplars`): each image as the model saw it (resized and
  cropped by the encoder's own processor), with the feature's activation on every patch drawn
  as a translucent heat map over that patch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from saekit.analysis.ontology import ClassSetRule, ClassStats, class_stats, feature_table
from saekit.masks import load_masks, patch_coverage
from saekit.sae.codes import check_width, device_dtype, merge_top_k
from saekit.taxonomy import Taxonomy

RANK_BY = ("max", "mean", "cls")
"""How exemplars are ranked: max patch activation, mean over patches, or the CLS activation."""

#: transformers / saekit family name -> the label papers use in feature names. Looked up in this
#: order, so "toyvit" (the toy world's ViT) is tried before "vit".
MODEL_LABELS = {
    "toyvit": "ToyViT",
    "dinov2": "DINOv2",
    "clip": "CLIP",
    "vit": "ViT",
    "resnet": "ResNet",
}


# --------------------------------------------------------------------------- names


def width_label(d_sae: int) -> str:
    """SAE width as papers write it: 24576 -> '24K', 16000 -> '16K', 384 -> '384'."""
    if d_sae >= 1024 and d_sae % 1024 == 0:
        return f"{d_sae // 1024}K"
    if d_sae >= 1000 and d_sae % 1000 == 0:
        return f"{d_sae // 1000}K"
    return str(d_sae)


def model_label(family_or_id: str) -> str:
    """'dinov2' or 'facebook/dinov2-base' -> 'DINOv2'; unknown names are returned unchanged, and
    so are names that already start with a label ('ToyViT-L3', to tell two layers apart)."""
    if str(family_or_id).startswith(tuple(MODEL_LABELS.values())):
        return str(family_or_id)
    lowered = str(family_or_id).lower()
    for family, label in MODEL_LABELS.items():
        if family in lowered:
            return label
    return str(family_or_id)


def _store_model_label(manifest: dict) -> str:
    """The label of the model a store was made from: its id or path first (the toy ViT's folder
    says "toyvit" where its family says only "vit"), else its family."""
    from_id = model_label(manifest["model"])
    if from_id != manifest["model"]:
        return from_id
    return model_label(manifest.get("family") or manifest["model"])


def feature_name(model: str, d_sae: int, index: int) -> str:
    """Paper 002's MODEL-WIDTH/INDEX name, e.g. ``feature_name("DINOv2", 24576, 9823)`` ->
    'DINOv2-24K/9823'. ``model`` may also be a family ('dinov2') or a hub id."""
    if not 0 <= index < d_sae:
        raise IndexError(f"feature {index} is out of range for an SAE of width {d_sae}")
    return f"{model_label(model)}-{width_label(d_sae)}/{index}"


# --------------------------------------------------------------------------- the scan


@dataclass
class ExemplarScan:
    """What one streaming pass over a store learned about every feature of an SAE."""

    layer: int
    """Store layer the SAE reads."""
    rank_by: str
    """Image score the exemplars are ranked by: 'max', 'mean' (over patches) or 'cls'."""
    model: str
    """Model label for feature names (e.g. 'DINOv2')."""
    d_sae: int
    """SAE width S."""
    top_values_SK: np.ndarray
    """Image scores of each feature's top-K images, best first (ties: lower store row first)."""
    top_rows_SK: np.ndarray
    """Store rows of those images."""
    token_freq_S: np.ndarray
    """Fraction of tokens (patches, or CLS tokens for 'cls') on which the feature fires."""
    image_freq_S: np.ndarray
    """Fraction of images on which it fires on at least one scored token."""
    max_act_S: np.ndarray
    """Largest activation on any scored token."""
    class_stats: ClassStats
    """Per-class firing fractions and mean image scores (`saekit.analysis.ontology.class_stats`)."""
    class_names: list[str]
    """Name of each class index of the store."""
    wnids: list[str] | None
    """WordNet id of each class index, when the store's classes are synsets."""
    n_images: int
    """Images scanned."""

    @property
    def k(self) -> int:
        """Exemplars kept per feature."""
        return self.top_rows_SK.shape[1]

    def name(self, feature: int) -> str:
        """The feature's MODEL-WIDTH/INDEX name."""
        return feature_name(self.model, self.d_sae, feature)

    def exemplars(self, feature: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, scores) of the feature's top images on which it fires at all."""
        values = self.top_values_SK[feature, :k]
        keep = values > 0
        return self.top_rows_SK[feature, :k][keep], values[keep]


def scan_store(
    store: Any,
    sae: Any,
    layer: int,
    *,
    k: int = 16,
    rank_by: str = "max",
    model: str | None = None,
    tokens_per_chunk: int = 4096,
    progress: bool = True,
) -> ExemplarScan:
    """One streaming pass over a store: every feature's top-``k`` images and its facts.

    ``rank_by`` is 'max' or 'mean' (the feature's patch activations of an image, reduced) or
    'cls' (its activation on the image's CLS token; the SAE then reads CLS tokens). Images are
    read in chunks of about ``tokens_per_chunk`` tokens, so memory stays at one chunk's codes
    (``tokens_per_chunk x S`` floats) plus the ``[S, k]`` running top-k. ``model`` labels the
    feature names (default: from the store's model family).
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, not {rank_by!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    manifest = store.manifest
    kind = "cls" if rank_by == "cls" else "patch"
    if kind not in manifest["tokens"]:
        hint = "--tokens both" if kind == "patch" else "--tokens cls (or both)"
        raise ValueError(
            f"rank_by={rank_by!r} needs {kind} tokens, but the store at {store.root} holds "
            f"{manifest['tokens']}; extract them with {hint}, or rank by "
            f"{'cls' if kind == 'patch' else 'max'}."
        )
    acts = store.cls(layer) if kind == "cls" else store.patches(layer)
    check_width(sae, acts.shape[-1])
    n_images = len(acts)
    if n_images == 0:
        raise ValueError(f"the store at {store.root} holds no images")
    tokens_per_image = 1 if kind == "cls" else int(acts.shape[1])
    chunk = max(1, tokens_per_chunk // tokens_per_image)
    d_sae = int(sae.cfg.d_sae)
    k = min(k, n_images)
    device, dtype = device_dtype(sae)
    labels_N = np.asarray(store.labels)

    top_values = torch.empty(d_sae, 0, device=device)
    top_rows = torch.empty(d_sae, 0, dtype=torch.int64, device=device)
    fired_tokens_S = torch.zeros(d_sae, dtype=torch.float64, device=device)
    fired_images_S = torch.zeros(d_sae, dtype=torch.float64, device=device)
    max_act_S = torch.zeros(d_sae, device=device)

    def image_scores() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        # class_stats consumes these (score, label) batches; the other accumulators are updated
        # on the way, so the store is read once for everything.
        nonlocal top_values, top_rows
        starts = range(0, n_images, chunk)
        for start in tqdm(starts, desc=f"exemplars L{layer}", disable=not progress):
            stop = min(start + chunk, n_images)
            x = torch.from_numpy(np.array(acts[start:stop], dtype=np.float32)).to(device, dtype)
            with torch.no_grad():
                codes = sae.encode(x).float()  # [b, S] for CLS, [b, P, S] for patches
            if kind == "cls":
                score_bS, fires_bS = codes, codes > 0
                fired_tokens_S.add_(fires_bS.sum(0))
                max_act_S.copy_(torch.maximum(max_act_S, codes.amax(0)))
            else:
                peak_bS = codes.amax(1)
                score_bS = peak_bS if rank_by == "max" else codes.mean(1)
                fires_bS = peak_bS > 0
                fired_tokens_S.add_((codes > 0).sum((0, 1)))
                max_act_S.copy_(torch.maximum(max_act_S, peak_bS.amax(0)))
            fired_images_S.add_(fires_bS.sum(0))
            rows_b = torch.arange(start, stop, device=device)
            top_values, top_rows = merge_top_k(top_values, top_rows, score_bS.T, rows_b, k)
            yield score_bS.cpu(), labels_N[start:stop]

    stats = class_stats(image_scores(), None, len(store.class_names))
    return ExemplarScan(
        layer=layer,
        rank_by=rank_by,
        model=model or _store_model_label(manifest),
        d_sae=d_sae,
        top_values_SK=top_values.cpu().numpy(),
        top_rows_SK=top_rows.cpu().numpy(),
        token_freq_S=(fired_tokens_S / (n_images * tokens_per_image)).cpu().numpy(),
        image_freq_S=(fired_images_S / n_images).cpu().numpy(),
        max_act_S=max_act_S.cpu().numpy(),
        class_stats=stats,
        class_names=list(store.class_names),
        wnids=list(store.wnids) if store.wnids else None,
        n_images=n_images,
    )


# --------------------------------------------------------------------------- facts


def select_features(
    scan: ExemplarScan,
    n: int,
    *,
    min_image_freq: float = 0.0,
    max_image_freq: float = 0.5,
    max_token_freq: float = 1.0,
) -> list[int]:
    """Up to ``n`` features worth browsing, strongest first: paper 002 §9 sorts by sparsity and
    maximum activation, so dead features and dense ones are dropped and the rest ranked by max
    activation. Dense means firing on more than ``max_image_freq`` of the images or on more
    than ``max_token_freq`` of the tokens (patches); for a patch SAE the token rate is the
    sparsity the paper counts, since a feature firing on one patch of every image is sparse."""
    freq = scan.image_freq_S
    keep = (
        (freq > min_image_freq)
        & (freq <= max_image_freq)
        & (scan.token_freq_S <= max_token_freq)
        & (scan.max_act_S > 0)
    )
    candidates = np.flatnonzero(keep)
    order = np.argsort(-scan.max_act_S[candidates], kind="stable")
    return candidates[order][:n].tolist()


def feature_facts(
    scan: ExemplarScan,
    features: Sequence[int] | None = None,
    *,
    taxonomy: Taxonomy | str | None = "auto",
    n_top_classes: int = 3,
    rule: ClassSetRule | None = None,
) -> pd.DataFrame:
    """One row per feature (index = feature): name, token_freq, image_freq, max_act,
    top_classes (the classes with the highest mean image score, as 'name (score)'), n_classes
    and ontology (the LCH of the classes the feature fires on by ``rule``, e.g. 'elasmobranch
    (coverage 1.00, 5 classes)'). ``taxonomy='auto'`` builds one from the store's wnids when it
    has them; pass None to skip the ontology column's work."""
    features = list(range(scan.d_sae)) if features is None else [int(f) for f in features]
    stats = scan.class_stats
    mean_FC = stats.mean_act_SC[features]
    top_FT = np.argsort(-mean_FC, axis=1, kind="stable")[:, :n_top_classes]
    top_classes = [
        ", ".join(
            f"{scan.class_names[c]} ({mean_FC[i, c]:.3g})" for c in top_FT[i] if mean_FC[i, c] > 0
        )
        for i in range(len(features))
    ]
    sets_FC = (rule or ClassSetRule()).apply(stats)[features]
    frame = pd.DataFrame(
        {
            "name": [scan.name(f) for f in features],
            "token_freq": scan.token_freq_S[features],
            "image_freq": scan.image_freq_S[features],
            "max_act": scan.max_act_S[features],
            "top_classes": top_classes,
            "n_classes": sets_FC.sum(1),
            "ontology": None,
        },
        index=pd.Index(features, name="feature"),
    )
    if taxonomy == "auto":
        taxonomy = Taxonomy.from_wnids(scan.wnids) if scan.wnids else None
    if taxonomy is not None:
        if scan.wnids is None:
            raise ValueError(
                "an ontology label needs the store's classes as WordNet ids (store.wnids is "
                "None); pass taxonomy=None to skip it"
            )
        if list(taxonomy.leaves) != list(scan.wnids):
            raise ValueError(
                "the taxonomy's leaf classes are not the store's classes in class-index order; "
                "build it with Taxonomy.from_wnids(store.wnids)"
            )
        table = feature_table(sets_FC, taxonomy, progress=False)
        labels = table["lch_name"].fillna("no common hypernym") + table.apply(
            lambda row: (
                f" (coverage {row.coverage:.2f}, {row.n_classes} "
                f"class{'es' if row.n_classes != 1 else ''})"
            ),
            axis=1,
        )
        frame.iloc[table["feature"].to_numpy(), frame.columns.get_loc("ontology")] = (
            labels.to_numpy()
        )
    return frame


# --------------------------------------------------------------------------- grids


def model_view(image: Image.Image, processor: Any | None = None) -> Image.Image:
    """The image as the encoder saw it: the processor's resize and crop, without normalising.

    Patch overlays must line up with the pixels the patches came from. Without a processor the
    image is centre-cropped to a square, which is what resize-shortest-edge-then-centre-crop
    processors (DINOv2, CLIP) do up to scale.
    """
    image = image.convert("RGB")
    if processor is not None:
        pixels = processor(
            images=[image], do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def exemplar_patch_acts(
    scan: ExemplarScan, store: Any, sae: Any, feature: int, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(store rows, image scores, the feature's activation on every patch ``[K, P]``) of its
    exemplars, re-encoding only those K images' patches."""
    rows, values = scan.exemplars(feature, k)
    if "patch" not in store.manifest["tokens"]:
        return rows, values, np.zeros((len(rows), 0), np.float32)
    device, dtype = device_dtype(sae)
    order = np.argsort(rows)  # memory-mapped reads in store order
    patches = np.empty((len(rows), *store.patches(scan.layer).shape[1:]), np.float32)
    patches[order] = np.asarray(store.patches(scan.layer)[rows[order]], np.float32)
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(patches).to(device, dtype))
    return rows, values, codes[..., feature].float().cpu().numpy()


def overlay_patches(
    ax: plt.Axes,
    image: Image.Image,
    acts_P: np.ndarray,
    grid: tuple[int, int],
    *,
    vmax: float | None = None,
    cmap: str = "inferno",
    max_alpha: float = 0.75,
) -> None:
    """Draw ``image`` with each patch's activation as a heat square whose opacity grows with it.

    The ``[h, w]`` activation grid is stretched over the image (``extent``), so every patch
    covers exactly its pixel block, as paper 002 draws patch predictions.
    """
    ax.imshow(image)
    if acts_P.size:
        acts_hw = np.asarray(acts_P, np.float32).reshape(grid)
        top = float(vmax if vmax is not None else acts_hw.max())
        level_hw = np.clip(acts_hw / top, 0.0, 1.0) if top > 0 else np.zeros_like(acts_hw)
        ax.imshow(
            level_hw,
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            alpha=level_hw * max_alpha,
            extent=(0, image.width, image.height, 0),
            interpolation="nearest",
        )
    ax.set_xticks([])
    ax.set_yticks([])


def plot_exemplars(
    images: Sequence[Image.Image],
    acts_KP: np.ndarray,
    grid: tuple[int, int],
    *,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    ncols: int = 4,
    axes: Sequence[plt.Axes] | None = None,
    tile: float = 1.8,
) -> Figure:
    """An exemplar grid: ``images`` (already as the model saw them, see `model_view`) with the
    feature's patch activations ``acts_KP`` overlaid, all on one colour scale (the largest
    activation among them) so brightness compares across tiles."""
    if len(images) != len(acts_KP):
        raise ValueError(f"{len(images)} images but {len(acts_KP)} rows of patch activations")
    n = max(len(images), 1)
    if axes is None:
        ncols = min(ncols, n)
        nrows = -(-n // ncols)
        fig, grid_axes = plt.subplots(
            nrows,
            ncols,
            figsize=(tile * ncols, tile * nrows + (0.4 if title else 0)),
            squeeze=False,
        )
        axes = list(grid_axes.ravel())
    else:
        fig = axes[0].figure
    vmax = float(np.max(acts_KP)) if np.size(acts_KP) else None
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.axis("off")
            continue
        overlay_patches(ax, images[i], acts_KP[i], grid, vmax=vmax)
        if captions is not None:
            ax.set_title(captions[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def row_images(
    store: Any, dataset: Any, rows: Sequence[int], processor: Any | None = None
) -> list[Image.Image]:
    """The images of store ``rows``, loaded from the dataset the store was extracted from."""
    images = []
    for row in rows:
        index = int(store.rows[row])
        if dataset.image_ids[index] != store.image_ids[row]:
            raise ValueError(
                f"store row {row} is image {store.image_ids[row]!r} but the dataset's image "
                f"{index} is {dataset.image_ids[index]!r}: pass the dataset the store was "
                "extracted from"
            )
        images.append(model_view(dataset.load(index), processor))
    return images


def exemplar_figure(
    scan: ExemplarScan,
    store: Any,
    sae: Any,
    dataset: Any,
    feature: int,
    *,
    k: int | None = None,
    processor: Any | None = None,
    ncols: int = 4,
    title: str | None = None,
    axes: Sequence[plt.Axes] | None = None,
    tile: float = 1.8,
) -> Figure:
    """`plot_exemplars` for one feature of a scan: its top images with their patch overlays,
    captioned with the image score and class, titled with the feature's name; ``tile`` is each
    image's size in inches."""
    rows, values, acts_KP = exemplar_patch_acts(scan, store, sae, feature, k)
    images = row_images(store, dataset, rows, processor)
    grid = store.grid(scan.layer) if acts_KP.size else (1, 1)
    captions = [
        f"{scan.class_names[store.labels[row]]} {value:.2g}"
        for row, value in zip(rows, values, strict=True)
    ]
    if title is None:
        title = f"{scan.name(feature)} ({scan.rank_by} activation)"
    return plot_exemplars(
        images, acts_KP, grid, captions=captions, title=title, ncols=ncols, axes=axes, tile=tile
    )


def patch_features(
    sae: Any, acts_PD: torch.Tensor | np.ndarray, top: int = 10
) -> list[list[tuple[int, float]]]:
    """For every patch, the features active there as (feature, activation), strongest first
    (at most ``top``)."""
    device, dtype = device_dtype(sae)
    x = torch.as_tensor(np.array(acts_PD, np.float32)).to(device, dtype)
    check_width(sae, x.shape[-1])
    with torch.no_grad():
        codes_PS = sae.encode(x).float().cpu()
    values_PT, index_PT = torch.sort(codes_PS, dim=1, descending=True, stable=True)
    out = []
    for values_T, index_T in zip(values_PT[:, :top], index_PT[:, :top], strict=True):
        out.append([(int(i), float(v)) for v, i in zip(values_T, index_T, strict=True) if v > 0])
    return out


def exemplar_rows(
    scan: ExemplarScan,
    store: Any,
    sae: Any,
    dataset: Any,
    features: Sequence[int],
    *,
    k: int = 6,
    processor: Any | None = None,
    names: Sequence[str] | None = None,
    tile: float = 1.3,
) -> Figure:
    """Several features at a glance, paper 002 Fig. 2 style: one row per feature (labelled with
    its name, or ``names``), its top ``k`` exemplars with their patch overlays."""
    if not features:
        raise ValueError("no features to draw; pick some with select_features(scan, n)")
    fig, axes = plt.subplots(
        len(features), k, figsize=(tile * k + 1.2, tile * len(features)), squeeze=False
    )
    for row, feature in enumerate(features):
        exemplar_figure(scan, store, sae, dataset, int(feature), k=k, processor=processor,
                        axes=list(axes[row]), title="")  # fmt: skip
        label = names[row] if names is not None else scan.name(int(feature))
        axes[row, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- ground truth


def store_patch_fractions(
    store: Any,
    dataset: Any,
    grid: tuple[int, int],
    n_labels: int,
    *,
    processor: Any | None = None,
    masks_dir: str | Path | None = None,
) -> np.ndarray:
    """How much of each patch every label covers: ``[N, P, n_labels]`` pixel fractions for
    every store row, patches in row-major order.

    The masks are read and cropped as the encoder saw the image by
    `saekit.masks.load_masks` (default folder: the image folder's sibling
    ``<root>_masks``, as the toy world exports them) and split per patch by
    `saekit.masks.patch_coverage`; unlabelled pixels (255) count for no label.
    Fractions rather than one label per patch, because at ViT resolution most patches that
    touch a small part are mostly background: a majority vote would hand nearly every patch
    to the background.
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
    store: Any,
    sae: Any,
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
    check_width(sae, acts.shape[-1])
    fractions_NPL = np.asarray(fractions_NPL, dtype=np.float64)
    expected = (*acts.shape[:2], len(label_names))
    if fractions_NPL.shape != expected:
        raise ValueError(
            f"fractions_NPL must be [N, P, labels] = {expected}, one row of label fractions per "
            f"store patch; got {fractions_NPL.shape}"
        )
    index = torch.as_tensor(list(features), dtype=torch.int64)
    device, dtype = device_dtype(sae)
    chunk = max(1, tokens_per_chunk // int(acts.shape[1]))
    mass_FL = torch.zeros(len(index), len(label_names), dtype=torch.float64)
    for start in tqdm(range(0, len(acts), chunk), desc="part shares", disable=not progress):
        x = torch.from_numpy(np.array(acts[start : start + chunk], dtype=np.float32))
        with torch.no_grad():
            codes_bPF = sae.encode(x.to(device, dtype))[..., index.to(device)].double().cpu()
        fractions_bPL = torch.from_numpy(fractions_NPL[start : start + chunk])
        mass_FL += torch.einsum("bpf,bpl->fl", codes_bPF, fractions_bPL)
    total_F1 = mass_FL.sum(1, keepdim=True)
    shares = torch.where(total_F1 > 0, mass_FL / total_F1.clamp(min=1e-300), torch.nan)
    frame = pd.DataFrame(
        shares.numpy(), index=pd.Index(list(features), name="feature"), columns=list(label_names)
    )
    # a plain dict: pandas compares attrs when it combines frames, which a Series cannot survive
    frame.attrs["base"] = dict(zip(label_names, fractions_NPL.mean((0, 1)).tolist(), strict=True))
    return frame


def dominant_part(shares: pd.DataFrame) -> pd.Series:
    """Each feature's label with the largest share, as 'body (62%, 3.1x its pixel share)'."""
    base = pd.Series(shares.attrs["base"])

    def describe(row: pd.Series) -> str:
        if row.isna().all():
            return "never fires"
        part = row.idxmax()
        lift = row[part] / base[part] if base[part] > 0 else np.inf
        return f"{part} ({row[part]:.0%}, {lift:.1f}x its pixel share)"

    return shares.apply(describe, axis=1)


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
