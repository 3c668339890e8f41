"""Chapter 07: LLaVA, do images and words share SAE features? (paper 003 §5)

What only this chapter needs: its settings (`LlavaSettings`, which own the profile), the model
it studies (in mini the toy LLaVA trained on the toy world, shipped in ``saekit/mini/assets``;
its planted-truth check is `llava_planted`), which images it shows and captions, its three ReLU SAEs (trained once and cached by
`saekit.sae.train_or_load`), the per-image evolution table, and its figures (Fig. 6 as a
heatmap, the Jaccard matrix and permutation null, Fig. 7 overlays, a per-class view). The
generic parts are `saekit.analysis.multimodal` (answers and image tokens),
`saekit.analysis.modality_overlap` and `saekit.analysis.patch_evolution`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image
from sae_lens import SAE
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from saekit.analysis.modality_overlap import (
    PermutationBaseline,
    jaccard,
    overlap_heatmap_frame,
    overlap_size,
)
from saekit.analysis.multimodal import PAPER_MODEL, AnswerConfig, Responses, load_llava
from saekit.analysis.patch_evolution import Evolution
from saekit.mini import toy_llava
from saekit.plan import SAENeed
from saekit.sae import SAESpec, get_recipe, train_or_load
from saekit.studies.settings import StudySettings


@dataclasses.dataclass(frozen=True)
class LlavaSettings(StudySettings):
    """Chapter 07's parameters; field defaults are the mini profile's, `PAPER` the paper's."""

    model: str | None = str(toy_llava.DEFAULT_OUT)
    """LLaVA hub id or folder; mini: the toy LLaVA (the toy ViT as vision tower, a small Llama)
    trained to caption the toy world (`python -m saekit.mini.toy_llava`)."""
    layer: int = 2
    """Language-model block read for the overlap (mini: 2 of 4; paper: 16 of 32, the middle)."""
    evolution_layer: int = 1
    """Block set against the projector output in the evolution study (paper: 6, as in §5.2)."""
    n_classes: int = 10
    """Classes studied, spread evenly over the dataset's classes."""
    images_per_class: int = 3
    """Images described per class."""
    max_new_tokens: int = 8
    """Longest answer in tokens (paper: 48)."""
    top_fraction: float = 0.05
    """Share of SAE features in a class's top set (paper: 1%; 1% of the mini SAE is 6 features)."""
    sae_captions_per_class: int = 2
    """Further images of every class captioned to train the overlap SAE."""
    sae_train_on: str = "both"
    """Overlap SAE data besides the captions: "both" modalities' answers, or "image" only."""
    sae_expansion: int = 8
    """SAE width as a multiple of the model width."""
    sae_l1: float = 0.3
    """λ of the ReLU SAEs, on normalised inputs."""
    sae_lr: float = 1e-3
    """Adam learning rate (paper: the recipe's 1e-4; mini has only a few thousand rows)."""
    sae_epochs: int = 50
    """Passes over the activations (paper: the recipe's 3)."""
    n_permutations: int = 1000
    """Mismatched class pairings drawn for the chance level."""
    seed: int = 0
    """Seeds the SAEs and the permutations."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k validation folder (one sub-folder per wnid)."""
    device: str | None = None
    """Where LLaVA runs and the SAEs train; None: "cuda" when available, else "cpu"."""

    PAPER: ClassVar[dict[str, object]] = {
        "model": PAPER_MODEL,
        "layer": 16,
        "evolution_layer": 6,
        "max_new_tokens": 48,
        "top_fraction": 0.01,
        "sae_lr": 1e-4,
        "sae_epochs": 3,
    }

    @property
    def dtype(self) -> str:
        """LLaVA's weight dtype: float16 on a GPU (a 7B model in float32 needs 28 GB), float32
        elsewhere (CPUs are slow in half precision)."""
        return "float16" if torch.device(self.device or "cpu").type == "cuda" else "float32"

    def answers(self) -> AnswerConfig:
        """How the model is asked and read while it answers."""
        return AnswerConfig(layer=self.layer, max_new_tokens=self.max_new_tokens)

    def sae_spec(self, name: str) -> SAESpec:
        """One of the chapter's ReLU SAEs: the `olson2025` recipe (paper 003 §3.3) with this
        chapter's learning rate and epochs and input normalisation switched on.

        A LLaVA-7B residual stream and the miniature's differ in scale by orders of magnitude;
        on normalised inputs one λ means the same sparsity for both. The normalisation is folded
        back into the weights, so the SAE encodes raw activations."""
        recipe = get_recipe(
            "olson2025",
            lr=self.sae_lr,
            epochs=self.sae_epochs,
            batch_size=64,
            normalize_inputs=True,
        )
        return SAESpec(
            arch="relu",
            expansion=self.sae_expansion,
            l1=self.sae_l1,
            recipe=recipe,
            seed=self.seed,
            name=name,
        )



def resource_needs(settings: LlavaSettings) -> dict[str, list]:
    """What the chapter loads and trains, for `saekit.book.Chapter.plan`: the LLaVA checkpoint
    and its three SAEs on token activations (the overlap SAE and one per evolution point; their rows depend on the answers, so the plan counts images instead)."""
    names = ("llava-overlap", "llava-projector", f"llava-block{settings.evolution_layer}")
    saes = [SAENeed(settings.sae_spec(name), epochs=settings.sae_epochs) for name in names]
    images = settings.n_classes * (settings.images_per_class + settings.sae_captions_per_class)
    notes = [f"about {images} images answered, up to {settings.max_new_tokens} tokens each"]
    return {"saes": saes, "models": [m for m in (settings.model,) if m], "notes": notes}

def load_model(
    settings: LlavaSettings,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, str]:
    """The LLaVA the chapter studies, its processor and where it came from."""
    if settings.model is None:
        raise ValueError("Set model: this profile has no default LLaVA.")
    model, processor = load_llava(settings.model, device=settings.device, dtype=settings.dtype)
    return model, processor, settings.model


def train_sae(acts_ND: torch.Tensor, settings: LlavaSettings, name: str, root: Path) -> SAE:
    """Train `settings.sae_spec(name)` on ``acts_ND`` or load it from ``root`` (the SAE cache:
    the same activations and settings give the same SAE)."""
    return train_or_load(
        settings.sae_spec(name), acts_ND, root=root, seed=settings.seed, device=settings.device
    )


# ----------------------------------------------------------------------------- images


def _first_images(labels_N: np.ndarray, label: int, start: int, count: int) -> list[int]:
    found = np.flatnonzero(labels_N == label)[start : start + count]
    if len(found) < count:
        raise ValueError(
            f"Class {label} has {len(np.flatnonzero(labels_N == label))} images; {start + count} "
            "are needed (images_per_class plus sae_captions_per_class). Lower those or add images."
        )
    return found.tolist()


def study_images(
    labels_N: Sequence[int], n_classes: int, per_class: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the study's classes and images from a labelled dataset.

    `n_classes` classes spread evenly over the dataset's class indices (so a toy world's or
    ImageNet's whole range is sampled, not just its first few classes), and the first
    `per_class` images of each. Returns the chosen class indices [C], the dataset indices of the
    images [C * per_class], grouped by class, and each image's study label in 0..C-1 [C * per_class].
    """
    labels_N = np.asarray(labels_N)
    n_available = int(labels_N.max()) + 1 if len(labels_N) else 0
    if not 1 <= n_classes <= n_available:
        raise ValueError(
            f"n_classes={n_classes} but the dataset has {n_available} classes; "
            f"pick between 1 and {n_available}."
        )
    # Points spaced >= 1 apart round to distinct integers.
    classes_C = np.linspace(0, n_available - 1, n_classes).round().astype(int)
    indices, study_labels = [], []
    for c, label in enumerate(classes_C):
        indices.extend(_first_images(labels_N, label, 0, per_class))
        study_labels.extend([c] * per_class)
    return classes_C, np.asarray(indices, dtype=int), np.asarray(study_labels, dtype=int)


def caption_images(labels_N: Sequence[int], skip: int, per_class: int) -> np.ndarray:
    """Dataset indices of images `skip .. skip + per_class - 1` of *every* class: images to
    caption only for the overlap SAE's training data (the paper trains it on activations
    recorded while LLaVA captions ImageNet), kept apart from the first `skip` study images."""
    labels_N = np.asarray(labels_N)
    indices = [
        i for label in np.unique(labels_N) for i in _first_images(labels_N, label, skip, per_class)
    ]
    return np.asarray(indices, dtype=int)


def training_activations(
    text: Responses, image: Responses, on: str = "both", captions: Responses | None = None
) -> torch.Tensor:
    """The overlap SAE's training rows, [N, D]: the caption answers (if any) plus both
    modalities' study answers (`on="both"`) or the image answers only (`on="image"`)."""
    if on not in ("both", "image"):
        raise ValueError(f"sae_train_on must be 'both' or 'image', got {on!r}.")
    parts = [r for r in (captions, text if on == "both" else None, image) if r is not None]
    layers = {r.layer for r in parts}
    if len(layers) != 1:
        raise ValueError(f"The answers come from blocks {sorted(layers)}; one SAE needs one layer.")
    return torch.cat([r.stacked() for r in parts if r.acts])


# ----------------------------------------------------------------------- evolution table


def evolution_table(
    evolution: Evolution,
    labels_N: Sequence[int],
    class_names: Sequence[str],
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """One row per image: its class, active patches early / late / both, persistence, new.

    `features` (early, late), as returned by `patch_maps`, adds the feature each map shows."""
    early_N = evolution.early_BHW.flatten(1).sum(1)
    late_N = evolution.late_BHW.flatten(1).sum(1)
    frame = pd.DataFrame(
        {
            "class": [class_names[int(c)] for c in labels_N],
            "early": early_N.numpy(),
            "late": late_N.numpy(),
            "both": (evolution.early_BHW & evolution.late_BHW).flatten(1).sum(1).numpy(),
            "persistence": evolution.persistence_B.numpy(),
            "new": evolution.new_B.numpy(),
        }
    )
    if features is not None:
        frame.insert(1, "early_feature", features[0].numpy())
        frame.insert(2, "late_feature", features[1].numpy())
    return frame


# ---------------------------------------------------------------------------- figures


def plot_overlap_heatmap(frame: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Draw `overlap_heatmap_frame` (Fig. 6): grey = one modality only, red = shared."""
    # Wide enough to read a few dozen features, capped so a 1% set of a big SAE still fits a page.
    width = min(14, max(6, 0.25 * frame.shape[1]))
    ax = ax or plt.subplots(figsize=(width, 0.35 * len(frame) + 1))[1]
    labels = [f"{name} · {modality}" for name, modality in frame.index]
    sns.heatmap(
        frame.set_axis(labels, axis=0),
        cmap=ListedColormap(["white", "0.6", "tab:red"]),
        vmin=0,
        vmax=2,
        cbar=False,
        linewidths=0.3 if frame.shape[1] <= 80 else 0,
        linecolor="0.9",
        ax=ax,
    )
    ax.set_xlabel("SAE feature")
    ax.set_ylabel("")
    ax.set_title("Top SAE features per class: text vs image (red = shared)")
    return ax


def plot_jaccard_matrix(
    j_CC: np.ndarray, class_names: Sequence[str], ax: Axes | None = None
) -> Axes:
    """Jaccard of every (text class, image class) pair; a bright diagonal means overlap beyond
    what mismatched classes share."""
    ax = ax or plt.subplots(figsize=(1 + 0.4 * len(class_names), 0.4 * len(class_names) + 1))[1]
    sns.heatmap(
        pd.DataFrame(j_CC, index=list(class_names), columns=list(class_names)),
        cmap="viridis",
        vmin=0,
        vmax=max(float(np.max(j_CC)), 0.01),  # an all-zero matrix still gets a 0-based scale
        square=True,
        ax=ax,
    )
    ax.set_ylabel("text prompt class")
    ax.set_xlabel("image class")
    return ax


def plot_permutation_null(baseline: PermutationBaseline, ax: Axes | None = None) -> Axes:
    """The chance distribution of mean Jaccard (mismatched class pairings) and the matched value."""
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    sns.histplot(baseline.null, bins=30, color="0.6", ax=ax, label="mismatched pairings")
    ax.axvline(baseline.observed, color="tab:red", lw=2, label="matched classes")
    ax.axvline(baseline.expected_chance, color="k", ls="--", lw=1, label="exact chance level")
    ax.set_xlabel("mean Jaccard over classes (text set vs image set)")
    ax.set_title(f"Permutation baseline, p = {baseline.p_value:.3g}")
    ax.legend(fontsize=8)
    return ax


def plot_evolution(
    image: Image.Image,
    evolution: Evolution,
    index: int = 0,
    names: tuple[str, str] = ("projector", "layer 6"),
    axes: Sequence[Axes] | None = None,
) -> Sequence[Axes]:
    """Fig. 7 for one image: active patches early, late, and their overlay on the image.

    Drawn with matplotlib's imshow because seaborn has no image-overlay plot. Pass the image
    as the grid sees it (`square_crop`).
    """
    axes = axes if axes is not None else plt.subplots(1, 3, figsize=(9, 3.2))[1]
    width, height = image.size
    clear = (0, 0, 0, 0)
    panels = [
        (evolution.early_BHW[index].int(), [clear, "tab:blue"], names[0]),
        (evolution.late_BHW[index].int(), [clear, "tab:orange"], names[1]),
        (
            evolution.overlay_BHW[index],
            [clear, "tab:blue", "tab:orange", "tab:purple"],
            "overlay (purple = both)",
        ),
    ]
    for ax, (values_HW, colors, title) in zip(axes, panels, strict=True):
        ax.imshow(image, extent=(0, width, height, 0))  # same extent as the grid: cells align
        ax.imshow(
            values_HW.numpy(),
            cmap=ListedColormap(colors),
            vmin=0,
            vmax=len(colors) - 1,
            alpha=0.6,
            extent=(0, width, height, 0),
            interpolation="nearest",
        )
        ax.set_title(title)
        ax.axis("off")
    return axes


def plot_class_view(
    c: int,
    class_names: Sequence[str],
    text_CS: np.ndarray,
    image_CS: np.ndarray,
    images: Sequence[Image.Image],
    evolution: Evolution,
    indices: Sequence[int],
    names: tuple[str, str] = ("projector", "layer 6"),
) -> Figure:
    """One class at a glance: its text and image top sets (a Fig. 6 strip) above the Fig. 7
    panels of its images `indices` (positions in `images` and `evolution`)."""
    strip, row = 2.4, 3.0  # inches: the strip needs room for its rotated feature labels
    fig = plt.figure(figsize=(9, strip + row * len(indices)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[strip, row * len(indices)])
    ax = top.subplots()
    frame = overlap_heatmap_frame(text_CS[[c]], image_CS[[c]], [class_names[c]])
    if frame.shape[1]:
        plot_overlap_heatmap(frame, ax=ax)
        ax.set_yticklabels(["text", "image"], rotation=0)  # the title names the class
    else:
        ax.text(0.5, 0.5, "no active features in either modality", ha="center", va="center")
        ax.axis("off")
    shared = int(overlap_size(text_CS[[c]], image_CS[[c]])[0])
    ax.set_title(
        f"{class_names[c]}: {shared} shared top features, "
        f"Jaccard {jaccard(text_CS[[c]], image_CS[[c]])[0]:.2f}"
    )
    axes = np.atleast_2d(bottom.subplots(len(indices), 3))
    for row, index in zip(axes, indices, strict=True):
        plot_evolution(images[index], evolution, index, names, axes=row)
    return fig


def plot_chance(
    j_CC: np.ndarray, class_names: Sequence[str], baseline: PermutationBaseline
) -> Figure:
    """The overlap as a chance test: the Jaccard of every (text class, image class) pair beside
    the null distribution of mean Jaccard under mismatched pairings."""
    fig, (ax_matrix, ax_null) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[1, 1.2])
    plot_jaccard_matrix(j_CC, class_names, ax=ax_matrix)
    plot_permutation_null(baseline, ax=ax_null)
    return fig


def plot_evolutions(
    images: Sequence[Image.Image],
    evolution: Evolution,
    indices: Sequence[int],
    titles: Sequence[str],
    names: tuple[str, str],
) -> Figure:
    """Fig. 7 for several images, one row each (`plot_evolution`), titled ``titles``."""
    fig, axes = plt.subplots(len(indices), 3, figsize=(9, 3.1 * len(indices)), squeeze=False)
    for row, index, title in zip(axes, indices, titles, strict=True):
        plot_evolution(images[index], evolution, index, names, axes=row)
        row[0].set_title(title)
    return fig
