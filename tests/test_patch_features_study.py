"""Chapter 04's study module: settings that own the profile, the layers each encoder defaults
to, the fallbacks when no feature passes a filter (with a printed note), the evaluation
patches, and the choice of features tied to the object."""

from __future__ import annotations

import numpy as np
import pandas as pd

from saekit.analysis.exemplars import ExemplarScan
from saekit.analysis.ontology import ClassStats
from saekit.sae import get_recipe
from saekit.studies.patch_features import (
    PatchFeaturesSettings,
    browsable_features,
    default_layer,
    eval_patches,
    matchable_features,
    object_features,
    resource_needs,
)


def _scan(image_freq_S, max_act_S) -> ExemplarScan:
    """A scan with the given per-feature image frequencies and maximum activations."""
    image_freq_S = np.asarray(image_freq_S, float)
    n = len(image_freq_S)
    stats = ClassStats(np.zeros((n, 2)), np.zeros((n, 2)), np.ones(2), image_freq_S)
    return ExemplarScan(
        layer=0, rank_by="max", model="ToyViT", d_sae=n,
        top_values_SK=np.zeros((n, 1)), top_rows_SK=np.zeros((n, 1), int),
        token_freq_S=image_freq_S / 10, image_freq_S=image_freq_S,
        max_act_S=np.asarray(max_act_S, float), class_stats=stats,
        class_names=["a", "b"], wnids=None, n_images=20,
    )  # fmt: skip


def test_settings_resolve_the_profile_and_the_encoders_layers():
    mini = PatchFeaturesSettings.for_profile("mini")
    assert (mini.family, mini.family_b, mini.lam, mini.epochs, mini.tile) == (
        "toyvit", "toyvit", 0.3, 20, 1.5,
    )  # fmt: skip
    paper = PatchFeaturesSettings.for_profile("paper", epochs=None, seed=3)
    assert (paper.family, paper.family_b, paper.expansion, paper.batch_size) == (
        "dinov2", "clip", 32, 16384,
    )  # fmt: skip
    assert paper.lam == get_recipe("stevens2025").l1 and paper.epochs == 1 and paper.seed == 3
    # layers left to the encoders: the toy ViT's middle and last, else the second-to-last
    toy = mini.for_encoders(6, 6)
    assert (toy.layer, toy.layer_b) == (3, 5)
    assert toy.labels == ("ToyViT-L3", "ToyViT-L5")
    big = paper.for_encoders(40, 24)
    assert (big.layer, big.layer_b) == (38, 22) and big.labels == ("DINOv2", "CLIP")
    chosen = PatchFeaturesSettings.for_profile("mini", layer=1, family_b="clip").for_encoders(6, 4)
    assert (chosen.layer, chosen.layer_b) == (1, 2) and chosen.labels == ("ToyViT", "CLIP")
    assert default_layer("toyvit", 6) == 3 and default_layer("toyvit", 6, partner=True) == 5


def test_browsable_features_fall_back_with_a_note(capsys):
    sparse = _scan([0.1, 0.9, 0.2, 0.0], [1.0, 5.0, 2.0, 0.0])
    assert browsable_features(sparse, 3, max_image_freq=0.5) == [2, 0]  # strongest sparse first
    assert capsys.readouterr().out == ""
    dense = _scan([0.9, 0.8, 0.0, 1.0], [1.0, 3.0, 0.0, 2.0])
    assert browsable_features(dense, 2, max_image_freq=0.5) == [1, 3]
    assert "dense ones included" in capsys.readouterr().out
    dead = _scan([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert browsable_features(dead, 2, max_image_freq=0.5) == [0, 1]
    assert "fires on any of the 20 images" in capsys.readouterr().out


def test_matchable_features_fall_back_to_the_browsed_ones(capsys):
    scan = _scan([0.01, 0.2, 0.06], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(matchable_features(scan, 0.05, [0]), [1, 2])
    assert capsys.readouterr().out == ""
    np.testing.assert_array_equal(matchable_features(scan, 0.5, [2, 0]), [2, 0])
    assert "the 2 browsed features" in capsys.readouterr().out


def test_eval_patches_take_whole_images_up_to_the_cap():
    class Store:
        acts = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)

        def patches(self, layer: int) -> np.ndarray:
            return self.acts

    store = Store()
    rows = eval_patches(store, 0, max_patches=9)  # two whole images of four patches
    np.testing.assert_array_equal(rows, store.acts[:2].reshape(8, 3))
    assert eval_patches(store, 0, max_patches=2).shape == (4, 3)  # at least one image
    assert eval_patches(store, 0).shape == (20, 3)  # the default cap holds them all


def test_object_features_rank_by_the_share_off_the_background():
    shares = pd.DataFrame(
        {"background": [0.9, 0.2, 0.5, 0.1, 0.7], "body": [0.1, 0.8, 0.5, 0.9, 0.3]},
        index=pd.Index([10, 11, 12, 13, 14], name="feature"),
    )
    assert object_features(shares, [10, 11, 12, 13, 14], 2, exclude=[]) == [13, 11]
    assert object_features(shares, [10, 11, 12, 13, 14], 2, exclude=[13]) == [11, 12]
    assert object_features(shares, [10, 14], 3, exclude=[13]) == [14, 10]


def test_resource_needs_name_the_stores_and_saes_the_chapter_uses():
    mini = PatchFeaturesSettings.for_profile("mini").for_encoders(6, 6)
    needs = resource_needs(mini)
    assert [(s.family, s.split, s.layers, s.tokens) for s in needs["stores"]] == [
        ("toyvit", "train", (3,), "both"), ("toyvit", "val", (3,), "both"),
        ("toyvit", "train", (5,), "both"), ("toyvit", "val", (5,), "both"),
    ]  # fmt: skip
    a, recipe, b = (need.specs.resolved() for need in needs["saes"])
    assert (a.layer, a.l1, a.seed, b.layer, b.seed) == (3, 0.3, 0, 5, 1)
    assert recipe.l1 == get_recipe("stevens2025").l1 and recipe.layer == 3
    assert all(n.tokens == "patch" and (n.epochs, n.batch_size) == (20, 512) for n in needs["saes"])
    # the paper profile already trains at the recipe's λ: no second SAE of A
    paper = resource_needs(PatchFeaturesSettings.for_profile("paper").for_encoders(40, 24))
    assert [n.specs.layer for n in paper["saes"]] == [38, 22]
    assert {s.family for s in paper["stores"]} == {"dinov2", "clip"}
