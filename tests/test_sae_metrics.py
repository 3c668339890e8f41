"""Metrics: known answers on a hand-built SAE."""

import numpy as np
import pytest
import torch

from saekit.sae import evaluate, frequency_histogram, metrics_table
from saekit.sae.synthetic import identity_sae as planted_identity_sae


@pytest.fixture
def identity_sae():
    """z = ReLU(x), x̂ = z: reconstructs the positive part of x exactly."""
    return planted_identity_sae(4)


def test_known_answers(identity_sae):
    # 200 rows: latent 0 fires on every row, latent 1 on 2 rows (1%, not dense),
    # latent 2 on 3 rows (1.5%, dense), latent 3 never (dead; its input is negative).
    x = torch.zeros(200, 4)
    x[:, 0] = 2.0
    x[:2, 1] = 1.0
    x[2:5, 2] = 3.0
    x[:, 3] = -1.0  # reconstructed as 0: error 1 per row
    m = evaluate(identity_sae, x.numpy(), batch_size=64)
    assert m.n_rows == 200
    assert m.mse == pytest.approx(1 / 4)  # ‖x − x̂‖² = 1 per row, averaged over 4 dims
    assert m.l0 == pytest.approx(1 + 5 / 200)
    assert m.l1 == pytest.approx(2 + (2 * 1 + 3 * 3) / 200)
    assert m.n_dead == 1
    assert m.n_dense == 2
    assert m.frequencies.tolist() == pytest.approx([1.0, 0.01, 0.015, 0.0])
    total_var = ((x - x.mean(0)) ** 2).sum().item()
    assert m.explained_variance == pytest.approx(1 - 200 / total_var)


def test_normalized_space_scales_the_error(identity_sae):
    identity_sae.cfg.metadata.saekit = {"input_normalization": {"folded": True, "scale": 0.5}}
    x = -torch.ones(10, 4)
    raw = evaluate(identity_sae, x)
    normalized = evaluate(identity_sae, x, normalized=True)
    assert normalized.mse == pytest.approx(raw.mse * 0.25)


def test_width_mismatch(identity_sae):
    with pytest.raises(ValueError, match="d_in=4"):
        evaluate(identity_sae, torch.zeros(3, 5))


def test_frequency_histogram_and_table(identity_sae):
    counts, edges = frequency_histogram(np.array([1.0, 0.01, 0.015, 0.0]), bins=np.arange(-7, 1))
    assert counts.sum() == 4
    assert counts[0] == 1  # the dead latent sits at the floor, log10(1e-7)
    assert counts[-1] == 1  # frequency 1 -> log10 = 0, the last bin
    m = evaluate(identity_sae, torch.rand(20, 4))
    table = metrics_table({"CLIP": m, "DINOv2": m})
    assert list(table.columns) == ["MSE", "L0", "Dead", "Dense"]
    assert list(table.index) == ["CLIP", "DINOv2"]
    assert table.loc["CLIP", "Dead"] == m.n_dead
