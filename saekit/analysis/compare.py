"""Comparing two encoders: match SAE features by activation correlation (paper 002 §4, §9).

Paper 002 finds "corresponding features in both models by starting with examples known to
activate a feature in one model and identifying features in the second model with high
activation on the same examples". Done for every feature at once, that is a correlation: over
the same images, each image scored per feature (its maximum patch activation, its mean, or its
CLS activation, as for exemplars), the Pearson correlation between a feature of SAE A and every
feature of SAE B; the best-correlated B feature is its match. The patch grids of the two
encoders may differ (CLIP /16 vs DINOv2 /14), so matching works on image-level scores.

The pass streams both stores chunk by chunk and keeps only sums, sums of squares and the
``[F, S_B]`` cross products, in float64 (one-pass moments in float32 would cancel badly).
`plot_matched` draws matched exemplars side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sae_lens import SAE
from tqdm.auto import tqdm
from transformers import BaseImageProcessor

from saekit.activations import Store
from saekit.analysis.exemplar_plots import exemplar_figure
from saekit.analysis.exemplars import RANK_BY, ExemplarScan
from saekit.data import ImageDataset
from saekit.sae.codes import iter_codes


@dataclass
class ExemplarSource:
    """What drawing one SAE's exemplars needs."""

    scan: ExemplarScan
    """The SAE's exemplar scan (`saekit.analysis.exemplars.scan_store`)."""
    store: Store
    """The activation store the scan read."""
    sae: SAE
    """The SAE."""
    dataset: ImageDataset
    """The image dataset the store was extracted from."""
    processor: BaseImageProcessor | None = None
    """The encoder's image processor, to show images as the model saw them."""


@dataclass
class FeatureMatches:
    """Correlations between chosen features of SAE A and every feature of SAE B."""

    features_a: np.ndarray
    """The A features, ``[F]``."""
    corr_FS: np.ndarray
    """Pearson correlation of each A feature with each B feature over the shared images
    (0 where a feature never varies)."""
    n_images: int
    """Images both stores hold."""

    def best(self, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(B features, correlations) of each A feature's ``top`` matches, best first."""
        order_FT = np.argsort(-self.corr_FS, axis=1, kind="stable")[:, :top]
        return order_FT, np.take_along_axis(self.corr_FS, order_FT, axis=1)

    def table(
        self,
        names_a: Callable[[int], str] | None = None,
        names_b: Callable[[int], str] | None = None,
    ) -> pd.DataFrame:
        """One row per A feature with its best B match, strongest matches first. ``names_a`` /
        ``names_b`` (e.g. two scans' ``name`` methods) label the features."""
        best_F, corr_F = (column[:, 0] for column in self.best(1))
        frame = pd.DataFrame(
            {"feature_a": self.features_a, "feature_b": best_F, "correlation": corr_F}
        )
        if names_a is not None:
            frame.insert(1, "name_a", [names_a(int(f)) for f in frame["feature_a"]])
        if names_b is not None:
            frame.insert(frame.columns.get_loc("feature_b") + 1, "name_b",
                         [names_b(int(f)) for f in frame["feature_b"]])  # fmt: skip
        return frame.sort_values("correlation", ascending=False, kind="stable").reset_index(
            drop=True
        )


def shared_rows(store_a: Store, store_b: Store) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each store holding the same images (matched by image id), in store A's order."""
    ids_a, ids_b = list(store_a.image_ids), list(store_b.image_ids)
    if ids_a == ids_b:
        rows = np.arange(len(ids_a))
        return rows, rows
    where_b = {image_id: row for row, image_id in enumerate(ids_b)}
    rows_a = np.array([row for row, i in enumerate(ids_a) if i in where_b], dtype=np.int64)
    rows_b = np.array([where_b[ids_a[row]] for row in rows_a], dtype=np.int64)
    if len(rows_a) == 0:
        raise ValueError(
            "the two stores share no image ids; extract both encoders' activations from the "
            "same dataset"
        )
    return rows_a, rows_b


class _RowsView:
    """Rows ``rows`` of an activation array, in that order, read only when sliced (what
    `saekit.sae.codes.iter_codes` reads chunk by chunk), so a memory-mapped store stays on disk."""

    def __init__(self, acts: Any, rows: np.ndarray) -> None:
        self.acts, self.rows = acts, rows
        self.shape = (len(rows), *acts.shape[1:])
        # where the rows came from, so iter_codes can check the SAE against them
        self.provenance = getattr(acts, "provenance", None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.asarray(self.acts[self.rows[index]])


def image_scores(
    store: Store,
    sae: SAE,
    layer: int,
    rows: np.ndarray,
    *,
    reduce: str = "max",
    tokens_per_chunk: int = 4096,
    images_per_chunk: int | None = None,
) -> Iterator[torch.Tensor]:
    """Per-image feature scores ``[b, S]`` (float64) of store ``rows``, chunk by chunk."""
    if reduce not in RANK_BY:
        raise ValueError(f"reduce must be one of {RANK_BY}, not {reduce!r}")
    acts = store.cls(layer) if reduce == "cls" else store.patches(layer)
    per_image = 1 if reduce == "cls" else int(acts.shape[1])
    chunk = images_per_chunk or max(1, tokens_per_chunk // per_image)
    for _, codes in iter_codes(sae, _RowsView(acts, np.asarray(rows)), chunk):
        if reduce == "max":
            codes = codes.amax(1)
        elif reduce == "mean":
            codes = codes.double().mean(1)
        yield codes.double()


def correlate_features(
    store_a: Store,
    sae_a: SAE,
    layer_a: int,
    store_b: Store,
    sae_b: SAE,
    layer_b: int,
    *,
    features_a: Sequence[int] | None = None,
    reduce: str = "max",
    tokens_per_chunk: int = 4096,
    null_seed: int | None = None,
    progress: bool = True,
) -> FeatureMatches:
    """Correlate ``features_a`` of SAE A (default: all) with every feature of SAE B over the
    images both stores hold. Memory: one chunk of codes per side plus ``[F, S_B]`` sums.

    With ``null_seed`` B's images are shuffled first (seeded), so every A feature is paired
    with unrelated images: the best correlation it then reaches is what chance gives with this
    many images and B features, the baseline a real match must beat."""
    rows_a, rows_b = shared_rows(store_a, store_b)
    if null_seed is not None:
        rows_b = rows_b[np.random.default_rng(null_seed).permutation(len(rows_b))]
    d_a = int(sae_a.cfg.d_sae)
    picked = np.arange(d_a) if features_a is None else np.asarray(features_a, dtype=np.int64)
    if picked.size == 0 or picked.min() < 0 or picked.max() >= d_a:
        raise IndexError(f"features_a must be indices in [0, {d_a})")
    # The chunk size in images is set by the wider of the two stores, so chunks stay aligned.
    patches = [
        store.patches(layer).shape[1] if reduce != "cls" else 1
        for store, layer in ((store_a, layer_a), (store_b, layer_b))
    ]
    images_per_chunk = max(1, tokens_per_chunk // max(patches))
    stream_a = image_scores(
        store_a, sae_a, layer_a, rows_a, reduce=reduce, images_per_chunk=images_per_chunk
    )
    stream_b = image_scores(
        store_b, sae_b, layer_b, rows_b, reduce=reduce, images_per_chunk=images_per_chunk
    )
    index = torch.from_numpy(picked)
    n = 0
    sum_a = sum_b = sq_a = sq_b = cross_FS = None
    n_chunks = -(-len(rows_a) // images_per_chunk)
    for scores_a, scores_b in tqdm(
        zip(stream_a, stream_b, strict=True), total=n_chunks, desc="matching", disable=not progress
    ):
        a_bF, b_bS = scores_a[:, index.to(scores_a.device)].cpu(), scores_b.cpu()
        if cross_FS is None:
            sum_a = torch.zeros(a_bF.shape[1], dtype=torch.float64)
            sum_b = torch.zeros(b_bS.shape[1], dtype=torch.float64)
            sq_a, sq_b = torch.zeros_like(sum_a), torch.zeros_like(sum_b)
            cross_FS = torch.zeros(a_bF.shape[1], b_bS.shape[1], dtype=torch.float64)
        n += len(a_bF)
        sum_a += a_bF.sum(0)
        sum_b += b_bS.sum(0)
        sq_a += (a_bF**2).sum(0)
        sq_b += (b_bS**2).sum(0)
        cross_FS += a_bF.T @ b_bS
    mean_a, mean_b = sum_a / n, sum_b / n
    cov_FS = cross_FS / n - mean_a[:, None] * mean_b[None, :]
    std_a = (sq_a / n - mean_a**2).clamp(min=0).sqrt()
    std_b = (sq_b / n - mean_b**2).clamp(min=0).sqrt()
    denom_FS = std_a[:, None] * std_b[None, :]
    corr_FS = torch.where(denom_FS > 1e-12, cov_FS / denom_FS.clamp(min=1e-300), 0.0)
    return FeatureMatches(picked, corr_FS.clamp(-1, 1).numpy(), n)


def plot_matched(
    side_a: ExemplarSource,
    side_b: ExemplarSource,
    pairs: Sequence[tuple[int, int]],
    *,
    k: int = 4,
    correlations: Sequence[float] | None = None,
    tile: float = 1.6,
) -> Figure:
    """Matched features side by side: one row per (A feature, B feature) pair, A's top ``k``
    exemplars on the left, B's on the right, each labelled with the feature's name; the
    correlation of the pair (when given) sits in the gap between the two sides."""
    if not pairs:
        raise ValueError("no feature pairs to draw")
    gap = 0.45  # width of the gap between the sides, in tiles
    fig = plt.figure(figsize=(tile * (2 * k + gap) + 0.4, tile * 1.2 * len(pairs) + 0.2))
    grid = fig.add_gridspec(len(pairs), 2 * k + 1, width_ratios=[1] * k + [gap] + [1] * k,
                            wspace=0.06, hspace=0.35, left=0.03, right=0.99, top=0.92,
                            bottom=0.02)  # fmt: skip
    for row, (feature_a, feature_b) in enumerate(pairs):
        for side, feature, first in ((side_a, feature_a, 0), (side_b, feature_b, k + 1)):
            axes = [fig.add_subplot(grid[row, first + i]) for i in range(k)]
            exemplar_figure(side.scan, side.store, side.sae, side.dataset, feature, k=k,
                            processor=side.processor, axes=axes, title="")  # fmt: skip
            axes[0].set_ylabel(side.scan.name(feature), fontsize=7)
        if correlations is not None:
            box = grid[row, k].get_position(fig)
            fig.text((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, f"↔\nr = {correlations[row]:.2f}",
                     ha="center", va="center", fontsize=8)  # fmt: skip
    return fig


def share_above_chance(
    matches: FeatureMatches, null: FeatureMatches, quantile: float = 0.99
) -> tuple[float, float]:
    """(share of A features whose best match beats the null's `quantile`, that cut-off)."""
    cut = float(np.quantile(null.best(1)[1][:, 0], quantile))
    return float((matches.best(1)[1][:, 0] > cut).mean()), cut


def plot_best_correlations(
    matches: FeatureMatches,
    null: FeatureMatches | None = None,
    *,
    label_a: str = "A",
    label_b: str = "B",
    ax: plt.Axes | None = None,
) -> Figure:
    """Histogram of each A feature's best correlation with any B feature; with ``null`` (the
    same matching on shuffled images, ``correlate_features(..., null_seed=0)``) its histogram
    too, and a line at the null's 99th percentile: A features right of it have a counterpart in
    B that chance does not explain, those left of it have none."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
    else:
        fig = ax.figure
    best = matches.best(1)[1][:, 0]
    bins = np.linspace(min(0.0, float(best.min())), 1.0, 41)
    ax.hist(best, bins=bins, color="#4c72b0", alpha=0.85, label=f"{label_a} features")
    if null is not None:
        chance = null.best(1)[1][:, 0]
        share, cut = share_above_chance(matches, null)
        ax.hist(chance, bins=bins, histtype="step", color="0.3", lw=1.5,
                label="same, images shuffled (chance)")  # fmt: skip
        ax.axvline(cut, color="#c44e52", ls="--", lw=1)
        right = cut < 0.6  # write on the side of the line with room
        ax.annotate(f"{share:.0%} above chance's\n99th percentile", (cut, 0.95),
                    xycoords=("data", "axes fraction"), xytext=(4 if right else -4, 0),
                    textcoords="offset points", va="top", ha="left" if right else "right",
                    fontsize=8, color="#c44e52")  # fmt: skip
    ax.set_xlabel(f"best correlation with any {label_b} feature")
    ax.set_ylabel(f"{label_a} features")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(f"Does each {label_a} feature have a counterpart in {label_b}?", fontsize=10)
    return fig
