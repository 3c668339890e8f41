"""Exemplars: feature names, streaming top-k == full sort, chunk-bounded memory, planted facts
with an ontology label, patch overlays that land on the right pixels, the model's view of an
image, per-patch feature lists, a cached patch SAE, and the mask ground truth (label fractions
per patch, activation shares per part)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.activations import extract  # noqa: E402
from saekit.analysis.exemplar_plots import (  # noqa: E402
    exemplar_figure,
    exemplar_rows,
    model_view,
    overlay_patches,
    patch_features,
    row_images,
)
from saekit.analysis.exemplars import (  # noqa: E402
    NO_CLASS_SET,
    feature_facts,
    feature_name,
    model_label,
    scan_store,
    select_features,
    width_label,
)
from saekit.analysis.ontology import ClassSetRule  # noqa: E402
from saekit.data import ImageFolder  # noqa: E402
from saekit.mini.miniatures import miniature  # noqa: E402
from saekit.models import load_encoder  # noqa: E402
from saekit.sae.codes import merge_top_k  # noqa: E402
from saekit.studies.patch_features import (  # noqa: E402
    dominant_part,
    part_shares,
    plot_part_shares,
    store_patch_fractions,
    train_patch_sae,
)

# tench, goldfish (both cyprinids), great white shark
WNIDS = ("n01440764", "n01443537", "n01484850")
LAYER = 1


def _tinted_folder(root: Path, per_class: int = 4, seed: int = 0, prefix: str = "") -> Path:
    """Noise images tinted red for the two cyprinid classes and blue for the shark, so the
    encoder's activations carry a planted class signal."""
    rng = np.random.default_rng(seed)
    tints = {WNIDS[0]: (1.0, 0.2, 0.2), WNIDS[1]: (1.0, 0.3, 0.1), WNIDS[2]: (0.1, 0.3, 1.0)}
    for wnid, tint in tints.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.uniform(0.3, 1.0, (36, 40, 1))
            pixels = (255 * noise * np.asarray(tint)).astype(np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{prefix}{wnid}_{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("exemplars")
    model = miniature("dinov2", root / "dinov2")
    dataset = ImageFolder(_tinted_folder(root / "images"))
    store = extract(
        str(model),
        dataset,
        layers=[LAYER],
        tokens="both",
        out=root / "store",
        dtype="float32",
        shard_images=5,  # several shards, so chunks straddle shard boundaries
        num_workers=1,
        progress=False,
    )
    return {"model": model, "dataset": dataset, "store": store}


def _random_sae(d_in: int, d_sae: int, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.3)  # some features off, some always on
    return sae


def _planted_sae(store) -> StandardSAE:
    """Feature 0 fires (on its strongest patch) on every cyprinid image and on no shark image."""
    patches = torch.from_numpy(np.asarray(store.patches(LAYER), np.float32))
    labels = torch.as_tensor(store.labels)
    red = patches[labels < 2].reshape(-1, patches.shape[-1]).mean(0)
    blue = patches[labels == 2].reshape(-1, patches.shape[-1]).mean(0)
    direction = (red - blue) / (red - blue).norm()
    peak_N = (patches @ direction).amax(1)
    shark_top, cyprinid_low = peak_N[labels == 2].max(), peak_N[labels < 2].min()
    assert shark_top < cyprinid_low, "the tint must separate the classes for this planted test"
    sae = _random_sae(patches.shape[-1], 8, seed=1)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, 0] = direction
        sae.b_enc[0] = -(shark_top + cyprinid_low) / 2
    return sae


# --------------------------------------------------------------------------- names


def test_feature_names_follow_model_width_index():
    assert feature_name("DINOv2", 24576, 9823) == "DINOv2-24K/9823"
    assert feature_name("clip", 24 * 1024, 20652) == "CLIP-24K/20652"
    assert feature_name("facebook/dinov2-base", 16384, 3) == "DINOv2-16K/3"
    assert width_label(16000) == "16K" and width_label(384) == "384"
    assert model_label("my-custom-net") == "my-custom-net"
    with pytest.raises(IndexError, match="out of range"):
        feature_name("CLIP", 64, 64)


def test_the_toy_vit_and_layer_suffixes_get_their_own_names():
    assert model_label("toyvit") == "ToyViT"
    assert model_label("/repo/saekit/data/toyvit") == "ToyViT"  # the shipped weights' folder
    assert model_label("google/vit-base-patch16-224") == "ViT"  # "toyvit" must not swallow it
    # an existing label is kept as given, so two layers of one model stay apart
    assert model_label("ToyViT-L3") == "ToyViT-L3"
    assert feature_name("ToyViT-L3", 512, 46) == "ToyViT-L3-512/46"
    assert feature_name("DINOv2-L11", 24576, 1) == "DINOv2-L11-24K/1"


# --------------------------------------------------------------------------- top-k


def test_merge_top_k_equals_a_stable_full_sort_whatever_the_chunking():
    rng = np.random.default_rng(0)
    # Few distinct values, many zeros: ties everywhere, where chunking could change the order.
    scores_SN = rng.choice([0.0, 0.0, 0.5, 1.0, 2.0], size=(6, 50)).astype(np.float32)
    expected_rows = np.argsort(-scores_SN, axis=1, kind="stable")[:, :7]
    for chunk in (1, 3, 7, 50):
        values = torch.empty(6, 0)
        rows = torch.empty(6, 0, dtype=torch.int64)
        for start in range(0, 50, chunk):
            part = torch.from_numpy(scores_SN[:, start : start + chunk])
            index = torch.arange(start, start + part.shape[1])
            values, rows = merge_top_k(values, rows, part, index, 7)
        np.testing.assert_array_equal(rows.numpy(), expected_rows)
        np.testing.assert_array_equal(
            values.numpy(), np.take_along_axis(scores_SN, expected_rows, 1)
        )


@pytest.mark.parametrize("rank_by", ["max", "mean", "cls"])
def test_streaming_scan_equals_full_sort(world, rank_by):
    store = world["store"]
    sae = _random_sae(store.d_model, 24)
    scan = scan_store(store, sae, LAYER, k=5, rank_by=rank_by, tokens_per_chunk=40, progress=False)

    if rank_by == "cls":
        codes = sae.encode(torch.from_numpy(np.asarray(store.cls(LAYER), np.float32))).detach()
        scores_NS, fires_NS, token_fires = codes, codes > 0, (codes > 0).float().mean(0)
        max_act = codes.amax(0)
    else:
        patches = torch.from_numpy(np.asarray(store.patches(LAYER), np.float32))
        codes = sae.encode(patches).detach()  # [N, P, S], all at once
        scores_NS = codes.amax(1) if rank_by == "max" else codes.mean(1)
        fires_NS = codes.amax(1) > 0
        token_fires = (codes > 0).float().mean((0, 1))
        max_act = codes.amax((0, 1))
    scores_SN = scores_NS.T.numpy()
    expected_rows = np.argsort(-scores_SN, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(scan.top_rows_SK, expected_rows)
    np.testing.assert_allclose(
        scan.top_values_SK, np.take_along_axis(scores_SN, expected_rows, 1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(scan.token_freq_S, token_fires.numpy(), atol=1e-9)
    np.testing.assert_allclose(scan.image_freq_S, fires_NS.float().mean(0).numpy(), atol=1e-9)
    np.testing.assert_allclose(scan.max_act_S, max_act.numpy(), rtol=1e-6)
    labels = torch.as_tensor(store.labels)
    for c in range(3):
        np.testing.assert_allclose(
            scan.class_stats.mean_act_SC[:, c], scores_NS[labels == c].mean(0).numpy(), rtol=1e-5
        )


def test_scan_never_encodes_more_than_one_chunk(world):
    store = world["store"]
    sae = _random_sae(store.d_model, 16)
    seen = []
    encode = sae.encode
    sae.encode = lambda x: (seen.append(x.shape[:-1].numel()), encode(x))[1]
    scan_store(store, sae, LAYER, k=3, tokens_per_chunk=33, progress=False)
    n_patches = store.patches(LAYER).shape[1]
    assert sum(seen) == store.n_rows * n_patches  # every token once...
    assert max(seen) <= max(33, n_patches)  # ...and never more than a chunk at a time
    assert len(seen) > 1


def test_scan_refuses_missing_tokens_with_a_hint(world, tmp_path):
    cls_only = extract(
        str(world["model"]),
        world["dataset"],
        layers=[LAYER],
        tokens="cls",
        out=tmp_path / "cls",
        num_workers=1,
        progress=False,
    )
    with pytest.raises(ValueError, match="tokens both"):
        scan_store(cls_only, _random_sae(32, 8), LAYER, rank_by="max", progress=False)


# --------------------------------------------------------------------------- facts


def test_planted_feature_facts_and_ontology_label(world):
    store = world["store"]
    sae = _planted_sae(store)
    scan = scan_store(store, sae, LAYER, k=12, progress=False)
    facts = feature_facts(scan, [0])
    row = facts.loc[0]
    assert row["name"] == "DINOv2-8/0"
    assert row["image_freq"] == pytest.approx(8 / 12)  # every cyprinid image, no shark
    assert row["n_classes"] == 2
    assert row["ontology"].startswith("cyprinid (coverage 1.00, 2 classes)")
    assert "great white shark" not in row["top_classes"]
    assert row["top_classes"].split(" (")[0] in {"tench", "goldfish"}
    rows, values = scan.exemplars(0)
    assert len(rows) == 8 and (store.labels[rows] < 2).all() and (values > 0).all()
    assert 0 in select_features(scan, 8, max_image_freq=0.7)
    # A feature that fires everywhere is "dense" and is not offered for browsing.
    dense = scan.image_freq_S == 1.0
    assert not set(np.flatnonzero(dense)) & set(select_features(scan, 8, max_image_freq=0.7))
    plain = feature_facts(scan, [0], taxonomy=None)
    assert plain.loc[0, "ontology"] is None


def test_facts_of_features_without_a_class_set(world):
    """No browsed feature with a class set (issue 13: pandas turned the empty label table into
    floats and the facts crashed): every feature still gets its facts and says it has none."""
    store = world["store"]
    sae = _planted_sae(store)
    with torch.no_grad():
        sae.b_enc[5:] = -1e3  # features 5-7 never fire
    scan = scan_store(store, sae, LAYER, k=4, progress=False)
    sets_SC = ClassSetRule().apply(scan.class_stats)
    silent = [int(f) for f in np.flatnonzero(~sets_SC.any(1))]
    assert silent == [5, 6, 7]
    facts = feature_facts(scan, silent)
    assert list(facts.index) == silent and (facts["n_classes"] == 0).all()
    assert (facts["ontology"] == NO_CLASS_SET).all()
    np.testing.assert_allclose(facts["image_freq"], scan.image_freq_S[silent])
    # mixed: the planted feature keeps its label beside them, in the order asked for
    mixed = feature_facts(scan, [silent[0], 0])
    assert mixed.loc[silent[0], "ontology"] == NO_CLASS_SET
    assert mixed.loc[0, "ontology"].startswith("cyprinid (coverage 1.00, 2 classes)")
    assert feature_facts(scan, []).empty


# --------------------------------------------------------------------------- grids


def test_overlay_heats_exactly_the_activating_patch():
    image = Image.new("RGB", (32, 32), "white")
    acts_P = np.zeros(16)
    acts_P[1 * 4 + 2] = 3.0  # row 1, column 2 of a 4 x 4 grid
    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    overlay_patches(ax, image, acts_P, (4, 4))
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]

    def colour_at(col: int, row: int) -> np.ndarray:
        x, y = ax.transData.transform((col * 8 + 4, row * 8 + 4))
        return pixels[pixels.shape[0] - int(y), int(x)]

    assert (colour_at(2, 1) < 200).any(), "the hot patch must be tinted"
    for col, row in [(1, 2), (2, 2), (1, 1), (3, 1), (0, 0)]:
        np.testing.assert_array_equal(colour_at(col, row), [255, 255, 255])
    plt.close(fig)


def test_model_view_is_what_the_encoder_sees(world):
    encoder = load_encoder(world["model"])
    image = world["dataset"].load(0)  # 40 x 36: resized and centre-cropped to 32 x 32
    view = model_view(image, encoder.processor)
    assert view.size == (32, 32)
    seen = encoder.preprocess([image])[0]
    mean = torch.tensor(encoder.processor.image_mean)[:, None, None]
    std = torch.tensor(encoder.processor.image_std)[:, None, None]
    rebuilt = (torch.from_numpy(np.array(view)).permute(2, 0, 1) / 255 - mean) / std
    # the view is rounded to whole 8-bit levels
    assert (rebuilt - seen).abs().max() <= 0.6 / 255 / min(encoder.processor.image_std)


def test_exemplar_figure_and_wrong_dataset(world, tmp_path):
    store, dataset = world["store"], world["dataset"]
    sae = _planted_sae(store)
    scan = scan_store(store, sae, LAYER, k=6, progress=False)
    fig = exemplar_figure(scan, store, sae, dataset, 0, ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6
    assert fig._suptitle.get_text().startswith("DINOv2-8/0")
    assert all(ax.get_title().split()[0] in ("tench", "goldfish") for ax in shown)
    plt.close(fig)
    other = ImageFolder(_tinted_folder(tmp_path / "other", seed=1, prefix="other_"))
    with pytest.raises(ValueError, match="dataset the store was extracted from"):
        row_images(store, other, [0])


def test_patch_features_lists_active_features_strongest_first(world):
    store = world["store"]
    sae = _random_sae(store.d_model, 24)
    acts_PD = np.array(store.patches(LAYER)[3], np.float32)
    listed = patch_features(sae, acts_PD, top=24)
    codes_PS = sae.encode(torch.from_numpy(acts_PD)).detach()
    assert len(listed) == len(acts_PD)
    for p, entries in enumerate(listed):
        features = [f for f, _ in entries]
        values = [v for _, v in entries]
        assert values == sorted(values, reverse=True)
        assert set(features) == set(torch.nonzero(codes_PS[p] > 0).ravel().tolist())
        for f, v in entries:
            assert v == pytest.approx(float(codes_PS[p, f]))


def test_select_features_drops_features_dense_over_patches(world):
    scan = scan_store(world["store"], _random_sae(32, 24), LAYER, k=3, progress=False)
    alive = scan.token_freq_S[scan.token_freq_S > 0]
    cap = float(np.median(alive))
    picked = select_features(scan, 24, max_image_freq=1.0, max_token_freq=cap)
    by_strength = np.argsort(-scan.max_act_S, kind="stable")
    expected = [int(f) for f in by_strength if 0 < scan.token_freq_S[f] <= cap]
    assert picked == expected
    assert 0 < len(picked) < len(alive)  # the cap removed some live features, not all


def test_exemplar_rows_draw_one_row_per_feature(world):
    store, dataset = world["store"], world["dataset"]
    sae = _planted_sae(store)
    scan = scan_store(store, sae, LAYER, k=8, progress=False)
    fig = exemplar_rows(scan, store, sae, dataset, [0, 3], k=4)
    assert len(fig.axes) == 8
    assert [fig.axes[0].get_ylabel(), fig.axes[4].get_ylabel()] == ["DINOv2-8/0", "DINOv2-8/3"]
    # feature 0 fires on the eight cyprinid images: its row is full, with cyprinids only
    assert all(ax.images for ax in fig.axes[:4])
    assert all(ax.get_title().split()[0] in ("tench", "goldfish") for ax in fig.axes[:4])
    plt.close(fig)
    with pytest.raises(ValueError, match="no features"):
        exemplar_rows(scan, store, sae, dataset, [])


def test_train_patch_sae_trains_on_patches_once_then_loads(world, tmp_path, monkeypatch):
    import saekit.sae.cache

    store = world["store"]
    options = dict(expansion=2, l1=0.01, epochs=2, batch_size=64)
    sae = train_patch_sae(store, LAYER, tmp_path / "sae", **options)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (32, 64)
    info = sae.cfg.metadata.saekit
    assert info["tokens"] == "patch" and info["spec"]["recipe"]["name"] == "stevens2025"
    steps = -(-store.n_rows * store.patches(LAYER).shape[1] // 64)
    assert info["steps"] == 2 * steps  # every patch of every image, twice

    def retrain(*args, **kwargs):
        raise AssertionError("an identical request must load the saved SAE")

    monkeypatch.setattr(saekit.sae.cache, "sweep_from_store", retrain)
    again = train_patch_sae(store, LAYER, tmp_path / "sae", **options)
    torch.testing.assert_close(again.W_dec, sae.W_dec)
    with pytest.raises(AssertionError, match="must load"):  # other settings: trained anew
        train_patch_sae(store, LAYER, tmp_path / "sae", **{**options, "l1": 0.02})
    cls_only = type("Store", (), {"manifest": {"tokens": ["cls"]}, "root": "somewhere"})()
    with pytest.raises(ValueError, match="tokens='both'"):
        train_patch_sae(cls_only, LAYER, tmp_path / "other")


# --------------------------------------------------------------------------- ground truth


def _write_masks(root: Path, image_ids: list[str]) -> None:
    """8 x 8 masks: label 1 fills patch 0 of the 4 x 4 grid, label 2 half of patch 15, and one
    pixel of patch 5 is unlabelled (255)."""
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2] = 1
    mask[6:8, 7] = 2
    mask[2, 2] = 255
    for image_id in image_ids:
        path = (root / image_id).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)


def test_part_shares_split_each_feature_by_the_masks(world, tmp_path):
    store = world["store"]
    grid = store.grid(LAYER)
    assert grid == (4, 4)
    _write_masks(tmp_path / "masks", store.image_ids)
    dataset, masks = world["dataset"], tmp_path / "masks"
    fractions = store_patch_fractions(store, dataset, grid, 3, masks_dir=masks)
    one = np.zeros((16, 3))
    one[:, 0] = 1
    one[0] = [0, 1, 0]
    one[15] = [0.5, 0, 0.5]
    one[5] = [0.75, 0, 0]  # its unlabelled pixel counts for no label
    np.testing.assert_allclose(fractions, np.broadcast_to(one, (store.n_rows, 16, 3)))
    with pytest.raises(ValueError, match="label 2 but n_labels is 2"):
        store_patch_fractions(store, dataset, grid, 2, masks_dir=masks)
    with pytest.raises(FileNotFoundError, match="No mask"):
        store_patch_fractions(store, dataset, grid, 3, masks_dir=tmp_path / "nowhere")

    sae = _random_sae(32, 24)
    with torch.no_grad():
        sae.b_enc[5] = -1e4  # a feature that never fires
    features = list(range(24))
    names = ["background", "body", "fin"]
    shares = part_shares(store, sae, LAYER, features, fractions, names, tokens_per_chunk=40,
                         progress=False)  # fmt: skip
    codes = sae.encode(torch.from_numpy(np.asarray(store.patches(LAYER), np.float32))).detach()
    mass = np.einsum("nps,npl->sl", codes.double().numpy(), fractions)
    live = mass.sum(1) > 0
    assert not live[5] and live.sum() >= 12
    expected = mass[live] / mass[live].sum(1, keepdims=True)
    np.testing.assert_allclose(shares.to_numpy()[live], expected, rtol=1e-6)
    assert shares.loc[~live].isna().all().all()  # never fires: no share to give
    assert list(shares.columns) == names
    assert shares.attrs["base"] == pytest.approx(
        {"background": 14.25 / 16, "body": 1 / 16, "fin": 0.5 / 16}
    )
    with pytest.raises(ValueError, match="one row of label fractions per"):
        part_shares(store, sae, LAYER, features, fractions[:, :8], names, progress=False)


def test_dominant_part_and_its_heat_map():
    shares = pd.DataFrame(
        [[0.3, 0.7, 0.0], [np.nan] * 3],
        index=pd.Index([7, 9], name="feature"),
        columns=["background", "body", "fin"],
    )
    shares.attrs["base"] = {"background": 0.9, "body": 0.1, "fin": 0.0}
    parts = dominant_part(shares)
    assert parts[7] == "body (70%, 7.0x its pixel share)"
    assert parts[9] == "never fires"
    fig = plot_part_shares(shares.loc[[7, 9]], ["A/7", "A/9"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["all pixels", "A/7", "A/9"]
    # 'fin' covers no pixel and draws no activation: no column for it
    assert [t.get_text() for t in ax.get_xticklabels()] == ["background", "body"]
    plt.close(fig)


def test_store_features_are_named_after_the_model_folder_before_its_family():
    from saekit.analysis.exemplars import _store_model_label

    # The toy ViT's family is plain "vit"; its folder name tells it apart.
    assert _store_model_label({"model": "/repo/saekit/data/toyvit", "family": "vit"}) == "ToyViT"
    assert _store_model_label({"model": "facebook/dinov2-giant", "family": "dinov2"}) == "DINOv2"
    assert _store_model_label({"model": "/tmp/my_model", "family": "clip"}) == "CLIP"
