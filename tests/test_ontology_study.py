"""The ontology chapter's study steps: settings per profile, planted synsets recovered exactly
(and matched on leaves, not wnids), paper synsets absent from the data skipped with a note,
per-layer counts that add up to Table 2 with every-class features apart, the most-hierarchical
ordering, streaming top images equal to a brute-force ranking on a real multi-shard store, the
image grid showing exactly those images, SAEs trained once and reloaded, the λ comparison, a
store of a few classes through the whole chapter, and bad input."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.analysis.ontology import (  # noqa: E402
    ClassSetRule,
    class_sets_from_store,
    class_sets_with_baselines,
    feature_table,
    table2,
)
from saekit.mini.toyworld import taxonomy as planted  # noqa: E402
from saekit.sae import evaluate  # noqa: E402
from saekit.studies import ontology as study  # noqa: E402
from saekit.studies import ontology_figures as figures  # noqa: E402
from saekit.taxonomy import Taxonomy  # noqa: E402

HOUND, TERRIER, DOG, BIRD = "n02087551", "n02092468", "n02084071", "n01503061"
HUNTING_DOG = "n02087122"


@pytest.fixture(scope="module")
def toy_taxonomy() -> Taxonomy:
    return Taxonomy.from_wnids(planted.WNIDS)


def _mask(wnids) -> np.ndarray:
    row = np.zeros(planted.N_CLASSES, dtype=bool)
    row[[planted.WNIDS.index(w) for w in wnids]] = True
    return row


def _leaves(synset_wnid: str) -> list[str]:
    for group, mids in planted.TREE:
        if group.wnid == synset_wnid:
            return [leaf.wnid for _, leaves in mids for leaf in leaves]
        for mid, leaves in mids:
            if mid.wnid == synset_wnid:
                return [leaf.wnid for leaf in leaves]
    raise KeyError(synset_wnid)


@pytest.fixture(scope="module")
def planted_sets() -> dict[int, np.ndarray]:
    """Two layers of hand-planted class sets over the toy world's 30 classes.

    layer 0: f0 = the hounds exactly, f1 = hounds + one terrier, f2 = one beagle-only feature,
             f3 = no class.
    layer 1: f0 and f2 = all six dogs exactly, f1 = the birds but one, f3 = the hounds exactly,
             f4 = the terriers exactly.
    """
    hounds, terriers = _leaves(HOUND), _leaves(TERRIER)
    layer0 = np.stack([_mask(hounds), _mask(hounds + terriers[:1]), _mask(hounds[:1]), _mask([])])
    layer1 = np.stack(
        [
            _mask(hounds + terriers),
            _mask(_leaves(BIRD)[:-1]),
            _mask(hounds + terriers),
            _mask(hounds),
            _mask(terriers),
        ]
    )
    return {0: layer0, 1: layer1}


# --------------------------------------------------------------------------- planted synsets


def test_planted_synsets_have_the_planted_leaves_in_wordnet(toy_taxonomy):
    synsets = study.toyworld_synsets()
    assert list(synsets.values()).count("group") == 5 and list(synsets.values()).count("mid") == 10
    for wnid in synsets:
        assert sorted(toy_taxonomy.leaf_set(wnid)) == sorted(_leaves(wnid)), wnid
    # The six dogs' LCH is 'hunting dog', one step below 'dog' with the same leaves: recovery
    # must therefore compare leaves, not wnids.
    assert toy_taxonomy.lch(_leaves(DOG)) == HUNTING_DOG
    assert toy_taxonomy.leaf_set(HUNTING_DOG) == toy_taxonomy.leaf_set(DOG)


def test_settings_per_profile():
    mini = study.OntologySettings.for_profile("mini")
    assert (mini.encoder, mini.lam, mini.epochs, mini.compare_lambdas) == (
        "toyvit",
        3.0,
        100,
        (0.3, 10.0),
    )
    assert mini.layers_to_draw([0, 1, 2]) == [0, 1, 2]
    paper = study.OntologySettings.for_profile("paper", imagenet_val="/data/val")
    assert (paper.encoder, paper.lam, paper.epochs, paper.compare_lambdas) == (
        "dinov2",
        10.0,
        3,
        (),
    )
    assert paper.layers_to_draw(range(40)) == [24, 28, 32, 36]
    assert study.OntologySettings.for_profile("mini", figure_layers=[5]).layers_to_draw([0, 5]) == [
        5
    ]


def test_paper_synsets_absent_from_the_data_are_skipped_with_a_note(toy_taxonomy, capsys):
    # The toy world's 30 ImageNet classes include sharks, dogs and birds, but no whale,
    # woodwind or warship.
    synsets = study.chapter_synsets("paper", toy_taxonomy)
    assert synsets == {"n01482071": "paper 000", "n02084071": "broad", "n01503061": "broad"}
    note = capsys.readouterr().out
    assert note.startswith("Skipped 3 of 6 synsets that are above none of this data's 30 classes")
    assert "whale (n02062744)" in note and "warship" in note and "woodwind" in note
    assert study.chapter_synsets("mini", toy_taxonomy) == study.toyworld_synsets()
    assert capsys.readouterr().out == ""
    # none present at all: the chapter's recovery steps still run, and say so
    only_tench = Taxonomy.from_wnids(["n01440764", "n01443537"])
    assert study.chapter_synsets("paper", only_tench) == {}
    recovery = {"SAE features": study.synset_recovery({0: np.ones((2, 2), bool)}, only_tench, {})}
    assert recovery["SAE features"].empty
    assert study.recovery_summary(recovery).empty
    assert "no synset" in figures.plot_synset_recovery(recovery["SAE features"]).texts[0].get_text()
    assert study.recovery_text(recovery, {}).startswith("No listed synset")


def test_synset_recovery_counts_exact_covers(toy_taxonomy, planted_sets):
    synsets = {DOG: "group", HOUND: "mid", TERRIER: "mid", BIRD: "group"}
    rec = study.synset_recovery(planted_sets, toy_taxonomy, synsets).set_index(["layer", "synset"])
    assert rec.loc[(0, HOUND), "n_exact"] == 1 and rec.loc[(0, HOUND), "best_feature"] == 0
    assert rec.loc[(0, TERRIER), "n_exact"] == 0
    assert rec.loc[(0, TERRIER), "best_jaccard"] == pytest.approx(1 / 6)  # f1: 1 of 6 in union
    assert rec.loc[(0, DOG), "best_jaccard"] == pytest.approx(4 / 6)
    assert rec.loc[(1, DOG), "n_exact"] == 2 and rec.loc[(1, DOG), "best_feature"] == 0
    assert rec.loc[(1, BIRD), "n_exact"] == 0
    assert rec.loc[(1, BIRD), "best_jaccard"] == pytest.approx(5 / 6)
    assert rec.loc[(1, HOUND), "n_exact"] == 1 and rec.loc[(1, TERRIER), "n_exact"] == 1
    assert rec.loc[(1, DOG), "name"] == "dog" and rec.loc[(1, DOG), "n_leaves"] == 6
    assert ((rec["n_exact"] > 0) == (rec["best_jaccard"] == 1.0)).all()

    # Agreement with the ontology's definition: exact covers are exactly the features with
    # coverage 1 whose LCH holds the synset's leaves.
    table = feature_table(planted_sets, toy_taxonomy, progress=False)
    for (layer, wnid), row in rec.iterrows():
        hits = table[
            (table["layer"] == layer)
            & (table["coverage"] == 1.0)
            & table["lch"].map(
                lambda h, w=wnid: toy_taxonomy.leaf_set(h) == toy_taxonomy.leaf_set(w)
            )
        ]
        assert len(hits) == row["n_exact"], (layer, wnid)


def test_recovery_summary_lists_layers_and_counts(toy_taxonomy, planted_sets):
    synsets = {DOG: "group", HOUND: "mid", TERRIER: "mid", BIRD: "group"}
    recovery = {
        "SAE features": study.synset_recovery(planted_sets, toy_taxonomy, synsets),
        "nothing": study.synset_recovery({0: np.zeros((3, 30), bool)}, toy_taxonomy, synsets),
    }
    summary = study.recovery_summary(recovery)
    assert list(summary.index) == ["dog (group)", "hound (mid)", "terrier (mid)", "bird (group)"]
    assert list(summary["SAE features"]) == ["1", "0, 1", "1", ""]
    assert (summary["nothing"] == "").all()
    found = summary.attrs["found"]
    assert found.loc["group", "SAE features"] == 1 and found.loc["mid", "SAE features"] == 2
    assert found["nothing"].sum() == 0
    # Features that overlap no synset name no best feature (not feature 0).
    assert (recovery["nothing"]["best_feature"] == -1).all()
    assert (recovery["nothing"]["best_jaccard"] == 0).all()
    assert study.recovery_text(recovery, synsets) == (
        "At some layer, SAE features cover exactly 1 of 2 group synsets; 2 of 2 mid synsets.\n"
        "Features that cover one of these synsets exactly, summed over layers: "
        "SAE features 5, nothing 0."
    )


def test_synset_recovery_rejects_bad_input(toy_taxonomy, planted_sets):
    with pytest.raises(KeyError, match="n01440764"):
        study.synset_recovery(planted_sets, toy_taxonomy, {"n01440764": "group"})  # tench
    with pytest.raises(ValueError, match="30"):
        study.synset_recovery({0: np.zeros((2, 7), bool)}, toy_taxonomy, {DOG: "group"})


def test_plot_synset_recovery_annotates_exact_counts(toy_taxonomy, planted_sets):
    synsets = study.toyworld_synsets()
    rec = study.synset_recovery(planted_sets, toy_taxonomy, synsets)
    fig = figures.plot_synset_recovery(rec)
    ax = fig.axes[0]
    texts = [int(t.get_text()) for t in ax.texts]
    assert len(texts) == 15 * 2  # 15 planted synsets x 2 layers
    assert sum(texts) == rec["n_exact"].sum() == 1 + 2 + 1 + 1
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows[0].startswith("dog (group") and rows[1].startswith("hound (mid")


# --------------------------------------------------------------------------- counts


def test_hierarchy_by_layer_counts(toy_taxonomy, planted_sets):
    table = feature_table(planted_sets, toy_taxonomy, progress=False)
    counts = study.hierarchy_by_layer(table, planted.N_CLASSES)
    assert counts.loc[0, "no class"] == 1 and counts.loc[0, "1 class"] == 1
    assert counts.loc[0, "multi-class"] == 2 and counts.loc[0, "multi, coverage > 0.99"] == 1
    assert counts.loc[1, "multi-class"] == 5 and counts.loc[1, "multi, coverage > 0.99"] == 4
    # 5 of 6 birds: coverage 5/6 > 0.75
    assert counts.loc[1, "multi, coverage > 0.75"] == 5
    assert counts.loc[1, "no class"] == 0 and counts[["every class"]].sum().item() == 0
    everything = {2: np.ones((1, planted.N_CLASSES), bool)}
    table = feature_table({**planted_sets, **everything}, toy_taxonomy, progress=False)
    counts = study.hierarchy_by_layer(table, planted.N_CLASSES)
    # a feature on every class is counted apart, not as a superordinate concept
    assert counts.loc[2, "every class"] == 1 and counts.loc[2, "multi, coverage > 0.99"] == 0
    assert counts.loc[2, "multi-class"] == 1
    # layer 0: hounds (height 1) and hounds + a terrier (LCH hunting dog, height 2)
    assert counts.loc[0, "mean height (multi)"] == pytest.approx(1.5)


def test_table2_by_layer_adds_up_to_table2(toy_taxonomy, planted_sets):
    rng = np.random.default_rng(0)
    sets = {
        "SAE features": planted_sets,
        "Random vectors": {ly: rng.random(s.shape) < 0.1 for ly, s in planted_sets.items()},
    }
    per_layer = study.table2_by_layer(sets, toy_taxonomy)
    total = table2(sets, toy_taxonomy, thresholds=(0.99,))
    assert list(per_layer.columns) == ["SAE features", "Random vectors"]
    assert per_layer.loc[1, "SAE features"] == 4
    np.testing.assert_array_equal(per_layer.sum().to_numpy(), total["> 0.99"].to_numpy())
    fig = figures.plot_table2_by_layer(per_layer)
    assert len(fig.axes[0].patches) >= 4


def test_most_hierarchical_orders_and_deduplicates(toy_taxonomy, planted_sets):
    table = feature_table(planted_sets, toy_taxonomy, progress=False)
    top = study.most_hierarchical(table, n=10)
    # the dogs (6 classes) first, then hounds / terriers (3 classes, later layer first);
    # the duplicate dog feature (layer 1, f2) and layer 0's hound feature are dropped
    assert list(zip(top["layer"], top["feature"], strict=True)) == [(1, 0), (1, 3), (1, 4)]
    assert top.loc[0, "lch"] == HUNTING_DOG and top.loc[0, "label"].startswith("layer 1 / 0:")
    every = study.most_hierarchical(table, n=10, one_per_lch=False)
    assert len(every) == 5 and (every["coverage"] >= 0.99).all() and (every["n_classes"] >= 2).all()
    assert study.most_hierarchical(table, n=1).shape[0] == 1
    # a feature on all 30 classes has coverage 1 at the root: first unless max_classes drops it
    everything = {2: np.ones((1, planted.N_CLASSES), bool)}
    table = feature_table({**planted_sets, **everything}, toy_taxonomy, progress=False)
    assert study.most_hierarchical(table, n=1)["n_classes"].item() == planted.N_CLASSES
    kept = study.most_hierarchical(table, n=10, max_classes=planted.N_CLASSES - 1)
    assert list(zip(kept["layer"], kept["feature"], strict=True)) == [(1, 0), (1, 3), (1, 4)]


def test_layer_view_is_self_contained_html(toy_taxonomy, planted_sets):
    table = feature_table(planted_sets, toy_taxonomy, progress=False)
    html = figures.layer_view(table, 1)
    assert "data:image/png;base64," in html and "<table" in html and "hunting dog" in html
    # one row per LCH: the two dog features (layer 1, f0 and f2) share a row that counts both
    rows = html.split("<tbody>")[1].split("<tr>")[1:]
    assert len(rows) == 3 and "hunting dog" in rows[0] and "<td>2</td>" in rows[0]
    assert "no multi-class feature" in figures.layer_view(table[table["n_classes"] < 2], 0)


# --------------------------------------------------------------------------- a real store


@pytest.fixture(scope="module")
def store_and_data(tmp_path_factory):
    """A miniature DINOv2 over four toy-world classes of coloured noise, in several shards."""
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.mini.miniatures import miniature

    root = tmp_path_factory.mktemp("ontology_study")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(_leaves(HOUND) + _leaves(TERRIER)[:1]):
        (root / "img" / wnid).mkdir(parents=True)
        for i in range(6):
            colour = np.array([60 * c + 20, 200 - 50 * c, 120], float)
            pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "img" / wnid / f"{i}.png")
    dataset = ImageFolder(root / "img")
    store = extract(
        miniature("dinov2", root / "model"),
        dataset,
        layers="0,2",
        out=root / "store",
        batch_size=8,
        shard_images=8,
        num_workers=1,
        progress=False,
    )
    return store, dataset


def _random_sae(store, layer: int, d_sae: int = 16, seed: int = 0) -> StandardSAE:
    """Random directions whose biases sit at the projections' median: each fires on about
    half of the store's images, with distinct activations."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=store.d_model, d_sae=d_sae))
    acts_ND = torch.from_numpy(np.asarray(store.cls(layer), np.float32))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.copy_(-(acts_ND @ sae.W_enc).median(0).values)
    return sae


def test_top_images_equal_a_brute_force_ranking(store_and_data):
    store, _ = store_and_data
    assert len(store.shard_dirs) > 1
    sae = _random_sae(store, 2)
    features = [3, 0, 11, 7]
    top = study.top_images(store, sae, 2, features, k=5, batch_size=7, progress=False)
    with torch.no_grad():
        codes_NS = sae.encode(torch.from_numpy(np.asarray(store.cls(2), np.float32)))
    for i, f in enumerate(features):
        order = torch.sort(codes_NS[:, f], descending=True, stable=True).indices[:5]
        np.testing.assert_array_equal(top.rows_FK[i], order.numpy())
        np.testing.assert_allclose(top.values_FK[i], codes_NS[order, f].numpy(), rtol=1e-5)
    assert top.layer == 2 and top.features == features
    with pytest.raises(IndexError, match="width 16"):
        study.top_images(store, sae, 2, [16], progress=False)


def test_plot_top_images_draws_exactly_the_top_images(store_and_data):
    store, dataset = store_and_data
    sae = _random_sae(store, 0, seed=1)
    top = study.top_images(store, sae, 0, [1, 5], k=4, progress=False)
    fig = figures.plot_top_images([top], store, dataset, ["feature 1", "feature 5"])
    drawn = [ax for ax in fig.axes if ax.images]
    assert 0 < int((top.values_FK > 0).sum()) == len(drawn)
    first = drawn[0].images[0].get_array()
    expected = np.asarray(dataset.load(int(store.rows[top.rows_FK[0, 0]])).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(first), expected)
    label = store.class_names[int(store.labels[top.rows_FK[0, 0]])]
    assert drawn[0].get_title().startswith(label[:17])
    with pytest.raises(ValueError, match="titles"):
        figures.plot_top_images([top], store, dataset, ["only one"])


def test_plot_top_images_refuses_another_dataset(store_and_data, tmp_path):
    from saekit.data import ImageFolder

    store, dataset = store_and_data
    other = tmp_path / "other" / planted.WNIDS[0]
    other.mkdir(parents=True)
    for i in range(len(dataset)):
        Image.new("RGB", (8, 8)).save(other / f"x{i}.png")
    top = study.top_images(store, _random_sae(store, 0), 0, [0], k=2, progress=False)
    with pytest.raises(ValueError, match="dataset the store was made from"):
        figures.plot_top_images([top], store, ImageFolder(other.parent), ["f0"])


def test_layer_saes_train_once_then_reload(store_and_data, tmp_path, monkeypatch):
    import saekit.sae.cache

    store, _ = store_and_data
    out = tmp_path / "saes"
    saes = study.layer_saes(store, out, lam=5.0, epochs=2, progress=False)
    assert sorted(saes) == [0, 2]
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [name.rsplit("-", 1)[0] for name in folders] == [
        "layer00-relu-x8-l1_5-olson2025",
        "layer02-relu-x8-l1_5-olson2025",
    ]
    assert saes[2].cfg.d_sae == 8 * store.d_model

    def no_training(*args, **kwargs):
        raise AssertionError("the cached sweep should have been loaded")

    monkeypatch.setattr(saekit.sae.cache, "sweep_from_store", no_training)
    again = study.layer_saes(store, out, lam=5.0, epochs=2, progress=False)
    for layer in saes:
        torch.testing.assert_close(again[layer].W_enc, saes[layer].W_enc)
        torch.testing.assert_close(again[layer].b_dec, saes[layer].b_dec)
    # Another chapter asking for one layer of the same sweep gets the same SAE from the cache.
    reused = study.layer_saes(store, out, lam=5.0, epochs=2, layers=[2], progress=False)
    torch.testing.assert_close(reused[2].W_dec, saes[2].W_dec)
    # Other epochs, λ or batch order are other SAEs: they train, never reuse these.
    for changed in ({"epochs": 3}, {"lam": 1.0}, {"seed": 1}):
        settings = {"lam": 5.0, "epochs": 2, **changed}
        with pytest.raises(AssertionError, match="should have been loaded"):
            study.layer_saes(store, out, progress=False, **settings)


def test_lambda_comparison_measures_the_chosen_and_other_lambdas(store_and_data, tmp_path):
    store, _ = store_and_data
    settings = study.OntologySettings.for_profile(
        "mini", lam=5.0, epochs=2, compare_lambdas=[0.05, 5.0], device="cpu"
    )
    saes = study.layer_saes(store, tmp_path, lam=5.0, epochs=2, progress=False)
    taxonomy = Taxonomy.from_store(store)
    comparison = study.lambda_comparison(
        store, store, saes, settings, tmp_path, taxonomy, progress=False
    )
    assert list(comparison.index) == [0.05, 5.0]
    share = np.mean([evaluate(sae, store.cls(ly)).l0 / sae.cfg.d_sae for ly, sae in saes.items()])
    assert comparison.loc[5.0, "active latents per image"] == pytest.approx(share)
    rule = ClassSetRule(min_fire_frac=settings.min_fire_frac)
    sets = {
        ly: class_sets_from_store(store, sae, ly, rule, progress=False) for ly, sae in saes.items()
    }
    expected = table2({"SAE": sets}, taxonomy, thresholds=(0.99,)).loc["SAE", "> 0.99"]
    assert comparison.loc[5.0, "superordinate, coverage > 0.99"] == expected
    n_classes = np.concatenate([s.sum(1) for s in sets.values()])
    assert comparison.loc[5.0, "classes per feature"] == pytest.approx(
        n_classes[n_classes > 0].mean() if (n_classes > 0).any() else 0.0
    )
    # the weak penalty keeps more latents active
    assert comparison.loc[0.05, "active latents per image"] > share
    text = study.lambda_text(comparison, 5.0)
    assert text.splitlines()[1].startswith(
        f"- **λ = 5**: {share:.0%} of the {8 * store.d_model} latents active per image"
    )


def test_a_store_of_a_few_classes_runs_through_the_chapter(store_and_data, tmp_path, capsys):
    # Four ImageNet classes (three hounds, a terrier): the paper synsets mostly have no leaf
    # here, Table 2 and the counts still come out, and nothing raises.
    store, dataset = store_and_data
    taxonomy = Taxonomy.from_store(store)
    saes = study.layer_saes(store, tmp_path, lam=0.5, epochs=2, progress=False)
    class_sets = class_sets_with_baselines(store, saes, n_fit=100, progress=False)
    table = feature_table(class_sets["SAE features"], taxonomy, progress=False)
    counts = study.hierarchy_by_layer(table, len(store.class_names))
    assert list(counts.index) == [0, 2]
    total = table2(class_sets, taxonomy)
    per_layer = study.table2_by_layer(class_sets, taxonomy)
    np.testing.assert_array_equal(per_layer.sum().to_numpy(), total["> 0.99"].to_numpy())
    every = total["# Fire on every class"]
    assert (total["> 0.99 incl. every class"] == total["> 0.99"] + every).all()
    synsets = study.chapter_synsets("paper", taxonomy)
    assert synsets == {"n02084071": "broad"}  # only "dog" is above these classes
    assert "Skipped 5 of 6 synsets" in capsys.readouterr().out
    recovery = {
        row: study.synset_recovery(sets, taxonomy, synsets) for row, sets in class_sets.items()
    }
    assert set(recovery["SAE features"]["n_leaves"]) == {4}
    assert study.recovery_text(recovery, synsets).startswith("At some layer, SAE features cover")
    top = study.most_hierarchical(table, 2, max_classes=len(store.class_names) - 1)
    tops = [
        study.top_images(store, saes[r.layer], r.layer, [r.feature], 2) for r in top.itertuples()
    ]
    figures.plot_top_images(tops, store, dataset, list(top["label"]))
