"""Seaborn figures, and the small tables behind them, that the book's chapters share.

Every function returns a matplotlib `Figure` (or a DataFrame / text for the tables), so a chapter
can show it inline and also hand it to `saekit.analysis.widgets.switcher` as a pre-rendered view.

The layer sweep (paper 000 Fig. 1, paper 003 Fig. 8) puts a linear probe's accuracy on the left
axis and the SAE's unsupervised metrics (MSE, L0, L1) on the right, one x tick per layer. The
three metrics live on very different scales (MSE ~1e-3, L0 ~10², L1 anything), so by default
each is drawn as a fraction of its own largest value over layers: what the figure is about is
the *shape* of each curve across depth, and the legend keeps every metric's largest value.
``scale="log"`` draws the raw values on a log axis instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from scipy import stats

if TYPE_CHECKING:  # SAELens, which the metrics module imports, is slow to import
    from saekit.sae.metrics import SAEMetrics

#: Column name -> axis/legend label of the SAE metrics a layer-sweep table holds.
METRIC_LABELS = {
    "mse": "MSE",
    "l0": "L0",
    "l1": "L1",
    "explained_variance": "variance explained",
    "dead": "dead latents",
    "dense": "dense latents",
}
SWEEP_METRICS = ("mse", "l0", "l1")
ACCURACY = "probe_accuracy"


def layer_sweep_table(
    sae_metrics: Mapping[int, SAEMetrics], probe_accuracy: Mapping[int, float]
) -> pd.DataFrame:
    """One row per layer: probe accuracy and the SAE's held-out metrics.

    `sae_metrics` maps layer -> `saekit.sae.SAEMetrics` (what `saekit.sae.evaluate` returns);
    `probe_accuracy` maps layer -> top-1 accuracy of that layer's probe. Both must cover the
    same layers.
    """
    if set(sae_metrics) != set(probe_accuracy):
        raise ValueError(
            f"SAE metrics cover layers {sorted(sae_metrics)} but probe accuracies cover "
            f"{sorted(probe_accuracy)}; evaluate both on the same layers"
        )
    rows = [
        {
            "layer": layer,
            ACCURACY: float(probe_accuracy[layer]),
            "mse": m.mse,
            "explained_variance": m.explained_variance,
            "l0": m.l0,
            "l1": m.l1,
            "dead": m.n_dead,
            "dense": m.n_dense,
        }
        for layer, m in sorted(sae_metrics.items())
    ]
    return pd.DataFrame(rows).set_index("layer")


def _check_columns(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(
            f"the table has no column(s) {missing}; it has {list(table.columns)}. "
            "Build it with saekit.analysis.plots.layer_sweep_table."
        )


def layer_sweep_figure(
    table: pd.DataFrame,
    *,
    accuracy: str = ACCURACY,
    metrics: Sequence[str] = SWEEP_METRICS,
    scale: str = "relative",
    chance: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 4.5),
) -> Figure:
    """Probe accuracy (left axis) and SAE metrics (right axis) against layer, paper style.

    `table` is indexed by layer (as `layer_sweep_table` builds it). ``scale="relative"`` draws
    each metric divided by its largest absolute value over layers (the legend gives that value);
    ``scale="log"`` draws the raw values on a log axis. `chance`, if given, is drawn as a dotted
    line on the accuracy axis.
    """
    if scale not in ("relative", "log"):
        raise ValueError(f"scale must be 'relative' or 'log', not {scale!r}")
    _check_columns(table, [accuracy, *metrics])
    if table.empty:
        raise ValueError("the layer-sweep table is empty: train and evaluate at least one layer")
    layers = np.asarray(table.index, dtype=int)
    metric_colors = sns.color_palette("deep", len(metrics) + 1)[1:]

    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=figsize)
        right = ax.twinx()
        sns.lineplot(
            x=layers,
            y=table[accuracy].to_numpy(dtype=float),
            ax=ax,
            marker="o",
            linewidth=2.5,
            color=sns.color_palette("deep")[0],
            label="probe accuracy",
        )
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        for metric, color, marker in zip(metrics, metric_colors, "s^Dvp<>", strict=False):
            values = table[metric].to_numpy(dtype=float)
            name = METRIC_LABELS.get(metric, metric)
            if scale == "relative":
                peak = float(np.nanmax(np.abs(values))) if len(values) else 0.0
                values = values / peak if peak > 0 else values
                name = f"{name} (max {peak:.3g})"
            sns.lineplot(
                x=layers,
                y=values,
                ax=right,
                marker=marker,
                linestyle="--",
                color=color,
                label=name,
            )
        ax.set_xlabel("layer (CLS token)")
        ax.set_ylabel("linear probe top-1 accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(layers)
        if scale == "relative":
            right.set_ylim(0, 1.05)
            right.set_ylabel("SAE metric ÷ its max over layers")
        else:
            right.set_yscale("log")
            right.set_ylabel("SAE metric (log scale)")
        right.grid(False)
        handles, labels = ax.get_legend_handles_labels()
        more_handles, more_labels = right.get_legend_handles_labels()
        if right.get_legend() is not None:
            right.get_legend().remove()
        ax.legend(
            handles + more_handles,
            labels + more_labels,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.15),
            ncol=min(len(labels) + len(more_labels), 5),
            frameon=False,
        )
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def frequency_histogram_figure(
    frequencies: np.ndarray,
    *,
    n_rows: int | None = None,
    bins: int = 30,
    dense_threshold: float = 0.01,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 3.4),
) -> Figure:
    """Histogram of log10 latent firing frequency; dead latents are counted in the title.

    With `n_rows` (the evaluation set's size) the x axis starts at the rarest observable
    frequency, 1 / n_rows, so histograms of several SAEs scored on one set share their axis.
    The dashed line marks `dense_threshold` (latents right of it count as dense).
    """
    freqs = np.asarray(frequencies, dtype=np.float64)
    if freqs.ndim != 1 or len(freqs) == 0:
        raise ValueError(f"frequencies must be a non-empty 1-D array, got shape {freqs.shape}")
    if ((freqs < 0) | (freqs > 1)).any():
        raise ValueError("frequencies must lie in [0, 1] (fractions of inputs a latent fires on)")
    live = freqs[freqs > 0]
    if n_rows is not None:
        low = np.log10(1.0 / n_rows)
    else:
        low = np.log10(live.min()) if len(live) else np.log10(dense_threshold) - 1
    edges = np.linspace(low - 0.05, 0.0, bins + 1)
    n_dead = int((freqs == 0).sum())
    n_dense = int((freqs > dense_threshold).sum())

    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=figsize)
        sns.histplot(x=np.log10(live), bins=edges.tolist(), ax=ax, color="C0", edgecolor="w")
        ax.axvline(np.log10(dense_threshold), color="C3", linestyle="--", linewidth=1)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("log10 firing frequency")
        ax.set_ylabel("latents")
        summary = f"{len(freqs)} latents: {n_dead} dead, {n_dense} dense (> {dense_threshold:g})"
        ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
        fig.tight_layout()
    return fig


def frequency_by_layer_figure(
    frequencies: Mapping[int, np.ndarray],
    *,
    n_rows: int | None = None,
    bins: int = 30,
    dense_threshold: float = 0.01,
    figsize: tuple[float, float] = (8.0, 4.0),
) -> Figure:
    """Every layer's latent-frequency histogram in one figure (step outlines, one colour per
    layer, dead latents counted in the legend): the static overview of a per-layer widget.

    `frequencies` maps layer -> per-latent firing frequency [S]; `n_rows` as in
    `frequency_histogram_figure`.
    """
    if not frequencies:
        raise ValueError("no layers to draw")
    live = {layer: np.asarray(f, dtype=np.float64) for layer, f in sorted(frequencies.items())}
    logs = {layer: np.log10(f[f > 0]) for layer, f in live.items()}
    lowest = min((x.min() for x in logs.values() if len(x)), default=np.log10(dense_threshold) - 1)
    low = np.log10(1.0 / n_rows) if n_rows is not None else lowest
    edges = np.linspace(low - 0.05, 0.0, bins + 1)
    names = {layer: f"{layer} ({int((f == 0).sum())} dead)" for layer, f in live.items()}
    long = pd.DataFrame(
        {
            "log10 firing frequency": np.concatenate(list(logs.values())),
            "layer": np.concatenate([[names[layer]] * len(x) for layer, x in logs.items()]),
        }
    )
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=figsize)
        sns.histplot(
            data=long,
            x="log10 firing frequency",
            hue="layer",
            hue_order=list(names.values()),
            bins=edges.tolist(),
            element="step",
            fill=False,
            palette="viridis",
            ax=ax,
        )
        ax.axvline(np.log10(dense_threshold), color="C3", linestyle="--", linewidth=1)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylabel("latents")
        ax.set_title("How often each SAE latent fires, layer by layer", fontsize=10)
        fig.tight_layout()
    return fig


def metric_correlations(
    table: pd.DataFrame,
    target: str = ACCURACY,
    metrics: Sequence[str] = SWEEP_METRICS,
) -> pd.DataFrame:
    """Pearson and Spearman correlation (scipy, two-sided p) of each metric with `target`.

    One row per metric; columns ``pearson_r``, ``pearson_p``, ``spearman_rho``, ``spearman_p``
    and ``n`` (layers). A metric constant over layers has no correlation: its row is NaN.
    """
    _check_columns(table, [target, *metrics])
    if len(table) < 3:
        raise ValueError(
            f"a correlation over {len(table)} layer(s) means nothing; sweep at least 3 layers"
        )
    y = table[target].to_numpy(dtype=float)
    rows = {}
    for metric in metrics:
        x = table[metric].to_numpy(dtype=float)
        with warnings.catch_warnings():
            # a constant column: scipy warns and returns NaN, which is the honest answer
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            pearson = stats.pearsonr(x, y)
            spearman = stats.spearmanr(x, y)
        rows[metric] = {
            "pearson_r": float(pearson.statistic),
            "pearson_p": float(pearson.pvalue),
            "spearman_rho": float(spearman.statistic),
            "spearman_p": float(spearman.pvalue),
            "n": len(x),
        }
    out = pd.DataFrame(rows).T.astype({"n": int})
    out.index.name = "metric"
    return out


def correlation_summary(correlations: pd.DataFrame, target: str = "probe accuracy") -> str:
    """The correlations of `metric_correlations` in Markdown: a verdict (which metrics rank the
    layers exactly as `target` does, or else the closest monotone match), then one line per
    metric with r, ρ and their p-values."""
    if correlations.empty:
        raise ValueError("no correlations to describe")
    n = int(correlations["n"].iloc[0])
    parts = []
    for metric, row in correlations.iterrows():
        name = METRIC_LABELS.get(str(metric), str(metric))
        if np.isnan(row["pearson_r"]):
            parts.append(f"* **{name}** is constant over the layers, so it cannot track {target}.")
            continue
        parts.append(
            f"* **{name}**: Pearson r = {row['pearson_r']:+.2f} ({_p(row['pearson_p'])}), "
            f"Spearman ρ = {row['spearman_rho']:+.2f} ({_p(row['spearman_p'])})."
        )
    rho = correlations["spearman_rho"].dropna()
    verdicts = []
    for sign, how in ((1, "the same order as"), (-1, "exactly the reverse order of")):
        names = [METRIC_LABELS.get(str(m), str(m)) for m in rho.index[sign * rho >= 0.999]]
        if names:
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            verb = "puts" if len(names) == 1 else "put"
            verdicts.append(f"{listed} {verb} the layers in {how} {target} (ρ = {sign:+d}).")
    if not verdicts and len(rho):
        best = rho.abs().idxmax()
        name = METRIC_LABELS.get(str(best), str(best))
        verdicts.append(f"The closest monotone match is {name} (ρ = {rho[best]:+.2f}).")
    if not verdicts:
        verdicts.append(f"No metric varies over the layers, so none can track {target}.")
    verdict = " ".join(verdicts)
    return f"Correlation with {target} across {n} layers. {verdict}\n\n" + "\n".join(parts)


def _p(p: float) -> str:
    # scipy reports p = 0 for a perfect correlation; "p = 0" would overstate what few layers show
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
