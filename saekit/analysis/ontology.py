"""Ontology metrics of SAE features against the WordNet hierarchy (paper 000 §3.2, paper 003 §3.5).

For the set C_k of classes a feature fires on, `saekit.taxonomy.Taxonomy` gives LCH, LCH height
and ontological coverage. The stages here, in reading order: per-class firing statistics and
class sets C_k, streamed from codes or a store; the papers' baselines (neurons, random
directions) and Table 2; the per-feature table with automatic labels; the figure.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from tqdm.auto import tqdm

from saekit.sae.codes import iter_codes
from saekit.taxonomy import Taxonomy, _as_float_tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from sae_lens import SAE

    from saekit.activations import Store

# --------------------------------------------------------------------------- class sets C_k


@dataclass
class ClassSetRule:
    """Which classes a feature activates on (C_k), from its per-class statistics. The default,
    'fires on at least half of the class's images', follows the papers' reading of C_k as the
    classes a feature reliably responds to; it is scale-free, so it needs no normalisation."""

    #: a class joins C_k when the feature fires on at least this fraction of its images
    min_fire_frac: float = 0.5
    #: a code fires on an image when it is strictly above this value
    fire_threshold: float = 0.0
    #: and when its mean code on the class is at least this fraction of its top class mean (0: off)
    min_rel_mean_act: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_fire_frac <= 1.0:
            raise ValueError(f"min_fire_frac must be in (0, 1], got {self.min_fire_frac}")
        if not 0.0 <= self.min_rel_mean_act <= 1.0:
            raise ValueError(f"min_rel_mean_act must be in [0, 1], got {self.min_rel_mean_act}")

    def apply(self, stats: ClassStats) -> np.ndarray:
        """Boolean class_sets_SC; classes without images never join."""
        keep_SC = (stats.fire_frac_SC >= self.min_fire_frac) & (stats.n_images_C > 0)
        if self.min_rel_mean_act > 0:
            top_S1 = stats.mean_act_SC.max(axis=1, keepdims=True)
            keep_SC &= stats.mean_act_SC >= self.min_rel_mean_act * top_S1
        return keep_SC


@dataclass
class ClassStats:
    """Per-feature, per-class statistics of codes over a labelled set of images."""

    #: fraction of class c's images on which feature s fires
    fire_frac_SC: np.ndarray
    #: mean code of feature s over class c's images (zeros included)
    mean_act_SC: np.ndarray
    #: number of images of each class
    n_images_C: np.ndarray
    #: fraction of all images on which feature s fires
    firing_rate_S: np.ndarray


def _as_batches(codes: Any, labels: Any, chunk: int = 8192) -> Iterator[tuple[Any, Any]]:
    if labels is None:
        yield from codes
        return
    if len(codes) != len(labels):
        raise ValueError(f"{len(codes)} rows of codes but {len(labels)} labels")
    for start in range(0, len(labels), chunk):
        yield codes[start : start + chunk], labels[start : start + chunk]


def class_stats(
    codes: Any,
    labels: Any = None,
    n_classes: int | None = None,
    *,
    fire_threshold: float = 0.0,
    progress: bool = False,
) -> ClassStats:
    """Per-class firing fractions and mean codes, accumulated batch by batch so that stores
    larger than memory stream through. ``codes`` is either codes_NS (array or tensor) with
    ``labels`` [N], or an iterable of (codes_BS, labels_B) batches with ``labels=None``."""
    if n_classes is None:
        if labels is None:
            raise ValueError("pass n_classes when codes is an iterator of batches")
        n_classes = int(np.max(np.asarray(labels))) + 1
    fire_CS = act_CS = None
    n_images_C = torch.zeros(n_classes, dtype=torch.int64)
    for codes_BS, labels_B in tqdm(_as_batches(codes, labels), disable=not progress):
        codes_BS = _as_float_tensor(codes_BS).cpu()
        labels_B = torch.as_tensor(np.asarray(labels_B)).to(torch.int64).reshape(-1)
        if codes_BS.ndim != 2 or codes_BS.shape[0] != labels_B.shape[0]:
            raise ValueError(
                f"a batch needs codes [B, S] and labels [B]; got {tuple(codes_BS.shape)} "
                f"and {tuple(labels_B.shape)}"
            )
        if labels_B.numel() and (labels_B.min() < 0 or labels_B.max() >= n_classes):
            raise ValueError(
                f"labels must be class indices in [0, {n_classes}); got "
                f"{int(labels_B.min())}..{int(labels_B.max())}"
            )
        if fire_CS is None:
            fire_CS = torch.zeros(n_classes, codes_BS.shape[1])
            act_CS = torch.zeros(n_classes, codes_BS.shape[1])
        # index_add_ is a per-class scatter, O(B·S); a one-hot matmul would be O(B·S·C).
        fire_CS.index_add_(0, labels_B, (codes_BS > fire_threshold).float())
        act_CS.index_add_(0, labels_B, codes_BS)
        n_images_C += torch.bincount(labels_B, minlength=n_classes)
    if fire_CS is None:
        raise ValueError("no codes to accumulate: the input is empty")
    denom_C = n_images_C.clamp(min=1).float()
    return ClassStats(
        fire_frac_SC=(fire_CS / denom_C[:, None]).T.contiguous().numpy(),
        mean_act_SC=(act_CS / denom_C[:, None]).T.contiguous().numpy(),
        n_images_C=n_images_C.numpy(),
        firing_rate_S=(fire_CS.sum(0) / max(int(n_images_C.sum()), 1)).numpy(),
    )


def class_sets(
    codes: Any,
    labels: Any = None,
    n_classes: int | None = None,
    rule: ClassSetRule | None = None,
) -> np.ndarray:
    """Boolean class_sets_SC: C_k for every feature, by ``rule`` (default `ClassSetRule()`)."""
    rule = rule or ClassSetRule()
    return rule.apply(class_stats(codes, labels, n_classes, fire_threshold=rule.fire_threshold))


def class_stats_from_store(
    store: Store,
    sae: SAE | Baseline,
    layer: int,
    *,
    fire_threshold: float = 0.0,
    batch_size: int = 4096,
    progress: bool = True,
) -> ClassStats:
    """Per-class statistics of ``sae.encode`` over a store's CLS tokens at ``layer``. Reads
    ``store.cls(layer)`` in order, chunk by chunk (`saekit.sae.codes.iter_codes`), beside
    ``store.labels`` (``store.batches`` shuffles and drops labels). The baselines below encode
    like an SAE and work as ``sae`` too."""
    labels_N = np.asarray(store.labels)
    codes = iter_codes(
        sae, store.cls(layer), batch_size, progress=progress, desc=f"layer {layer} codes"
    )
    batches = ((codes_BS, labels_N[start : start + len(codes_BS)]) for start, codes_BS in codes)
    return class_stats(batches, None, len(store.class_names), fire_threshold=fire_threshold)


def class_sets_from_store(
    store: Store,
    sae: SAE | Baseline,
    layer: int,
    rule: ClassSetRule | None = None,
    *,
    batch_size: int = 4096,
    progress: bool = True,
) -> np.ndarray:
    """Boolean class_sets_SC of ``sae``'s features over a store's labelled CLS tokens."""
    rule = rule or ClassSetRule()
    stats = class_stats_from_store(
        store,
        sae,
        layer,
        fire_threshold=rule.fire_threshold,
        batch_size=batch_size,
        progress=progress,
    )
    return rule.apply(stats)


# --------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class BaselineCfg:
    """The two widths a baseline shares with an SAE's ``cfg``, so it reads stores like one."""

    d_in: int
    """Width of the activations it encodes."""
    d_sae: int
    """Number of features."""


class NeuronBaseline:
    """The encoder's own neurons as features: code_d = ReLU(x_d - mean_d). Centring is the
    normalisation that matters for firing (an SAE subtracts b_dec, near the data mean); any
    positive rescaling the SAE applies changes no firing decision under a scale-free rule."""

    def __init__(self, mean_D: torch.Tensor) -> None:
        self.mean_D = mean_D.float()
        self.cfg = BaselineCfg(d_in=len(self.mean_D), d_sae=len(self.mean_D))

    @classmethod
    def fit(cls, acts_ND: Any) -> NeuronBaseline:
        return cls(_as_float_tensor(acts_ND).mean(0))

    def encode(self, acts_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(acts_BD.float() - self.mean_D.to(acts_BD.device))


class RandomDirections:
    """Random unit directions as features: code_s = ReLU(w_s · (x - mean) + b_s), with b_s set
    so that the direction fires on a chosen fraction of images (the SAE's firing rate)."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, mean_D: torch.Tensor) -> None:
        self.W_enc, self.b_enc, self.mean_D = W_enc.float(), b_enc.float(), mean_D.float()
        self.cfg = BaselineCfg(d_in=self.W_enc.shape[0], d_sae=self.W_enc.shape[1])

    @classmethod
    def fit(
        cls,
        acts_ND: Any,
        n: int,
        firing_rate: float | Sequence[float] | np.ndarray,
        seed: int = 0,
        mean_D: torch.Tensor | None = None,
    ) -> RandomDirections:
        """``firing_rate``: one fraction for all directions, or one per direction (match an
        SAE's per-feature rates, dead features included). Biases come from quantiles of the
        projections of ``acts_ND`` (a sample of the store is enough)."""
        acts_ND = _as_float_tensor(acts_ND)
        if acts_ND.ndim != 2 or acts_ND.shape[0] < 1:
            raise ValueError(f"acts must be [N, D] with N >= 1, got {tuple(acts_ND.shape)}")
        rate_S = torch.as_tensor(np.asarray(firing_rate, dtype=np.float64)).expand(n)
        if rate_S.min() < 0 or rate_S.max() > 1:
            raise ValueError("firing_rate must lie in [0, 1]")
        mean_D = acts_ND.mean(0) if mean_D is None else mean_D.float()
        generator = torch.Generator().manual_seed(seed)
        W_DS = torch.randn(acts_ND.shape[1], n, generator=generator)
        W_DS /= W_DS.norm(dim=0, keepdim=True)
        centred_ND = acts_ND - mean_D
        n_rows = acts_ND.shape[0]
        n_fire_S = torch.round(rate_S * n_rows).long()
        b_S = torch.empty(n)
        for start in range(0, n, 1024):
            proj_NK = centred_ND @ W_DS[:, start : start + 1024]
            desc_NK = proj_NK.sort(dim=0, descending=True).values
            # Pad above the largest and below the smallest projection, then put the threshold
            # halfway between the k-th and (k+1)-th largest: exactly k rows fire, and float
            # rounding in encode() cannot tip a row sitting on the threshold.
            desc_NK = torch.cat([desc_NK[:1] + 1.0, desc_NK, desc_NK[-1:] - 1.0])
            k_K = n_fire_S[start : start + 1024]
            cols_K = torch.arange(k_K.numel())
            b_S[start : start + 1024] = -(desc_NK[k_K, cols_K] + desc_NK[k_K + 1, cols_K]) / 2
        return cls(W_DS, b_S, mean_D)

    def encode(self, acts_BD: torch.Tensor) -> torch.Tensor:
        x = acts_BD.float() - self.mean_D.to(acts_BD.device)
        return torch.relu(x @ self.W_enc.to(x.device) + self.b_enc.to(x.device))


#: What `class_stats_from_store` can encode with besides an SAE.
Baseline = NeuronBaseline | RandomDirections


def neuron_codes(acts_ND: Any, mean_D: torch.Tensor | None = None) -> torch.Tensor:
    """The neuron baseline's codes_ND = ReLU(acts - mean), mean over ``acts`` unless given."""
    baseline = NeuronBaseline.fit(acts_ND) if mean_D is None else NeuronBaseline(mean_D)
    return baseline.encode(_as_float_tensor(acts_ND))


def random_direction_codes(
    acts_ND: Any, n: int, firing_rate: float | Sequence[float] | np.ndarray, seed: int = 0
) -> torch.Tensor:
    """The random-direction baseline's codes_NS: ``n`` random unit directions whose ReLU
    biases make each fire on ``firing_rate`` of the rows of ``acts``."""
    directions = RandomDirections.fit(acts_ND, n, firing_rate, seed)
    return directions.encode(_as_float_tensor(acts_ND))


TABLE2_ROWS = ("Original encoder", "Random vectors", "SAE features")


def class_sets_with_baselines(
    store: Store,
    saes: Mapping[int, SAE],
    rule: ClassSetRule | None = None,
    *,
    n_fit: int = 8192,
    seed: int = 0,
    batch_size: int = 4096,
    progress: bool = True,
) -> dict[str, dict[int, np.ndarray]]:
    """Class sets of every layer's SAE features and of both baselines, keyed by Table 2's
    rows: the neurons (centred with a sample mean) and as many random directions as SAE
    features, each direction matching one SAE feature's firing rate on the store. The
    baselines are fitted on ``n_fit`` rows drawn at random (seeded) from the store."""
    rule = rule or ClassSetRule()
    out: dict[str, dict[int, np.ndarray]] = {row: {} for row in TABLE2_ROWS}
    for layer, sae in saes.items():
        common = dict(fire_threshold=rule.fire_threshold, batch_size=batch_size, progress=progress)
        stats = class_stats_from_store(store, sae, layer, **common)
        out["SAE features"][layer] = rule.apply(stats)
        acts_ND = store.cls(layer)
        rng = np.random.default_rng(seed + layer)
        rows = np.sort(rng.choice(len(acts_ND), size=min(n_fit, len(acts_ND)), replace=False))
        sample_ND = np.asarray(acts_ND[rows], dtype=np.float32)
        neurons = NeuronBaseline.fit(sample_ND)
        directions = RandomDirections.fit(
            sample_ND, len(stats.firing_rate_S), stats.firing_rate_S, seed=seed + layer
        )
        for row, baseline in (("Original encoder", neurons), ("Random vectors", directions)):
            out[row][layer] = rule.apply(class_stats_from_store(store, baseline, layer, **common))
    return out


def _blocks(class_sets: np.ndarray | sparse.sparray | Mapping[int, Any]) -> list[sparse.csr_array]:
    """One sparse boolean block per layer (a single array is one block)."""
    values = list(class_sets.values()) if isinstance(class_sets, Mapping) else [class_sets]
    if not values:
        raise ValueError("no class sets given")
    return [sparse.csr_array(v, dtype=bool) for v in values]


def table2(
    class_sets: Mapping[str, np.ndarray | Mapping[int, np.ndarray]],
    taxonomy: Taxonomy,
    *,
    thresholds: Sequence[float] = (0.99, 0.75),
    min_classes: int = 2,
    progress: bool = False,
) -> pd.DataFrame:
    """Paper 003 Table 2: per row (e.g. `class_sets_with_baselines`'s output), the number of
    superordinate features with coverage above each threshold, in two readings, since the paper
    does not say which it used:

    - ``> t``: features on at least ``min_classes`` classes but not on every class;
    - ``> t incl. every class``: the same plus the features that fire on every class, whose LCH
      holds all the classes, so their coverage is 1 by construction (``# Fire on every class``
      counts them apart: they are no concept, and on real data they can outnumber the rest).

    A single-class set always has coverage 1 (paper 000 §3.2), so those never count; the last
    columns give the number of features and of those firing on no class."""
    n_all = len(taxonomy.leaves)
    records = {}
    for row, sets in class_sets.items():
        m = taxonomy.metrics(sparse.vstack(_blocks(sets)).tocsr(), progress=progress)
        every_F = m.n_classes_F == n_all
        multi_F = (m.n_classes_F >= min_classes) & ~every_F
        record = {f"> {t:g}": int(np.sum(multi_F & (m.coverage_F > t))) for t in thresholds}
        record["# Fire on every class"] = int(np.sum(every_F))
        for t in thresholds:
            record[f"> {t:g} incl. every class"] = int(
                np.sum((multi_F | every_F) & (m.coverage_F > t))
            )
        record["# Features"] = len(m.n_classes_F)
        record["# Fire on no class"] = int(np.sum(m.n_classes_F == 0))
        records[row] = record
    return pd.DataFrame.from_dict(records, orient="index").rename_axis("Ontological Coverage")


# --------------------------------------------------------------------------- output


def feature_table(
    class_sets: np.ndarray | sparse.sparray | Mapping[int, Any],
    taxonomy: Taxonomy,
    *,
    layer: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per feature that fires on at least one class: layer, feature, n_classes, lch
    (wnid), lch_name, height, coverage and an automatic label. ``class_sets`` is one layer's
    class_sets_SC (named by ``layer``) or ``{layer: class_sets_SC}``; all layers are scored in
    one vectorised pass. ``table.attrs['n_no_class']`` counts the excluded features per layer."""
    per_layer = class_sets if isinstance(class_sets, Mapping) else {layer: class_sets}
    blocks = _blocks(per_layer)
    widths = [block.shape[0] for block in blocks]
    m = taxonomy.metrics(sparse.vstack(blocks).tocsr(), progress=progress)
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.array(list(per_layer.keys()), dtype=object), widths),
            "feature": np.concatenate([np.arange(w) for w in widths]),
            "n_classes": m.n_classes_F,
            # lch_F = -1 (no LCH) picks the trailing None
            "lch": np.array(taxonomy.synsets + [None], dtype=object)[m.lch_F],
            "height": m.height_F,
            "coverage": m.coverage_F,
        }
    )
    fired = frame["n_classes"] > 0
    bounds = np.cumsum([0, *widths])
    n_no_class = {
        key: int(np.sum(m.n_classes_F[lo:hi] == 0))
        for key, lo, hi in zip(per_layer, bounds[:-1], bounds[1:], strict=True)
    }
    frame = frame[fired].reset_index(drop=True)
    frame.insert(4, "lch_name", frame["lch"].map(taxonomy.names))
    frame["label"] = feature_labels(frame)
    frame.attrs["n_no_class"] = n_no_class
    return frame


def feature_labels(table: pd.DataFrame) -> pd.Series:
    """Automatic names from each feature's LCH, e.g. 'layer 36 / 657: elasmobranch (coverage
    1.00, 5 classes)'; the layer part is left out where the layer is unknown."""
    where = np.where(table["layer"].isna(), "", "layer " + table["layer"].astype(str) + " / ")
    n = table["n_classes"]
    return (
        where
        + table["feature"].astype(str)
        + ": "
        + table["lch_name"].fillna("no common hypernym").astype(str)
        + " (coverage "
        + table["coverage"].map("{:.2f}".format).astype(str)
        + ", "
        + n.astype(str)
        + np.where(n == 1, " class)", " classes)")
    )


def plot_height_vs_coverage(
    table: pd.DataFrame,
    layers: Sequence[Any] | None = None,
    *,
    min_classes: int = 1,
    height_bin: float = 0.5,
    coverage_bins: int = 20,
    ncols: int = 4,
) -> Figure:
    """Paper 000 Fig. 2: per layer, a 2D histogram of LCH height (x) against ontological
    coverage (y) of the features in a `feature_table`; log-scaled counts, since single-class
    features (top-left corner) outnumber the rest by orders of magnitude. Returns a Figure."""
    import seaborn as sns
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    layers = list(pd.unique(table["layer"])) if layers is None else list(layers)
    if not layers:
        raise ValueError("the table has no layers to plot")
    data = table[(table["n_classes"] >= min_classes) & table["coverage"].notna()]
    top = max(float(data["height"].max()) if len(data) else 1.0, 1.0)
    x_edges = np.arange(0.0, top + height_bin, height_bin)
    y_edges = np.linspace(0.0, 1.0, coverage_bins + 1)
    ncols = min(ncols, len(layers))
    nrows = -(-len(layers) // ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.2 * nrows), layout="constrained")
    axes = np.atleast_1d(
        fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    ).ravel()
    for ax, layer in zip(axes, layers, strict=False):
        panel = data[data["layer"] == layer] if layer is not None else data[data["layer"].isna()]
        if len(panel):
            sns.histplot(
                panel, x="height", y="coverage", bins=[x_edges, y_edges], ax=ax,
                cmap="mako_r", norm=LogNorm(), vmin=None, vmax=None, cbar=True,
            )  # fmt: skip
        ax.set_title(
            f"layer {layer} ({len(panel)} features)"
            if layer is not None
            else f"{len(panel)} features"
        )
        ax.set_xlabel("LCH height")
        ax.set_ylabel("ontological coverage")
        ax.set_xlim(0, x_edges[-1])
        ax.set_ylim(0, 1.02)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    return fig
