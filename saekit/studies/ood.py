"""Out-of-distribution generalisation of SAE features (paper 003 §3, Table 1, Fig. 2, 10, 12).

The study, one step per function:

1. `SweepGrid.specs`: SAEs of several architectures (ReLU, TopK, Gated) × sparsity (λ for the
   L1 architectures, k for TopK) × expansion, trained on an encoder's last-layer CLS activations
   of the training images in one pass with the sweep trainer (`saekit.sae.train_or_load`).
2. `probe_table`: one linear probe per representation, fit on the training images with the same
   settings for every input: the raw embedding x, the SAE codes z, and the SAE's pre-activation
   codes (the encoder output before its nonlinearity; paper 003 Fig. 12, "skip the activation
   function"). Top-1 accuracy on the in-domain validation set and on every shifted set. A set
   that covers only some classes (ImageNet-A and -R: 200 of the 1000; `restricted_classes`) is
   scored on those classes alone: rows of other classes are dropped and the prediction is the
   argmax over the subset's logits.
3. `reconstruction_table`: MSE = ‖x − x̂‖² / d (Eq. 6), L0 and L1 of every SAE on in-domain,
   near-OOD (the shifted sets) and far-OOD (unrelated images) activations.
4. `summary_table`, `table1`, `ood_figure` (the three panels of Fig. 2), `split_figure`
   (Fig. 10, one evaluation set) and `preactivation_figure` (Fig. 12).

Labels of every evaluation set are mapped into the training set's class order by wnid (or class
name): an ImageNet-A folder holds 200 class folders, so its own label 0 is not ImageNet's 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.sae import SAESpec, encode_in_batches, evaluate
from saekit.sae.architectures import K_ARCHS, canonical_arch
from saekit.sae.recipes import Recipe

#: Evaluation split -> its column in Table 1 (paper order: Val, V2, S(ketch), A, R).
TABLE1_COLUMNS = {"val": "Val", "v2": "V2", "sketch": "S", "hard": "A", "rendition": "R"}
#: The shifted sets with ImageNet's label space (ImageNet-V2, -Sketch, -A, -R).
SHIFTS = ("v2", "sketch", "hard", "rendition")
#: Split -> the domain its reconstruction error counts toward.
DOMAINS = {
    "val": "in-domain",
    **dict.fromkeys(SHIFTS, "near-OOD"),
    "far_ood": "far-OOD",
}
DOMAIN_ORDER = ("in-domain", "near-OOD", "far-OOD")
#: Shifted sets that cover a class subset -> the subset's name in `saekit.analysis.ontology.imagenet_subset`.
PAPER_SUBSETS = {"hard": "imagenet_a", "rendition": "imagenet_r"}
#: Representation names in the probe table.
RAW, CODES, PRE = "raw", "codes", "pre-activation"


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


# --- labelled activations -----------------------------------------------------------------------


@dataclass
class LabelledActs:
    """One evaluation set's activations with labels in a shared class order."""

    acts_ND: Any
    """Activations [N, D]: an array, tensor or a store's memory-mapped array (read in chunks)."""
    labels_N: np.ndarray
    """Class index of each row, in the order of ``classes``."""
    classes: list[str] = field(default_factory=list)
    """Class keys (wnids, else class names) that the labels index."""

    def __post_init__(self) -> None:
        self.labels_N = np.asarray(self.labels_N, dtype=np.int64)
        if len(self.labels_N) != len(self.acts_ND):
            raise ValueError(f"{len(self.acts_ND)} activation rows but {len(self.labels_N)} labels")

    def per_class(self, n: int, seed: int = 0) -> LabelledActs:
        """At most `n` rows of every class, drawn without replacement with `seed`, in store
        order (the paper profile's SAE codes of all 1.2M training images would not fit in memory).
        ``n <= 0`` keeps every row."""
        if n <= 0:
            return self
        rng = np.random.default_rng(seed)
        keep = []
        for label in np.unique(self.labels_N):
            rows = np.flatnonzero(self.labels_N == label)
            keep.append(rows if len(rows) <= n else rng.choice(rows, n, replace=False))
        index = np.sort(np.concatenate(keep))
        return LabelledActs(self.acts_ND[index], self.labels_N[index], list(self.classes))

    @classmethod
    def from_store(
        cls, store: Any, layer: int | None = None, classes: Sequence[str] | None = None
    ) -> LabelledActs:
        """CLS activations of `layer` (default: the store's last) with labels mapped into
        `classes` (default: the store's own order). A store class missing from `classes` is an
        error: the probe could never predict it."""
        layer = store.layers[-1] if layer is None else layer
        keys = list(store.wnids or store.class_names)
        labels = np.asarray(store.labels, dtype=np.int64)
        if classes is None:
            return cls(store.cls(layer), labels, keys)
        index = {key: i for i, key in enumerate(classes)}
        unknown = sorted(set(keys[i] for i in np.unique(labels)) - set(index))
        if unknown:
            raise ValueError(
                f"the store {getattr(store, 'root', '')} holds classes the training set lacks: "
                f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}. Evaluate only on sets whose "
                "class folders (wnids) also exist in the training set."
            )
        mapping = np.asarray([index.get(key, -1) for key in keys], dtype=np.int64)
        return cls(store.cls(layer), mapping[labels], list(classes))


def restricted_classes(
    classes: Sequence[str], profile: str, splits: Sequence[str] = tuple(PAPER_SUBSETS)
) -> dict[str, list[int]]:
    """Class indices (into `classes`) that each subset-covering shifted set is scored on.

    Paper profile: ImageNet-A ("hard") and ImageNet-R ("rendition") cover 200 classes each,
    `saekit.analysis.ontology.imagenet_subset` lists them. Mini profile, the same restriction in
    miniature: every other class (indices 0, 2, 4, ...), half of the toy classes.
    """
    if profile == "mini":
        return {split: list(range(0, len(classes), 2)) for split in splits}
    if profile != "paper":
        raise ValueError(f"profile must be 'mini' or 'paper', not {profile!r}")
    from saekit.taxonomy import imagenet_subset

    index = {key: i for i, key in enumerate(classes)}
    out = {}
    for split in splits:
        wnids = imagenet_subset(PAPER_SUBSETS[split])
        missing = [w for w in wnids if w not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {PAPER_SUBSETS[split]} classes (e.g. {missing[:3]}) are "
                "not among the training classes; train on ImageNet-1k folders named by wnid"
            )
        out[split] = sorted(index[w] for w in wnids)
    return out


# --- 2. linear probes -----------------------------------------------------------------------------


def _features(data: LabelledActs, sae: SAE | None, kind: str) -> torch.Tensor:
    if sae is None:
        return torch.as_tensor(np.asarray(data.acts_ND, dtype=np.float32))
    return encode_in_batches(sae, data.acts_ND, pre_activation=kind == PRE)


def probe_accuracy(
    probe: Any, feats_ND: torch.Tensor, labels_N: np.ndarray, subset: Sequence[int] | None
) -> tuple[float, int]:
    """Top-1 accuracy and the number of rows scored; with `subset`, only rows of those classes,
    predicted by the argmax over the subset's logits."""
    labels = torch.as_tensor(labels_N)
    if subset is not None:
        keep = torch.isin(labels, torch.as_tensor(list(subset)))
        feats_ND, labels = feats_ND[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError(f"no rows of the scored classes {list(subset or [])[:10]} in this set")
    accuracy = probe.accuracy(
        feats_ND, labels, class_subset=None if subset is None else list(subset)
    )
    return float(accuracy), len(labels)


def probe_table(
    saes: Mapping[str, SAE],
    train: LabelledActs,
    evals: Mapping[str, LabelledActs],
    *,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
    pre_activation: bool = True,
    encoder: str = "",
    progress: bool = True,
    **probe_kwargs: Any,
) -> pd.DataFrame:
    """Accuracy of a linear probe on the raw embedding and on each SAE's codes (and pre-activation
    codes), fit on `train` with identical settings (``probe_kwargs`` go to
    `saekit.analysis.probes.train_probe`), scored on every set in `evals`.

    Long format, one row per (representation, evaluation set): encoder, sae ("raw" for the
    embedding), input (raw | codes | pre-activation), split, accuracy, n_rows, n_classes.
    """
    from saekit.analysis.probes import train_probe

    class_subsets = class_subsets or {}
    for split, data in evals.items():
        if data.classes != train.classes:
            raise ValueError(
                f"evaluation set {split!r} is labelled in another class order than the training "
                "set; build it with LabelledActs.from_store(store, classes=train.classes)"
            )
    jobs: list[tuple[str, SAE | None, str]] = [(RAW, None, RAW)]
    for name, sae in saes.items():
        jobs.append((name, sae, CODES))
        if pre_activation:
            jobs.append((name, sae, PRE))
    rows = []
    for name, sae, kind in tqdm(jobs, desc="linear probes", disable=not progress):
        probe = train_probe(
            _features(train, sae, kind),
            train.labels_N,
            n_classes=len(train.classes),
            **probe_kwargs,
        )
        for split, data in evals.items():
            subset = class_subsets.get(split)
            accuracy, n_rows = probe_accuracy(
                probe, _features(data, sae, kind), data.labels_N, subset
            )
            rows.append(
                {
                    "encoder": encoder,
                    "sae": name,
                    "input": kind,
                    "split": split,
                    "accuracy": accuracy,
                    "n_rows": n_rows,
                    "n_classes": len(subset) if subset is not None else len(train.classes),
                }
            )
    return pd.DataFrame(rows)


# --- 3. reconstruction ------------------------------------------------------------------------------


def reconstruction_table(
    saes: Mapping[str, SAE],
    sets: Mapping[str, LabelledActs | Any],
    *,
    domains: Mapping[str, str] = DOMAINS,
    encoder: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """MSE (Eq. 6), variance explained, L0 and L1 of every SAE on every set (`saekit.sae.evaluate`).

    `sets` maps a split name to `LabelledActs` or bare activations [N, D]; `domains` says which
    domain each split counts toward. One row per (SAE, split).
    """
    unknown = [split for split in sets if split not in domains]
    if unknown:
        raise KeyError(f"no domain for split(s) {unknown}; pass domains={{split: 'near-OOD', ...}}")
    rows = []
    pairs = list(itertools.product(saes.items(), sets.items()))
    for (name, sae), (split, data) in tqdm(pairs, desc="reconstruction", disable=not progress):
        acts = data.acts_ND if isinstance(data, LabelledActs) else data
        m = evaluate(sae, acts)
        rows.append(
            {
                "encoder": encoder,
                "sae": name,
                "split": split,
                "domain": domains[split],
                "mse": m.mse,
                "explained_variance": m.explained_variance,
                "l0": m.l0,
                "l1": m.l1,
                "n_rows": m.n_rows,
            }
        )
    return pd.DataFrame(rows)


def domain_summary(recon: pd.DataFrame) -> pd.DataFrame:
    """Mean MSE per SAE and domain (splits of a domain weigh equally), with the OOD/in-domain ratios."""
    mse = recon.pivot_table(index="sae", columns="domain", values="mse", aggfunc="mean", sort=False)
    mse = mse[[d for d in DOMAIN_ORDER if d in mse.columns]]
    mse.columns.name = None
    for domain in ("near-OOD", "far-OOD"):
        if domain in mse and "in-domain" in mse:
            mse[f"{domain} ÷ in-domain"] = mse[domain] / mse["in-domain"]
    return mse


# --- 4. tables and figures ---------------------------------------------------------------------------


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


def _log_x(ax: plt.Axes, values: pd.Series) -> None:
    if len(values) and (values > 0).all():
        ax.set_xscale("log")


def _scatter(
    ax: plt.Axes,
    data: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    style: str | None,
    focus: tuple[str, Any] | None,
    palette: Any = "deep",
    legend: bool = True,
) -> None:
    """seaborn scatter of `data`; with `focus` = (column, value) the other rows are drawn grey.
    Colours and markers are assigned over all of `data`, so a focused view keeps them."""
    shown = data
    levels = list(dict.fromkeys(data[hue]))
    colors = dict(zip(levels, sns.color_palette(palette, len(levels)), strict=True))
    style_order = list(dict.fromkeys(data[style])) if style else None
    if focus is not None:
        column, value = focus
        rest = data[data[column] != value]
        ax.scatter(rest[x], rest[y], color="0.85", s=30, zorder=1, label="_others")
        shown = data[data[column] == value]
    sns.scatterplot(
        data=shown,
        x=x,
        y=y,
        hue=hue,
        style=style,
        s=70,
        ax=ax,
        palette=colors,
        style_order=style_order,
        legend=legend,
        zorder=2,
    )


def _legend_below(ax: plt.Axes) -> None:
    """Move an axis' legend under it, so no point hides behind it."""
    handles, labels = ax.get_legend_handles_labels()
    keep = [
        (h, label) for h, label in zip(handles, labels, strict=True) if not label.startswith("_")
    ]
    if keep:
        ax.legend(
            *zip(*keep, strict=True),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=3,
            fontsize=8,
            frameon=False,
        )


def ood_figure(
    summary: pd.DataFrame,
    baseline: Mapping[str, float] | pd.Series | None = None,
    *,
    focus: tuple[str, Any] | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (15.0, 4.4),
) -> Figure:
    """Paper 003 Fig. 2 in three panels, from `summary_table` rows (several encoders allowed).

    Left: mean accuracy over the shifted sets of a probe on SAE codes against the SAE's L0 (dashed:
    the raw embedding's probe). Middle: near-OOD reconstruction MSE against the mean activation
    magnitude L1. Right: MSE in-domain, near- and far-OOD against L0 (first encoder only, as the
    paper shows DINOv2 alone). The x axis is the measured L0 rather than λ or k so that λ- and
    k-controlled architectures share one axis. With several encoders colour means encoder,
    otherwise architecture. `focus` = (column, value), e.g. ("arch", "topk"), greys the rest out
    while keeping every axis, so views of different architectures compare at a glance.
    """
    if summary.empty:
        raise ValueError("the summary table is empty: train and evaluate at least one SAE")
    data = summary.reset_index()
    data["expansion"] = "x" + data["expansion"].astype(int).astype(str)
    many = data["encoder"].nunique() > 1
    hue, style = ("encoder", "arch") if many else ("arch", "expansion")
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 3, figsize=figsize)
        left, middle, right = axes
        if "ood" in data:
            _scatter(left, data, "l0", "ood", hue, style, focus)
            encoders = list(dict.fromkeys(data["encoder"]))
            palette = sns.color_palette("deep", len(encoders))  # as `_scatter` colours encoders
            for encoder, value in dict(baseline if baseline is not None else {}).items():
                left.axhline(
                    value,
                    linestyle="--",
                    color=palette[encoders.index(encoder)]
                    if many and encoder in encoders
                    else "0.3",
                    linewidth=1.2,
                    label=f"{encoder} raw embedding",
                )
            _legend_below(left)
            left.set_ylabel("OOD top-1 accuracy (mean of shifts)")
        left.set_xlabel("L0 (active latents, in-domain)")
        _log_x(left, data["l0"])
        left.set_title("probe on SAE codes vs sparsity")

        if "near-OOD" in data:
            _scatter(middle, data, "l1", "near-OOD", hue, style, focus, legend=False)
            middle.set_ylabel("near-OOD reconstruction MSE")
        middle.set_xlabel("L1 (mean activation magnitude, in-domain)")
        _log_x(middle, data["l1"])
        middle.set_title("OOD reconstruction vs activation")

        first = data[data["encoder"] == data["encoder"].iloc[0]]
        domains = [d for d in DOMAIN_ORDER if d in first]
        long = first.melt(
            id_vars=["sae", "arch", "expansion", "l0"],
            value_vars=domains,
            var_name="domain",
            value_name="mse",
        )
        focus_long = None if focus is None or focus[0] not in long else focus
        _scatter(right, long, "l0", "mse", "domain", "arch", focus_long, palette="rocket_r")
        right.set_xlabel("L0 (active latents, in-domain)")
        right.set_ylabel("reconstruction MSE")
        right.set_yscale("log")
        _log_x(right, long["l0"])
        _legend_below(right)
        right.set_title(f"reconstruction by domain ({first['encoder'].iloc[0] or 'encoder'})")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def _raw_lines(ax: plt.Axes, probes: pd.DataFrame | None, split: str) -> None:
    if probes is None:
        return
    raw = probes[(probes["input"] == RAW) & (probes["split"] == split)]
    for i, (encoder, value) in enumerate(
        raw.groupby("encoder", sort=False)["accuracy"].mean().items()
    ):
        ax.axhline(
            value,
            linestyle="--",
            color="0.3" if i == 0 else f"C{i}",
            linewidth=1.2,
            label=f"{encoder or 'encoder'} raw embedding",
        )


def split_figure(
    summary: pd.DataFrame,
    splits: str | Sequence[str],
    probes: pd.DataFrame | None = None,
    *,
    panel_size: tuple[float, float] = (4.2, 3.6),
) -> Figure:
    """Fig. 10, one panel per evaluation set: probe accuracy on SAE codes (filled) and on
    pre-activation codes (hollow) against L0; with `probes`, the raw embedding's accuracy dashed.
    Panels share the y axis so the drop from in-domain to each shift reads across."""
    splits = [splits] if isinstance(splits, str) else list(splits)
    missing = [split for split in splits if split not in summary]
    if missing:
        raise KeyError(f"no accuracy column(s) {missing}; the summary has {list(summary.columns)}")
    data = summary.reset_index()
    archs = list(dict.fromkeys(data["arch"]))
    colors = dict(zip(archs, sns.color_palette("deep", len(archs)), strict=True))
    with sns.axes_style("whitegrid"):
        n_cols = min(3, len(splits))
        n_rows = -(-len(splits) // n_cols)
        fig, axes = plt.subplots(
            n_rows,
            n_cols,
            figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows),
            sharey=True,
            squeeze=False,
        )
        for ax, split in zip(axes.flat, splits, strict=False):
            for arch in archs:
                part = data[data["arch"] == arch]
                ax.scatter(part["l0"], part[split], color=colors[arch], s=50, label=f"{arch} codes")
                if f"pre:{split}" in part:
                    ax.scatter(
                        part["l0"],
                        part[f"pre:{split}"],
                        facecolors="none",
                        edgecolors=colors[arch],
                        s=50,
                        label=f"{arch} pre-activation",
                    )
            _raw_lines(ax, probes, split)
            _log_x(ax, data["l0"])
            ax.set_title(f"{split} ({TABLE1_COLUMNS.get(split, split)})")
            ax.set_xlabel("L0 (in-domain)")
            ax.set_ylabel("top-1 accuracy")
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes.flat[len(splits) :]:
            ax.axis("off")  # a spare panel holds the legend
        if len(splits) < axes.size:
            axes.flat[-1].legend(handles, labels, loc="center", fontsize=9, frameon=False)
        else:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
    return fig


def preactivation_figure(
    summary: pd.DataFrame,
    split: str = "val",
    probes: pd.DataFrame | None = None,
    *,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Figure:
    """Paper 003 Fig. 12: accuracy of probes on codes vs on pre-activation codes (the encoder
    output before its nonlinearity) against L0; a grey line joins each SAE's two points. With
    `probes`, the raw embedding's accuracy is dashed."""
    needed = [split, f"pre:{split}"]
    missing = [c for c in needed if c not in summary]
    if missing:
        raise KeyError(f"the summary lacks {missing}; run probe_table with pre_activation=True")
    data = summary.reset_index()
    long = data.melt(
        id_vars=["sae", "arch", "l0"], value_vars=needed, var_name="input", value_name="accuracy"
    )
    long["input"] = long["input"].map(
        {split: "codes (after activation)", f"pre:{split}": "pre-activation"}
    )
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=figsize)
        for _, row in data.iterrows():
            ax.plot(
                [row["l0"]] * 2,
                [row[split], row[f"pre:{split}"]],
                color="0.75",
                linewidth=1,
                zorder=1,
            )
        sns.scatterplot(
            data=long, x="l0", y="accuracy", hue="input", style="arch", s=70, ax=ax, zorder=2
        )
        _raw_lines(ax, probes, split)
        _log_x(ax, data["l0"])
        ax.set_xlabel("L0 (active latents, in-domain)")
        ax.set_ylabel(f"top-1 accuracy on {split}")
        _legend_below(ax)
        fig.tight_layout()
    return fig
