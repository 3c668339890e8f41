"""Chapter 01, the layer sweep (paper 000 Fig. 1, paper 003 Fig. 8): one ReLU SAE and one linear
probe on the CLS token of every layer, and whether the SAE's unsupervised metrics track where the
probe finds class information.

In reading order:

1. `LayerSweepSettings`: the chapter's parameters with their profile defaults.
2. `layer_specs` / `train_layer_saes`: the per-layer SAEs (ReLU, recipe ``olson2025``), trained in
   one pass and kept in the SAE cache. The ontology (03) and relevancy (05) chapters ask for the
   same SAEs with the same function, so a book run trains them once.
3. `lambda_calibration`: the same SAEs at several λ, for the page's "why this λ" paragraph, which
   `calibration_summary` writes from the measured numbers.
4. `sae_metrics` and `layer_probes`: each layer's SAE scored on held-out images, and a linear
   probe per layer on the raw CLS activations (L-BFGS full batch, or Adam streamed from the store
   so a 1.28M-image layer never sits in memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.activations import Store
from saekit.analysis.probes import ProbeConfig, train_probe
from saekit.plan import SAENeed, StoreNeed
from saekit.sae import SAEMetrics, SAESpec, evaluate, get_recipe, train_or_load
from saekit.studies.settings import StudySettings

#: Adam's step size for the paper profile's streamed probes.
ADAM_PROBE_LR = 1e-3


@dataclasses.dataclass(frozen=True)
class LayerSweepSettings(StudySettings):
    """Chapter 01's parameters (mini defaults; `PAPER` holds the paper profile's)."""

    encoder: str = "toyvit"
    """Encoder family: "toyvit" (mini), "dinov2" (paper: facebook/dinov2-giant), or any family
    `saekit.book.PAPER_ENCODERS` / the miniatures know."""
    layers: str = "all"
    """"all", or comma-separated layer indices such as "0,10,20,39"."""
    lam: float = 3.0
    """SAE sparsity coefficient λ (paper 10; the toy ViT's small activations need less, see
    `lambda_sweep`)."""
    expansion: int = 8
    """SAE width as a multiple of the model width."""
    epochs: int = 100
    """Passes over the training store for the SAEs (paper 3; the mini store has 1,800 images)."""
    probe_optimizer: str = "lbfgs"
    """"lbfgs" (full batch; mini) or "adam" (minibatches streamed from the store; paper)."""
    probe_epochs: int = 200
    """The probes' own training length: L-BFGS iterations, or Adam epochs over the training store
    (paper 3, as paper 000's probes use "identical training parameters as the SAEs where
    relevant"). Independent of the SAEs' ``epochs``."""
    lambda_sweep: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    """λ values the chosen λ is compared with (the same SAEs at each, every layer); empty: no
    comparison (paper: λ = 10 as published)."""
    seed: int = 0
    """Seeds the SAEs' initialisation and the batch order."""
    device: str | None = None
    """Where SAEs and probes train; None: "cuda" when available, else "cpu"."""
    imagenet_train: str | None = None
    """Paper profile: ImageNet-1k train folder (one sub-folder per wnid)."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k val folder, same layout."""

    PAPER: ClassVar[dict] = {
        "encoder": "dinov2",
        "lam": 10.0,
        "epochs": 3,
        "probe_optimizer": "adam",
        "probe_epochs": 3,
        "lambda_sweep": (),
    }

    def __post_init__(self) -> None:
        if self.probe_optimizer not in ("lbfgs", "adam"):
            raise ValueError(
                f"probe_optimizer must be 'lbfgs' or 'adam', not {self.probe_optimizer!r}"
            )

    @property
    def probe_config(self) -> ProbeConfig:
        """The probes' optimiser settings, the same for every layer."""
        if self.probe_optimizer == "lbfgs":
            return ProbeConfig(max_iter=self.probe_epochs)
        return ProbeConfig(
            optimizer="adam", lr=ADAM_PROBE_LR, max_iter=self.probe_epochs, seed=self.seed
        )


def resource_needs(settings: LayerSweepSettings) -> dict[str, list]:
    """What the chapter stores and trains, for `saekit.book.Chapter.plan`: every layer's CLS
    store of both splits, one SAE per layer at λ and at each λ it is compared with."""
    train = StoreNeed(settings.encoder, "train", settings.layers)
    saes = [
        SAENeed(SAESpec(arch="relu", l1=float(lam), expansion=settings.expansion,
                        recipe="olson2025", seed=settings.seed),
                on=train, epochs=settings.epochs, per_layer=True)  # fmt: skip
        for lam in dict.fromkeys((settings.lam, *settings.lambda_sweep))
    ]
    return {"stores": [train, StoreNeed(settings.encoder, "val", settings.layers)], "saes": saes}


# --------------------------------------------------------------------------- SAEs


def layer_specs(
    layers: Sequence[int], lam: float, *, expansion: int = 8, seed: int = 0
) -> list[SAESpec]:
    """The layer sweep's SAEs: ReLU, recipe ``olson2025``, sparsity λ = ``lam``, one per layer."""
    return [
        SAESpec(
            arch="relu",
            layer=int(layer),
            l1=float(lam),
            expansion=int(expansion),
            recipe="olson2025",
            seed=seed,
        )
        for layer in layers
    ]


def train_layer_saes(
    store: Store,
    root: str | Path,
    *,
    lam: float,
    epochs: int | None = None,
    expansion: int = 8,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[int, SAE]:
    """One SAE per layer of ``store`` (CLS tokens), ``{layer: SAE}``: loaded from the SAE cache
    under ``root`` where an equal request was trained (by any chapter), the rest trained together
    in one pass (`saekit.sae.train_or_load`). ``epochs`` defaults to the recipe's (3)."""
    layers = list(store.layers if layers is None else layers)
    specs = layer_specs(layers, lam, expansion=expansion, seed=seed)
    saes = train_or_load(
        specs, store, root=root, epochs=epochs, seed=seed, device=device, progress=progress
    )
    return dict(zip(layers, saes.values(), strict=True))


def lambda_calibration(
    train: Store,
    val: Store,
    lambdas: Sequence[float],
    root: str | Path,
    *,
    epochs: int | None = None,
    expansion: int = 8,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """The layer SAEs at every λ of ``lambdas`` (all trained in one pass, cached like any layer
    SAE), scored on ``val``: one row per (λ, layer) with the explained variance, L0, the share of
    active latents (L0 / width) and the MSE. Empty ``lambdas``: an empty table."""
    columns = ["lam", "layer", "explained_variance", "l0", "active_share", "mse", "d_sae"]
    if not lambdas:
        return pd.DataFrame(columns=columns)
    layers = list(train.layers)
    specs = [
        spec for lam in lambdas for spec in layer_specs(layers, lam, expansion=expansion, seed=seed)
    ]
    saes = train_or_load(
        specs, train, root=root, epochs=epochs, seed=seed, device=device, progress=progress
    )
    rows = []
    for spec, sae in zip(specs, saes.values(), strict=True):
        m = evaluate(sae, val.cls(spec.layer))
        d_sae = int(sae.cfg.d_sae)
        rows.append(
            {
                "lam": spec.l1,
                "layer": spec.layer,
                "explained_variance": m.explained_variance,
                "l0": m.l0,
                "active_share": m.l0 / d_sae,
                "mse": m.mse,
                "d_sae": d_sae,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def calibration_view(calibration: pd.DataFrame) -> pd.DataFrame:
    """The calibration as a λ × layer table of "explained variance / L0" cells."""
    cells = calibration.assign(
        cell=[
            f"{ev:.0%} / {l0:.0f}"
            for ev, l0 in zip(calibration["explained_variance"], calibration["l0"], strict=True)
        ]
    )
    view = cells.pivot(index="lam", columns="layer", values="cell")
    view.index.name = "λ"
    view.columns.name = "layer: variance explained / L0"
    return view


def _span(values: pd.Series, fmt: str) -> str:
    low, high = fmt.format(values.min()), fmt.format(values.max())
    if low == high:
        return low
    if values.min() < 0:  # "−3–31%" would read as a range from −3 to −31
        return f"{low} to {high}"
    return f"{low.removesuffix('%') if high.endswith('%') else low}–{high}"


def layers_text(layers: Sequence[int]) -> str:
    """'layer 3' or 'layers 1–5' (consecutive) or 'layers 0, 10, 20'."""
    layers = sorted(int(layer) for layer in layers)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}–{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def calibration_summary(calibration: pd.DataFrame, lam: float, d_model: int) -> str:
    """The measured answer to "why this λ", one line per λ of the calibration: the range of the
    variance explained and of active latents over the layers after the first (the first is the
    patch embedding's CLS, which needs few latents at any λ), with the chosen λ in bold."""
    if calibration.empty:
        return f"No λ comparison was run; λ = {lam:g} as set."
    layers = sorted(calibration["layer"].unique())
    later = layers[1:] if len(layers) > 1 else layers
    d_sae = int(calibration["d_sae"].iloc[0])
    lines = [
        f"Measured on the validation images, {layers_text(later)} (out of {d_sae} latents; the "
        f"model has {d_model} dimensions):",
        "",
    ]
    for value, rows in calibration[calibration["layer"].isin(later)].groupby("lam"):
        mark = "**" if np.isclose(value, lam) else ""
        lines.append(
            f"- {mark}λ = {value:g}{mark}: {_span(rows['explained_variance'], '{:.0%}')} of the "
            f"variance explained, {_span(rows['l0'], '{:.0f}')} latents active per image "
            f"({_span(rows['active_share'], '{:.0%}')} of them)"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- scores


def sae_metrics(saes: dict[int, SAE], val: Store) -> dict[int, SAEMetrics]:
    """Each layer's SAE scored on the held-out CLS tokens of that layer."""
    return {layer: evaluate(sae, val.cls(layer)) for layer, sae in saes.items()}


def sweep_summary(metrics: dict[int, SAEMetrics], lam: float, d_sae: int) -> str:
    """The chosen λ's SAEs in one sentence: the range of variance explained and active latents
    over the layers after the first."""
    layers = sorted(metrics)
    later = layers[1:] if len(layers) > 1 else layers
    ev = pd.Series([metrics[layer].explained_variance for layer in later])
    l0 = pd.Series([metrics[layer].l0 for layer in later])
    text = (
        f"At λ = {lam:g}, the SAEs of {layers_text(later)} explain {_span(ev, '{:.0%}')} of the "
        f"validation images' variance with {_span(l0, '{:.0f}')} of their {d_sae} latents active "
        "per image"
    )
    if len(layers) > 1:
        first = metrics[layers[0]]
        text += (
            f"; layer {layers[0]}'s explains {first.explained_variance:.0%} with "
            f"{first.l0:.0f} active"
        )
    return text + "."


def activation_norms(store: Store, chunk: int = 65536) -> pd.Series:
    """Mean L2 norm of the CLS activations per layer (read in chunks), the scale λ acts against."""
    norms = {}
    for layer in store.layers:
        acts_ND = store.cls(layer)
        total = 0.0
        for start in range(0, len(acts_ND), chunk):
            block = np.asarray(acts_ND[start : start + chunk], dtype=np.float32)
            total += float(np.linalg.norm(block, axis=1).sum())
        norms[layer] = total / max(len(acts_ND), 1)
    return pd.Series(norms, name="mean CLS norm").rename_axis("layer")


def data_summary(train: Store, val: Store, epochs: int, recipe: str = "olson2025") -> str:
    """The training store's size in SAE steps and the CLS activations' scale, measured."""
    steps = -(-len(train) // get_recipe(recipe).batch_size)
    norms = activation_norms(val)
    return (
        f"{len(train):,} training images ({steps} SAE steps an epoch, {epochs} epochs). The mean "
        f"CLS norm is {norms.iloc[0]:.2g} at layer {norms.index[0]} and "
        f"{norms.iloc[-1]:.2g} at layer {norms.index[-1]}, in a {val.d_model}-wide stream."
    )


def layer_probes(
    train: Store,
    val: Store,
    config: ProbeConfig,
    *,
    layers: Sequence[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[int, float]:
    """Validation top-1 accuracy of a linear probe on each layer's raw CLS activations, every
    probe trained with ``config``. Each probe reads ``train.cls(layer)`` as the store gives it: an
    Adam probe streams it in blocks, an L-BFGS probe (full batch) reads it whole."""
    n_classes = len(train.class_names)
    accuracy = {}
    for layer in tqdm(list(train.layers if layers is None else layers), disable=not progress):
        probe = train_probe(
            train.cls(layer), train.labels, n_classes=n_classes, config=config, device=device
        )
        accuracy[layer] = probe.accuracy(val.cls(layer), val.labels)
    return accuracy
