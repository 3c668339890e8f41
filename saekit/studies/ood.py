"""Chapter 02, out-of-distribution generalisation of SAE features (paper 003 §3, Table 1,
Fig. 2, 10, 11, 12): the settings, the sweep, and the study's steps and tables.

1. `OODSettings`: the chapter's parameters with their profile defaults.
2. `SweepGrid` / `train_sweeps`: SAEs of several architectures (ReLU, TopK, Gated) × sparsity
   (λ for the L1 architectures, k for TopK) × expansion, trained on each encoder's last-layer CLS
   activations of the training images in one pass (`saekit.sae.train_or_load`).
3. `probe_tables`: a linear probe on the raw embedding, the SAE codes and the pre-activation codes,
   fit with identical settings on the training classes and scored on every set on the classes it
   shares with them (`saekit.studies.ood_scoring`).
4. `reconstruction_tables`: MSE, L0 and L1 of every SAE in-domain, near- and far-OOD.
5. `summary_table`, `findings`, `table1`; the figures are in `saekit.studies.ood_figures`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sae_lens import SAE

from saekit.activations import Store
from saekit.plan import SAENeed, StoreNeed
from saekit.sae import SAESpec, get_recipe, train_or_load
from saekit.sae.architectures import K_ARCHS, canonical_arch
from saekit.sae.recipes import Recipe
from saekit.studies.ood_scoring import (
    CODES,
    EVAL_SPLITS,
    PRE,
    RAW,
    SHIFTS,
    SPLITS,
    TABLE1_COLUMNS,
    LabelledActs,
    domain_summary,
    probe_table,
    reconstruction_table,
    scored_classes,
    scoring_table,
)
from saekit.studies.settings import StudySettings

# --- 1. the sweep -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepGrid:
    """Architectures × sparsity × expansion: the SAEs one OOD sweep trains."""

    archs: tuple[str, ...] = ("relu", "topk", "gated")
    """SAE architectures (saekit names: relu, topk, gated, batchtopk, jumprelu)."""
    lambdas: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0)
    """Sparsity coefficients λ for the λ-controlled architectures (relu, gated, jumprelu)."""
    ks: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    """Active latents k for the k-controlled architectures (topk, batchtopk)."""
    expansions: tuple[int, ...] = (8, 16, 32)
    """SAE widths as multiples of the input width."""

    def __post_init__(self) -> None:
        for name in ("archs", "lambdas", "ks", "expansions"):
            if not getattr(self, name):
                raise ValueError(f"SweepGrid.{name} is empty; give at least one value")
        for arch in self.archs:
            canonical_arch(arch)  # raises with the list of valid names

    def specs(
        self, layer: int | None = None, recipe: str | Recipe = "olson2025_ood"
    ) -> list[SAESpec]:
        """One `SAESpec` per grid point, architecture-major (arch, expansion, sparsity)."""
        specs = []
        for arch, expansion in itertools.product(self.archs, self.expansions):
            arch = canonical_arch(arch)
            for value in self.ks if arch in K_ARCHS else self.lambdas:
                sparsity = {"k": value} if arch in K_ARCHS else {"l1": float(value)}
                specs.append(
                    SAESpec(
                        arch=arch, expansion=int(expansion), layer=layer, recipe=recipe, **sparsity
                    )
                )
        return specs


#: The paper's sweep (paper 003 §3.3): 7 values of λ or k × 3 expansions × 3 architectures.
PAPER_GRID = SweepGrid()


@dataclass(frozen=True)
class OODSettings(StudySettings):
    """Chapter 02's parameters (mini defaults; `PAPER` holds the paper profile's)."""

    encoders: tuple[str, ...] = ("toyvit",)
    """Encoder families, one sweep each (paper: DINOv2, CLIP and ResNet-50, paper 003 Table 1)."""
    layer: int = -1
    """Whose CLS token the SAEs read: a layer index, negative counting from the end (-1, the
    last layer, as in the paper; ResNet: the last stage's pooled vector)."""
    archs: tuple[str, ...] = ("relu", "topk", "gated")
    """SAE architectures."""
    lambdas: tuple[float, ...] = (0.5, 5.0)
    """λ of the ReLU and Gated SAEs (mini: scaled to a 64-wide stream; 0.5 is Table 1's)."""
    ks: tuple[int, ...] = (4, 16)
    """k of the TopK SAEs."""
    expansions: tuple[int, ...] = (4, 8)
    """SAE width ÷ model width."""
    epochs: int = 30
    """Passes over the training images (the mini store is small; paper 3)."""
    lr: float = 1e-3
    """SAE learning rate (paper 1e-4)."""
    probe_per_class: int | None = None
    """Training images per class for the probes, drawn with ``seed``; None keeps every image
    (mini). Paper: 100, as the codes of 1.28M images would not fit in memory."""
    pre_activation: bool = True
    """Also probe the pre-activation codes (paper Fig. 12)."""
    table1_arch: str = "relu"
    """The SAE Table 1 reports: architecture,"""
    table1_sparsity: float = 0.5
    """its λ (or k for TopK),"""
    table1_expansion: int = 8
    """and its expansion."""
    detail_encoder: str = "toyvit"
    """The encoder whose sweep Fig. 11 shows in detail (paper: ResNet-50)."""
    seed: int = 0
    """Seeds the SAEs' initialisation, the batch order and the probes' subsample."""
    device: str | None = None
    """Where SAEs and probes train; None: "cuda" when available, else "cpu"."""
    imagenet_train: str | None = None
    """Paper profile: ImageNet-1k train folder (one sub-folder per wnid); the probes learn the
    classes it holds."""
    imagenet_val: str | None = None
    """Paper profile: ImageNet-1k val folder."""
    imagenet_v2: str | None = None
    """Paper profile: ImageNet-V2 (matched frequency), folders named by wnid."""
    imagenet_sketch: str | None = None
    """Paper profile: ImageNet-Sketch."""
    imagenet_rendition: str | None = None
    """Paper profile: ImageNet-R (200 classes; scored on those shared with training)."""
    imagenet_hard: str | None = None
    """Paper profile: ImageNet-A (200 classes; scored on those shared with training)."""
    imagenet_far_ood: str | None = None
    """Paper profile: far-OOD images (e.g. OpenOOD's iNaturalist/Textures)."""

    PAPER: ClassVar[dict[str, Any]] = {
        "encoders": ("dinov2", "clip", "resnet"),
        "lambdas": PAPER_GRID.lambdas,
        "ks": PAPER_GRID.ks,
        "expansions": PAPER_GRID.expansions,
        "epochs": 3,
        "lr": 1e-4,
        "probe_per_class": 100,
        "detail_encoder": "resnet",
    }

    @property
    def grid(self) -> SweepGrid:
        """The SAEs each encoder's sweep trains."""
        return SweepGrid(
            archs=tuple(self.archs),
            lambdas=tuple(self.lambdas),
            ks=tuple(self.ks),
            expansions=tuple(self.expansions),
        )

    @property
    def recipe(self) -> Recipe:
        """``olson2025_ood`` with this run's epochs and learning rate."""
        return get_recipe("olson2025_ood", epochs=self.epochs, lr=self.lr)


def resource_needs(settings: OODSettings) -> dict[str, list]:
    """What the chapter stores and trains, for `saekit.book.Chapter.plan`: each encoder's
    chosen layer over every split, and its sweep."""
    layers = (settings.layer,)
    stores = [StoreNeed(encoder, split, layers) for encoder in settings.encoders
              for split in SPLITS]  # fmt: skip
    saes = [SAENeed(tuple(settings.grid.specs(layer=settings.layer, recipe=settings.recipe)),
                    on=StoreNeed(encoder, "train", layers))
            for encoder in settings.encoders]  # fmt: skip
    return {"stores": stores, "saes": saes}


def sweep_table(saes: Mapping[str, SAE], encoder: str = "") -> pd.DataFrame:
    """One row per SAE (indexed by name): encoder, arch, expansion, λ, k and a sparsity label,
    read from the spec saekit's trainer stores with every SAE."""
    rows = []
    for name, sae in saes.items():
        info = (sae.cfg.metadata.get("saekit") or {}).get("spec")
        if info is None:
            raise ValueError(
                f"SAE {name!r} carries no saekit spec (cfg.metadata.saekit); train it with "
                "saekit.sae (e.g. saekit.sae.train_or_load) so its grid point is known"
            )
        spec = SAESpec.from_dict(info).resolved()
        is_k = spec.arch in K_ARCHS
        rows.append(
            {
                "sae": name,
                "encoder": encoder,
                "arch": spec.arch,
                "expansion": spec.expansion,
                "lam": np.nan if is_k else spec.l1,
                "k": spec.k if is_k else np.nan,
                "sparsity": f"k={spec.k:g}" if is_k else f"λ={spec.l1:g}",
            }
        )
    return pd.DataFrame(rows).set_index("sae")


# --- the chapter's steps, every encoder ------------------------------------------------------------


def train_sweeps(
    stores: Mapping[str, Mapping[str, Store]],
    settings: OODSettings,
    root: str | Path,
    *,
    progress: bool = True,
) -> dict[str, dict[str, SAE]]:
    """Every encoder's sweep (``settings.grid`` with ``settings.recipe``) on its training store,
    from the SAE cache under ``root`` where the same request was trained: {encoder: {name: SAE}}."""
    saes = {}
    for encoder in settings.encoders:
        train = stores[encoder]["train"]
        specs = settings.grid.specs(layer=train.layers[-1], recipe=settings.recipe)
        saes[encoder] = train_or_load(
            specs, train, root=root, seed=settings.seed, device=settings.device, progress=progress
        )
    return saes


def sweep_tables(saes: Mapping[str, Mapping[str, SAE]]) -> pd.DataFrame:
    """`sweep_table` of every encoder's SAEs, one below the other."""
    return pd.concat([sweep_table(mine, encoder) for encoder, mine in saes.items()])


def data_summary(stores: Mapping[str, Mapping[str, Store]], recipe: Recipe) -> str:
    """Per encoder, the images of every split and the SAE steps an epoch takes, measured."""
    lines = []
    for encoder, splits in stores.items():
        n_train = len(splits["train"])
        steps = -(-n_train // recipe.batch_size)
        others = ", ".join(
            f"{split} {len(store):,}" for split, store in splits.items() if split != "train"
        )
        lines.append(
            f"{encoder}: {n_train:,} training images ({steps} minibatches of {recipe.batch_size} "
            f"an epoch, {recipe.epochs} epochs at lr {recipe.lr:g}); {others}."
        )
    return "\n\n".join(lines)


def probe_tables(
    stores: Mapping[str, Mapping[str, Store]],
    saes: Mapping[str, Mapping[str, SAE]],
    settings: OODSettings,
    *,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`probe_table` for every encoder: probes learn the training store's classes (at most
    ``settings.probe_per_class`` images each) and every evaluation set is scored on the classes
    it shares with them (`scored_classes`). Returns the probe results and, per encoder and set,
    the `scoring_table`."""
    probes, scoring = [], []
    for encoder in settings.encoders:
        train = LabelledActs.from_store(stores[encoder]["train"])
        train = train.per_class(settings.probe_per_class, seed=settings.seed)
        evals = {
            split: LabelledActs.from_store(stores[encoder][split], classes=train.classes)
            for split in EVAL_SPLITS
        }
        subsets = scored_classes(evals, settings.profile)
        probes.append(
            probe_table(
                saes[encoder],
                train,
                evals,
                class_subsets=subsets,
                pre_activation=settings.pre_activation,
                encoder=encoder,
                device=settings.device,
                progress=progress,
            )
        )
        scoring.append(scoring_table(evals, subsets).assign(encoder=encoder))
    scoring_df = pd.concat(scoring).set_index("encoder", append=True).swaplevel()
    return pd.concat(probes, ignore_index=True), scoring_df


def reconstruction_tables(
    stores: Mapping[str, Mapping[str, Store]],
    saes: Mapping[str, Mapping[str, SAE]],
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """`reconstruction_table` of every encoder's SAEs on all its sets but the training one."""
    return pd.concat(
        [
            reconstruction_table(
                saes[encoder],
                {
                    split: LabelledActs.from_store(store)
                    for split, store in splits.items()
                    if split != "train"
                },
                encoder=encoder,
                progress=progress,
            )
            for encoder, splits in stores.items()
        ],
        ignore_index=True,
    )


# --- 4. tables ---------------------------------------------------------------------------


def baselines(probes: pd.DataFrame, splits: Sequence[str] = SHIFTS) -> pd.Series:
    """Raw-embedding probe accuracy per encoder, averaged over `splits` present."""
    raw = probes[(probes["input"] == RAW) & probes["split"].isin(splits)]
    return raw.groupby("encoder")["accuracy"].mean()


def summary_table(
    sweep: pd.DataFrame, probes: pd.DataFrame, recon: pd.DataFrame, in_domain: str = "val"
) -> pd.DataFrame:
    """One row per SAE: its grid point, L0 and L1 on the in-domain set, probe accuracy on every
    split (codes, and ``pre:<split>`` for pre-activation codes), mean OOD accuracy over the shifts
    (``ood``, ``pre:ood``), and mean MSE per domain: the data behind Fig. 2, 10 and 12.
    Several encoders are summarised each on its own (their SAEs may share names)."""
    parts = []
    for encoder, rows in sweep.groupby("encoder", sort=False):
        mine_probes = probes[probes["encoder"] == encoder]
        mine_recon = recon[recon["encoder"] == encoder]
        out = rows.join(mine_recon[mine_recon["split"] == in_domain].set_index("sae")[["l0", "l1"]])
        for kind, prefix in ((CODES, ""), (PRE, "pre:")):
            acc = mine_probes[mine_probes["input"] == kind].pivot(
                index="sae", columns="split", values="accuracy"
            )
            if acc.empty:
                continue
            shifts = [split for split in SHIFTS if split in acc.columns]
            if shifts:
                acc["ood"] = acc[shifts].mean(axis=1)
            out = out.join(acc.add_prefix(prefix))
        parts.append(out.join(domain_summary(mine_recon)))
    if not parts:
        raise ValueError("the sweep table is empty: train at least one SAE")
    return pd.concat(parts)


def findings(summary: pd.DataFrame, probes: pd.DataFrame) -> str:
    """The study's numbers in words, per encoder: the best SAE's OOD accuracy against the raw
    embedding's, how many SAEs beat it, and how much worse near- and far-OOD data reconstruct."""
    raw = baselines(probes)
    lines = []
    for encoder, rows in summary.groupby("encoder", sort=False):
        who = encoder or "the encoder"
        if "ood" in rows and encoder in raw:
            best = rows["ood"].idxmax()
            beat = int((rows["ood"] > raw[encoder]).sum())
            lines.append(
                f"{who}: mean accuracy over the shifted sets is {raw[encoder]:.1%} for the raw "
                f"embedding and {rows.loc[best, 'ood']:.1%} for the best SAE ({best}); "
                f"{beat} of {len(rows)} SAEs beat the raw embedding."
            )
        if "pre:ood" in rows and "ood" in rows:
            gain = (rows["pre:ood"] - rows["ood"]).mean()
            lines.append(
                f"{who}: probing the pre-activation codes changes OOD accuracy by "
                f"{gain:+.1%} on average over the SAEs."
            )
        for domain in ("near-OOD", "far-OOD"):
            column = f"{domain} ÷ in-domain"
            if column in rows:
                lines.append(
                    f"{who}: {domain} MSE is {rows[column].median():.2f}× the in-domain MSE "
                    f"(median over SAEs; range {rows[column].min():.2f}–{rows[column].max():.2f})."
                )
    return "\n".join(lines)


def pick_sae(
    sweep: pd.DataFrame, arch: str, expansion: int, sparsity: float, encoder: str | None = None
) -> str:
    """Name of the SAE at one grid point (λ for λ-architectures, k for k-architectures)."""
    arch = canonical_arch(arch)
    column = "k" if arch in K_ARCHS else "lam"
    hit = sweep[(sweep["arch"] == arch) & (sweep["expansion"] == expansion)]
    if encoder is not None:
        hit = hit[hit["encoder"] == encoder]
    hit = hit[np.isclose(hit[column].astype(float), sparsity)]
    if hit.empty:
        raise KeyError(
            f"no {arch} SAE with expansion {expansion} and {column}={sparsity} in the sweep; it has "
            f"{sorted(set(zip(sweep['arch'], sweep['expansion'], sweep['sparsity'], strict=True)))}"
        )
    return str(hit.index[0])


def table1(
    probes: pd.DataFrame,
    chosen: Mapping[str, str],
    *,
    splits: Sequence[str] = tuple(TABLE1_COLUMNS),
    pre_activation: bool = False,
) -> pd.DataFrame:
    """Table 1: top-1 accuracy (%) of the raw embedding's probe and of the chosen SAE's, per
    encoder (`chosen` maps encoder -> SAE name), on Val, V2, S, A, R (splits present)."""
    rows = {}
    for encoder, sae in chosen.items():
        mine = probes[probes["encoder"] == encoder]
        picks = [
            (encoder, mine[mine["input"] == RAW]),
            (f"{encoder}+SAE", mine[(mine["sae"] == sae) & (mine["input"] == CODES)]),
        ]
        if pre_activation:
            picks.append(
                (f"{encoder}+SAE (pre-act.)", mine[(mine["sae"] == sae) & (mine["input"] == PRE)])
            )
        for label, part in picks:
            if part.empty:
                raise KeyError(f"no probe results for {label!r} (SAE {sae!r}) in the table")
            rows[label] = part.set_index("split")["accuracy"] * 100
    table = pd.DataFrame(rows).T
    present = [s for s in splits if s in table.columns]
    table = table[present].rename(columns=TABLE1_COLUMNS)
    table.columns.name = "top-1 accuracy (%)"
    return table.round(2)
