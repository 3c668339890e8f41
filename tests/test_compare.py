"""Cross-encoder matching: streaming correlation == numpy's corrcoef across a DINOv2 and a CLIP
store, a planted permutation is recovered with r = 1, stores in different image orders are
aligned by id, and matched exemplars are drawn side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.activations import extract  # noqa: E402
from saekit.analysis.compare import (  # noqa: E402
    ExemplarSource,
    FeatureMatches,
    correlate_features,
    plot_best_correlations,
    plot_matched,
    shared_rows,
)
from saekit.analysis.exemplars import scan_store  # noqa: E402
from saekit.data import ImageFolder, ImageList  # noqa: E402


@pytest.fixture(scope="module")
def stores(miniatures, image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    folder = ImageFolder(image_folder)
    pairs = list(zip(folder.paths, folder.labels, strict=True))
    in_order = ImageList.from_pairs(pairs, folder.class_names, folder.wnids)
    shuffled = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]
    options = dict(layers=[2], tokens="both", dtype="float32", num_workers=1, progress=False)
    return {
        "folder": in_order,
        "dinov2": extract(str(miniatures["dinov2"]), in_order, out=root / "d", **options),
        "clip": extract(str(miniatures["clip"]), in_order, out=root / "c", **options),
        "dinov2_shuffled": extract(
            str(miniatures["dinov2"]),
            ImageList.from_pairs(shuffled, folder.class_names, folder.wnids),
            out=root / "ds",
            shard_images=4,
            **options,
        ),
    }


def _sae(d_sae: int, seed: int) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, d_sae) / 32**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.2)
    return sae


def _scores(store, sae, reduce):
    if reduce == "cls":
        return sae.encode(torch.from_numpy(np.asarray(store.cls(2), np.float32))).detach()
    codes = sae.encode(torch.from_numpy(np.asarray(store.patches(2), np.float32))).detach()
    return codes.amax(1) if reduce == "max" else codes.mean(1)


@pytest.mark.parametrize("reduce", ["max", "cls"])
def test_streaming_correlation_equals_corrcoef(stores, reduce):
    sae_a, sae_b = _sae(12, 0), _sae(20, 1)
    matches = correlate_features(
        stores["dinov2"], sae_a, 2, stores["clip"], sae_b, 2,
        features_a=[0, 3, 5, 11], reduce=reduce, tokens_per_chunk=50, progress=False,
    )  # fmt: skip
    a = _scores(stores["dinov2"], sae_a, reduce).numpy()[:, [0, 3, 5, 11]]
    b = _scores(stores["clip"], sae_b, reduce).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):  # constant features: NaN, set below
        expected = np.corrcoef(a.T, b.T)[:4, 4:]
    constant = (a.std(0)[:, None] == 0) | (b.std(0)[None, :] == 0)
    expected[constant] = 0.0
    assert matches.n_images == 15
    np.testing.assert_allclose(matches.corr_FS, expected, atol=1e-6)


def test_a_planted_permutation_is_recovered_and_stores_align_by_image_id(stores):
    sae_a = _sae(12, 0)
    perm = np.random.default_rng(1).permutation(12)
    sae_b = StandardSAE(StandardSAEConfig(d_in=32, d_sae=12))
    with torch.no_grad():  # B's feature j is A's feature perm[j], scaled by 3
        sae_b.W_enc.copy_(3 * sae_a.W_enc[:, perm])
        sae_b.b_enc.copy_(3 * sae_a.b_enc[perm])
        sae_b.b_dec.copy_(sae_a.b_dec)
    # B reads a store of the same images extracted in another order, in other shards
    rows_a, rows_b = shared_rows(stores["dinov2"], stores["dinov2_shuffled"])
    ids_b = stores["dinov2_shuffled"].image_ids
    assert [ids_b[r] for r in rows_b] == list(stores["dinov2"].image_ids)
    matches = correlate_features(
        stores["dinov2"], sae_a, 2, stores["dinov2_shuffled"], sae_b, 2, progress=False
    )
    best, corr = matches.best(1)
    varies = _scores(stores["dinov2"], sae_a, "max").std(0) > 0
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(best[varies.numpy(), 0], inverse[varies.numpy()])
    np.testing.assert_allclose(corr[varies.numpy(), 0], 1.0, atol=1e-6)
    table = matches.table(lambda f: f"A/{f}", lambda f: f"B/{f}")
    assert table["correlation"].is_monotonic_decreasing
    assert table.loc[0, "name_b"] == f"B/{table.loc[0, 'feature_b']}"


def test_matched_exemplars_side_by_side(stores, tmp_path):
    sides = []
    for name, seed in (("dinov2", 0), ("clip", 1)):
        sae = _sae(12, seed)
        scan = scan_store(stores[name], sae, 2, k=4, progress=False)
        sides.append(ExemplarSource(scan, stores[name], sae, stores["folder"]))
    fig = plot_matched(sides[0], sides[1], [(0, 1), (2, 3)], k=3, correlations=[0.9, 0.5])
    assert len(fig.axes) == 2 * 6
    labels = [fig.axes[i].get_ylabel() for i in (0, 3, 6, 9)]
    assert labels == ["DINOv2-12/0", "CLIP-12/1", "DINOv2-12/2", "CLIP-12/3"]
    # each pair's correlation sits in the gap between its two sides
    texts = {t.get_text(): t.get_position() for t in fig.texts}
    assert set(texts) == {"↔\nr = 0.90", "↔\nr = 0.50"}
    x = texts["↔\nr = 0.90"][0]
    assert fig.axes[2].get_position().x1 < x < fig.axes[3].get_position().x0
    plt.close(fig)
    with pytest.raises(ValueError, match="share no image"):
        empty = ImageList.from_pairs([(tmp_path / "x.png", 0)])
        shared_rows(stores["dinov2"], type("S", (), {"image_ids": empty.image_ids})())


def test_the_chance_baseline_correlates_with_b_images_shuffled(stores):
    sae_a, sae_b = _sae(6, 0), _sae(9, 1)
    null = correlate_features(
        stores["dinov2"], sae_a, 2, stores["clip"], sae_b, 2, null_seed=3, progress=False
    )
    a = _scores(stores["dinov2"], sae_a, "max").numpy()
    b = _scores(stores["clip"], sae_b, "max").numpy()
    b = b[np.random.default_rng(3).permutation(len(b))]  # image i of A meets another image of B
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.corrcoef(a.T, b.T)[:6, 6:]
    expected[(a.std(0)[:, None] == 0) | (b.std(0)[None, :] == 0)] = 0.0
    np.testing.assert_allclose(null.corr_FS, expected, atol=1e-6)
    real = correlate_features(stores["dinov2"], sae_a, 2, stores["clip"], sae_b, 2, progress=False)
    assert not np.allclose(real.corr_FS, null.corr_FS)


def test_best_correlation_histogram_counts_features_above_chance():
    real = FeatureMatches(
        np.arange(4), np.array([[0.9, 0.1], [0.2, 0.95], [0.3, 0.1], [0.1, 0.05]]), 10
    )
    chance = FeatureMatches(np.arange(4), np.full((4, 2), 0.25), 10)
    fig = plot_best_correlations(real, chance, label_a="A", label_b="B")
    ax = fig.axes[0]
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["75% above chance's\n99th percentile"]  # 0.9, 0.95 and 0.3 beat 0.25
    assert [line.get_xdata()[0] for line in ax.lines] == [pytest.approx(0.25)]
    assert ax.get_xlabel() == "best correlation with any B feature"
    plt.close(fig)


def test_share_above_chance_known_answer():
    from saekit.analysis.compare import FeatureMatches, share_above_chance

    # Best real matches 0.9, 0.8, 0.1, 0.05; the null's best matches are all 0.2 or below.
    real = FeatureMatches(
        np.arange(4), np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.0], [0.05, 0.0]]), 10
    )
    null = FeatureMatches(
        np.arange(4), np.array([[0.2, 0.1], [0.1, 0.15], [0.0, 0.1], [0.05, 0.0]]), 10
    )
    share, cut = share_above_chance(real, null)
    assert cut == pytest.approx(np.quantile([0.2, 0.15, 0.1, 0.05], 0.99))
    assert share == 0.5
