"""A report card for one vision SAE: what a researcher choosing an SAE asks beyond MSE and L0.

One call, `report_card`, puts side by side (each part documented in its own module):

- **fidelity** (`saekit.sae.evaluate`): MSE, normalised MSE, explained variance, L0, dead and
  dense features;
- **downstream fidelity** (`saekit.analysis.fidelity`): the reconstruction spliced back into the
  encoder; accuracy and KL recovered against zero ablation (needs the encoder and images);
- **sparse probing** (`saekit.analysis.sparse_probing`): per class, a probe on the top-k features
  by mean difference, against the same on neurons;
- **stability** (`saekit.analysis.stability`): Hungarian matching against a twin trained with
  another seed;
- **absorption** (`saekit.analysis.absorption`): parent features of the WordNet hierarchy that go
  silent on a child's images;
- **Pareto** (`pareto_frame`): NMSE against L0 for a set of SAEs, with PCA and k-means baselines
  (`saekit.analysis.baselines`).

The card lives in ``analysis`` rather than in ``saekit.sae`` because it reads probes and the
WordNet analyses; the core stays free of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sae_lens import SAE

from saekit.activations import Store
from saekit.analysis.absorption import absorption_table
from saekit.analysis.baselines import baseline_front
from saekit.analysis.fidelity import Fidelity, downstream_fidelity
from saekit.analysis.sparse_probing import (
    DEFAULT_KS,
    mean_sparse_probing,
    sparse_probing_summary,
)
from saekit.analysis.stability import Matching, stability
from saekit.data import ImageDataset
from saekit.models import Encoder
from saekit.sae import SAEMetrics, encode_in_batches, evaluate
from saekit.sae.codes import check_sae_matches_store
from saekit.taxonomy import Taxonomy


@dataclass
class ReportCard:
    """Everything `report_card` measured for one SAE (parts it could not measure are None)."""

    name: str
    """The SAE's name (its label)."""
    fidelity: SAEMetrics
    """MSE, explained variance, L0, dead and dense features on the evaluation rows."""
    sparse_probing: pd.DataFrame
    """Mean balanced accuracy over classes: rows 'SAE features' and 'neurons', columns k."""
    downstream: Fidelity | None = None
    """Accuracy and KL with the reconstruction spliced in (None without encoder and images)."""
    stability: Matching | None = None
    """Matching against the twin SAE (None without a twin)."""
    absorption: pd.DataFrame | None = None
    """One row per (parent synset, child class) (None without WordNet ids)."""
    notes: list[str] = field(default_factory=list)
    """Why a part is missing."""

    def row(self) -> dict[str, float]:
        """The card as one flat table row."""
        m = self.fidelity
        row: dict[str, float] = {
            "MSE": m.mse,
            "NMSE": 1.0 - m.explained_variance,
            "explained variance": m.explained_variance,
            "L0": m.l0,
            "dead": m.n_dead,
            "dense": m.n_dense,
        }
        for k, accuracy in self.sparse_probing.loc["SAE features"].items():
            row[f"sparse probe k={k}"] = float(accuracy)
        for k, accuracy in self.sparse_probing.loc["neurons"].items():
            row[f"neuron probe k={k}"] = float(accuracy)
        if self.downstream is not None:
            row["acc recovered"] = self.downstream.accuracy_recovered
            row["KL recovered"] = self.downstream.kl_recovered
        if self.stability is not None:
            row["stability (mean cos)"] = self.stability.mean_cosine()
            row["stable share (>0.9)"] = self.stability.share_above(0.9)
        if self.absorption is not None and len(self.absorption):
            row["mean absorption"] = float(self.absorption["absorption"].mean())
        return row

    def figure(self) -> Figure:
        """Sparse probing by k (SAE vs neurons) and, when measured, the absorption per pair."""
        panels = 2 if self.absorption is not None and len(self.absorption) else 1
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
        ax = axes[0, 0]
        for name, values in self.sparse_probing.iterrows():
            ax.plot([str(k) for k in values.index], values.to_numpy(), marker="o", label=name)
        ax.set(xlabel="k features", ylabel="balanced accuracy", title="sparse probing",
               ylim=(0.45, 1.02))  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(frameon=False)
        if panels == 2:
            ax = axes[0, 1]
            table = self.absorption.sort_values("absorption")
            labels = [f"{p} > {c}" for p, c in zip(table["parent"], table["child"], strict=True)]
            ax.barh(labels, table["absorption"], color="tab:red")
            ax.set(xlabel="absorption (parent silent, child fires)", xlim=(0, 1),
                   title="hierarchical absorption")  # fmt: skip
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(self.name)
        fig.tight_layout()
        return fig


def _split_rows(n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(n_rows)
    return rows[rows % 2 == 0], rows[rows % 2 == 1]


def report_card(
    sae: SAE,
    store: Store,
    layer: int,
    *,
    train_store: Store | None = None,
    twin: SAE | None = None,
    taxonomy: Taxonomy | None = None,
    encoder: Encoder | None = None,
    dataset: ImageDataset | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    neurons: pd.Series | None = None,
    max_images: int = 256,
    name: str | None = None,
    seed: int = 0,
) -> ReportCard:
    """The report card of ``sae`` on the CLS tokens of ``layer`` in ``store``.

    ``train_store`` fits the sparse probes (default: the even rows of ``store``, scored on the
    odd ones). ``twin`` (the same SAE trained with another seed) gives stability. ``taxonomy``
    (default: from the store's WordNet ids when it has them) gives absorption. ``encoder``,
    ``dataset`` (the images the store was made from) and ``head`` (a classifier on the
    encoder's last-layer CLS token) give downstream fidelity on the first ``max_images`` images.
    ``neurons`` is the neuron row of sparse probing when computed before (`neuron_probing`: the
    same for every SAE on one layer).
    """
    check_sae_matches_store(sae, store, layer, "cls")
    acts_ND = store.cls(layer)
    labels_N = np.asarray(store.labels)
    card = ReportCard(
        name=name or sae.cfg.metadata.get("saekit", {}).get("name", "SAE"),
        fidelity=evaluate(sae, acts_ND),
        sparse_probing=pd.DataFrame(),
    )
    train_x, train_y, eval_x, eval_y = _probe_split(store, layer, train_store)
    card.sparse_probing = sparse_probing_summary(
        (encode_in_batches(sae, train_x), encode_in_batches(sae, eval_x)),
        neurons if neurons is not None else (train_x, eval_x),
        train_y,
        eval_y,
        ks=ks,
        seed=seed,
    )
    if twin is not None:
        card.stability = stability(sae, twin)
    else:
        card.notes.append("stability: no twin SAE given")
    if taxonomy is None and getattr(store, "wnids", None):
        taxonomy = Taxonomy.from_store(store)
    if taxonomy is not None:
        card.absorption = absorption_table(sae, acts_ND, labels_N, taxonomy)
    else:
        card.notes.append("absorption: the store has no WordNet ids")
    if encoder is not None and dataset is not None and head is not None:
        rows = [int(r) for r in np.asarray(store.rows)[:max_images]]
        images = [dataset.load(r) for r in rows]
        card.downstream = downstream_fidelity(
            encoder, images, labels_N[: len(rows)], sae, layer, head
        )
    else:
        card.notes.append("downstream fidelity: needs encoder, dataset and head")
    return card


def _probe_split(
    store: Store, layer: int, train_store: Store | None
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """(train features, labels, eval features, labels) as `report_card` splits them."""
    acts = torch.from_numpy(np.array(store.cls(layer), dtype=np.float32))
    labels = np.asarray(store.labels)
    if train_store is not None:
        train = torch.from_numpy(np.array(train_store.cls(layer), dtype=np.float32))
        return train, np.asarray(train_store.labels), acts, labels
    fit, held = _split_rows(len(labels))
    return acts[fit], labels[fit], acts[held], labels[held]


def neuron_probing(
    store: Store,
    layer: int,
    *,
    train_store: Store | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> pd.Series:
    """The neuron row of sparse probing on ``layer`` (what `report_card` compares SAE features
    with), to compute once for many SAEs of one layer."""
    train_x, train_y, eval_x, eval_y = _probe_split(store, layer, train_store)
    return mean_sparse_probing(train_x, train_y, eval_x, eval_y, ks=ks, seed=seed)


def cards_table(cards: Sequence[ReportCard]) -> pd.DataFrame:
    """One row per card."""
    return pd.DataFrame({card.name: card.row() for card in cards}).T


def pareto_frame(
    saes: Mapping[str, SAE],
    store: Store,
    layer: int,
    *,
    fit_store: Store | None = None,
    baseline_ks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    seed: int = 0,
) -> pd.DataFrame:
    """NMSE against L0 on ``store``'s CLS rows of ``layer``: one row per SAE, plus PCA (top-k
    components) and k-means (k centroids, one active) fitted on ``fit_store`` (default: the same
    rows). Columns: method, name, L0, NMSE."""
    acts_ND = store.cls(layer)
    rows = []
    for sae_name, sae in saes.items():
        metrics = evaluate(sae, acts_ND)
        rows.append({"method": "SAE", "name": sae_name, "L0": metrics.l0,
                     "NMSE": 1.0 - metrics.explained_variance})  # fmt: skip
    fit = (fit_store or store).cls(layer)
    width = int(acts_ND.shape[-1])
    for row in baseline_front(np.asarray(fit), np.asarray(acts_ND), [
            k for k in baseline_ks if k <= width], seed=seed):  # fmt: skip
        rows.append({**row, "name": f"{row['method']} k={row['k']}"})
    return pd.DataFrame(rows)[["method", "name", "L0", "NMSE"]]


def plot_pareto(frame: pd.DataFrame) -> Figure:
    """NMSE against L0 (log x): SAEs as labelled points, each baseline as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, part in frame.groupby("method", sort=False):
        part = part.sort_values("L0")
        if method == "SAE":
            ax.scatter(part["L0"], part["NMSE"], zorder=3, label="SAEs")
            for _, row in part.iterrows():
                ax.annotate(row["name"], (row["L0"], row["NMSE"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        elif method == "k-means":
            ax.scatter(part["L0"], part["NMSE"], marker="x", color="grey",
                       label="k-means (L0 = 1, k centroids)")  # fmt: skip
        else:
            ax.plot(part["L0"], part["NMSE"], marker=".", label=f"{method} (top-k components)")
    ax.set(xscale="log", xlabel="L0 (active latents per input)", ylabel="normalised MSE",
           title="sparsity against fidelity")  # fmt: skip
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
