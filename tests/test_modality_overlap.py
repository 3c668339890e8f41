"""saekit.analysis.modality_overlap: class profiles, top sets, overlap and the chance level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saekit.analysis import modality_overlap as mo
from saekit.analysis.multimodal import Responses
from saekit.sae.synthetic import identity_sae


def test_class_profiles_in_chunks_equal_per_response_means():
    """Responses of different lengths encoded in chunks that cut through them: each class's
    profile is the mean over its responses of each response's mean code."""
    gen = torch.Generator().manual_seed(0)
    acts = [torch.randn(n, 5, generator=gen) for n in (3, 1, 4, 2)]
    responses = Responses(acts, ["", "", "", ""], np.array([0, 2, 0, 2]), layer=1)
    sae = identity_sae(5)
    means = [a.clamp(min=0).mean(0).numpy() for a in acts]
    for chunk in (1, 3, 100):
        profile_CS = mo.class_profiles(sae, responses, n_classes=3, chunk=chunk)
        np.testing.assert_allclose(profile_CS[0], (means[0] + means[2]) / 2, rtol=1e-6)
        np.testing.assert_allclose(profile_CS[2], (means[1] + means[3]) / 2, rtol=1e-6)
        assert not profile_CS[1].any()  # no response of class 1
    empty = Responses([], [], np.array([], int), layer=1)
    assert not mo.class_profiles(sae, empty, n_classes=2).any()


def test_top_feature_sets_pick_planted_features_and_skip_silent_ones():
    profile_CS = np.zeros((2, 100))
    profile_CS[0, [7, 42]] = [5.0, 3.0]
    profile_CS[0, 60] = 1.0
    profile_CS[1, 99] = 0.5  # only one active feature
    sets_CS = mo.top_feature_sets(profile_CS, fraction=0.02)  # K = 2
    assert np.flatnonzero(sets_CS[0]).tolist() == [7, 42]
    assert np.flatnonzero(sets_CS[1]).tolist() == [99]
    assert mo.top_feature_sets(profile_CS, fraction=0.001)[0].sum() == 1  # K never drops to 0
    assert mo.top_set_size(0.02, 100) == 2 and mo.top_set_size(0.001, 100) == 1
    with pytest.raises(ValueError):
        mo.top_feature_sets(profile_CS, fraction=0)


def test_overlap_and_jaccard_on_planted_sets():
    text_CS = np.zeros((3, 10), bool)
    image_CS = np.zeros((3, 10), bool)
    text_CS[0, [0, 1, 2, 3]] = True
    image_CS[0, [2, 3, 4]] = True  # 2 shared of 5 -> 0.4
    text_CS[1, [5, 6]] = True
    image_CS[1, [5, 6]] = True  # identical -> 1
    text_CS[2, [7]] = True  # image set empty -> 0
    assert mo.overlap_size(text_CS, image_CS).tolist() == [2, 2, 0]
    np.testing.assert_allclose(mo.jaccard(text_CS, image_CS), [0.4, 1.0, 0.0])
    j_CC = mo.jaccard_matrix(text_CS, image_CS)
    np.testing.assert_allclose(np.diag(j_CC), [0.4, 1.0, 0.0])
    assert j_CC[0, 1] == 0 and j_CC[2, 0] == 0
    np.testing.assert_allclose(mo.jaccard(np.zeros((1, 4)), np.zeros((1, 4))), [0.0])
    table = mo.overlap_table(text_CS, image_CS, ["a", "b", "c"])
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
    frame = mo.overlap_heatmap_frame(text_CS, image_CS, ["cat", "dog"])
    assert frame.columns.tolist() == [1, 4, 0, 5]  # first class's features first
    assert frame.loc[("cat", "text")].tolist() == [2, 1, 0, 0]
    assert frame.loc[("cat", "image")].tolist() == [2, 0, 0, 0]
    assert frame.loc[("dog", "image")].tolist() == [0, 0, 1, 2]


def test_random_derangement_has_no_fixed_points():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        for _ in range(20):
            perm = mo.random_derangement(n, rng)
            assert sorted(perm.tolist()) == list(range(n))
            assert not np.any(perm == np.arange(n))
    with pytest.raises(ValueError):
        mo.random_derangement(1, rng)


def test_permutation_baseline_known_answers():
    # Each class owns a disjoint block and both modalities agree: matched 1, mismatched 0.
    sets_CS = np.kron(np.eye(4, dtype=bool), np.ones((1, 5), bool))
    result = mo.permutation_baseline(sets_CS, sets_CS, n_permutations=99, seed=0)
    assert result.observed == 1.0 and result.expected_chance == 0.0
    assert np.all(result.null == 0.0)
    assert result.p_value == pytest.approx(1 / 100)
    # Every class has the same set: mismatched pairs overlap as much as matched ones.
    same_CS = np.ones((4, 5), bool)
    tied = mo.permutation_baseline(same_CS, same_CS, n_permutations=50)
    assert tied.observed == tied.null_mean == 1.0 and tied.p_value == 1.0
    # Two classes: the only mismatched pairing is the swap, so the null is exact.
    text_CS = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    image_CS = np.array([[1, 0, 0, 0], [0, 1, 1, 1]], bool)
    two = mo.permutation_baseline(text_CS, image_CS, n_permutations=10)
    j_CC = mo.jaccard_matrix(text_CS, image_CS)  # [[1/2, 1/4], [0, 2/3]]
    np.testing.assert_allclose(two.null, (1 / 4 + 0) / 2)
    assert two.observed == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert two.expected_chance == pytest.approx((j_CC[0, 1] + j_CC[1, 0]) / 2)


def test_permutation_null_mean_converges_to_mismatched_mean():
    rng = np.random.default_rng(3)
    text_CS = rng.random((6, 40)) < 0.3
    image_CS = rng.random((6, 40)) < 0.3
    result = mo.permutation_baseline(text_CS, image_CS, n_permutations=4000, seed=1)
    assert result.null_mean == pytest.approx(result.expected_chance, abs=0.01)
