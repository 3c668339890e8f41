"""The OOD study: settings per profile, grid, label alignment, scoring on the classes a set
shares with the training set (sets holding a subset of the classes, or classes the training set
lacks), probes, reconstruction by domain, Table 1, caching of the sweep, and the figures."""

from __future__ import annotations

import shutil

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

matplotlib.use("Agg")

from conftest import WNIDS, write_image_folder  # noqa: E402

from saekit.activations import extract  # noqa: E402
from saekit.analysis.probes import ProbeConfig, train_probe  # noqa: E402
from saekit.data import ImageFolder  # noqa: E402
from saekit.models import load_encoder  # noqa: E402
from saekit.sae import get_recipe, train_or_load  # noqa: E402
from saekit.studies import ood, ood_figures, ood_scoring  # noqa: E402
from saekit.taxonomy import Taxonomy, imagenet_subset  # noqa: E402

TIGER_SHARK = "n01491361"  # a class the training folders lack

# --- the grid ----------------------------------------------------------------------------------


def test_paper_grid_has_the_papers_63_saes_with_the_right_sparsity_knob():
    specs = ood.PAPER_GRID.specs(layer=39)
    assert len(specs) == 7 * 3 * 3
    assert len({s.label for s in specs}) == len(specs)
    by_arch = {arch: [s for s in specs if s.arch == arch] for arch in ("relu", "topk", "gated")}
    assert sorted({s.k for s in by_arch["topk"]}) == [4, 8, 16, 32, 64, 128, 256]
    assert all(s.l1 is None for s in by_arch["topk"])
    for arch in ("relu", "gated"):
        assert sorted({s.l1 for s in by_arch[arch]}) == [0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0]
        assert all(s.k is None for s in by_arch[arch])
    assert {s.expansion for s in specs} == {8, 16, 32}
    assert all(s.layer == 39 and s.resolved().recipe.name == "olson2025_ood" for s in specs)


def test_grid_rejects_unknown_architectures_and_empty_axes():
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        ood.SweepGrid(archs=("relu", "sigmoid"))
    with pytest.raises(ValueError, match="lambdas is empty"):
        ood.SweepGrid(lambdas=())


# --- settings ----------------------------------------------------------------------------------


def test_settings_resolve_each_profile_and_paper_includes_resnet():
    mini = ood.OODSettings.for_profile("mini")
    assert mini.encoders == ("toyvit",) and mini.detail_encoder == "toyvit"
    assert mini.grid == ood.SweepGrid(lambdas=(0.5, 5.0), ks=(4, 16), expansions=(4, 8))
    assert (mini.recipe.epochs, mini.recipe.lr, mini.probe_per_class) == (30, 1e-3, None)
    paper = ood.OODSettings.for_profile("paper", imagenet_hard="/data/a")
    assert paper.encoders == ("dinov2", "clip", "resnet") and paper.detail_encoder == "resnet"
    assert paper.grid == ood.PAPER_GRID and len(paper.grid.specs()) == 63
    assert (paper.recipe.name, paper.recipe.epochs, paper.recipe.lr) == ("olson2025_ood", 3, 1e-4)
    assert paper.probe_per_class == 100 and paper.imagenet_hard == "/data/a"
    narrowed = ood.OODSettings.for_profile("paper", encoders=["dinov2"], lambdas=[0.5])
    assert narrowed.encoders == ("dinov2",) and narrowed.grid.lambdas == (0.5,)


# --- class subsets -------------------------------------------------------------------------------


def _labelled(labels, n_classes, left_out=None):
    labels = np.asarray(labels)
    classes = [f"n{i:08d}" for i in range(n_classes)]
    return ood_scoring.LabelledActs(np.zeros((len(labels), 2)), labels, classes, left_out or {})


def test_each_set_is_scored_on_the_training_classes_it_holds():
    # an ImageNet-A-like set: the 200 imagenet_a classes, in a training set of all 1000
    wnids = list(Taxonomy.imagenet1k().leaves)[::-1]  # any class order: indices must follow it
    a_index = sorted(wnids.index(w) for w in imagenet_subset("imagenet_a"))
    evals = {
        "val": ood_scoring.LabelledActs(np.zeros((1000, 2)), np.arange(1000), wnids),
        "hard": ood_scoring.LabelledActs(np.zeros((400, 2)), np.repeat(a_index, 2), wnids),
    }
    subsets = ood_scoring.scored_classes(evals, "paper")
    assert subsets["val"] is None  # every training class: the argmax over all logits
    assert subsets["hard"] == a_index and {wnids[i] for i in subsets["hard"]} == set(
        imagenet_subset("imagenet_a")
    )
    # a training folder with fewer classes than the shifted set: the shared ones, rows counted
    partial = {"hard": _labelled([0, 0, 2], 5, left_out={"n09999999": 4})}
    assert ood_scoring.scored_classes(partial, "paper") == {"hard": [0, 2]}
    table = ood_scoring.scoring_table(partial, {"hard": [0, 2]})
    assert table.loc["hard"].to_dict() == {
        "classes in the set": 3,
        "not in training": 1,
        "classes scored": 2,
        "rows scored": 3,
        "rows left out": 4,
    }
    with pytest.raises(ValueError, match="shares no class with the training set"):
        ood_scoring.scored_classes({"v2": _labelled([], 3, left_out={"n09999999": 2})}, "paper")


def test_mini_stand_ins_for_imagenet_a_and_r_keep_every_other_class():
    evals = {split: _labelled(np.arange(7), 7) for split in ("val", "hard", "rendition")}
    subsets = ood_scoring.scored_classes(evals, "mini")
    assert subsets == {"val": None, "hard": [0, 2, 4, 6], "rendition": [0, 2, 4, 6]}
    # a stand-in holding only some classes: the even ones among those it holds
    assert ood_scoring.scored_classes({"hard": _labelled([1, 2, 3, 4], 7)}, "mini") == {
        "hard": [2, 4]
    }


def test_subset_scoring_drops_other_classes_and_takes_the_argmax_over_the_subset():
    # four classes at the corners e0..e3; the probe learns them perfectly
    rng = np.random.default_rng(0)
    centers = 4 * np.eye(4, dtype=np.float32)
    labels = np.repeat(np.arange(4), 50)
    feats = centers[labels] + 0.1 * rng.standard_normal((200, 4)).astype(np.float32)
    probe = train_probe(feats, labels, n_classes=4)
    # test rows of class 2 drawn toward class 3 (outside the subset {0, 2}) so that the full
    # argmax says 3 but among {0, 2} class 2 wins; rows of classes 1 and 3 must not be scored
    test = np.stack([0.4 * centers[2] + 0.6 * centers[3]] * 5 + [centers[1]] * 7 + [centers[0]] * 3)
    test_labels = np.array([2] * 5 + [1] * 7 + [0] * 3)
    full, n_full = ood_scoring.probe_accuracy(probe, torch.as_tensor(test), test_labels, None)
    assert (full, n_full) == (pytest.approx(10 / 15), 15)
    restricted, n_restricted = ood_scoring.probe_accuracy(
        probe, torch.as_tensor(test), test_labels, [0, 2]
    )
    assert (restricted, n_restricted) == (1.0, 8)


# --- reconstruction by domain, with a hand-built SAE ----------------------------------------------


def _exact_sae(atoms_SD: torch.Tensor) -> StandardSAE:
    """A ReLU SAE whose dictionary is the given orthonormal rows: it reconstructs every
    non-negative combination of them exactly and maps their orthogonal complement to zero."""
    s, d = atoms_SD.shape
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=s))
    with torch.no_grad():
        sae.W_enc.copy_(atoms_SD.T)
        sae.W_dec.copy_(atoms_SD)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_reconstruction_error_by_domain_has_known_values():
    d = 8
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0].T
    atoms, complement = basis[:4], basis[4:]
    sae = _exact_sae(atoms)
    gen = torch.Generator().manual_seed(1)
    in_domain = torch.rand(50, 4, generator=gen) @ atoms
    off = 0.5 * torch.randn(50, 4, generator=gen) @ complement  # the part no atom explains
    near = torch.rand(50, 4, generator=gen) @ atoms + off
    far = torch.randn(50, 4, generator=gen) @ complement
    labels = np.zeros(50, dtype=int)
    sets = {
        "val": ood_scoring.LabelledActs(in_domain, labels),
        "v2": ood_scoring.LabelledActs(near, labels),
        "sketch": ood_scoring.LabelledActs(near, labels),
        "far_ood": far,
    }
    recon = ood_scoring.reconstruction_table({"exact": sae}, sets, encoder="toy", progress=False)
    assert list(recon["domain"]) == ["in-domain", "near-OOD", "near-OOD", "far-OOD"]
    mse = recon.set_index("split")["mse"]
    assert mse["val"] == pytest.approx(0.0, abs=1e-10)
    assert mse["v2"] == pytest.approx(off.pow(2).sum(1).mean().item() / d, rel=1e-4)
    assert mse["far_ood"] == pytest.approx(far.pow(2).sum(1).mean().item() / d, rel=1e-4)
    assert recon.set_index("split")["l1"]["far_ood"] == pytest.approx(0.0, abs=1e-5)

    summary = ood_scoring.domain_summary(recon)
    assert list(summary.columns[:3]) == ["in-domain", "near-OOD", "far-OOD"]
    assert summary.loc["exact", "near-OOD"] == pytest.approx(mse["v2"])
    assert summary.loc["exact", "far-OOD ÷ in-domain"] > 1e6

    with pytest.raises(KeyError, match="no domain"):
        ood_scoring.reconstruction_table({"exact": sae}, {"imagenet_o": far}, progress=False)


# --- the study on a real activation store ----------------------------------------------------------


@pytest.fixture(scope="module")
def stores(miniatures, tmp_path_factory):
    """Train and validation stores of a miniature ViT, a shifted store whose folder holds only
    two of the three classes (so its own label 0 is the training set's label 1), and one holding a
    training class and a class the training set lacks."""
    root = tmp_path_factory.mktemp("ood")
    encoder = load_encoder(miniatures["vit"])
    folders = {
        "train": write_image_folder(root / "train", per_class=24, seed=1),
        "val": write_image_folder(root / "val", per_class=6, seed=2),
        "hard": write_image_folder(root / "hard", per_class=6, seed=3),
    }
    shutil.rmtree(folders["hard"] / WNIDS[0])
    folders["rendition"] = write_image_folder(root / "rendition", per_class=6, seed=4)
    shutil.rmtree(folders["rendition"] / WNIDS[1])
    (folders["rendition"] / WNIDS[2]).rename(folders["rendition"] / TIGER_SHARK)
    return {
        split: extract(
            encoder, ImageFolder(path), layers=[-1], out=root / f"s-{split}", progress=False
        )
        for split, path in folders.items()
    }


def test_labels_of_a_partial_folder_are_mapped_to_the_training_classes(stores):
    train = ood_scoring.LabelledActs.from_store(stores["train"])
    assert train.classes == list(WNIDS)
    hard = ood_scoring.LabelledActs.from_store(stores["hard"], classes=train.classes)
    assert stores["hard"].wnids == list(WNIDS[1:])
    assert set(np.asarray(stores["hard"].labels)) == {0, 1}
    np.testing.assert_array_equal(hard.labels_N, np.asarray(stores["hard"].labels) + 1)
    assert hard.left_out == {}
    # rows of a class the training set lacks are left out and counted, the rest mapped
    two = ood_scoring.LabelledActs.from_store(stores["train"], classes=list(WNIDS[1:]))
    assert two.left_out == {WNIDS[0]: 24} and len(two.labels_N) == 48
    np.testing.assert_array_equal(
        np.asarray(two.acts_ND),
        np.asarray(stores["train"].cls(stores["train"].layers[-1]))[stores["train"].labels > 0],
    )
    np.testing.assert_array_equal(
        two.labels_N, stores["train"].labels[stores["train"].labels > 0] - 1
    )


def test_per_class_subsample_is_seeded_and_balanced(stores):
    train = ood_scoring.LabelledActs.from_store(stores["train"])
    five = train.per_class(5, seed=3)
    assert np.bincount(five.labels_N).tolist() == [5, 5, 5]
    again = train.per_class(5, seed=3)
    np.testing.assert_array_equal(np.asarray(five.acts_ND), np.asarray(again.acts_ND))
    assert train.per_class(None) is train
    with pytest.raises(ValueError, match="n >= 1"):
        train.per_class(0)


@pytest.fixture(scope="module")
def sweep(stores, tmp_path_factory):
    grid = ood.SweepGrid(lambdas=(0.5,), ks=(4,), expansions=(2,))
    recipe = get_recipe("olson2025_ood", epochs=2)
    specs = grid.specs(layer=stores["train"].layers[-1], recipe=recipe)
    out = tmp_path_factory.mktemp("sweep")
    saes = train_or_load(specs, stores["train"], root=out, progress=False)
    return specs, saes, out


def test_sweep_table_reads_each_saes_grid_point(sweep):
    _, saes, _ = sweep
    table = ood.sweep_table(saes, encoder="vit")
    assert list(table.index) == list(saes)
    assert table.set_index("arch")["sparsity"].to_dict() == {
        "relu": "λ=0.5",
        "topk": "k=4",
        "gated": "λ=0.5",
    }
    assert (table["expansion"] == 2).all() and (table["encoder"] == "vit").all()
    assert ood.pick_sae(table, "topk", 2, 4) == table.index[table["arch"] == "topk"][0]
    with pytest.raises(KeyError, match="no relu SAE"):
        ood.pick_sae(table, "relu", 8, 0.5)
    with pytest.raises(ValueError, match="carries no saekit spec"):
        ood.sweep_table({"hand-made": _exact_sae(torch.eye(4))})


@pytest.fixture(scope="module")
def results(stores, sweep):
    _, saes, _ = sweep
    train = ood_scoring.LabelledActs.from_store(stores["train"])
    evals = {
        split: ood_scoring.LabelledActs.from_store(stores[split], classes=train.classes)
        for split in ("val", "hard")
    }
    subsets = {"hard": [1]}
    probes = ood_scoring.probe_table(
        saes,
        train,
        evals,
        class_subsets=subsets,
        encoder="vit",
        progress=False,
        config=ProbeConfig(max_iter=50),
    )
    recon = ood_scoring.reconstruction_table(
        saes, {"val": evals["val"], "hard": evals["hard"]}, encoder="vit", progress=False
    )
    sweep_df = ood.sweep_table(saes, encoder="vit")
    return probes, recon, sweep_df, evals


def test_probe_table_scores_every_representation_on_every_set(results, sweep):
    probes, _, _, evals = results
    _, saes, _ = sweep
    assert len(probes) == (1 + 2 * len(saes)) * 2
    assert set(probes["input"]) == {"raw", "codes", "pre-activation"}
    hard = probes[probes["split"] == "hard"]
    assert (hard["n_classes"] == 1).all()
    assert (hard["n_rows"] == (evals["hard"].labels_N == 1).sum()).all()
    # one class left to choose from: the argmax over the subset is always right
    assert (hard["accuracy"] == 1.0).all()
    val = probes[probes["split"] == "val"]
    assert (val["n_rows"] == len(evals["val"].labels_N)).all() and (val["n_classes"] == 3).all()
    assert val["accuracy"].between(0, 1).all()


def test_probe_table_matches_a_probe_fit_by_hand(results, stores):
    probes, _, _, evals = results
    train = ood_scoring.LabelledActs.from_store(stores["train"])
    probe = train_probe(
        np.asarray(train.acts_ND), train.labels_N, n_classes=3, config=ProbeConfig(max_iter=50)
    )
    expected = probe.accuracy(np.asarray(evals["val"].acts_ND), evals["val"].labels_N)
    raw = probes[(probes["input"] == "raw") & (probes["split"] == "val")]["accuracy"].item()
    assert raw == pytest.approx(expected)


def test_summary_table1_and_figures(results):
    probes, recon, sweep_df, _ = results
    summary = ood.summary_table(sweep_df, probes, recon)
    assert list(summary.index) == list(sweep_df.index)
    for column in ("l0", "l1", "val", "hard", "ood", "pre:val", "in-domain", "near-OOD"):
        assert summary[column].notna().all(), column
    codes = probes[probes["input"] == "codes"].set_index(["sae", "split"])["accuracy"]
    for name in summary.index:
        assert summary.loc[name, "ood"] == pytest.approx(codes[(name, "hard")])
    topk = summary[summary["arch"] == "topk"]
    assert topk["l0"].item() <= 4 + 1e-6

    name = ood.pick_sae(sweep_df, "relu", 2, 0.5)
    table = ood.table1(probes, {"vit": name}, pre_activation=True)
    assert list(table.columns) == ["Val", "A"]
    assert list(table.index) == ["vit", "vit+SAE", "vit+SAE (pre-act.)"]
    raw_val = probes[(probes["input"] == "raw") & (probes["split"] == "val")]["accuracy"].item()
    assert table.loc["vit", "Val"] == pytest.approx(round(100 * raw_val, 2))
    with pytest.raises(KeyError, match="no probe results"):
        ood.table1(probes, {"vit": "no-such-sae"})

    base = ood.baselines(probes)
    assert base["vit"] == pytest.approx(1.0)  # the one-class subset of "hard"
    figures = [
        ood_figures.ood_figure(summary, base),
        ood_figures.ood_figure(summary, base, focus=("arch", "topk")),
        ood_figures.split_figure(summary, ["val", "hard"], probes),
        ood_figures.preactivation_figure(summary, "val", probes),
    ]
    assert [len(f.axes) for f in figures[:3]] == [3, 3, 2]
    left = figures[0].axes[0]
    assert any(np.allclose(line.get_ydata(), base["vit"]) for line in left.get_lines())
    # focus greys out the other architectures but keeps their points
    assert sum(len(c.get_offsets()) for c in figures[1].axes[0].collections) == len(summary)
    # the raw embedding's line sits at its accuracy on that panel's set
    val_lines = [line.get_ydata()[0] for line in figures[2].axes[0].get_lines()]
    assert val_lines == [pytest.approx(raw_val)]
    for figure in figures:
        matplotlib.pyplot.close(figure)
    text = ood.findings(summary, probes)
    assert "100.0% for the raw embedding" in text and "near-OOD MSE is" in text
    with pytest.raises(KeyError, match="pre_activation=True"):
        ood_figures.preactivation_figure(summary.drop(columns=["pre:val"]), "val")
    with pytest.raises(ValueError, match="empty"):
        ood_figures.ood_figure(summary.iloc[:0])


def test_summary_keeps_encoders_apart_when_their_saes_share_names(results):
    probes, recon, sweep_df, _ = results
    other = probes.assign(encoder="clip", accuracy=1 - probes["accuracy"])
    other_recon = recon.assign(encoder="clip", mse=2 * recon["mse"])
    summary = ood.summary_table(
        pd.concat([sweep_df, sweep_df.assign(encoder="clip")]),
        pd.concat([probes, other]),
        pd.concat([recon, other_recon]),
    )
    vit, clip = summary[summary["encoder"] == "vit"], summary[summary["encoder"] == "clip"]
    assert len(vit) == len(clip) == len(sweep_df)
    np.testing.assert_allclose(clip["val"], 1 - vit["val"])
    np.testing.assert_allclose(clip["in-domain"], 2 * vit["in-domain"])
    np.testing.assert_allclose(clip["l0"], vit["l0"])
    # with two encoders colour means encoder, and each has its own dashed raw-embedding line
    both = pd.concat([probes, other])
    figure = ood_figures.ood_figure(summary, ood.baselines(both))
    dashed = [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2
    assert dashed[0].get_color() != dashed[1].get_color()
    matplotlib.pyplot.close(figure)


def test_evaluation_sets_in_another_class_order_are_refused(stores, sweep):
    _, saes, _ = sweep
    train = ood_scoring.LabelledActs.from_store(stores["train"])
    own_order = ood_scoring.LabelledActs.from_store(stores["hard"])
    with pytest.raises(ValueError, match="another class order"):
        ood_scoring.probe_table(saes, train, {"hard": own_order}, progress=False)


def test_chapter_steps_score_subsets_and_unknown_classes(stores, sweep, monkeypatch):
    import saekit.sae.cache

    _, saes, out = sweep
    by_split = {**stores, "v2": stores["val"], "sketch": stores["val"], "far_ood": stores["hard"]}
    settings = ood.OODSettings.for_profile(
        "paper", encoders=["vit"], lambdas=[0.5], ks=[4], expansions=[2], epochs=2
    )

    def no_training(*args, **kwargs):
        raise AssertionError("the sweep fixture's SAEs should have been loaded")

    monkeypatch.setattr(saekit.sae.cache, "sweep_from_store", no_training)
    trained = ood.train_sweeps({"vit": by_split}, settings, out, progress=False)
    assert list(trained["vit"]) == list(saes)
    sweep_df = ood.sweep_tables(trained)
    assert list(sweep_df.index) == list(saes) and set(sweep_df["encoder"]) == {"vit"}

    probes, scoring = ood.probe_tables({"vit": by_split}, trained, settings, progress=False)
    hard, rendition = scoring.loc[("vit", "hard")], scoring.loc[("vit", "rendition")]
    assert (hard["classes in the set"], hard["classes scored"], hard["rows scored"]) == (2, 2, 12)
    # the rendition set's tiger sharks are unknown to the training set: left out and counted
    assert rendition.to_dict() == {
        "classes in the set": 2,
        "not in training": 1,
        "classes scored": 1,
        "rows scored": 6,
        "rows left out": 6,
    }
    assert scoring.loc[("vit", "val"), "classes scored"] == 3
    rows = probes[probes["split"] == "rendition"]
    assert (rows["n_classes"] == 1).all() and (rows["accuracy"] == 1.0).all()
    assert (probes[probes["split"] == "hard"]["n_classes"] == 2).all()
    assert len(probes) == (1 + 2 * len(saes)) * len(ood_scoring.EVAL_SPLITS)

    recon = ood.reconstruction_tables({"vit": by_split}, trained, progress=False)
    assert set(recon["split"]) == {"val", "v2", "sketch", "hard", "rendition", "far_ood"}
    assert (
        recon.groupby("split")["n_rows"].first()["rendition"] == 12
    )  # every row, no labels needed
    text = ood.data_summary({"vit": by_split}, settings.recipe)
    assert text.startswith("vit: 72 training images (2 minibatches of 64 an epoch, 2 epochs")

    summary = ood.summary_table(sweep_df, probes, recon)
    figure = ood_figures.encoder_figure(summary, "vit", probes)
    assert [ax.get_ylabel() for ax in figure.axes] == [
        "top-1 accuracy, validation",
        "top-1 accuracy, mean of shifts",
        "reconstruction MSE, in-domain",
        "reconstruction MSE, near-OOD",
    ]
    raw_val = probes[(probes["input"] == "raw") & (probes["split"] == "val")]["accuracy"].item()
    dashed = [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in dashed] == [pytest.approx(raw_val)]
    assert sum(len(c.get_offsets()) for c in figure.axes[2].collections) == len(saes)
    matplotlib.pyplot.close(figure)
    with pytest.raises(KeyError, match="no SAEs of encoder 'resnet'"):
        ood_figures.encoder_figure(summary, "resnet")
