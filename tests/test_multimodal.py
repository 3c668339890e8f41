"""Tests for saekit.analysis.multimodal (paper 003 §5) on a miniature LLaVA built offline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from saekit.analysis import multimodal as mm
from saekit.mini.llava import build_mini_llava

CLASSES = ["clock", "red circle", "great_white_shark"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = build_mini_llava(tmp_path_factory.mktemp("mini_llava"), seed=0, extra_words=CLASSES)
    model, processor = mm.load_llava(str(path))
    return path, model, processor


def noise_images(n: int, seed: int = 0, size: tuple[int, int] = (48, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def planted_sae(W_enc: torch.Tensor) -> StandardSAE:
    """A ReLU SAE whose codes are relu(x @ W_enc): zero biases, chosen encoder."""
    d_in, d_sae = W_enc.shape
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------ miniature and loading


def test_mini_llava_round_trips_through_from_pretrained(llava, tmp_path):
    path, model, processor = llava
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert mm.patch_grid(model, processor) == (6, 6)
    # The processor expands one <image> into one token per patch (CLS dropped, as LLaVA-1.5).
    prompt = mm.build_prompt(processor, "Describe this image.", with_image=True)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith("ASSISTANT:")
    ids = processor(images=noise_images(1), text=[prompt], return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 36
    # Class names given as extra words tokenize to whole tokens, not bytes.
    assert len(processor.tokenizer.tokenize("clock")) == 1
    # Same seed, same weights; another seed, other weights.
    again, _ = mm.load_llava(str(build_mini_llava(tmp_path / "again", seed=0, extra_words=CLASSES)))
    other, _ = mm.load_llava(str(build_mini_llava(tmp_path / "other", seed=1, extra_words=CLASSES)))
    name, weight = next(iter(model.state_dict().items()))
    assert torch.equal(weight, again.state_dict()[name])
    assert not torch.equal(weight, other.state_dict()[name])


def test_load_llava_fails_offline_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(OSError, match="build_mini_llava"):
        mm.load_llava("llava-hf/no-such-llava-checkpoint")


def test_profile_config_rejects_unknown_names():
    cfg = mm.profile_config("paper")
    assert cfg.model == mm.PAPER_MODEL and cfg.evolution_layer == 6 and cfg.top_fraction == 0.01
    with pytest.raises(ValueError, match="mini"):
        mm.profile_config("huge")
    with pytest.raises(ValueError, match="valid ones"):
        mm.profile_config("mini", layr=3)


# -------------------------------------------------------------------- image-token positions


def test_image_token_positions_on_planted_sequences():
    image_id, grid = 9, (2, 3)
    ids_BT = torch.full((2, 12), 5)
    ids_BT[0, 1:7] = image_id  # image block near the start
    ids_BT[1, 4:10] = image_id  # shifted, as with left padding or a longer prefix
    tokens = mm.image_token_positions(ids_BT, image_id, grid)
    assert tokens.positions_BP.tolist() == [list(range(1, 7)), list(range(4, 10))]
    assert tokens.rows_P.tolist() == [0, 0, 0, 1, 1, 1]
    assert tokens.cols_P.tolist() == [0, 1, 2, 0, 1, 2]
    grid_BHW = tokens.to_grid(torch.arange(12.0).reshape(2, 6))
    assert grid_BHW[1].tolist() == [[6, 7, 8], [9, 10, 11]]
    # With CLS kept ("full" strategy) the first placeholder is skipped.
    ids_BT[0, 0] = image_id
    ids_BT[1, 3] = image_id
    assert mm.image_token_positions(ids_BT, image_id, grid).positions_BP[1].tolist() == list(
        range(4, 10)
    )
    with pytest.raises(ValueError, match="one image"):
        mm.image_token_positions(ids_BT[:, :8], image_id, grid)


def test_image_tokens_carry_projector_output_in_grid_order(llava):
    _, model, processor = llava
    prompt = mm.build_prompt(processor, "Describe this image.", with_image=True)
    inputs = processor(images=noise_images(2), text=[prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        projected_BPD = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
    projected_BPD = torch.stack(list(projected_BPD))
    tokens = mm.image_token_positions(inputs["input_ids"], model.config.image_token_id, (6, 6))
    embeds_BPD = out.hidden_states[0][torch.arange(2)[:, None], tokens.positions_BP]
    torch.testing.assert_close(embeds_BPD, projected_BPD)


@pytest.mark.parametrize("cell", [(0, 0), (1, 4), (5, 2)])
def test_planted_patch_moves_its_own_grid_cell(llava, cell):
    """Paint one 8x8 patch white: the image token mapped to that cell must change the most,
    at the projector and at a language-model block."""
    _, model, processor = llava
    base = np.full((48, 48, 3), 90, dtype=np.uint8)
    planted = base.copy()
    r, c = cell
    planted[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 255
    images = [Image.fromarray(base), Image.fromarray(planted)]
    acts, tokens = mm.image_token_activations(model, processor, images, (mm.PROJECTOR, 0))
    for key in (mm.PROJECTOR, 0):
        change_P = (acts[key][1] - acts[key][0]).norm(dim=-1)
        change_HW = tokens.to_grid(change_P[None])[0]
        assert divmod(int(change_HW.argmax()), 6) == cell, key


# ------------------------------------------------------------------- response activations


def test_response_mask_stops_after_first_eos():
    eos, pad = 2, 3
    new_BN = torch.tensor([[7, 8, 2, 3, 3], [2, 3, 3, 3, 3], [7, 8, 9, 10, 11], [7, 4, 2, 2, 2]])
    keep = mm.response_mask(new_BN, [eos, 4])
    assert keep.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True] * 5,
        [True, True, False, False, False],
    ]
    assert pad not in new_BN[keep].tolist()  # padding only ever follows an EOS


def test_response_activations_match_teacher_forced_pass(llava):
    _, model, processor = llava
    cfg = mm.profile_config("mini", max_new_tokens=6, batch_size=3)
    # Different prompt lengths in one batch: left padding must not change the activations.
    names = ["clock", "great_white_shark is a kind of animal", "red circle"]
    batched = mm.text_responses(model, processor, names, cfg)
    assert batched.labels.tolist() == [0, 1, 2]
    assert [a.shape for a in batched.acts] == [(6, 64)] * 3
    for name, acts_TD in zip(names, batched.acts, strict=True):
        alone = mm.text_responses(model, processor, [name], cfg)
        torch.testing.assert_close(acts_TD, alone.acts[0], atol=1e-4, rtol=1e-4)
    # Row t is the block output at the position that produced response token t.
    prompt = mm.build_prompt(processor, "What is a great white shark?", with_image=False)
    prompt_ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
        hidden = model(full, output_hidden_states=True).hidden_states[cfg.layer + 1][0]
    n_prompt = prompt_ids.shape[1]
    expected = hidden[n_prompt - 1 : n_prompt - 1 + 6]
    got = mm.text_responses(model, processor, ["great_white_shark"], cfg).acts[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_image_responses_and_class_profiles(llava):
    _, model, processor = llava
    cfg = mm.profile_config("mini", max_new_tokens=4)
    images = noise_images(3, seed=1)
    responses = mm.image_responses(model, processor, images, [0, 1, 0], cfg)
    assert responses.stacked().shape == (12, 64)
    sae = planted_sae(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))
    profile_CS = mm.class_profiles(sae, responses, n_classes=3)
    with torch.no_grad():
        means = [sae.encode(a).mean(0).numpy() for a in responses.acts]
    np.testing.assert_allclose(profile_CS[0], (means[0] + means[2]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(profile_CS[1], means[1], rtol=1e-5, atol=1e-6)
    assert not profile_CS[2].any()  # no image of class 2


# ------------------------------------------------------------------------ overlap metrics


def test_top_feature_sets_pick_planted_features_and_skip_silent_ones():
    profile_CS = np.zeros((2, 100))
    profile_CS[0, [7, 42]] = [5.0, 3.0]
    profile_CS[0, 60] = 1.0
    profile_CS[1, 99] = 0.5  # only one active feature
    sets_CS = mm.top_feature_sets(profile_CS, fraction=0.02)  # K = 2
    assert np.flatnonzero(sets_CS[0]).tolist() == [7, 42]
    assert np.flatnonzero(sets_CS[1]).tolist() == [99]
    assert mm.top_feature_sets(profile_CS, fraction=0.001)[0].sum() == 1  # K never drops to 0
    with pytest.raises(ValueError):
        mm.top_feature_sets(profile_CS, fraction=0)


def test_overlap_and_jaccard_on_planted_sets():
    text_CS = np.zeros((3, 10), bool)
    image_CS = np.zeros((3, 10), bool)
    text_CS[0, [0, 1, 2, 3]] = True
    image_CS[0, [2, 3, 4]] = True  # 2 shared of 5 -> 0.4
    text_CS[1, [5, 6]] = True
    image_CS[1, [5, 6]] = True  # identical -> 1
    text_CS[2, [7]] = True  # image set empty -> 0
    assert mm.overlap_size(text_CS, image_CS).tolist() == [2, 2, 0]
    np.testing.assert_allclose(mm.jaccard(text_CS, image_CS), [0.4, 1.0, 0.0])
    j_CC = mm.jaccard_matrix(text_CS, image_CS)
    np.testing.assert_allclose(np.diag(j_CC), [0.4, 1.0, 0.0])
    assert j_CC[0, 1] == 0 and j_CC[2, 0] == 0
    np.testing.assert_allclose(mm.jaccard(np.zeros((1, 4)), np.zeros((1, 4))), [0.0])
    table = mm.overlap_table(text_CS, image_CS, ["a", "b", "c"])
    assert table["overlap"].tolist() == [2, 2, 0]
    assert table["n_text"].tolist() == [4, 2, 1] and table["n_image"].tolist() == [3, 2, 0]
    np.testing.assert_allclose(table["chance_jaccard"], [0.0, 0.0, 0.0])


def test_overlap_heatmap_marks_shared_features():
    text_CS = np.zeros((2, 6), bool)
    image_CS = np.zeros((2, 6), bool)
    text_CS[0, [4, 1]] = True
    image_CS[0, [1]] = True
    text_CS[1, [5]] = True
    image_CS[1, [5, 0]] = True
    frame = mm.overlap_heatmap_frame(text_CS, image_CS, ["cat", "dog"])
    assert frame.columns.tolist() == [1, 4, 0, 5]  # first class's features first
    assert frame.loc[("cat", "text")].tolist() == [2, 1, 0, 0]
    assert frame.loc[("cat", "image")].tolist() == [2, 0, 0, 0]
    assert frame.loc[("dog", "image")].tolist() == [0, 0, 1, 2]
    ax = mm.plot_overlap_heatmap(frame)
    assert len(ax.get_yticklabels()) == 4
    mm.plot_jaccard_matrix(mm.jaccard_matrix(text_CS, image_CS), ["cat", "dog"])


def test_random_derangement_has_no_fixed_points():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        for _ in range(20):
            perm = mm.random_derangement(n, rng)
            assert sorted(perm.tolist()) == list(range(n))
            assert not np.any(perm == np.arange(n))
    with pytest.raises(ValueError):
        mm.random_derangement(1, rng)


def test_permutation_baseline_known_answers():
    # Each class owns a disjoint block and both modalities agree: matched 1, mismatched 0.
    sets_CS = np.kron(np.eye(4, dtype=bool), np.ones((1, 5), bool))
    result = mm.permutation_baseline(sets_CS, sets_CS, n_permutations=99, seed=0)
    assert result.observed == 1.0 and result.expected_chance == 0.0
    assert np.all(result.null == 0.0)
    assert result.p_value == pytest.approx(1 / 100)
    # Every class has the same set: mismatched pairs overlap as much as matched ones.
    same_CS = np.ones((4, 5), bool)
    tied = mm.permutation_baseline(same_CS, same_CS, n_permutations=50)
    assert tied.observed == tied.null_mean == 1.0 and tied.p_value == 1.0
    # Two classes: the only mismatched pairing is the swap, so the null is exact.
    text_CS = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    image_CS = np.array([[1, 0, 0, 0], [0, 1, 1, 1]], bool)
    two = mm.permutation_baseline(text_CS, image_CS, n_permutations=10)
    j_CC = mm.jaccard_matrix(text_CS, image_CS)  # [[1/2, 1/4], [0, 2/3]]
    np.testing.assert_allclose(two.null, (1 / 4 + 0) / 2)
    assert two.observed == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert two.expected_chance == pytest.approx((j_CC[0, 1] + j_CC[1, 0]) / 2)


def test_permutation_null_mean_converges_to_mismatched_mean():
    rng = np.random.default_rng(3)
    text_CS = rng.random((6, 40)) < 0.3
    image_CS = rng.random((6, 40)) < 0.3
    result = mm.permutation_baseline(text_CS, image_CS, n_permutations=4000, seed=1)
    assert result.null_mean == pytest.approx(result.expected_chance, abs=0.01)


# -------------------------------------------------------------------------- evolution maps


def test_patch_maps_and_evolution_on_planted_activations():
    grid = (2, 3)
    acts_BPD = torch.zeros(1, 6, 4)
    acts_BPD[0, [0, 4], 0] = torch.tensor([1.0, 3.0])  # direction 0 on cells (0,0) and (1,1)
    acts_BPD[0, 2, 1] = 0.5  # a weaker feature elsewhere
    sae = planted_sae(torch.eye(4))
    maps_BHW, features_B = mm.patch_maps(sae, acts_BPD, grid)
    assert features_B.tolist() == [0]  # the dominant feature
    assert maps_BHW[0].tolist() == [[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    fixed_BHW, _ = mm.patch_maps(sae, acts_BPD, grid, feature=1)
    assert fixed_BHW[0].tolist() == [[0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    late_BHW = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])
    evo = mm.compare_patch_maps(maps_BHW, late_BHW)
    assert evo.overlay_BHW[0].tolist() == [[1, 0, 2], [0, 3, 2]]
    assert evo.persistence_B.tolist() == [0.5] and evo.new_B.tolist() == [2]
    assert torch.isnan(mm.compare_patch_maps(torch.zeros(1, 2, 3), late_BHW).persistence_B[0])
    mm.plot_evolution(Image.new("RGB", (48, 32)), evo)
    with pytest.raises(ValueError, match="grid"):
        mm.patch_maps(sae, acts_BPD, (2, 2))


def test_evolution_study_end_to_end_on_mini(llava):
    _, model, processor = llava
    images = noise_images(3, seed=2, size=(60, 80))
    acts, tokens = mm.image_token_activations(model, processor, images, (mm.PROJECTOR, 1))
    assert acts[mm.PROJECTOR].shape == acts[1].shape == (3, 36, 64)
    assert tokens.grid == (6, 6)
    gen = torch.Generator().manual_seed(0)
    early, _ = mm.patch_maps(
        planted_sae(torch.randn(64, 16, generator=gen)), acts[mm.PROJECTOR], tokens.grid
    )
    late, _ = mm.patch_maps(planted_sae(torch.randn(64, 16, generator=gen)), acts[1], tokens.grid)
    evo = mm.compare_patch_maps(early, late)
    assert evo.overlay_BHW.shape == (3, 6, 6)
    # The overlay is a faithful code of both masks.
    assert torch.equal(evo.overlay_BHW % 2 == 1, evo.early_BHW)
    assert torch.equal(evo.overlay_BHW >= 2, evo.late_BHW)
    assert mm.square_crop(processor, images[0]).size == (48, 48)
    with pytest.raises(ValueError, match="block index"):
        mm.image_token_activations(model, processor, images, (99,))


# ------------------------------------------------------------------ study helpers (chapter 7)


def test_study_images_spreads_classes_and_takes_first_per_class():
    labels_N = np.tile(np.arange(5), 3)  # 0 1 2 3 4 0 1 2 3 4 0 1 2 3 4
    classes_C, indices, study_labels = mm.study_images(labels_N, n_classes=3, per_class=2)
    assert classes_C.tolist() == [0, 2, 4]
    assert indices.tolist() == [0, 5, 2, 7, 4, 9]
    assert study_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert labels_N[indices].tolist() == classes_C[study_labels].tolist()
    assert mm.study_images(labels_N, 5, 3)[0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="between 1 and 5"):
        mm.study_images(labels_N, 6, 1)
    with pytest.raises(ValueError, match="images_per_class"):
        mm.study_images(labels_N, 2, 4)


def test_train_relu_sae_recovers_planted_atoms_at_any_scale():
    """Tiny activations on a large offset (like the miniature's residual stream): input
    normalisation lets λ = 0.3 find every planted atom, and the SAE encodes raw inputs."""
    from saekit.sae import evaluate
    from saekit.sae.synthetic import atom_recovery, planted_dictionary

    planted = planted_dictionary(n_rows=2048, d_in=16, n_atoms=24, active=2, seed=0)
    raw_ND = 0.01 * planted.acts_ND + torch.linspace(-1, 1, 16)
    sae = mm.train_relu_sae(raw_ND, expansion=4, l1=0.3, lr=3e-3, epochs=10, progress=False)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 64)
    assert atom_recovery(sae.W_dec.detach(), planted.atoms_AD) == 1.0
    metrics = evaluate(sae, raw_ND)
    assert metrics.explained_variance > 0.85 and metrics.l0 < 12
    again = mm.train_relu_sae(raw_ND, expansion=4, l1=0.3, lr=3e-3, epochs=10, progress=False)
    assert torch.equal(sae.W_dec, again.W_dec)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        mm.train_relu_sae(raw_ND[0])


def test_evolution_table_counts_planted_patches():
    early_BHW = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    late_BHW = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 0.0]]])
    evo = mm.compare_patch_maps(early_BHW, late_BHW)
    features = (torch.tensor([3, 4]), torch.tensor([7, 8]))
    table = mm.evolution_table(evo, [1, 0], ["cat", "dog"], features)
    assert table["class"].tolist() == ["dog", "cat"]
    assert table["early_feature"].tolist() == [3, 4] and table["late_feature"].tolist() == [7, 8]
    assert table["early"].tolist() == [2, 0] and table["late"].tolist() == [3, 1]
    assert table["both"].tolist() == [1, 0] and table["new"].tolist() == [2, 1]
    assert table["persistence"][0] == 0.5 and np.isnan(table["persistence"][1])


def test_baseline_and_class_view_figures():
    sets_CS = np.kron(np.eye(3, dtype=bool), np.ones((1, 4), bool))
    baseline = mm.permutation_baseline(sets_CS, sets_CS, n_permutations=20)
    ax = mm.plot_permutation_null(baseline)
    assert ax.lines[0].get_xdata()[0] == 1.0  # the matched value
    # A wide heatmap stays page-sized.
    wide_CS = np.zeros((1, 400), bool)
    wide_CS[0, ::2] = True
    frame = mm.overlap_heatmap_frame(wide_CS, ~wide_CS, ["x"])
    assert mm.plot_overlap_heatmap(frame).figure.get_figwidth() <= 14
    image_CS = sets_CS.copy()
    image_CS[1] = False  # class 1: nothing active for images
    evo = mm.compare_patch_maps(torch.rand(4, 2, 3), torch.rand(4, 2, 3))
    images = [Image.new("RGB", (48, 48))] * 4
    fig = mm.plot_class_view(0, ["a", "b", "c"], sets_CS, image_CS, images, evo, [0, 1])
    assert len(fig.axes) == 1 + 2 * 3
    assert "4 shared" in fig.axes[0].get_title() and "Jaccard 1.00" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["text", "image"]
    fig = mm.plot_class_view(1, ["a", "b", "c"], sets_CS, image_CS, images, evo, [2])
    assert "Jaccard 0.00" in fig.axes[0].get_title()
    empty = mm.plot_class_view(
        1, ["a", "b", "c"], np.zeros_like(sets_CS), image_CS, images, evo, [3]
    )
    assert "0 shared" in empty.axes[0].get_title()


def test_caption_images_skip_the_study_images_of_every_class():
    labels_N = np.repeat(np.arange(3), 4)  # 0 0 0 0 1 1 1 1 2 2 2 2
    study = mm.study_images(labels_N, n_classes=3, per_class=2)[1]
    captions = mm.caption_images(labels_N, skip=2, per_class=2)
    assert captions.tolist() == [2, 3, 6, 7, 10, 11]
    assert not set(captions.tolist()) & set(study.tolist())
    assert mm.caption_images(labels_N, skip=2, per_class=0).tolist() == []
    with pytest.raises(ValueError, match="sae_captions_per_class"):
        mm.caption_images(labels_N, skip=2, per_class=3)


def test_training_activations_pick_modalities():
    text = mm.Responses([torch.zeros(2, 3), torch.zeros(1, 3)], ["", ""], np.array([0, 1]), 2)
    image = mm.Responses([torch.ones(4, 3)], [""], np.array([0]), 2)
    captions = mm.Responses([torch.full((5, 3), 2.0)], [""], np.array([0]), 2)
    both = mm.training_activations(text, image, "both")
    assert both.shape == (7, 3) and both.sum() == 12  # text rows are 0, image rows 1
    assert torch.equal(mm.training_activations(text, image, "image"), torch.ones(4, 3))
    with_captions = mm.training_activations(text, image, "image", captions)
    assert with_captions.shape == (9, 3) and with_captions.sum() == 12 + 30
    no_captions = mm.Responses([], [], np.array([], int), 2)
    assert torch.equal(mm.training_activations(text, image, "image", no_captions), image.acts[0])
    with pytest.raises(ValueError, match="'both' or 'image'"):
        mm.training_activations(text, image, "text")
    with pytest.raises(ValueError, match="one layer"):
        mm.training_activations(text, mm.Responses(image.acts, [""], image.labels, 3))
