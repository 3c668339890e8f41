"""Chapter 02's figures (paper 003 Fig. 2, 10, 11 and 12), drawn from `saekit.studies.ood`'s tables.

`ood_figure` is Fig. 2's three panels (accuracy vs sparsity, OOD reconstruction vs activation,
reconstruction by domain), `split_figure` Fig. 10 (every SAE on every evaluation set),
`encoder_figure` Fig. 11 (one encoder's SAEs across hyper-parameters; the paper shows ResNet-50)
and `preactivation_figure` Fig. 12 (codes against pre-activation codes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from saekit.studies.ood_scoring import DOMAIN_ORDER, RAW, SHIFTS, TABLE1_COLUMNS


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


def encoder_figure(
    summary: pd.DataFrame,
    encoder: str,
    probes: pd.DataFrame | None = None,
    *,
    panel_size: tuple[float, float] = (4.2, 3.6),
) -> Figure:
    """Paper 003 Fig. 11, one encoder's SAEs across hyper-parameters (the paper shows ResNet-50):
    against each SAE's L0, the validation and mean OOD accuracy of the probe on its codes (dashed:
    the raw embedding's), and the in-domain and near-OOD reconstruction MSE; colour is the
    architecture, the marker the expansion, so consistent trends read across both."""
    data = summary[summary["encoder"] == encoder].reset_index()
    if data.empty:
        raise KeyError(
            f"no SAEs of encoder {encoder!r} in the summary; it has {sorted(set(summary['encoder']))}"
        )
    data["expansion"] = "x" + data["expansion"].astype(int).astype(str)
    panels = [
        (column, label)
        for column, label in (
            ("val", "top-1 accuracy, validation"),
            ("ood", "top-1 accuracy, mean of shifts"),
            ("in-domain", "reconstruction MSE, in-domain"),
            ("near-OOD", "reconstruction MSE, near-OOD"),
        )
        if column in data
    ]
    raw = None
    if probes is not None:
        mine = probes[(probes["encoder"] == encoder) & (probes["input"] == RAW)]
        raw = {
            "val": mine[mine["split"] == "val"]["accuracy"].mean(),
            "ood": mine[mine["split"].isin(SHIFTS)]["accuracy"].mean(),
        }
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(
            1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False
        )
        for i, (ax, (column, label)) in enumerate(zip(axes[0], panels, strict=True)):
            _scatter(ax, data, "l0", column, "arch", "expansion", None, legend=i == 0)
            if raw is not None and column in raw and pd.notna(raw[column]):
                ax.axhline(raw[column], linestyle="--", color="0.3", linewidth=1.2,
                           label="raw embedding")  # fmt: skip
            if column in DOMAIN_ORDER:
                ax.set_yscale("log")
            _log_x(ax, data["l0"])
            ax.set_xlabel("L0 (active latents, in-domain)")
            ax.set_ylabel(label)
        fig.suptitle(f"{encoder}: every SAE of the sweep")
        fig.tight_layout()
        # One legend under all panels (the pages save figures with a tight bounding box).
        handles, labels = axes[0][0].get_legend_handles_labels()
        axes[0][0].get_legend().remove()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=len(labels), fontsize=8, frameon=False)  # fmt: skip
    return fig
