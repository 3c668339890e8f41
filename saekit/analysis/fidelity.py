"""Downstream fidelity: splice an SAE's reconstruction back into the encoder and measure what the
rest of the model still does with it (the vision form of SAELens's "loss recovered").

The SAE reads layer ``l``'s CLS token (or its patch tokens). A forward hook on block ``l``
(`saekit.analysis.interventions.replace_block_output`) replaces those tokens by

- nothing (``original``: the model as it is),
- the SAE's reconstruction ``x̂ = decode(encode(x))`` (``reconstructed``), or
- zeros (``zero-ablated``: the floor),

and the encoder runs on to ``readout_layer``, whose CLS token a head (a linear probe trained on
the original model, or the model's own classifier) turns into class logits. Reported: each
variant's top-1 accuracy, the KL divergence of its class distribution from the original's, and

``accuracy recovered = (acc_reconstructed − acc_zero) / (acc_original − acc_zero)``,
``KL recovered = 1 − KL_reconstructed / KL_zero``.

An SAE whose reconstruction is exact leaves every number at the original's (recovered = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from sae_lens import SAE

from saekit.analysis.interventions import replace_block_output
from saekit.models import Encoder
from saekit.sae.codes import check_width, device_dtype

VARIANTS = ("original", "reconstructed", "zero-ablated")


@dataclass(frozen=True)
class Fidelity:
    """Downstream fidelity of one SAE on one set of labelled images."""

    accuracy: dict[str, float]
    """Top-1 accuracy per variant (``VARIANTS``)."""
    kl: dict[str, float]
    """Mean KL(original ‖ variant) of the heads' class distributions, per variant."""

    @property
    def accuracy_recovered(self) -> float:
        """(acc_reconstructed − acc_zero) / (acc_original − acc_zero); NaN when the original is
        no better than zero ablation (nothing to recover)."""
        gap = self.accuracy["original"] - self.accuracy["zero-ablated"]
        if gap <= 0:
            return float("nan")
        return (self.accuracy["reconstructed"] - self.accuracy["zero-ablated"]) / gap

    @property
    def kl_recovered(self) -> float:
        """1 − KL_reconstructed / KL_zero."""
        zero = self.kl["zero-ablated"]
        return float("nan") if zero <= 0 else 1.0 - self.kl["reconstructed"] / zero

    def row(self) -> dict[str, float]:
        """A flat table row."""
        return {
            **{f"acc {name}": value for name, value in self.accuracy.items()},
            "acc recovered": self.accuracy_recovered,
            "KL reconstructed": self.kl["reconstructed"],
            "KL zero-ablated": self.kl["zero-ablated"],
            "KL recovered": self.kl_recovered,
        }


def splice(
    sae: SAE, tokens: str, first_patch: int, variant: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The replacement a block's output ``[B, T, D]`` goes through for ``variant``: the CLS
    token (position 0) or the patch tokens (from ``first_patch`` on) swapped for the SAE's
    reconstruction or for zeros; ``original`` returns the tokens unchanged."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    part = slice(0, 1) if tokens == "cls" else slice(first_patch, None)
    device, dtype = device_dtype(sae)

    def replace(tokens_BTD: torch.Tensor) -> torch.Tensor:
        if variant == "original":
            return tokens_BTD
        x = tokens_BTD[:, part]
        if variant == "zero-ablated":
            new = torch.zeros_like(x)
        else:
            new = sae.decode(sae.encode(x.to(device, dtype))).to(x.dtype).to(x.device)
        out = tokens_BTD.clone()
        out[:, part] = new
        return out

    return replace


@torch.no_grad()
def downstream_fidelity(
    encoder: Encoder,
    images: Sequence[Image.Image] | torch.Tensor,
    labels_B: Sequence[int] | torch.Tensor,
    sae: SAE,
    layer: int,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    tokens: str = "cls",
    readout_layer: int = -1,
    batch_size: int = 64,
) -> Fidelity:
    """Accuracy and KL of ``head`` on ``readout_layer``'s CLS token with the SAE spliced in at
    ``layer`` (see the module docstring). ``images`` are PIL images or ``pixel_values``."""
    if encoder.family == "resnet":
        raise ValueError("splicing replaces transformer tokens; a CNN has none")
    if tokens not in ("cls", "patch"):
        raise ValueError(f"tokens must be 'cls' or 'patch', not {tokens!r}")
    check_width(sae, encoder.widths[encoder.resolve_layers([layer])[0]])
    (layer,) = encoder.resolve_layers([layer])
    (readout,) = encoder.resolve_layers([readout_layer])
    if readout < layer:
        raise ValueError(f"the head reads layer {readout}, before the spliced layer {layer}")
    labels = torch.as_tensor(labels_B).long()
    first_patch = 1 + encoder.n_registers
    logits = {name: [] for name in VARIANTS}
    for start in range(0, len(labels), batch_size):
        batch = images[start : start + batch_size]
        pixels = batch if torch.is_tensor(batch) else encoder.preprocess(batch)
        for name in VARIANTS:
            replace = splice(sae, tokens, first_patch, name)
            spliced: list[torch.Tensor] = []

            def record(tokens_BTD: torch.Tensor, replace=replace, spliced=spliced) -> torch.Tensor:
                spliced.append(replace(tokens_BTD))
                return spliced[-1]

            with replace_block_output(encoder, layer, record):
                out = encoder.forward_pixels(pixels, layers=[readout])
            # The encoder's hidden states record a block's output before forward hooks change
            # it, so a head on the spliced layer itself reads the spliced tokens directly.
            cls_BD = spliced[-1][:, 0] if readout == layer else out.cls[readout]
            logits[name].append(head(cls_BD).float().cpu())
    joined = {name: torch.cat(parts) for name, parts in logits.items()}
    reference = F.log_softmax(joined["original"], dim=-1)
    accuracy, kl = {}, {}
    for name, values in joined.items():
        accuracy[name] = (values.argmax(-1) == labels).float().mean().item()
        log_probs = F.log_softmax(values, dim=-1)
        kl[name] = F.kl_div(log_probs, reference, log_target=True, reduction="batchmean").item()
    return Fidelity(accuracy, kl)
