"""Chapter 07's study code (saekit.studies.llava): settings, images, SAEs, tables, figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.analysis import modality_overlap as mo
from saekit.analysis import patch_evolution as pe
from saekit.analysis.multimodal import PAPER_MODEL, Responses
from saekit.mini import toy_llava
from saekit.runner import chapter_parameters
from saekit.sae import evaluate
from saekit.sae.synthetic import atom_recovery, planted_dictionary
from saekit.studies import llava as study

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "07_llava.py"


def test_settings_fields_are_exactly_the_chapters_parameters():
    declared = chapter_parameters(NOTEBOOK)
    fields = [f.name for f in dataclasses.fields(study.LlavaSettings)]
    assert list(declared) == fields
    # Profile-dependent parameters are None in the notebook: the settings own the defaults.
    for name in study.LlavaSettings.PAPER:
        assert declared[name] is None, name


def test_settings_resolve_each_profile_and_derive_the_dtype_from_the_device():
    mini = study.LlavaSettings.for_profile("mini", device="cpu")
    assert (mini.layer, mini.top_fraction, mini.sae_epochs) == (2, 0.05, 50)
    assert mini.model == str(toy_llava.DEFAULT_OUT)
    assert mini.dtype == "float32"
    paper = study.LlavaSettings.for_profile("paper", layer=None, device="cuda")
    assert (paper.model, paper.layer, paper.evolution_layer) == (PAPER_MODEL, 16, 6)
    assert (paper.max_new_tokens, paper.top_fraction, paper.sae_lr) == (48, 0.01, 1e-4)
    assert paper.dtype == "float16" and paper.replace(device="cpu").dtype == "float32"
    assert study.LlavaSettings.for_profile("paper", device="cuda:1").dtype == "float16"
    assert study.LlavaSettings.for_profile("mini").device in ("cpu", "cuda")
    assert paper.answers().layer == 16 and paper.answers().max_new_tokens == 48
    spec = mini.sae_spec("x").resolved()
    assert (spec.arch, spec.expansion, spec.l1, spec.seed, spec.name) == ("relu", 8, 0.3, 0, "x")
    assert (spec.recipe.lr, spec.recipe.epochs, spec.recipe.batch_size) == (1e-3, 50, 64)
    assert spec.recipe.normalize_inputs


def test_mini_model_is_the_shipped_toy_llava():
    settings = study.LlavaSettings.for_profile("mini", device="cpu")
    model, processor, source = study.load_model(settings)
    assert source == str(toy_llava.DEFAULT_OUT) and model.dtype == torch.float32
    # The toy world's caption words are whole tokens, so an answer reads word by word.
    assert len(processor.tokenizer.tokenize("a coarse dotted green fish")) == 5
    with pytest.raises(ValueError, match="Set model"):
        study.load_model(settings.replace(model=None))


def test_study_images_spreads_classes_and_takes_first_per_class():
    labels_N = np.tile(np.arange(5), 3)  # 0 1 2 3 4 0 1 2 3 4 0 1 2 3 4
    classes_C, indices, study_labels = study.study_images(labels_N, n_classes=3, per_class=2)
    assert classes_C.tolist() == [0, 2, 4]
    assert indices.tolist() == [0, 5, 2, 7, 4, 9]
    assert study_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert labels_N[indices].tolist() == classes_C[study_labels].tolist()
    assert study.study_images(labels_N, 5, 3)[0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="between 1 and 5"):
        study.study_images(labels_N, 6, 1)
    with pytest.raises(ValueError, match="images_per_class"):
        study.study_images(labels_N, 2, 4)


def test_chapter_saes_recover_planted_atoms_at_any_scale_and_are_cached(tmp_path):
    """Tiny activations on a large offset (like the miniature's residual stream): input
    normalisation lets λ = 0.3 find every planted atom, the SAE encodes raw inputs, and the same
    request a second time is a cache hit."""
    planted = planted_dictionary(n_rows=2048, d_in=16, n_atoms=24, active=2, seed=0)
    raw_ND = 0.01 * planted.acts_ND + torch.linspace(-1, 1, 16)
    settings = study.LlavaSettings.for_profile(
        "mini", sae_expansion=4, sae_l1=0.3, sae_lr=3e-3, sae_epochs=10, device="cpu"
    )
    sae = study.train_sae(raw_ND, settings, "planted", tmp_path)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 64)
    assert atom_recovery(sae.W_dec.detach(), planted.atoms_AD) == 1.0
    metrics = evaluate(sae, raw_ND)
    assert metrics.explained_variance > 0.85 and metrics.l0 < 12
    assert len(list(tmp_path.glob("planted-*"))) == 1
    again = study.train_sae(raw_ND, settings, "planted", tmp_path)
    assert torch.equal(sae.W_dec, again.W_dec) and len(list(tmp_path.glob("planted-*"))) == 1
    study.train_sae(raw_ND, settings.replace(sae_l1=0.5), "planted", tmp_path)
    assert len(list(tmp_path.glob("planted-*"))) == 2  # another λ is another SAE
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        study.train_sae(raw_ND[0], settings, "planted", tmp_path)


def test_evolution_table_counts_planted_patches():
    early_BHW = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    late_BHW = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 0.0]]])
    evo = pe.compare_patch_maps(early_BHW, late_BHW)
    features = (torch.tensor([3, 4]), torch.tensor([7, 8]))
    table = study.evolution_table(evo, [1, 0], ["cat", "dog"], features)
    assert table["class"].tolist() == ["dog", "cat"]
    assert table["early_feature"].tolist() == [3, 4] and table["late_feature"].tolist() == [7, 8]
    assert table["early"].tolist() == [2, 0] and table["late"].tolist() == [3, 1]
    assert table["both"].tolist() == [1, 0] and table["new"].tolist() == [2, 1]
    assert table["persistence"][0] == 0.5 and np.isnan(table["persistence"][1])


def test_baseline_and_class_view_figures():
    sets_CS = np.kron(np.eye(3, dtype=bool), np.ones((1, 4), bool))
    baseline = mo.permutation_baseline(sets_CS, sets_CS, n_permutations=20)
    ax = study.plot_permutation_null(baseline)
    assert ax.lines[0].get_xdata()[0] == 1.0  # the matched value
    # A wide heatmap stays page-sized.
    wide_CS = np.zeros((1, 400), bool)
    wide_CS[0, ::2] = True
    frame = mo.overlap_heatmap_frame(wide_CS, ~wide_CS, ["x"])
    assert study.plot_overlap_heatmap(frame).figure.get_figwidth() <= 14
    image_CS = sets_CS.copy()
    image_CS[1] = False  # class 1: nothing active for images
    evo = pe.compare_patch_maps(torch.rand(4, 2, 3), torch.rand(4, 2, 3))
    images = [Image.new("RGB", (48, 48))] * 4
    fig = study.plot_class_view(0, ["a", "b", "c"], sets_CS, image_CS, images, evo, [0, 1])
    assert len(fig.axes) == 1 + 2 * 3
    assert "4 shared" in fig.axes[0].get_title() and "Jaccard 1.00" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["text", "image"]
    fig = study.plot_class_view(1, ["a", "b", "c"], sets_CS, image_CS, images, evo, [2])
    assert "Jaccard 0.00" in fig.axes[0].get_title()
    empty = study.plot_class_view(
        1, ["a", "b", "c"], np.zeros_like(sets_CS), image_CS, images, evo, [3]
    )
    assert "0 shared" in empty.axes[0].get_title()


def test_caption_images_skip_the_study_images_of_every_class():
    labels_N = np.repeat(np.arange(3), 4)  # 0 0 0 0 1 1 1 1 2 2 2 2
    chosen = study.study_images(labels_N, n_classes=3, per_class=2)[1]
    captions = study.caption_images(labels_N, skip=2, per_class=2)
    assert captions.tolist() == [2, 3, 6, 7, 10, 11]
    assert not set(captions.tolist()) & set(chosen.tolist())
    assert study.caption_images(labels_N, skip=2, per_class=0).tolist() == []
    with pytest.raises(ValueError, match="sae_captions_per_class"):
        study.caption_images(labels_N, skip=2, per_class=3)


def test_training_activations_pick_modalities():
    text = Responses([torch.zeros(2, 3), torch.zeros(1, 3)], ["", ""], np.array([0, 1]), 2)
    image = Responses([torch.ones(4, 3)], [""], np.array([0]), 2)
    captions = Responses([torch.full((5, 3), 2.0)], [""], np.array([0]), 2)
    both = study.training_activations(text, image, "both")
    assert both.shape == (7, 3) and both.sum() == 12  # text rows are 0, image rows 1
    assert torch.equal(study.training_activations(text, image, "image"), torch.ones(4, 3))
    with_captions = study.training_activations(text, image, "image", captions)
    assert with_captions.shape == (9, 3) and with_captions.sum() == 12 + 30
    no_captions = Responses([], [], np.array([], int), 2)
    assert torch.equal(study.training_activations(text, image, "image", no_captions), image.acts[0])
    with pytest.raises(ValueError, match="'both' or 'image'"):
        study.training_activations(text, image, "text")
    with pytest.raises(ValueError, match="one layer"):
        study.training_activations(text, Responses(image.acts, [""], image.labels, 3))


def test_chance_and_evolution_figures_draw_what_they_are_given():
    sets_CS = np.kron(np.eye(3, dtype=bool), np.ones((1, 4), bool))
    baseline = mo.permutation_baseline(sets_CS, sets_CS, n_permutations=20)
    fig = study.plot_chance(mo.jaccard_matrix(sets_CS, sets_CS), ["a", "b", "c"], baseline)
    matrix = fig.axes[0].collections[0].get_array()
    np.testing.assert_allclose(np.asarray(matrix).reshape(3, 3), np.eye(3))
    early = torch.zeros(2, 2, 3)
    early[0, 0, 0] = 1.0
    late = torch.zeros(2, 2, 3)
    late[0, 1, 2] = 1.0
    evo = pe.compare_patch_maps(early, late)
    images = [Image.new("RGB", (48, 32))] * 2
    fig = study.plot_evolutions(images, evo, [0, 1], ["first", "second"], ("proj", "layer 1"))
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "first"
    overlay = np.asarray(fig.axes[2].get_images()[1].get_array())
    assert overlay.tolist() == [[1, 0, 0], [0, 0, 2]]
