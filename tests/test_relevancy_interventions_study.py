"""Chapter 05's study module: settings that own the profile, the relevancy SAE as a cache hit
on chapter 03's SAEs, the groups, the relevancy-on-object table, the parts chosen for editing
and the summary written from the tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from saekit.analysis.relevancy import RelevancyMaps
from saekit.mini.toyworld import GROUP_OF_CLASS, GROUPS, WNIDS
from saekit.sae.synthetic import identity_sae
from saekit.studies import ontology as ontology_study
from saekit.studies.layer_sweep import LayerSweepSettings
from saekit.studies.ontology import OntologySettings
from saekit.studies.relevancy_interventions import (
    RelevancySettings,
    object_relevancy,
    resource_needs,
    summary,
    synset_groups,
)
from saekit.studies.relevancy_interventions_edits import (
    SegmentationData,
    part_features,
    segmentation_data,
)


def test_settings_resolve_each_profile():
    mini = RelevancySettings.for_profile("mini")
    assert (mini.family, mini.relevancy_layer, mini.patch_layer, mini.patch_arch) == (
        "toyvit", 4, 1, "topk",
    )  # fmt: skip
    assert mini.synsets == tuple(group.wnid for group in GROUPS)
    assert mini.patch_spec.k == 8 and mini.patch_spec.recipe == "stevens2025"
    paper = RelevancySettings.for_profile("paper", synsets=["n02084071"], seed=2)
    assert (paper.family, paper.relevancy_layer, paper.patch_layer) == ("dinov2", 36, 38)
    assert paper.synsets == ("n02084071",) and paper.patch_spec.seed == 2
    assert paper.patch_spec.arch == "relu" and paper.patch_spec.k is None


def test_resource_needs_name_the_stores_and_saes_the_chapter_uses():
    settings = RelevancySettings.for_profile("mini")
    needs = resource_needs(settings)
    assert [(s.split, s.layers, s.tokens) for s in needs["stores"]] == [
        ("train", "all", "cls"), ("val", "all", "cls"),
        ("train", (1,), "patch"), ("val", (1,), "patch"),
    ]  # fmt: skip
    cls_need, patch_need = needs["saes"]
    assert cls_need.specs == tuple(ontology_study.layer_specs([4], 3.0, 0))
    assert (cls_need.epochs, cls_need.on.layers) == (100, "all")
    assert patch_need.specs == settings.patch_spec and patch_need.tokens == "patch"
    assert (patch_need.epochs, patch_need.batch_size) == (10, 512)


@pytest.mark.parametrize("profile", ["mini", "paper"])
def test_the_relevancy_sae_is_requested_as_chapters_01_and_03_train_it(profile):
    """Chapters 01 and 03 train every layer's CLS SAE at the layer sweep's λ, epochs and seed;
    chapter 05 must ask for its layer with the same values, or the cache never hits."""
    mine = RelevancySettings.for_profile(profile)
    for other in (LayerSweepSettings.for_profile(profile), OntologySettings.for_profile(profile)):
        assert (mine.lam, mine.cls_epochs, mine.seed) == (other.lam, other.epochs, other.seed)
        assert mine.family == other.encoder


@pytest.fixture(scope="module")
def cls_store(tmp_path_factory):
    """Every layer's CLS token of a miniature DINOv2 over a few noise images."""
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.mini.miniatures import miniature

    root = tmp_path_factory.mktemp("relevancy_study")
    rng = np.random.default_rng(0)
    for wnid in WNIDS[:3]:
        (root / "img" / wnid).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / wnid / f"{i}.png")
    return extract(miniature("dinov2", root / "model"), ImageFolder(root / "img"), layers="all",
                   out=root / "store", num_workers=1, progress=False)  # fmt: skip


def test_the_relevancy_sae_is_a_cache_hit_on_chapter_03s(cls_store, tmp_path, monkeypatch):
    import saekit.sae.cache

    settings = RelevancySettings.for_profile("mini")
    root = tmp_path / "saes"
    # chapter 03: every layer of the training store, at its λ, epochs and seed
    chapter03 = ontology_study.layer_saes(
        cls_store, root, lam=settings.lam, epochs=settings.cls_epochs, seed=settings.seed,
        progress=False,
    )  # fmt: skip

    def no_training(*args, **kwargs):
        raise AssertionError("chapter 05's request must be served from chapter 03's cache")

    monkeypatch.setattr(saekit.sae.cache, "sweep_from_store", no_training)
    layer = cls_store.layers[-1]
    chapter05 = ontology_study.layer_saes(
        cls_store, root, lam=settings.lam, epochs=settings.cls_epochs, layers=[layer],
        seed=settings.seed, progress=False,
    )[layer]  # fmt: skip
    torch.testing.assert_close(chapter05.W_enc, chapter03[layer].W_enc)
    torch.testing.assert_close(chapter05.b_dec, chapter03[layer].b_dec)


def test_synset_groups_are_the_planted_groups_and_empty_ones_are_left_out(capsys):
    class Store:
        wnids = list(WNIDS)

    groups = synset_groups(Store(), [group.wnid for group in GROUPS])
    assert list(groups) == [group.name for group in GROUPS]
    for g, (name, classes) in enumerate(groups.items()):
        assert classes == [c for c, group in enumerate(GROUP_OF_CLASS) if group == g], name
    assert capsys.readouterr().out == ""

    class Dogs:
        wnids = [w for w, g in zip(WNIDS, GROUP_OF_CLASS, strict=True) if g == 0]

    only = synset_groups(Dogs(), [GROUPS[0].wnid, GROUPS[1].wnid])
    assert list(only) == [GROUPS[0].name] and "left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no class of the store"):
        synset_groups(Dogs(), [GROUPS[1].wnid])


def test_object_relevancy_known_answer():
    # two images on a 2x2 grid; the object covers the top-left patch of both
    masks_NHW = np.zeros((3, 4, 4), np.uint8)
    masks_NHW[:, :2, :2] = 1
    maps_FBhw = np.zeros((1, 2, 2, 2))
    maps_FBhw[0, 0] = [[1.0, 0.0], [0.0, 0.0]]  # all of it on the object
    maps_FBhw[0, 1] = 0.25  # spread evenly
    maps = RelevancyMaps(maps_FBhw, np.ones((1, 2)), [7], 0, (2, 2))
    table = object_relevancy({"dog": (np.array([2, 0]), maps)}, masks_NHW, {"dog": "F/7"})
    row = table.loc["dog"]
    assert row["feature"] == "F/7"
    assert row["relevancy on the object"] == pytest.approx((1.0 + 0.25) / 2)
    assert row["object's share of the image"] == pytest.approx(0.25)
    assert row["ratio"] == pytest.approx(2.5)


def test_part_features_pick_the_planted_feature_and_leave_out_small_parts():
    class Store:
        def __init__(self, patches):
            self.acts = patches

        def grid(self, layer):
            return (2, 2)

        def patches(self, layer):
            return self.acts

    # 4 images, 2x2 patches of 4x4 pixels; part 1 covers the top-left patch of every image,
    # part 2 one patch of one image; feature 3 fires exactly on part 1's patches.
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[:, :4, :4] = 1
    masks[0, 4:, 4:] = 2
    patches = np.full((4, 4, 6), 0.1, np.float32)
    patches[:, 0, 3] = 2.0
    data = SegmentationData(Store(patches), Store(patches), None, None, masks, masks,
                            ["background", "one", "two"], range(1, 3))  # fmt: skip
    chosen, left_out = part_features(identity_sae(6), data, 0, min_region_patches=2)
    assert chosen == {1: 3} and left_out == [2]
    # a part on the validation images but on no training patch is left out, not an error
    train_masks = masks.copy()
    train_masks[train_masks == 2] = 0
    data.train_masks = train_masks
    assert part_features(identity_sae(6), data, 0, min_region_patches=1) == ({1: 3}, [2])


def test_the_paper_profile_asks_for_its_segmentation_folders():
    settings = RelevancySettings.for_profile("paper")
    with pytest.raises(FileNotFoundError, match="segmentation_train=None"):
        segmentation_data(settings, None, None, None, None, None, stores_root="/nowhere")


def test_summary_reads_every_number_off_the_tables():
    conditions = ["original", "edited", "random direction", "random feature"]
    effects = pd.DataFrame(
        {"p(group)": [0.9, 0.3, 0.85, 0.88, 0.8, 0.78, 0.79, 0.8]},
        index=pd.MultiIndex.from_product([["cars", "dogs"], conditions],
                                         names=["group", "condition"]),
    )  # fmt: skip
    part_table = pd.DataFrame(
        {"changed: edited": [0.5, 0.1], "changed: random direction": [0.1, 0.2],
         "changed: random feature": [0.4, 0.0]},
        index=pd.Index(["body", "head"], name="part"),
    )  # fmt: skip
    head_table = pd.DataFrame(
        {"|Δ| edited ÷ random direction": [2.25, 0.5]},
        index=pd.MultiIndex.from_tuples([("weight decay 1", "body"), ("weight decay 0.001", "body")]),
    )
    text = summary(effects, part_table, head_table)
    assert "for 1 of 2 groups (largest drop 0.60, for cars)" in text
    assert "random direction's largest drop was 0.05, the random feature's 0.02" in text
    assert "for 1 of 2 parts, and than the random feature did for 2" in text
    assert "2.2x as far as a random direction (weight decay 1) and 0.5x" in text
    assert not text.startswith("Relevancy")
    objects = pd.DataFrame({"ratio": [3.94, 5.43]})
    assert summary(effects, part_table, head_table, objects).startswith(
        "Relevancy on the object: 3.9 to 5.4 times"
    )
