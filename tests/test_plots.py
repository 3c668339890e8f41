"""saekit.analysis.plots: the layer-sweep figure draws exactly the table it is given, the frequency
histogram counts every live latent once, and the correlations match hand-computed values."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.analysis import plots  # noqa: E402
from saekit.sae import evaluate  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def sweep_table() -> pd.DataFrame:
    """Five layers with accuracy rising and the SAE metrics rising with it (paper 000 Fig. 1)."""
    return pd.DataFrame(
        {
            "probe_accuracy": [0.05, 0.2, 0.5, 0.8, 0.9],
            "mse": [0.001, 0.002, 0.004, 0.008, 0.01],
            "l0": [3.0, 10.0, 40.0, 80.0, 100.0],
            "l1": [0.5, 2.0, 5.0, 9.0, 20.0],
        },
        index=pd.Index([0, 1, 2, 3, 4], name="layer"),
    )


def test_table_from_real_sae_metrics_keeps_each_layer_apart():
    torch.manual_seed(0)
    metrics, accuracy = {}, {}
    for layer, scale in [(2, 1.0), (0, 3.0)]:
        sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
        acts = torch.randn(50, 8) * scale
        metrics[layer] = evaluate(sae, acts)
        accuracy[layer] = 0.1 * (layer + 1)
    table = plots.layer_sweep_table(metrics, accuracy)
    assert list(table.index) == [0, 2]  # sorted by layer
    assert table.loc[0, "probe_accuracy"] == pytest.approx(0.1)
    assert table.loc[2, "probe_accuracy"] == pytest.approx(0.3)
    for layer in (0, 2):
        assert table.loc[layer, "mse"] == pytest.approx(metrics[layer].mse)
        assert table.loc[layer, "l0"] == pytest.approx(metrics[layer].l0)
        assert table.loc[layer, "l1"] == pytest.approx(metrics[layer].l1)
        assert table.loc[layer, "dead"] == metrics[layer].n_dead
    # three times larger inputs with the same random SAE: the error must differ between layers
    assert table.loc[0, "mse"] > table.loc[2, "mse"]


def test_table_refuses_mismatched_layers():
    sae = StandardSAE(StandardSAEConfig(d_in=4, d_sae=8))
    m = evaluate(sae, torch.randn(10, 4))
    with pytest.raises(ValueError, match="same layers"):
        plots.layer_sweep_table({0: m, 1: m}, {0: 0.5})


def test_layer_sweep_figure_draws_the_table_relative():
    table = sweep_table()
    fig = plots.layer_sweep_figure(table, chance=1 / 30)
    left, right = fig.axes
    acc_line = left.lines[0]
    np.testing.assert_allclose(acc_line.get_xdata(), table.index)
    np.testing.assert_allclose(acc_line.get_ydata(), table["probe_accuracy"])
    assert list(left.get_xticks()) == list(table.index)  # one tick per layer
    assert len(right.lines) == 3
    for line, metric in zip(right.lines, ["mse", "l0", "l1"], strict=True):
        np.testing.assert_allclose(line.get_ydata(), table[metric] / table[metric].max())
    legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert "probe accuracy" in legend and "chance" in legend
    assert "MSE (max 0.01)" in legend and "L0 (max 100)" in legend and "L1 (max 20)" in legend
    assert right.get_legend() is None  # one combined legend


def test_layer_sweep_figure_log_scale_draws_raw_values():
    table = sweep_table()
    fig = plots.layer_sweep_figure(table, scale="log", metrics=["l0"])
    _, right = fig.axes
    assert right.get_yscale() == "log"
    np.testing.assert_allclose(right.lines[0].get_ydata(), table["l0"])


def test_layer_sweep_figure_bad_input():
    with pytest.raises(KeyError, match="l0"):
        plots.layer_sweep_figure(sweep_table().drop(columns="l0"))
    with pytest.raises(ValueError, match="relative"):
        plots.layer_sweep_figure(sweep_table(), scale="linear")


def test_frequency_histogram_counts_live_latents_and_names_the_dead():
    rng = np.random.default_rng(0)
    n_rows = 600
    fires = rng.integers(1, n_rows + 1, size=90)
    freqs = np.concatenate([fires / n_rows, np.zeros(10)])
    fig = plots.frequency_histogram_figure(freqs, n_rows=n_rows, title="layer 3")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == 90  # every live latent once, the dead ones not at all
    n_dense = int((freqs > 0.01).sum())
    assert f"100 latents: 10 dead, {n_dense} dense" in ax.get_title()
    assert ax.get_xlim()[0] <= np.log10(1 / n_rows) < ax.get_xlim()[0] + 0.1
    assert ax.get_xlim()[1] == 0.0
    dense_line = [line for line in ax.lines if line.get_linestyle() == "--"][0]
    assert dense_line.get_xdata()[0] == pytest.approx(-2.0)


def test_frequency_histogram_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.frequency_histogram_figure(np.array([0.5, 2.0]))
    with pytest.raises(ValueError, match="non-empty"):
        plots.frequency_histogram_figure(np.array([]))


def test_correlations_known_answers():
    # x = 1..4 against y = 1,3,2,4: both Pearson r and Spearman rho are 0.8 by hand
    # (sum of centred products 4 over sqrt(5 * 5)); an exponential is perfectly monotone
    # (rho = 1) but not linear (r < 1); a constant column has no correlation.
    table = pd.DataFrame(
        {
            "probe_accuracy": [1.0, 3.0, 2.0, 4.0],
            "mse": [1.0, 2.0, 3.0, 4.0],
            "l0": [-10.0, -30.0, -20.0, -40.0],
            "l1": [7.0, 7.0, 7.0, 7.0],
        }
    )
    corr = plots.metric_correlations(table)
    assert corr.loc["mse", "pearson_r"] == pytest.approx(0.8)
    assert corr.loc["mse", "spearman_rho"] == pytest.approx(0.8)
    assert corr.loc["l0", "pearson_r"] == pytest.approx(-1.0)
    assert corr.loc["l0", "spearman_rho"] == pytest.approx(-1.0)
    assert np.isnan(corr.loc["l1", "pearson_r"]) and np.isnan(corr.loc["l1", "spearman_rho"])
    assert (corr["n"] == 4).all()

    monotone = pd.DataFrame({"probe_accuracy": np.exp(np.arange(6.0)), "mse": np.arange(6.0)})
    corr = plots.metric_correlations(monotone, metrics=["mse"])
    assert corr.loc["mse", "spearman_rho"] == pytest.approx(1.0)
    assert corr.loc["mse", "pearson_r"] < 0.95


def test_correlation_summary_states_the_numbers():
    table = pd.DataFrame(
        {
            "probe_accuracy": [1.0, 3.0, 2.0, 4.0],
            "mse": [1.0, 2.0, 3.0, 4.0],
            "l0": [-10.0, -30.0, -20.0, -40.0],
            "l1": [7.0, 7.0, 7.0, 7.0],
        }
    )
    text = plots.correlation_summary(plots.metric_correlations(table))
    assert (
        "across 4 layers. L0 puts the layers in exactly the reverse order of probe accuracy" in text
    )
    assert "**MSE**: Pearson r = +0.80 (p = 0.2), Spearman ρ = +0.80" in text
    assert "**L0**: Pearson r = -1.00 (p < 0.001), Spearman ρ = -1.00 (p < 0.001)" in text
    assert "**L1** is constant" in text


def test_correlations_need_three_layers():
    with pytest.raises(ValueError, match="at least 3 layers"):
        plots.metric_correlations(sweep_table().iloc[:2])


def test_frequency_by_layer_draws_each_layer_and_counts_its_dead():
    freqs = {
        5: np.array([0.0, 0.0, 0.5, 0.1, 0.02]),
        1: np.array([0.0, 0.9, 0.9, 0.9, 0.9]),
    }
    fig = plots.frequency_by_layer_figure(freqs, n_rows=100)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["1 (1 dead)", "5 (2 dead)"]  # sorted by layer, dead counted per layer
    assert ax.get_xlim()[0] == pytest.approx(np.log10(1 / 100) - 0.05)


def test_correlation_summary_names_the_closest_monotone_match():
    table = pd.DataFrame(
        {
            "probe_accuracy": [1.0, 2.0, 3.0, 4.0, 5.0],
            "mse": [1.0, 3.0, 2.0, 4.0, 5.0],  # one swapped pair: rho = 0.9
            "l0": [5.0, 1.0, 4.0, 2.0, 3.0],
            "l1": [2.0, 1.0, 3.0, 5.0, 4.0],  # two swapped pairs: rho = 0.8
        }
    )
    text = plots.correlation_summary(plots.metric_correlations(table))
    assert "The closest monotone match is MSE (ρ = +0.90)." in text
