"""Ontology: hand-checked LCH/height/coverage on a small DAG, the shipped ImageNet-1k taxonomy
(with and without NLTK), vectorised == naive, class sets from codes and from a real store,
the baselines, Table 2, the feature table, labels and figures."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sae_lens import StandardSAE, StandardSAEConfig

from saekit import taxonomy
from saekit.analysis.ontology import (
    ClassSetRule,
    RandomDirections,
    class_sets,
    class_sets_from_store,
    class_sets_with_baselines,
    class_stats,
    feature_labels,
    feature_table,
    neuron_codes,
    plot_height_vs_coverage,
    random_direction_codes,
    table2,
)
from saekit.taxonomy import Taxonomy, imagenet_subset

REPO = Path(__file__).resolve().parents[1]
ELASMOBRANCHS = ["n01484850", "n01491361", "n01494475", "n01496331", "n01498041"]

# A small DAG. `dog` has two parents (animal, pet); `elasmo`, `cartfish` and `fish` form a
# chain with one and the same leaf set; `pet` reaches the root in fewer steps than `animal`.
#
#   entity ── organism ── animal ─┬─ dog ─┬─ corgi
#     │                           │       └─ husky
#     │                           └─ fish ── cartfish ── elasmo ─┬─ shark
#     ├─ pet ─┬─ dog (2nd parent)                                └─ ray
#     │       └─ hamster
#     └─ artifact ─┬─ car
#                  └─ boat
EDGES = {
    "organism": ["entity"],
    "animal": ["organism"],
    "pet": ["entity"],
    "artifact": ["entity"],
    "dog": ["animal", "pet"],
    "corgi": ["dog"],
    "husky": ["dog"],
    "fish": ["animal"],
    "cartfish": ["fish"],
    "elasmo": ["cartfish"],
    "shark": ["elasmo"],
    "ray": ["elasmo"],
    "hamster": ["pet"],
    "car": ["artifact"],
    "boat": ["artifact"],
}
LEAVES = ["corgi", "husky", "shark", "ray", "hamster", "car", "boat"]


@pytest.fixture(scope="module")
def toy() -> Taxonomy:
    return Taxonomy(LEAVES, EDGES)


@pytest.fixture(scope="module")
def imagenet() -> Taxonomy:
    return Taxonomy.imagenet1k()


def _wordnet_or_skip():
    try:
        return taxonomy.wordnet()
    except (ImportError, LookupError) as err:
        pytest.skip(f"WordNet 3.0 for NLTK is not installed: {err}")


# --------------------------------------------------------------------------- hand-checked DAG


@pytest.mark.parametrize(
    "classes, lch, height, coverage",
    [
        # dog's second parent makes pet the LCH; corgi→dog→pet is 2 steps, hamster→pet 1
        (["corgi", "hamster"], "pet", 1.5, 2 / 3),
        (["corgi", "husky", "hamster"], "pet", 5 / 3, 1.0),
        # corgi→dog→animal (2), shark→elasmo→cartfish→fish→animal (4)
        (["corgi", "shark"], "animal", 3.0, 2 / 4),
        # shortest path: corgi→dog→pet→entity (3), not via animal/organism (4); car→artifact→entity (2)
        (["corgi", "car"], "entity", 2.5, 2 / 7),
        # a chain of equal leaf sets: the lowest member wins
        (["shark", "ray"], "elasmo", 1.0, 1.0),
        (["car", "boat"], "artifact", 1.0, 1.0),
        (["shark"], "shark", 0.0, 1.0),
        (LEAVES, "entity", (3 + 3 + 6 + 6 + 2 + 2 + 2) / 7, 1.0),
    ],
)
def test_hand_checked_lch_height_coverage(toy, classes, lch, height, coverage):
    assert toy.lch(classes) == lch
    assert toy.lch_height(classes) == pytest.approx(height)
    assert toy.coverage(classes) == pytest.approx(coverage)


def test_dag_structure_and_distances(toy):
    assert len(toy.synsets) == 16
    assert toy.leaf_set("dog") == ["corgi", "husky"]
    assert toy.leaf_set("pet") == ["corgi", "husky", "hamster"]
    corgi = toy.leaf_index["corgi"]
    assert toy.dist_CH[corgi, toy.synset_index["entity"]] == 3
    assert toy.dist_CH[corgi, toy.synset_index["organism"]] == 3
    assert np.isinf(toy.dist_CH[corgi, toy.synset_index["fish"]])
    # L(h) sizes and leaf membership agree
    assert np.array_equal(toy.n_leaves_H, toy.leaves_HC.sum(1))
    assert "dog" in toy and "cat" not in toy


def test_vectorised_equals_naive_on_every_subset_of_the_dag(toy):
    subsets = [
        s for r in range(1, len(LEAVES) + 1) for s in itertools.combinations(range(len(LEAVES)), r)
    ]
    sets_FC = np.zeros((len(subsets) + 1, len(LEAVES)), dtype=bool)  # last row: empty
    for f, s in enumerate(subsets):
        sets_FC[f, list(s)] = True
    m = toy.metrics(sets_FC, chunk_size=13, progress=False)  # several chunks
    for f, s in enumerate(subsets):
        wnids = [LEAVES[c] for c in s]
        assert toy.synsets[m.lch_F[f]] == toy.lch(wnids)
        assert m.height_F[f] == pytest.approx(toy.lch_height(wnids))
        assert m.coverage_F[f] == pytest.approx(toy.coverage(wnids))
    assert m.n_classes_F[-1] == 0 and m.lch_F[-1] == -1 and np.isnan(m.coverage_F[-1])


def test_several_roots_have_no_lch():
    forest = Taxonomy(["a", "b", "c"], {"a": ["top"], "b": ["top"]})  # c is its own root
    assert forest.lch(["a", "b"]) == "top"
    with pytest.raises(ValueError, match="share no hypernym"):
        forest.lch(["a", "c"])
    m = forest.metrics(np.array([[1, 0, 1], [1, 1, 0]], bool), progress=False)
    assert m.lch_F.tolist() == [-1, forest.synset_index["top"]]
    assert np.isnan(m.height_F[0]) and m.coverage_F[1] == 1.0


def test_bad_class_sets_name_the_culprit(toy):
    with pytest.raises(ValueError, match="'cat' is not a leaf class"):
        toy.lch(["corgi", "cat"])
    with pytest.raises(ValueError, match="empty"):
        toy.coverage([])
    with pytest.raises(ValueError, match="7 classes"):
        toy.metrics(np.zeros((2, 5), bool), progress=False)
    with pytest.raises(ValueError, match="distinct"):
        Taxonomy(["corgi", "corgi"], EDGES)


# --------------------------------------------------------------------------- ImageNet-1k


def test_imagenet1k_shipped_taxonomy(imagenet):
    assert len(imagenet.leaves) == 1000 and len(imagenet.synsets) == 1860
    assert imagenet.leaves == sorted(imagenet.leaves)  # class-index order is sorted wnids
    assert imagenet.name("n01440764") == "tench"
    # the paper's example: sharks and rays -> elasmobranch, not the equal-leaf 'cartilaginous fish'
    lch = imagenet.lch(ELASMOBRANCHS)
    assert imagenet.name(lch) == "elasmobranch"
    assert imagenet.coverage(ELASMOBRANCHS) == 1.0
    parent = imagenet.hypernyms[lch][0]
    assert imagenet.leaf_set(parent) == imagenet.leaf_set(lch) == ELASMOBRANCHS
    for name in ("imagenet_a", "imagenet_r"):
        subset = imagenet_subset(name)
        assert len(subset) == 200 and set(subset) <= set(imagenet.leaves)
    # every synset reaches the single root 'entity'
    root = imagenet.synset_index["n00001740"]
    assert imagenet.leaves_HC[root].all()


def test_single_class_sets_have_coverage_one_and_height_zero(imagenet):
    m = imagenet.metrics(np.eye(1000, dtype=bool), progress=False)
    assert np.all(m.coverage_F == 1.0) and np.all(m.height_F == 0.0)
    assert [imagenet.synsets[h] for h in m.lch_F] == imagenet.leaves


def test_vectorised_equals_naive_on_random_imagenet_sets(imagenet):
    rng = np.random.default_rng(0)
    sets_FC = np.zeros((160, 1000), dtype=bool)
    for f in range(120):  # random classes, sizes log-uniform in 1..1000
        k = int(np.exp(rng.uniform(0, np.log(1000))))
        sets_FC[f, rng.choice(1000, k, replace=False)] = True
    mid = np.flatnonzero((imagenet.n_leaves_H > 1) & (imagenet.n_leaves_H < 60))
    for f in range(120, 160):  # thinned subtrees, where ties and high coverage live
        leaves = np.flatnonzero(imagenet.leaves_HC[rng.choice(mid)])
        sets_FC[f, leaves[rng.random(leaves.size) < 0.8]] = True
        sets_FC[f, leaves[0]] = True
    m = imagenet.metrics(sets_FC, chunk_size=50, progress=False)
    for f, row in enumerate(sets_FC):
        wnids = [imagenet.leaves[c] for c in np.flatnonzero(row)]
        assert imagenet.synsets[m.lch_F[f]] == imagenet.lch(wnids)
        assert m.height_F[f] == pytest.approx(imagenet.lch_height(wnids))
        assert m.coverage_F[f] == pytest.approx(imagenet.coverage(wnids))


def test_imagenet_without_nltk(monkeypatch, imagenet):
    """The shipped file serves ImageNet-1k and any subset of its synsets with NLTK unimportable."""
    for name in [m for m in sys.modules if m == "nltk" or m.startswith("nltk.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nltk", None)  # `import nltk` now raises ImportError
    taxonomy._imagenet1k.cache_clear()
    try:
        fresh = Taxonomy.imagenet1k()
        assert len(fresh.synsets) == 1860 and fresh.leaves == imagenet.leaves
        subset = imagenet_subset("imagenet_r")[::-1]  # any order: it becomes the class order
        sub = Taxonomy.from_wnids(subset)
        assert sub.leaves == subset
        # L_sub(h) = L(h) ∩ subset, distances unchanged
        for h in sub.synsets:
            assert sub.leaf_set(h) == [w for w in subset if w in set(imagenet.leaf_set(h))]
        full_cols = [imagenet.leaf_index[w] for w in subset]
        full_rows = [imagenet.synset_index[h] for h in sub.synsets]
        assert np.array_equal(sub.dist_CH, imagenet.dist_CH[np.ix_(full_cols, full_rows)])
        # an inner ImageNet synset ('dog') is a valid leaf of a toy-world taxonomy too
        dogs = Taxonomy.from_wnids(["n02084071", "n01440764"])
        assert dogs.name(dogs.lch(dogs.leaves)) == "animal"  # a fish and a dog
        with pytest.raises(ImportError, match="NLTK"):
            Taxonomy.from_wnids(["n01440764", "n00000000"])
    finally:
        taxonomy._imagenet1k.cache_clear()


def test_json_round_trip(tmp_path, toy):
    toy.subsets["pets"] = ["corgi", "hamster"]
    toy.to_json(tmp_path / "t.json", source="test")
    back = Taxonomy.from_json(tmp_path / "t.json")
    assert back.leaves == toy.leaves and back.hypernyms == toy.hypernyms
    assert back.subsets == {"pets": ["corgi", "hamster"]}
    assert np.array_equal(back.dist_CH, toy.dist_CH)


@pytest.mark.slow  # loading NLTK's WordNet takes several seconds
def test_shipped_file_matches_wordnet(imagenet):
    """The data file is what the generator makes from NLTK's WordNet 3.0 today, and its
    distances agree with NLTK's own shortest-path search."""
    wn = _wordnet_or_skip()
    rebuilt = Taxonomy.from_wordnet(imagenet.leaves, subsets=imagenet.subsets)
    assert rebuilt.synsets == imagenet.synsets
    assert rebuilt.hypernyms == imagenet.hypernyms
    assert rebuilt.names == imagenet.names
    # NLTK's shortest_path_distance may go up and down again, so the reference is the
    # shortest of NLTK's root-to-leaf hypernym paths through each ancestor.
    rng = np.random.default_rng(1)
    for c in rng.choice(1000, 15, replace=False):
        leaf = wn.synset_from_pos_and_offset("n", int(imagenet.leaves[c][1:]))
        nearest: dict[str, int] = {}
        for path in leaf.hypernym_paths():
            for steps, synset in enumerate(reversed(path)):
                wnid = f"n{synset.offset():08d}"
                nearest[wnid] = min(nearest.get(wnid, steps), steps)
        ancestors = [imagenet.synsets[h] for h in np.flatnonzero(imagenet.leaves_HC[:, c])]
        assert sorted(nearest) == ancestors
        for wnid, steps in nearest.items():
            assert imagenet.dist_CH[c, imagenet.synset_index[wnid]] == steps


@pytest.mark.slow
def test_from_wnids_outside_imagenet_uses_wordnet():
    wn = _wordnet_or_skip()
    democracy = f"n{wn.synset('democracy.n.01').offset():08d}"
    taxonomy = Taxonomy.from_wnids(["n01440764", democracy])
    assert taxonomy.name(taxonomy.lch(taxonomy.leaves)) == "entity"
    assert taxonomy.name(democracy) == "democracy"
    with pytest.raises(ValueError, match="n99999999"):
        Taxonomy.from_wnids(["n01440764", "n99999999"])


@pytest.mark.parametrize("bad", ["dog", "n0144076", "v01440764", 1440764])
def test_from_wnids_rejects_non_wnids(bad):
    with pytest.raises(ValueError, match="not a WordNet noun id"):
        Taxonomy.from_wnids(["n01440764", bad])


def test_store_without_wnids_explains_the_fix():
    with pytest.raises(ValueError, match="needs WordNet ids") as err:
        Taxonomy.from_store(types.SimpleNamespace(wnids=None, class_names=["a", "b"]))
    assert "Taxonomy.from_wnids" in str(err.value)


# --------------------------------------------------------------------------- class sets


def _planted_codes():
    """5 classes x 10 images; per feature, a known firing pattern."""
    labels = np.repeat(np.arange(5), 10)
    codes = np.zeros((50, 4), np.float32)
    within = np.tile(np.arange(10), 5)  # image index inside its class
    # feature 0: 8/10 images of classes 0 and 1, 3/10 of class 2
    codes[(labels <= 1) & (within < 8), 0] = 1.0
    codes[(labels == 2) & (within < 3), 0] = 1.0
    # feature 1: never; feature 2: exactly half of class 4
    codes[(labels == 4) & (within < 5), 2] = 0.5
    # feature 3: every image of class 0 strongly, of class 3 weakly
    codes[labels == 0, 3] = 10.0
    codes[labels == 3, 3] = 1.0
    expected = np.zeros((4, 5), bool)
    expected[0, [0, 1]] = True
    expected[2, 4] = True
    expected[3, [0, 3]] = True
    return codes, labels, expected


def test_class_sets_recover_planted_sets():
    codes, labels, expected = _planted_codes()
    stats = class_stats(codes, labels, 5)
    assert stats.fire_frac_SC[0].tolist() == pytest.approx([0.8, 0.8, 0.3, 0, 0])
    assert stats.mean_act_SC[3].tolist() == pytest.approx([10, 0, 0, 1, 0])
    assert stats.firing_rate_S.tolist() == pytest.approx([19 / 50, 0, 5 / 50, 20 / 50])
    assert np.array_equal(class_sets(codes, labels, 5), expected)
    # a stricter rule: classes where the mean is at least half the top class mean
    strict = class_sets(codes, labels, 5, ClassSetRule(min_rel_mean_act=0.5))
    assert np.flatnonzero(strict[3]).tolist() == [0]
    assert np.flatnonzero(
        class_sets(codes, labels, 5, ClassSetRule(min_fire_frac=0.3))[0]
    ).tolist() == [0, 1, 2]
    # a class without images never joins, even for a rule every present class passes
    assert not class_sets(codes, labels, 6, ClassSetRule(min_fire_frac=1e-9))[:, 5].any()


def test_class_stats_stream_in_any_batching_and_order():
    codes, labels, _ = _planted_codes()
    rng = np.random.default_rng(0)
    order = rng.permutation(50)
    cuts = [0, 7, 8, 30, 50]
    batches = (
        (torch.from_numpy(codes[order[a:b]]), torch.from_numpy(labels[order[a:b]]))
        for a, b in itertools.pairwise(cuts)
    )
    streamed = class_stats(batches, None, 5)
    whole = class_stats(codes, labels, 5)
    assert np.allclose(streamed.fire_frac_SC, whole.fire_frac_SC)
    assert np.allclose(streamed.mean_act_SC, whole.mean_act_SC)
    assert streamed.n_images_C.tolist() == [10] * 5


def test_class_stats_reject_bad_labels():
    codes, labels, _ = _planted_codes()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        class_stats(codes, labels, 4)
    with pytest.raises(ValueError, match="labels"):
        class_stats(codes[:10], labels, 5)
    with pytest.raises(ValueError, match="n_classes"):
        class_stats(iter([]), None)


# --------------------------------------------------------------------------- baselines


def test_neuron_codes_centre_and_threshold():
    labels = np.repeat(np.arange(3), 4)
    acts = np.zeros((12, 2), np.float32)
    acts[:, 0] = np.where(labels == 1, 5.0, 1.0)  # mean 7/3: only class 1 is above it
    acts[:, 1] = 3.0  # constant: never above its mean
    codes = neuron_codes(acts)
    assert torch.allclose(codes[:, 0], torch.relu(torch.from_numpy(acts[:, 0]) - 7 / 3))
    assert np.array_equal(class_sets(codes, labels, 3), np.array([[0, 1, 0], [0, 0, 0]], bool))


def test_random_directions_match_firing_rates():
    acts = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    rates = np.array([0.0, 0.05, 0.25, 0.5, 1.0] * 4)
    directions = RandomDirections.fit(acts, len(rates), rates, seed=3)
    assert torch.allclose(directions.W_enc.norm(dim=0), torch.ones(len(rates)))
    fired = (directions.encode(acts) > 0).float().mean(0).numpy()
    assert fired == pytest.approx(rates)
    codes = random_direction_codes(acts, 20, 0.1, seed=3)
    assert codes.shape == (200, 20) and ((codes > 0).float().mean(0) == 0.1).all()
    assert torch.equal(codes, random_direction_codes(acts, 20, 0.1, seed=3))
    assert not torch.equal(codes, random_direction_codes(acts, 20, 0.1, seed=4))
    with pytest.raises(ValueError, match="firing_rate"):
        RandomDirections.fit(acts, 2, 1.5)


# --------------------------------------------------------------------------- store path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real activation store: a miniature DINOv2 over 3 wnid classes of coloured images."""
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.mini.miniatures import miniature

    root = tmp_path_factory.mktemp("ontology_store")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(ELASMOBRANCHS[:3]):
        (root / "img" / wnid).mkdir(parents=True)
        for i in range(7):
            colour = np.array([90 * c + 20, 200 - 70 * c, 120], float)
            pixels = np.clip(colour + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "img" / wnid / f"{i}.png")
    encoder = miniature("dinov2", root / "model")
    return extract(
        encoder,
        ImageFolder(root / "img"),
        layers="0,2",
        out=root / "store",
        batch_size=8,
        shard_images=8,  # several shards, so chunks cross shard boundaries
        num_workers=1,
        progress=False,
    )


def _planted_sae(store, layer):
    """Feature c fires on images closer to class c's mean than to the others' (plus an always-
    and a never-firing feature); built from the store's class means."""
    acts = torch.from_numpy(np.asarray(store.cls(layer), np.float32))
    labels = torch.from_numpy(np.asarray(store.labels))
    means_CD = torch.stack([acts[labels == c].mean(0) for c in range(3)])
    d = acts.shape[1]
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=5, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        for c in range(3):
            others = means_CD[[o for o in range(3) if o != c]].mean(0)
            sae.W_enc[:, c] = means_CD[c] - others
            sae.b_enc[c] = -(means_CD[c] - others) @ (means_CD[c] + others) / 2
        sae.b_enc[3], sae.b_enc[4] = 1.0, -1.0
    return sae, acts, labels


def test_class_sets_from_store_match_in_memory(store):
    assert store.wnids == ELASMOBRANCHS[:3] and len(store.shard_dirs) > 1
    sae, acts, labels = _planted_sae(store, 2)
    from_store = class_sets_from_store(store, sae, 2, batch_size=5, progress=False)
    with torch.no_grad():
        in_memory = class_sets(sae.encode(acts), labels.numpy(), 3)
    assert np.array_equal(from_store, in_memory)
    assert from_store[3].all() and not from_store[4].any()
    # the planted class features find (at least) their own class
    assert all(from_store[c, c] for c in range(3))
    taxonomy = Taxonomy.from_store(store)
    assert taxonomy.leaves == ELASMOBRANCHS[:3]


def test_class_sets_with_baselines_on_store(store):
    saes = {layer: _planted_sae(store, layer)[0] for layer in (0, 2)}
    sets = class_sets_with_baselines(store, saes, n_fit=1000, progress=False)
    assert list(sets) == ["Original encoder", "Random vectors", "SAE features"]
    d = store.d_model
    for layer in (0, 2):
        assert sets["SAE features"][layer].shape == (5, 3)
        assert sets["Original encoder"][layer].shape == (d, 3)
        assert sets["Random vectors"][layer].shape == (5, 3)
        # random directions copy each SAE feature's firing rate: the never-firing one stays dead
        assert not sets["Random vectors"][layer][4].any()
        assert sets["Random vectors"][layer][3].all()
    table = table2(sets, Taxonomy.from_store(store))
    assert table.loc["Original encoder", "# Features"] == 2 * d
    assert table.loc["SAE features", "# Features"] == 10


# --------------------------------------------------------------------------- outputs


def _imagenet_sets(imagenet, n_features, planted):
    sets = np.zeros((n_features, 1000), bool)
    for f, wnids in planted.items():
        sets[f, [imagenet.leaf_index[w] for w in wnids]] = True
    return sets


def test_table2_counts_planted_features(imagenet):
    sae = _imagenet_sets(
        imagenet, 4, {0: ELASMOBRANCHS, 1: ELASMOBRANCHS[:4], 2: ["n01440764"]}
    )  # coverage 1.0, 0.8, single class, no class
    rand = _imagenet_sets(imagenet, 4, {0: ["n01440764", "n04589890"]})  # tench + window screen
    table = table2(
        {"Random vectors": {0: rand}, "SAE features": {0: sae[:2], 1: sae[2:]}}, imagenet
    )
    assert table.index.tolist() == ["Random vectors", "SAE features"]
    assert table.columns.tolist() == [
        "> 0.99",
        "> 0.75",
        "# Fire on every class",
        "> 0.99 incl. every class",
        "> 0.75 incl. every class",
        "# Features",
        "# Fire on no class",
    ]
    assert table.loc["SAE features"].tolist() == [1, 2, 0, 1, 2, 4, 1]
    assert table.loc["Random vectors"].tolist() == [0, 0, 0, 0, 0, 4, 3]
    with_singles = table2({"SAE features": sae}, imagenet, min_classes=1)
    assert with_singles.loc["SAE features", "> 0.99"] == 2


def test_table2_counts_features_on_every_class_apart(imagenet):
    # Two features fire on all 1000 classes (coverage 1 at the root for free), one is the
    # elasmobranchs, one fires on 999 classes (coverage 0.999: superordinate, not everything).
    sets = _imagenet_sets(imagenet, 5, {2: ELASMOBRANCHS})
    sets[[0, 1]] = True
    sets[3] = True
    sets[3, imagenet.leaf_index["n01440764"]] = False
    table = table2({"SAE features": sets}, imagenet)
    row = table.loc["SAE features"]
    assert row["# Fire on every class"] == 2
    assert (row["> 0.99"], row["> 0.75"]) == (2, 2)  # elasmobranchs and the 999-class feature
    assert (row["> 0.99 incl. every class"], row["> 0.75 incl. every class"]) == (4, 4)
    assert row["# Fire on no class"] == 1


def test_feature_table_and_labels(imagenet):
    layer36 = _imagenet_sets(imagenet, 700, {657: ELASMOBRANCHS, 3: ["n01440764"]})
    layer24 = _imagenet_sets(imagenet, 10, {9: ["n01440764", "n04589890"]})
    table = feature_table({24: layer24, 36: layer36}, imagenet, progress=False)
    assert len(table) == 3 and table.attrs["n_no_class"] == {24: 9, 36: 698}
    row = table.set_index(["layer", "feature"]).loc[(36, 657)]
    assert row["lch_name"] == "elasmobranch" and row["n_classes"] == 5
    assert row["label"] == "layer 36 / 657: elasmobranch (coverage 1.00, 5 classes)"
    single = table.set_index(["layer", "feature"]).loc[(36, 3)]
    assert single["label"] == "layer 36 / 3: tench (coverage 1.00, 1 class)"
    assert single["height"] == 0.0
    wide = table.set_index(["layer", "feature"]).loc[(24, 9)]
    assert wide["lch"] == imagenet.lch(["n01440764", "n04589890"])
    # a single layer without a layer number
    alone = feature_table(layer36, imagenet, progress=False)
    assert alone["label"].iloc[-1] == "657: elasmobranch (coverage 1.00, 5 classes)"
    assert alone.attrs["n_no_class"] == {None: 698}


def test_height_vs_coverage_figure_has_a_panel_per_layer(imagenet):
    rng = np.random.default_rng(0)
    per_layer = {layer: rng.random((40, 1000)) < rng.random((40, 1)) * 0.01 for layer in (1, 2, 3)}
    table = feature_table(per_layer, imagenet, progress=False)
    fig = plot_height_vs_coverage(table, ncols=2)
    titled = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [t.split(" (")[0] for t in titled] == ["layer 1", "layer 2", "layer 3"]


def test_benchmark_agrees_with_naive_and_writes_its_figure(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_ontology", REPO / "benchmarks" / "ontology.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(n_layers=2, width=400, sample=150, seed=0, out=tmp_path)
    assert results["agree_on_sample"] and results["features"] == 800
    assert 0 < results["features_with_classes"] < 800
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    assert (tmp_path / "results.json").exists()


def test_feature_labels_of_an_empty_table_is_empty():
    # No feature fired on any class (e.g. a very large λ): labelling must not crash.
    empty = pd.DataFrame(
        {
            "layer": pd.Series([], dtype=float),
            "feature": pd.Series([], dtype=int),
            "lch_name": pd.Series([], dtype=object),
            "coverage": pd.Series([], dtype=float),
            "n_classes": pd.Series([], dtype=int),
        }
    )
    assert len(feature_labels(empty)) == 0
