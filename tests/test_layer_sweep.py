"""Chapter 01's study: settings per profile, the per-layer SAEs shared with chapters 03 and 05 by
equal requests, the λ comparison (trained with the chosen λ's SAEs, equal to them), the texts the
page prints from measured numbers, and probes (L-BFGS in memory, Adam streamed) on a real store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import write_image_folder

from saekit.analysis.probes import ProbeConfig, train_probe
from saekit.sae import SAEMetrics, evaluate
from saekit.sae.cache import make_request
from saekit.studies import layer_sweep
from saekit.studies import ontology as ontology_study
from saekit.studies.layer_sweep import LayerSweepSettings


def test_settings_per_profile_and_the_probes_own_epochs():
    mini = LayerSweepSettings.for_profile("mini")
    assert (mini.encoder, mini.lam, mini.epochs, mini.probe_optimizer) == (
        "toyvit",
        3.0,
        100,
        "lbfgs",
    )
    # mini probes: L-BFGS with the default 200 iterations, the configuration the page always used
    assert mini.probe_config == ProbeConfig()
    paper = LayerSweepSettings.for_profile("paper", imagenet_train="/data/train")
    assert (paper.encoder, paper.lam, paper.epochs, paper.lambda_sweep) == ("dinov2", 10.0, 3, ())
    assert paper.probe_config.optimizer == "adam" and paper.probe_config.max_iter == 3
    # the probes' length is a setting of its own, not the SAEs' epochs
    longer = LayerSweepSettings.for_profile("paper", probe_epochs=7, epochs=1)
    assert (longer.probe_config.max_iter, longer.epochs) == (7, 1)
    assert LayerSweepSettings.for_profile("mini", lambda_sweep=[1, 2]).lambda_sweep == (1, 2)
    with pytest.raises(ValueError, match="probe_optimizer must be"):
        LayerSweepSettings.for_profile("mini", probe_optimizer="sgd")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Train and validation stores of a miniature DINOv2, CLS tokens of layers 0 and 2."""
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.mini.miniatures import miniature

    root = tmp_path_factory.mktemp("layer_sweep")
    model = miniature("dinov2", root / "model")
    out = {}
    for split, per_class, seed in (("train", 16, 1), ("val", 6, 2)):
        folder = write_image_folder(root / split, per_class=per_class, seed=seed)
        out[split] = extract(
            model, ImageFolder(folder), layers="0,2", out=root / f"s-{split}", progress=False
        )
    return out


def test_layer_saes_are_the_requests_chapters_03_and_05_make(stores, tmp_path):
    train = stores["train"]
    saes = layer_sweep.train_layer_saes(train, tmp_path, lam=2.0, epochs=1, progress=False)
    assert sorted(saes) == [0, 2]
    # chapter 03 (and 05, through it) leave the expansion to the recipe: the same request
    mine = layer_sweep.layer_specs([2], 2.0, expansion=8)[0]
    theirs = ontology_study.layer_specs([2], 2.0)[0]
    assert make_request(mine, train, epochs=1).key == make_request(theirs, train, epochs=1).key
    assert make_request(layer_sweep.layer_specs([2], 2.0, expansion=4)[0], train).key != (
        make_request(theirs, train).key
    )


def test_lambda_calibration_contains_the_chosen_lambdas_saes(stores, tmp_path):
    train, val = stores["train"], stores["val"]
    saes = layer_sweep.train_layer_saes(train, tmp_path, lam=2.0, epochs=2, progress=False)
    calibration = layer_sweep.lambda_calibration(
        train, val, [0.1, 2.0], tmp_path, epochs=2, progress=False
    )
    assert list(zip(calibration["lam"], calibration["layer"], strict=True)) == [
        (0.1, 0),
        (0.1, 2),
        (2.0, 0),
        (2.0, 2),
    ]
    for layer, sae in saes.items():
        expected = evaluate(sae, val.cls(layer))
        row = calibration[(calibration["lam"] == 2.0) & (calibration["layer"] == layer)].iloc[0]
        assert row["l0"] == pytest.approx(expected.l0)
        assert row["explained_variance"] == pytest.approx(expected.explained_variance)
        assert row["active_share"] == pytest.approx(expected.l0 / (8 * train.d_model))
    # a weaker penalty keeps more latents active
    by_lam = calibration.groupby("lam")["l0"].mean()
    assert by_lam[0.1] > by_lam[2.0]
    view = layer_sweep.calibration_view(calibration)
    assert view.shape == (2, 2) and view.loc[2.0, 2].endswith(f"/ {row['l0']:.0f}")
    empty = layer_sweep.lambda_calibration(train, val, (), tmp_path)
    assert empty.empty
    assert "No λ comparison" in layer_sweep.calibration_summary(empty, 10.0, 64)


def test_summaries_print_the_measured_ranges():
    calibration = pd.DataFrame(
        {
            "lam": [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 10.0, 10.0, 10.0],
            "layer": [0, 1, 2] * 3,
            "explained_variance": [0.2, 0.9, 0.95, 0.1, 0.75, 0.85, -0.04, -0.03, 0.31],
            "l0": [9.0, 120.0, 130.0, 5.0, 55.0, 65.0, 0.0, 0.0, 14.0],
            "active_share": np.array([9, 120, 130, 5, 55, 65, 0, 0, 14]) / 512,
            "mse": [0.0] * 9,
            "d_sae": [512] * 9,
        }
    )
    text = layer_sweep.calibration_summary(calibration, 3.0, 64)
    assert "layers 1–2 (out of 512 latents; the model has 64 dimensions)" in text
    assert "- λ = 1: 90–95% of the variance explained, 120–130 latents active" in text
    assert "- **λ = 3**: 75–85% of the variance explained, 55–65 latents active" in text
    assert "- λ = 10: -3% to 31% of the variance explained, 0–14 latents active" in text

    def metrics(ev, l0):
        return SAEMetrics(0.0, ev, 0.0, l0, 0, 0, np.zeros(4), 10)

    sweep = {0: metrics(0.31, 8.9), 1: metrics(0.76, 62.0), 5: metrics(0.84, 59.1)}
    assert layer_sweep.sweep_summary(sweep, 3.0, 512) == (
        "At λ = 3, the SAEs of layers 1, 5 explain 76–84% of the validation images' variance "
        "with 59–62 of their 512 latents active per image; layer 0's explains 31% with 9 active."
    )


def test_activation_norms_and_data_summary(stores):
    val = stores["val"]
    norms = layer_sweep.activation_norms(val, chunk=5)
    for layer in (0, 2):
        acts = np.asarray(val.cls(layer), np.float32)
        assert norms[layer] == pytest.approx(np.linalg.norm(acts, axis=1).mean(), rel=1e-5)
    text = layer_sweep.data_summary(stores["train"], val, epochs=4)
    assert text.startswith("48 training images (1 SAE steps an epoch, 4 epochs)")
    assert f"is {norms[0]:.2g} at layer 0 and {norms[2]:.2g} at layer 2" in text


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_layer_probes_equal_probes_fit_by_hand(stores, optimizer):
    train, val = stores["train"], stores["val"]
    config = ProbeConfig(optimizer=optimizer, lr=1e-2, max_iter=10, chunk_rows=20)
    accuracy = layer_sweep.layer_probes(train, val, config, progress=False)
    assert sorted(accuracy) == [0, 2]
    for layer in (0, 2):
        probe = train_probe(np.asarray(train.cls(layer)), train.labels, n_classes=3, config=config)
        expected = probe.accuracy(np.asarray(val.cls(layer)), val.labels)
        assert accuracy[layer] == pytest.approx(expected)
