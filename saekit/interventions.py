"""Causal edits through an SAE, with the error term and controls (paper 002 §3.3).

The six steps, for activations ``x`` (``[B, D]`` CLS tokens or ``[B, P, D]`` patch tokens):

1. encode, ``z = SAE.encode(x)``;
2. reconstruct, ``x̂ = SAE.decode(z)``, and keep the error ``e = x − x̂``;
3. change chosen features in chosen tokens: suppress to 0, scale, or set a value (`Edit`);
4. decode the edited codes, ``x̂' = SAE.decode(z')``;
5. add the error back, ``x' = x̂' + e``;
6. run the frozen task head on ``x`` and ``x'`` and compare.

Step 5 is computed as ``x' = x + (x̂' − x̂)``, the same quantity, because then an edit that
changes nothing returns ``x`` bit for bit (``x̂ + (x − x̂)`` need not round back to ``x``).

An effect only means something next to what a meaningless edit of the same size does, so
`compare` runs two controls as saev does: the same change in norm along a random direction, and
the same edit applied to a random feature (drawn among the features active in the edited tokens:
suppressing a feature that is off changes nothing and would make a vacuous control).

The head is any callable from activations to outputs: a linear probe on CLS, a
`saekit.probes.SegmentationHead` on patches, or, when the SAE reads an earlier layer than
the head, `continue_forward`, which re-runs the encoder from that layer with the edited tokens
(`compare_in_encoder` does both from images).

The rest serves the book's study of these edits: which features to edit (`tie_scores` for the
patches of a segmentation class, `class_contrast` for a synset's classes), segmentation masks as
the encoder saw the image (`load_masks`, `patch_coverage`), effect tables next to their controls
(`classification_table`, `suppression_curve`, `edit_part` and `part_effects`) and figures of
original and edited predictions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from saekit.probes import mean_iou
from saekit.sae.architectures import check_width
from saekit.toyworld.export import masks_root

EDIT_MODES = ("suppress", "scale", "set")


@dataclass(frozen=True)
class Edit:
    """Which SAE features to change, in which tokens, and how (step 3)."""

    features: tuple[int, ...]
    """SAE features to change."""
    patches: Any = None
    """Tokens to edit in ``[B, P, D]`` input: patch indices (in every image), a bool mask
    ``[P]`` or ``[B, P]``, or None for all; must be None for ``[B, D]`` input."""
    mode: str = "suppress"
    """'suppress' (set to 0), 'scale' (multiply by ``value``) or 'set' (set to ``value``)."""
    value: float = 0.0
    """The factor for 'scale' or the activation for 'set'; 'suppress' ignores it."""

    def __post_init__(self) -> None:
        features = (self.features,) if isinstance(self.features, int) else self.features
        object.__setattr__(self, "features", tuple(int(f) for f in features))
        if self.mode not in EDIT_MODES:
            raise ValueError(f"Edit.mode must be one of {EDIT_MODES}, not {self.mode!r}")
        if not self.features:
            raise ValueError("an Edit needs at least one feature")


@dataclass
class Intervention:
    """The edited activations and what the SAE saw on the way (steps 1-5)."""

    edited: torch.Tensor
    """x' = x̂' + e, shaped like the input."""
    codes: torch.Tensor
    """z, the SAE codes of the input."""
    edited_codes: torch.Tensor
    """z', the codes after the edit."""
    tokens: torch.Tensor
    """Bool mask of the edited tokens, ``[B]`` or ``[B, P]``."""
    delta: torch.Tensor
    """x̂' − x̂ = x' − x: the change the edit made (the error term cancels)."""


def token_mask(patches: Any, shape: torch.Size) -> torch.Tensor:
    """Bool mask of the tokens an `Edit` touches, ``[B]`` for ``[B, D]`` input or ``[B, P]``."""
    if len(shape) == 2:
        if patches is not None:
            raise ValueError(
                "Edit.patches selects patch tokens, but the activations are [B, D] (one token "
                "per image); leave patches=None or pass [B, P, D] patch activations"
            )
        return torch.ones(shape[0], dtype=torch.bool)
    if len(shape) != 3:
        raise ValueError(f"activations must be [B, D] or [B, P, D], got shape {tuple(shape)}")
    batch, n_patches = shape[0], shape[1]
    if patches is None:
        return torch.ones(batch, n_patches, dtype=torch.bool)
    given = torch.as_tensor(np.asarray(patches))
    if given.dtype == torch.bool:
        if given.shape == (n_patches,):
            return given.expand(batch, n_patches).clone()
        if given.shape == (batch, n_patches):
            return given.clone()
        raise ValueError(
            f"a patch mask must be [P] = [{n_patches}] or [B, P] = [{batch}, {n_patches}], got "
            f"{tuple(given.shape)}"
        )
    index = given.long().reshape(-1)
    if index.numel() and (index.min() < -n_patches or index.max() >= n_patches):
        raise IndexError(f"patch indices must be in [0, {n_patches}); got {index.tolist()}")
    mask = torch.zeros(batch, n_patches, dtype=torch.bool)
    mask[:, index] = True
    return mask


def edit_codes(codes: torch.Tensor, edit: Edit, tokens: torch.Tensor) -> torch.Tensor:
    """Step 3: z' from z; only the chosen features of the chosen tokens change."""
    features = list(edit.features)
    chosen = codes[..., features]
    if edit.mode == "suppress":
        changed = torch.zeros_like(chosen)
    elif edit.mode == "scale":
        changed = chosen * edit.value
    else:
        changed = torch.full_like(chosen, edit.value)
    edited = codes.clone()
    edited[..., features] = torch.where(tokens[..., None], changed, chosen)
    return edited


@torch.no_grad()
def intervene(acts: torch.Tensor, sae: Any, edit: Edit) -> Intervention:
    """Steps 1-5: edited activations ``x' = x + (SAE.decode(z') − SAE.decode(z))``."""
    check_width(sae, acts.shape[-1])
    if max(edit.features) >= sae.cfg.d_sae or min(edit.features) < 0:
        raise IndexError(f"features {edit.features} are outside the SAE's 0..{sae.cfg.d_sae - 1}")
    x = acts.to(sae.W_dec.device, sae.W_dec.dtype)
    tokens = token_mask(edit.patches, acts.shape).to(x.device)
    codes = sae.encode(x)
    edited_codes = edit_codes(codes, edit, tokens)
    delta = sae.decode(edited_codes) - sae.decode(codes)
    edited = (x + delta).to(acts.device, acts.dtype)
    return Intervention(edited, codes, edited_codes, tokens, delta)


def random_direction(acts: torch.Tensor, delta: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Control: ``x + ‖δ_t‖ r`` with one random unit direction ``r``, so every token moves as
    far as the SAE edit moved it, but along a direction no feature chose."""
    generator = torch.Generator().manual_seed(seed)
    direction_D = torch.randn(acts.shape[-1], generator=generator, dtype=torch.float64)
    direction_D = (direction_D / direction_D.norm()).to(acts.device, delta.dtype)
    size = delta.norm(dim=-1, keepdim=True).to(acts.device)
    return (acts.to(delta.dtype) + size * direction_D).to(acts.dtype)


def random_features(
    codes: torch.Tensor, tokens: torch.Tensor, exclude: Sequence[int], n: int, seed: int = 0
) -> tuple[int, ...]:
    """Control features: ``n`` random features other than ``exclude`` that fire in the edited
    tokens (any features when too few fire)."""
    d_sae = codes.shape[-1]
    active = (codes[tokens] > 0).any(dim=0).cpu().numpy()
    active[list(exclude)] = False
    pool = np.flatnonzero(active)
    if len(pool) < n:
        pool = np.setdiff1d(np.arange(d_sae), np.asarray(exclude, dtype=np.int64))
    rng = np.random.default_rng(seed)
    return tuple(int(f) for f in rng.choice(pool, size=min(n, len(pool)), replace=False))


@dataclass
class Comparison:
    """Head outputs for the original activations, the edit and its controls (step 6)."""

    outputs: dict[str, torch.Tensor]
    """'original', 'edited', 'random direction', 'random feature' -> head output."""
    intervention: Intervention
    """The SAE edit itself."""
    control_features: tuple[int, ...]
    """The features the random-feature control edited."""

    def change(self, condition: str) -> torch.Tensor:
        """Output change of a condition, ``output − original``."""
        return self.outputs[condition] - self.outputs["original"]

    def summary(self, region: torch.Tensor | None = None, class_dim: int = 1) -> pd.DataFrame:
        """Per condition: mean absolute output change (inside and outside ``region``, a bool
        mask over the output with the class axis removed) and the fraction of predictions
        (argmax over ``class_dim``) that changed."""
        original = self.outputs["original"]
        before = original.argmax(class_dim)
        rows = {}
        for condition in self.outputs:
            if condition == "original":
                continue
            size = self.change(condition).abs().mean(class_dim)
            flips = (self.outputs[condition].argmax(class_dim) != before).float()
            row = {"mean |Δ|": float(size.mean()), "changed predictions": float(flips.mean())}
            if region is not None:
                inside = region.to(torch.bool)
                row["mean |Δ| in region"] = float(size[inside].mean())
                row["mean |Δ| outside"] = float(size[~inside].mean()) if (~inside).any() else 0.0
                row["changed in region"] = float(flips[inside].mean())
            rows[condition] = row
        return pd.DataFrame.from_dict(rows, orient="index")

    def _pixel_predictions(self, masks_BHW: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The masks as a tensor and, per condition, the predicted class of every pixel:
        patch-level logits ``[B, C, h, w]`` bilinearly upsampled to the masks' size, as paper
        002 §11 scores them."""
        masks = torch.as_tensor(np.asarray(masks_BHW)).long()
        predictions = {}
        for condition, logits_BChw in self.outputs.items():
            if logits_BChw.ndim != 4:
                raise ValueError("mIoU needs segmentation logits [B, C, h, w] from the head")
            upsampled = F.interpolate(
                logits_BChw, size=tuple(masks.shape[1:]), mode="bilinear", align_corners=False
            )
            predictions[condition] = upsampled.argmax(1)
        return masks, predictions

    def miou(self, masks_BHW: Any, n_classes: int, ignore_index: int = 255) -> dict[str, float]:
        """Per condition: mIoU against ``masks_BHW`` (pixels marked ``ignore_index`` skipped)."""
        masks, predictions = self._pixel_predictions(masks_BHW)
        return {
            condition: mean_iou(pred, masks, n_classes, ignore_index)[0]
            for condition, pred in predictions.items()
        }

    def iou(
        self, masks_BHW: Any, class_names: Sequence[str], ignore_index: int = 255
    ) -> pd.DataFrame:
        """Per condition (rows) and class (columns): IoU against ``masks_BHW``; NaN for a class
        in neither the prediction nor the masks."""
        masks, predictions = self._pixel_predictions(masks_BHW)
        rows = {
            condition: mean_iou(pred, masks, len(class_names), ignore_index)[1]
            for condition, pred in predictions.items()
        }
        return pd.DataFrame.from_dict(rows, orient="index", columns=list(class_names))


@torch.no_grad()
def compare(
    acts: torch.Tensor,
    sae: Any,
    edit: Edit,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    seed: int = 0,
) -> Comparison:
    """Step 6 with controls: the head's output on the original activations, on the SAE edit,
    on the same change in norm along a random direction, and on the same edit of random
    features (as many as the edit names)."""
    result = intervene(acts, sae, edit)
    control = Edit(
        random_features(result.codes, result.tokens, edit.features, len(edit.features), seed),
        edit.patches,
        edit.mode,
        edit.value,
    )
    outputs = {
        "original": head(acts),
        "edited": head(result.edited),
        "random direction": head(random_direction(acts, result.delta, seed)),
        "random feature": head(intervene(acts, sae, control).edited),
    }
    return Comparison(outputs, result, control.features)


# --------------------------------------------------------------------------- deeper heads


def _blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The model's list of transformer blocks (its name differs between architectures)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"found no list of {n_layers} blocks in {type(model).__name__}")


@contextlib.contextmanager
def replace_block_output(
    encoder: Any, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While active, block ``layer``'s output tokens ``[B, T, D]`` are passed through
    ``replace`` before the next block reads them."""
    block = _blocks(encoder.model, encoder.n_layers)[layer]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def continue_forward(
    encoder: Any,
    pixel_values: torch.Tensor,
    layer: int,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    readout_layer: int = -1,
    tokens: str = "cls",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A head for activations of an earlier layer: ``f(patches_BPD)`` writes the (edited) patch
    tokens into block ``layer``'s output, runs the rest of the encoder on ``pixel_values`` and
    applies ``head`` to ``readout_layer``'s CLS (``tokens='cls'``) or patch tokens.

    Paper 002 §5.1 edits layer 11 of 12 and reads the class off the last layer's CLS probe.
    """
    if encoder.family == "resnet":
        raise ValueError("continue_forward edits transformer tokens; a CNN has none")
    (readout,) = encoder.resolve_layers([readout_layer])
    (layer,) = encoder.resolve_layers([layer])
    if readout < layer:
        raise ValueError(f"the head reads layer {readout}, before the edited layer {layer}")
    first_patch = 1 + encoder.n_registers

    def run(patches_BPD: torch.Tensor) -> torch.Tensor:
        def swap(tokens_BTD: torch.Tensor) -> torch.Tensor:
            if tokens_BTD.shape[1] - first_patch != patches_BPD.shape[1]:
                raise ValueError(
                    f"{patches_BPD.shape[1]} patches given, the layer has "
                    f"{tokens_BTD.shape[1] - first_patch}"
                )
            patch_part = patches_BPD.to(tokens_BTD.dtype).to(tokens_BTD.device)
            return torch.cat([tokens_BTD[:, :first_patch], patch_part], dim=1)

        with torch.no_grad(), replace_block_output(encoder, layer, swap):
            out = encoder.forward_pixels(pixel_values, layers=[readout])
        return head(out.cls[readout] if tokens == "cls" else out.patches[readout])

    return run


@torch.no_grad()
def compare_in_encoder(
    encoder: Any,
    images: Sequence[Image.Image] | torch.Tensor,
    sae: Any,
    layer: int,
    edit: Edit,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    readout_layer: int = -1,
    tokens: str = "cls",
    seed: int = 0,
) -> Comparison:
    """`compare` for an SAE on the patch tokens of ``layer`` and a head on a later layer
    (paper 002 §5.1): the images' patches are edited, the rest of the encoder runs on them
    (`continue_forward`) and ``head`` reads ``readout_layer``'s CLS or patch tokens.

    ``images`` are PIL images or preprocessed ``pixel_values``.
    """
    (layer,) = encoder.resolve_layers([layer])
    pixels = images if torch.is_tensor(images) else encoder.preprocess(images)
    patches_BPD = encoder.forward_pixels(pixels, layers=[layer]).patches[layer]
    run = continue_forward(encoder, pixels, layer, head, readout_layer=readout_layer, tokens=tokens)
    return compare(patches_BPD, sae, edit, run, seed=seed)


# --------------------------------------------------------------------------- which features


@torch.no_grad()
def tie_scores(
    sae: Any, acts: Any, inside: Any, *, batch_size: int = 64, progress: bool = False
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
    check_width(sae, acts.shape[-1])
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    sum_in_S = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_all_S = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    starts = range(0, len(acts), batch_size)
    for start in tqdm(starts, desc="feature ties", disable=not progress):
        x = torch.from_numpy(np.array(acts[start : start + batch_size], np.float32))
        codes = sae.encode(x.to(device, dtype)).double().cpu()
        mark = torch.as_tensor(inside[start : start + batch_size])
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
    stats: Any, features: Mapping[str, int], groups: Mapping[str, Sequence[int]]
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


# --------------------------------------------------------------------------- masks


def model_view_mask(mask_HW: np.ndarray, processor: Any | None = None) -> np.ndarray:
    """A segmentation mask resized and cropped exactly as ``processor`` treats the image
    (nearest neighbour, so labels stay labels), ``uint8 [H', W']``; unchanged without one."""
    mask_HW = np.asarray(mask_HW)
    if processor is None:
        return mask_HW.astype(np.uint8)
    rgb = Image.fromarray(np.repeat(mask_HW.astype(np.uint8)[..., None], 3, axis=-1))
    pixels = processor(
        images=[rgb],
        do_rescale=False,
        do_normalize=False,
        resample=Image.Resampling.NEAREST,
        return_tensors="np",
    )["pixel_values"][0]
    return np.rint(pixels[0]).astype(np.uint8)


MASK_LAYOUT = """Masks sit in a sibling folder with the images' relative paths, as PNG:
    {root}/<class>/<name>.jpg      the image
    {root}_masks/<class>/<name>.png  its mask; pixel value = class index (255 = unlabelled)
(saekit.toyworld.export_imagefolder writes this layout; convert ADE20K the same way)."""


def load_masks(
    store: Any, dataset: Any, processor: Any | None = None, masks_dir: str | Path | None = None
) -> np.ndarray:
    """The segmentation mask of every store row, as the encoder saw the image
    (`model_view_mask`), ``uint8 [N, H, W]``. Masks are read from ``masks_dir`` (default: the
    image folder's sibling ``<root>_masks``) under each image's relative path, as PNG."""
    root = Path(masks_dir) if masks_dir is not None else masks_root(dataset.root)
    masks = []
    for row, image_id in zip(store.rows, store.image_ids, strict=True):
        if dataset.image_ids[int(row)] != image_id:
            raise ValueError(
                f"store row of image {image_id!r} does not match the dataset's image {int(row)}"
                f" ({dataset.image_ids[int(row)]!r}): pass the dataset the store was made from"
            )
        path = (root / image_id).with_suffix(".png")
        if not path.is_file():
            raise FileNotFoundError(
                f"No mask {path} for image {image_id!r}.\n"
                + MASK_LAYOUT.format(root=getattr(dataset, "root", "images"))
            )
        masks.append(model_view_mask(np.asarray(Image.open(path)), processor))
    return np.stack(masks)


def patch_coverage(
    masks_NHW: Any, grid: tuple[int, int], classes: int | Sequence[int] | None = None
) -> np.ndarray:
    """Fraction of each patch's pixels whose mask value is in ``classes`` (None: any value but
    0, i.e. the object), ``[N, h, w]``; the mask must tile the patch grid exactly."""
    masks = np.asarray(masks_NHW)
    n, height, width = masks.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"masks of {height}x{width} pixels do not tile a {h}x{w} patch grid")
    if classes is None:
        hit = masks != 0
    else:
        hit = np.isin(masks, np.atleast_1d(np.asarray(classes)))
    return hit.reshape(n, h, height // h, w, width // w).mean(axis=(2, 4))


# --------------------------------------------------------------------------- effects


def classification_table(
    comparison: Comparison, labels_B: Any, group: Sequence[int] | None = None
) -> pd.DataFrame:
    """Per condition of a classification `Comparison` whose outputs are class logits
    ``[B, C]``: the mean probability of each image's true class, of the classes in ``group``
    taken together (e.g. a synset's leaves), top-1 accuracy and the share of changed
    predictions."""
    labels = torch.as_tensor(np.asarray(labels_B)).long()
    before = comparison.outputs["original"].argmax(-1)
    rows = {}
    for condition, logits_BC in comparison.outputs.items():
        if logits_BC.ndim != 2:
            raise ValueError("classification_table needs class logits [B, C] from the head")
        probs_BC = logits_BC.float().softmax(-1)
        row = {"p(true class)": float(probs_BC[torch.arange(len(labels)), labels].mean())}
        if group is not None:
            row["p(group)"] = float(probs_BC[:, list(group)].sum(-1).mean())
        row["accuracy"] = float((probs_BC.argmax(-1) == labels).float().mean())
        row["changed predictions"] = float((probs_BC.argmax(-1) != before).float().mean())
        rows[condition] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def suppression_curve(
    encoder: Any,
    images: Sequence[Image.Image] | torch.Tensor,
    sae: Any,
    layer: int,
    ranked_features: Sequence[int],
    head: Callable[[torch.Tensor], torch.Tensor],
    labels_B: Any,
    group: Sequence[int],
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """`classification_table` after suppressing the first 1, 2, ... of ``ranked_features`` in
    every patch of ``layer``, with the controls of the same size: a dose-response table with
    columns n_features, condition and the table's columns."""
    pixels = images if torch.is_tensor(images) else encoder.preprocess(images)
    tables = []
    for n in tqdm(range(1, len(ranked_features) + 1), desc="suppression curve", leave=False):
        edit = Edit(tuple(ranked_features[:n]))
        comparison = compare_in_encoder(encoder, pixels, sae, layer, edit, head, seed=seed)
        table = classification_table(comparison, labels_B, group)
        tables.append(table.rename_axis("condition").reset_index().assign(n_features=n))
    return pd.concat(tables, ignore_index=True)


@dataclass
class PartEdit:
    """A feature suppressed on the patches a segmentation class covers, with its controls."""

    part: int
    """The class (e.g. a toy-world part) whose patches were edited."""
    feature: int
    """The SAE feature suppressed there."""
    images: np.ndarray
    """Indices of the images that have such patches (the rows of ``comparison``)."""
    region_BP: torch.Tensor
    """Bool, the edited patches of those images."""
    comparison: Comparison
    """Head outputs for the original, the edit and the controls."""


def edit_part(
    patches_NPD: Any,
    masks_NHW: np.ndarray,
    sae: Any,
    head: Any,
    part: int,
    feature: int,
    *,
    min_cover: float = 0.5,
    seed: int = 0,
) -> PartEdit:
    """Suppress ``feature`` on the patches at least ``min_cover`` covered by class ``part``, in
    every image that has such a patch, and run the segmentation head's ``patch_logits``."""
    coverage_Nhw = patch_coverage(masks_NHW, head.grid, part)
    region_NP = torch.as_tensor(coverage_Nhw.reshape(len(coverage_Nhw), -1) >= min_cover)
    images = np.flatnonzero(region_NP.any(1).numpy())
    if not len(images):
        raise ValueError(f"no patch is {min_cover:.0%} covered by class {part}; lower min_cover")
    patches = torch.as_tensor(np.asarray(patches_NPD[images], np.float32))
    region_BP = region_NP[images]
    edit = Edit(feature, patches=region_BP)
    comparison = compare(patches, sae, edit, head.patch_logits, seed=seed)
    return PartEdit(part, feature, images, region_BP, comparison)


def part_effects(
    edits: Sequence[PartEdit], masks_NHW: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """One row per `PartEdit`: the edited patches, the share of them whose predicted class
    changed and the mean logit change there, under the edit and each control, and the part's
    IoU and the mIoU over all classes (pixels of the edited images), for the original and under
    each condition."""
    rows = []
    for e in edits:
        region_Bhw = e.region_BP.reshape(len(e.images), *e.comparison.outputs["original"].shape[2:])
        summary = e.comparison.summary(region_Bhw)
        iou = e.comparison.iou(masks_NHW[e.images], class_names)[class_names[e.part]]
        row = {"part": class_names[e.part], "feature": e.feature, "patches": int(e.region_BP.sum())}
        for condition in summary.index:
            row[f"changed: {condition}"] = summary.loc[condition, "changed in region"]
        for condition in summary.index:
            row[f"|Δ|: {condition}"] = summary.loc[condition, "mean |Δ| in region"]
        for condition, value in iou.items():
            row[f"IoU: {condition}"] = value
        miou = e.comparison.miou(masks_NHW[e.images], len(class_names))
        for condition, value in miou.items():
            row[f"mIoU: {condition}"] = value
        rows.append(row)
    return pd.DataFrame(rows).set_index("part")


# --------------------------------------------------------------------------- figures


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
    (`saekit.exemplars.model_view`, `model_view_mask`), in the order of ``rows``.
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
