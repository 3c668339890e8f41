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
`saekit.analysis.probes.SegmentationHead` on patches, or, when the SAE reads an earlier layer than
the head, `continue_forward`, which re-runs the encoder from that layer with the edited tokens
(`compare_in_encoder` does both from images).

`saekit.studies.relevancy_interventions` builds the book's study of these edits on top of this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from sae_lens import SAE
from torch import nn

from saekit.analysis.probes import mean_iou
from saekit.models import Encoder
from saekit.sae.codes import check_width, device_dtype

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
        # np.atleast_1d accepts an int, a numpy integer (from argmax) or any sequence.
        features = np.atleast_1d(np.asarray(self.features)).ravel()
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
    if given.ndim > 1:
        raise ValueError(
            "patch indices apply to every image; pass a bool [B, P] mask to pick patches per image"
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
def intervene(acts: torch.Tensor, sae: SAE, edit: Edit) -> Intervention:
    """Steps 1-5: edited activations ``x' = x + (SAE.decode(z') − SAE.decode(z))``."""
    check_width(sae, acts.shape[-1])
    if max(edit.features) >= sae.cfg.d_sae or min(edit.features) < 0:
        raise IndexError(f"features {edit.features} are outside the SAE's 0..{sae.cfg.d_sae - 1}")
    x = acts.to(*device_dtype(sae))
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
    """Control features: ``n`` random features other than ``exclude`` whose activation mass in
    the edited tokens is like the edited features' (within 0.5x to 2x of their mean mass; the
    closest in log-mass when too few are). Matching the mass keeps the control's edit about as
    large as the real one: any feature that merely fires somewhere in the edited tokens is
    usually so weak there that suppressing it changes nothing, a vacuous control."""
    mass_S = codes[tokens].clamp(min=0).sum(0).double().cpu().numpy()
    exclude = np.asarray(list(exclude), dtype=np.int64)
    target = max(mass_S[exclude].mean(), np.finfo(float).tiny)
    pool = np.setdiff1d(np.arange(len(mass_S)), exclude)
    matched = pool[(mass_S[pool] >= 0.5 * target) & (mass_S[pool] <= 2.0 * target)]
    if len(matched) < n:
        distance = np.abs(np.log(np.maximum(mass_S[pool], np.finfo(float).tiny) / target))
        matched = pool[np.argsort(distance, kind="stable")[: max(n, 1)]]
    rng = np.random.default_rng(seed)
    return tuple(int(f) for f in rng.choice(matched, size=min(n, len(matched)), replace=False))


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

    def _pixel_predictions(
        self, masks_BHW: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    def miou(
        self, masks_BHW: np.ndarray | torch.Tensor, n_classes: int, ignore_index: int = 255
    ) -> dict[str, float]:
        """Per condition: mIoU against ``masks_BHW`` (pixels marked ``ignore_index`` skipped)."""
        masks, predictions = self._pixel_predictions(masks_BHW)
        return {
            condition: mean_iou(pred, masks, n_classes, ignore_index)[0]
            for condition, pred in predictions.items()
        }

    def iou(
        self,
        masks_BHW: np.ndarray | torch.Tensor,
        class_names: Sequence[str],
        ignore_index: int = 255,
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
    sae: SAE,
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
        "original": apply_head(head, acts),
        "edited": apply_head(head, result.edited),
        "random direction": apply_head(head, random_direction(acts, result.delta, seed)),
        "random feature": apply_head(head, intervene(acts, sae, control).edited),
    }
    return Comparison(outputs, result, control.features)


def apply_head(head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``head(x)``, with ``x`` moved to the head's device when the head is a module (or a
    module's method, such as ``SegmentationHead.patch_logits``), and the output returned on the
    CPU: an encoder and SAE on a GPU can then feed a small head trained on the CPU, and every
    condition's outputs compare on one device."""
    owner = getattr(head, "__self__", head)
    if isinstance(owner, nn.Module):
        x = x.to(device_dtype(owner)[0])
    return head(x).cpu()


# --------------------------------------------------------------------------- deeper heads


def _blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The model's list of transformer blocks (its name differs between architectures)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"found no list of {n_layers} blocks in {type(model).__name__}")


@contextlib.contextmanager
def replace_block_output(
    encoder: Encoder, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]
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
    encoder: Encoder,
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
        return apply_head(head, out.cls[readout] if tokens == "cls" else out.patches[readout])

    return run


@torch.no_grad()
def compare_in_encoder(
    encoder: Encoder,
    images: Sequence[Image.Image] | torch.Tensor,
    sae: SAE,
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
