"""The SAE report card's pieces, each against an answer known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from saekit.analysis.absorption import absorption_table, best_f1_feature, parent_child_pairs
from saekit.analysis.baselines import baseline_front, fit_pca, kmeans, nmse, quantize
from saekit.analysis.fidelity import downstream_fidelity
from saekit.analysis.sparse_probing import (
    balanced_accuracy,
    sparse_probing,
    top_features_by_mean_difference,
)
from saekit.analysis.stability import match_atoms, stability
from saekit.sae.synthetic import identity_sae
from saekit.taxonomy import Taxonomy


def exact_sae(width: int) -> StandardSAE:
    """Codes [relu(x), relu(-x)] and decoder [I; -I]: reconstructs x exactly."""
    sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=2 * width))
    eye = torch.eye(width)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# --- stability ------------------------------------------------------------------------------


def test_a_dictionary_matched_with_itself_is_perfectly_stable_in_any_order():
    atoms = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    shuffled = atoms[torch.randperm(48, generator=torch.Generator().manual_seed(1))] * 3.0
    matching = match_atoms(atoms, shuffled)
    assert matching.mean_cosine() == pytest.approx(1.0) and matching.share_above(0.9) == 1.0
    # the matching undoes the permutation
    np.testing.assert_allclose(
        torch.nn.functional.normalize(atoms[matching.rows_a], dim=1).numpy(),
        torch.nn.functional.normalize(shuffled[matching.rows_b], dim=1).numpy(),
        atol=1e-6,
    )


def test_random_dictionaries_match_near_chance():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
    matching = match_atoms(a, b)
    assert matching.share_above(0.9) == 0.0
    assert matching.mean_cosine() < 2 * math.sqrt(2 * math.log(64) / 128)


def test_stability_of_two_saes_reads_their_decoders():
    sae = identity_sae(8)
    assert stability(sae, sae).mean_cosine() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different widths"):
        match_atoms(torch.eye(4), torch.eye(5))


# --- PCA and k-means ------------------------------------------------------------------------


def test_pca_at_full_rank_has_zero_error_and_error_falls_with_k():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) @ torch.randn(6, 6)
    basis = fit_pca(x)
    errors = [nmse(x.double(), basis.reconstruct(x, k)) for k in range(7)]
    assert errors[0] == pytest.approx(1.0) and errors[6] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:], strict=False))


def test_kmeans_finds_planted_clusters_exactly():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(20, dim=0)
    found = kmeans(x, 3, seed=0)
    assert sorted(map(tuple, found.tolist())) == sorted(map(tuple, centres.tolist()))
    assert nmse(x.double(), quantize(x, found)) == pytest.approx(0.0)


def test_baseline_front_rows():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    rows = baseline_front(x, x, ks=[1, 4])
    pca = {r["k"]: r["NMSE"] for r in rows if r["method"] == "PCA"}
    assert pca[4] == pytest.approx(0.0, abs=1e-12) and pca[1] > 0
    assert {r["L0"] for r in rows if r["method"] == "k-means"} == {1.0}


# --- sparse probing -------------------------------------------------------------------------


def test_mean_difference_picks_the_planted_feature_and_the_probe_reads_it():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    feats = torch.from_numpy(rng.normal(size=(120, 10)).astype(np.float32)) * 0.1
    for c in range(3):
        feats[labels == c, 7 - c] += 2.0  # class c lives on feature 7 - c
    assert top_features_by_mean_difference(feats, labels, 1, 1).tolist() == [6]
    table = sparse_probing(feats, labels, feats, labels, ks=(1,))
    assert (table[1] == 1.0).all()
    noise = torch.from_numpy(rng.normal(size=(120, 10)).astype(np.float32))
    assert sparse_probing(noise, labels, noise, labels, ks=(1,))[1].mean() < 0.8


def test_balanced_accuracy_does_not_reward_always_no():
    truth = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert balanced_accuracy(torch.zeros(10, dtype=torch.long), truth) == 0.5


# --- absorption -----------------------------------------------------------------------------


@pytest.fixture()
def tree():
    # WordNet: tench and goldfish are cyprinids; the shark is not.
    return Taxonomy.from_wnids(["n01440764", "n01443537", "n01484850"])


def test_planted_absorption_is_found(tree):
    # feature 0 = "cyprinid" (parent), feature 1 = goldfish-specific, feature 2 = shark.
    # On tench images the parent fires; on goldfish images the parent is silent and the
    # goldfish feature fires instead: the goldfish has been absorbed.
    labels = np.repeat(np.arange(3), 10)
    codes = np.zeros((30, 4), dtype=np.float32)
    codes[labels == 0, 0] = 1.0
    codes[labels == 1, 1] = 1.0
    codes[labels == 2, 2] = 1.0
    codes[:2, 3] = 0.5  # a weak extra feature on two tench images
    pairs = parent_child_pairs(tree)
    assert any(children == [0, 1] for _, children in pairs)
    table = absorption_table(identity_sae(4), torch.from_numpy(codes), labels, tree)
    cyprinid = table[table["child"].isin(["tench", "goldfish"])]
    by_child = cyprinid.groupby("child")["absorption"].max()
    assert by_child["goldfish"] == 1.0 and by_child["tench"] == 0.0


def test_best_f1_feature_excludes_the_parent():
    fires = np.array([[10, 10, 0], [0, 10, 0]])  # feature 0 fires on classes 0-1, feature 1 on 1
    n_images = np.array([10, 10, 10])
    assert best_f1_feature(fires, n_images, [0, 1]) == (0, 1.0)
    assert best_f1_feature(fires, n_images, [1], exclude=0)[0] == 1


# --- downstream fidelity --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit(miniatures):
    from saekit.models import load_encoder

    return load_encoder(miniatures["vit"])


def _head(width: int, n_classes: int = 3) -> torch.nn.Linear:
    head = torch.nn.Linear(width, n_classes)
    torch.nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(0))
    return head


def test_an_exact_reconstruction_changes_nothing(vit):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    head = _head(vit.d_model)
    labels = head(vit.forward_pixels(pixels, layers=[-1]).cls[vit.n_layers - 1]).argmax(-1)
    result = downstream_fidelity(vit, pixels, labels, exact_sae(vit.d_model), 1, head)
    assert result.accuracy["original"] == 1.0 == result.accuracy["reconstructed"]
    assert result.kl["reconstructed"] == pytest.approx(0.0, abs=1e-10)
    assert result.kl["zero-ablated"] > 0


@torch.no_grad()
def test_splicing_the_layer_the_head_reads(vit):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    head = _head(vit.d_model)
    last = vit.n_layers - 1
    labels = head(vit.forward_pixels(pixels, layers=[last]).cls[last]).argmax(-1)
    result = downstream_fidelity(vit, pixels, labels, exact_sae(vit.d_model), last, head)
    assert result.accuracy["reconstructed"] == 1.0
    # a zeroed CLS token gives the head's bias: one class for every image
    constant = head(torch.zeros(1, vit.d_model)).argmax(-1).item()
    assert result.accuracy["zero-ablated"] == pytest.approx((labels == constant).float().mean())
    assert result.kl["zero-ablated"] > 0


@torch.no_grad()
def test_zero_ablation_matches_a_hand_written_forward(vit):
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    head = _head(vit.d_model)
    hidden = vit.model.embeddings(pixels)
    for index, block in enumerate(vit.model.layers):
        hidden = block(hidden)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if index == 1:
            hidden = hidden.clone()
            hidden[:, 0] = 0.0
    ablated_logits = head(hidden[:, 0])
    original_logits = head(vit.forward_pixels(pixels, layers=[-1]).cls[vit.n_layers - 1])
    labels = ablated_logits.argmax(-1)
    labels[0] = (labels[0] + 1) % 3  # one wrong label: zero-ablated accuracy is exactly 3/4
    result = downstream_fidelity(vit, pixels, labels, exact_sae(vit.d_model), 1, head)
    assert result.accuracy["zero-ablated"] == pytest.approx(0.75)
    expected_kl = torch.nn.functional.kl_div(
        ablated_logits.log_softmax(-1), original_logits.log_softmax(-1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    assert result.kl["zero-ablated"] == pytest.approx(expected_kl.item(), rel=1e-5)


# --- the card -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card_world(miniatures, tmp_path_factory):
    from conftest import write_image_folder

    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.models import load_encoder
    from saekit.sae import SAESpec, get_recipe, train_or_load

    root = tmp_path_factory.mktemp("card")
    encoder = load_encoder(miniatures["vit"])
    dataset = ImageFolder(write_image_folder(root / "val", per_class=8, seed=4))
    store = extract(encoder, dataset, layers=[1, 2], tokens="cls", out=root / "store")
    spec = SAESpec(arch="relu", layer=1, expansion=2, l1=0.1,
                   recipe=get_recipe("olson2025", epochs=3, batch_size=8))  # fmt: skip
    sae = train_or_load(spec, store, root=root / "saes", progress=False)
    return encoder, dataset, store, sae


def test_report_card_measures_every_part(card_world):
    from saekit.analysis.report_card import cards_table, report_card

    encoder, dataset, store, sae = card_world
    head = _head(encoder.d_model)
    card = report_card(sae, store, 1, twin=sae, encoder=encoder, dataset=dataset, head=head,
                       ks=(1, 2))  # fmt: skip
    row = card.row()
    assert row["stability (mean cos)"] == pytest.approx(1.0)  # an SAE is its own perfect twin
    assert row["NMSE"] == pytest.approx(1.0 - card.fidelity.explained_variance) and row["L0"] > 0
    assert set(card.sparse_probing.index) == {"SAE features", "neurons"}
    assert list(card.sparse_probing.columns) == [1, 2]
    assert card.absorption is not None and len(card.absorption) > 0  # tench/goldfish/shark
    assert card.downstream is not None and card.downstream.accuracy.keys() == {
        "original",
        "reconstructed",
        "zero-ablated",
    }
    assert card.notes == []
    assert list(cards_table([card]).index) == [card.name]
    card.figure()


def test_pareto_frame_has_the_sae_and_baselines_with_exact_full_rank_pca(card_world):
    from saekit.analysis.report_card import pareto_frame, plot_pareto

    _, _, store, sae = card_world
    # 24 images: 24 components span the centred rows exactly
    frame = pareto_frame({"relu": sae}, store, 1, baseline_ks=(1, 24))
    assert frame[frame["method"] == "SAE"]["name"].tolist() == ["relu"]
    full = frame[(frame["method"] == "PCA") & (frame["L0"] == 24)]
    assert full["NMSE"].iloc[0] == pytest.approx(0.0, abs=1e-9)
    plot_pareto(frame)


def test_report_card_refuses_an_sae_from_another_layer(card_world):
    from saekit.analysis.report_card import report_card
    from saekit.sae.codes import SAEStoreMismatchError

    _, _, store, sae = card_world  # trained on layer 1
    with pytest.raises(SAEStoreMismatchError, match="layer"):
        report_card(sae, store, 2)


def test_saekit_eval_prints_and_saves_the_card(card_world, tmp_path, capsys):
    import time

    from saekit.cli import main

    _, _, store, sae = card_world
    folder = tmp_path / "sae"
    from saekit.sae import save_sae

    save_sae(sae, folder)
    start = time.perf_counter()
    assert main(["eval", "--sae", str(folder), "--store", str(store.root), "--ks", "1,2",
                 "--out", str(tmp_path / "card")]) == 0  # fmt: skip
    assert time.perf_counter() - start < 60  # issue 17: under a minute at mini size
    printed = capsys.readouterr().out
    assert "report card of" in printed and "on layer 1" in printed  # the SAE's own layer
    assert "sparse probe k=2" in printed and "not measured: stability" in printed
    saved = (tmp_path / "card" / "report_card.csv").read_text()
    assert "explained variance" in saved and (tmp_path / "card" / "report_card.png").exists()
    with pytest.raises(SystemExit) as usage:
        main(["eval", "--sae", str(folder), "--store", str(store.root), "--ks", "x"])
    assert usage.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
