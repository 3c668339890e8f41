"""Chapter 08, choosing an SAE: one report card per architecture on the same layer.

The chapter asks which SAE to use for a vision model's CLS token, measuring more than MSE and L0
(`saekit.analysis.report_card`). Its SAEs are the OOD chapter's (ReLU, TopK and Gated at one
grid point, the same requests, so they come from the SAE cache when chapter 02 has run), the
layer sweep's SAE at that layer (chapter 01's request), and BatchTopK, JumpReLU and Matryoshka
SAEs trained the same way; each has a twin trained with another seed for stability. The
downstream head is the model's own classifier where it has one (the toy ViT) and otherwise a
linear probe on the last layer's CLS token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import transformers
from sae_lens import SAE

from saekit.activations import Store
from saekit.analysis.probes import train_probe
from saekit.analysis.report_card import ReportCard, cards_table, neuron_probing, report_card
from saekit.models import Encoder
from saekit.plan import SAENeed, StoreNeed
from saekit.sae import SAESpec, get_recipe, train_or_load
from saekit.sae.architectures import K_ARCHS
from saekit.studies.layer_sweep import LayerSweepSettings, train_layer_saes
from saekit.studies.ood import OODSettings
from saekit.studies.settings import StudySettings

#: Which way each report-card column is better, for the verdict.
HIGHER_IS_BETTER = {
    "explained variance": True,
    "dead": False,
    "acc recovered": True,
    "KL recovered": True,
    "stability (mean cos)": True,
    "mean absorption": False,
}


@dataclasses.dataclass(frozen=True)
class ChoosingSettings(StudySettings):
    """Chapter 08's parameters (mini defaults; `PAPER` holds the paper profile's)."""

    encoder: str = "toyvit"
    """Encoder family whose last-layer CLS token every SAE reads (paper: DINOv2 ViT-g/14)."""
    archs: tuple[str, ...] = ("relu", "topk", "gated", "batchtopk", "jumprelu", "matryoshka")
    """Architectures to compare (relu, topk, gated are chapter 02's; the others train here)."""
    lam: float = 0.5
    """λ of the λ-sparsity SAEs (relu, gated; chapter 02's Table 1 point)."""
    k: int = 16
    """k of the k-sparsity SAEs (topk, batchtopk, matryoshka)."""
    jumprelu_lam: float = 0.05
    """λ of the JumpReLU SAE: it weighs L0 itself, so its scale differs from the L1 SAEs'."""
    expansion: int = 8
    """SAE width ÷ model width."""
    include_layer_sweep: bool = True
    """Also grade chapter 01's SAE at this layer (ReLU, recipe olson2025, its λ and epochs)."""
    ks: tuple[int, ...] = (1, 5, 20)
    """Feature counts for sparse probing."""
    max_images: int = 256
    """Validation images for downstream fidelity (three forward passes each)."""
    seed: int = 0
    """Seeds the SAEs (their twins use seed + 1), the batch order and the probes."""
    device: str | None = None
    """Where SAEs train; None: "cuda" when available, else "cpu"."""
    imagenet_train: str | None = None
    """Paper profile: ImageNet-1k train folder (one sub-folder per wnid)."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k val folder."""

    PAPER: ClassVar[dict[str, Any]] = {"encoder": "dinov2", "k": 64, "jumprelu_lam": 0.5}

    @property
    def ood(self) -> OODSettings:
        """Chapter 02's settings for this profile: its recipe, so equal requests share SAEs."""
        return OODSettings.for_profile(self.profile, encoders=(self.encoder,), seed=self.seed)

    @property
    def layer_sweep(self) -> LayerSweepSettings:
        """Chapter 01's settings for this profile."""
        return LayerSweepSettings.for_profile(self.profile, encoder=self.encoder, seed=self.seed)

    def specs(self, layer: int | None, seed: int) -> list[SAESpec]:
        """One SAE per architecture at this chapter's grid point, on ``layer`` (None: the
        store's only layer)."""
        recipe = self.ood.recipe
        specs = []
        for arch in self.archs:
            if arch in K_ARCHS:
                sparsity: dict[str, float] = {"k": self.k}
            else:
                sparsity = {"l1": self.jumprelu_lam if arch == "jumprelu" else self.lam}
            specs.append(SAESpec(arch=arch, layer=layer, expansion=self.expansion,
                                 recipe=recipe, seed=seed, **sparsity))  # fmt: skip
        return specs

    def resource_needs(self) -> dict[str, list]:
        """What the chapter reads and trains, for `saekit.book.Chapter.plan`."""
        store = StoreNeed(self.encoder, "train", layers=(-1,))
        stores = [store, StoreNeed(self.encoder, "val", layers=(-1,))]
        saes = [SAENeed(tuple(self.specs(None, seed)), on=store, epochs=self.ood.epochs)
                for seed in (self.seed, self.seed + 1)]  # fmt: skip
        if self.include_layer_sweep:
            stores.append(StoreNeed(self.encoder, "train", layers="all"))
        return {"stores": stores, "saes": saes}


def train_saes(
    settings: ChoosingSettings,
    store: Store,
    sweep_store: Store | None,
    root: str | Path,
) -> tuple[dict[str, SAE], dict[str, SAE]]:
    """(SAEs by architecture, their twins): one pass for all of them (`train_or_load`); with
    ``sweep_store`` (chapter 01's all-layer store) also chapter 01's SAE at this layer."""
    (layer,) = store.layers[-1:]
    saes, twins = {}, {}
    for seed, out in ((settings.seed, saes), (settings.seed + 1, twins)):
        specs = settings.specs(layer, seed)
        trained = train_or_load(specs, store, root=root, seed=settings.seed,
                                device=settings.device)  # fmt: skip
        out.update(dict(zip(settings.archs, trained.values(), strict=True)))
    if settings.include_layer_sweep and sweep_store is not None:
        sweep = settings.layer_sweep
        for seed, out in ((settings.seed, saes), (settings.seed + 1, twins)):
            (sae,) = train_layer_saes(
                sweep_store, root, lam=sweep.lam, epochs=sweep.epochs, layers=[layer],
                expansion=sweep.expansion, seed=seed, device=settings.device,
            ).values()  # fmt: skip
            out["relu (ch. 01)"] = sae
    return saes, twins


def model_head(encoder: Encoder) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's own classifier on its last layer's CLS token (final layer norm, then the
    classification head), when its checkpoint holds one; else None."""
    config = encoder.model.config
    if encoder.family == "resnet" or not getattr(config, "id2label", None):
        return None
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForImageClassification") for name in architectures):
        return None
    classifier = transformers.AutoModelForImageClassification.from_pretrained(
        config._name_or_path or encoder.model_id
    ).eval()
    norm = getattr(getattr(classifier, classifier.base_model_prefix), "layernorm", None)

    @torch.no_grad()
    def head(cls_BD: torch.Tensor) -> torch.Tensor:
        x = cls_BD.to(classifier.dtype)
        return classifier.classifier(norm(x) if norm is not None else x)

    return head


def probe_head(train: Store, layer: int, device: str = "cpu") -> Callable[[torch.Tensor], Any]:
    """A linear probe on ``layer``'s CLS tokens of the training store: the head for encoders
    without a classifier of their own."""
    probe = train_probe(
        np.asarray(train.cls(layer), np.float32), np.asarray(train.labels), device=device
    )
    return lambda cls_BD: probe(cls_BD.float().to(probe.linear.weight.device))


def grade(
    saes: Mapping[str, SAE],
    twins: Mapping[str, SAE],
    val: Store,
    settings: ChoosingSettings,
    *,
    train: Store,
    encoder: Encoder | None = None,
    dataset: Any = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[ReportCard]:
    """A report card per SAE on the validation store (sparse probes fit on the training store,
    the neuron row computed once)."""
    (layer,) = val.layers[-1:]
    neurons = neuron_probing(val, layer, train_store=train, ks=settings.ks, seed=settings.seed)
    return [
        report_card(
            sae,
            val,
            layer,
            train_store=train,
            twin=twins.get(name),
            encoder=encoder,
            dataset=dataset,
            head=head,
            ks=settings.ks,
            neurons=neurons,
            max_images=settings.max_images,
            name=name,
            seed=settings.seed,
        )  # fmt: skip
        for name, sae in saes.items()
    ]


def verdict(table: pd.DataFrame) -> pd.DataFrame:
    """For each measure, the SAE that does best and its value (ties: the first in the table)."""
    rows = {}
    for column, higher in HIGHER_IS_BETTER.items():
        if column not in table or table[column].isna().all():
            continue
        values = table[column].astype(float)
        best = values.idxmax() if higher else values.idxmin()
        rows[column] = {"best": best, "value": values[best],
                        "direction": "higher" if higher else "lower"}  # fmt: skip
    probes = [c for c in table.columns if c.startswith("sparse probe k=")]
    if probes:
        column = probes[0]
        values = table[column].astype(float)
        rows[column] = {"best": values.idxmax(), "value": values.max(), "direction": "higher"}
    return pd.DataFrame(rows).T


def verdict_text(table: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """The verdict in sentences, every number from the tables."""
    lines = []
    for measure, row in verdicts.iterrows():
        lines.append(f"- **{measure}** ({row['direction']} is better): {row['best']} "
                     f"({float(row['value']):.3g})")  # fmt: skip
    neuron_cols = [c for c in table.columns if c.startswith("neuron probe k=")]
    if neuron_cols:
        col = neuron_cols[0]
        sae_col = col.replace("neuron", "sparse")
        wins = int((table[sae_col] > table[col]).sum())
        lines.append(f"- At {col.split()[-1]}, {wins} of {len(table)} SAEs' features make better "
                     f"single-class probes than the model's neurons ({table[col].iloc[0]:.3f}).")  # fmt: skip
    return "\n".join(lines)


def summary_table(cards: list[ReportCard]) -> pd.DataFrame:
    """The cards side by side, the columns a reader compares first."""
    table = cards_table(cards)
    first = [c for c in ("NMSE", "L0", "dead", "acc recovered", "KL recovered",
                         "stability (mean cos)", "mean absorption") if c in table]  # fmt: skip
    return table[first + [c for c in table.columns if c not in first]]


def recipe_note(settings: ChoosingSettings) -> str:
    """Which recipe the SAEs train with, from the settings."""
    recipe = get_recipe(settings.ood.recipe)
    return (f"Every SAE trains with recipe `{recipe.name}` for {recipe.epochs} epochs at learning "
            f"rate {recipe.lr:g}, expansion {settings.expansion}, λ = {settings.lam:g} (JumpReLU "
            f"λ = {settings.jumprelu_lam:g}) or k = {settings.k}.")  # fmt: skip
