"""Interventions: a no-op edit returns the input bit for bit (the error term), edits move exactly
along decoder rows and only in the chosen tokens, the controls have the promised size and
features, continue_forward re-runs the encoder faithfully, and in the toy world suppressing a
part's feature moves the segmentation head on that part far more than a random direction does.

The study helpers: feature ties on planted data, masks as the encoder saw the image, patch
coverage, effect tables with known answers, a planted part edit, and the figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402

from saekit.analysis.interventions import (  # noqa: E402
    Comparison,
    Edit,
    compare,
    compare_in_encoder,
    continue_forward,
    intervene,
    random_direction,
    random_features,
    token_mask,
)
from saekit.masks import (  # noqa: E402
    load_masks,
    model_view_mask,
    patch_coverage,
)
from saekit.models import load_encoder  # noqa: E402
from saekit.sae.synthetic import identity_sae
from saekit.studies.relevancy_interventions import (  # noqa: E402
    class_contrast,
    group_tie_table,
    tie_scores,
)
from saekit.studies.relevancy_interventions_edits import (  # noqa: E402
    classification_table,
    edit_part,
    part_effects,
    suppression_curve,
)
from saekit.studies.relevancy_interventions_figures import (  # noqa: E402
    plot_class_probabilities,
    plot_segmentation_edit,
    plot_suppression_curves,
)

D, S = 16, 24


def _sae(kind: str = "relu", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=4))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=S))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, S) / D**0.5)
        sae.W_dec.copy_(torch.randn(S, D) / D**0.5)  # imperfect: the error term is large
        sae.b_dec.copy_(torch.randn(D) * 0.1)
    return sae


def _acts(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["relu", "topk"])
@pytest.mark.parametrize("shape", [(5, D), (3, 7, D)])
def test_a_no_op_edit_returns_the_input_bit_for_bit(kind, shape):
    sae, acts = _sae(kind), _acts(shape)
    codes = sae.encode(acts).detach()
    active = int((codes > 0).sum(tuple(range(codes.ndim - 1))).argmax())
    assert (codes[..., active] > 0).any()
    # the reconstruction alone is far from the input: only the error term makes this exact
    assert (sae.decode(codes) - acts).abs().max() > 0.1
    for edit in (Edit(active, mode="scale", value=1.0), Edit((active, 2), mode="scale", value=1)):
        result = intervene(acts, sae, edit)
        assert torch.equal(result.edited, acts)
        out = compare(acts, sae, edit, lambda x: x.sum(-1, keepdim=True) * 3)
        assert torch.equal(out.outputs["edited"], out.outputs["original"])
        assert torch.equal(out.outputs["random direction"], out.outputs["original"])


def test_suppress_scale_and_set_move_along_the_decoder_row_in_chosen_patches_only():
    sae, acts = _sae(), _acts((2, 6, D))
    codes = sae.encode(acts).detach()
    feature = int(codes[:, [1, 4]].reshape(-1, S).gt(0).sum(0).argmax())
    z = codes[:, [1, 4], feature]
    assert (z > 0).all(), "pick a feature active in both edited patches of both images"
    row = sae.W_dec[feature].detach()
    untouched = [0, 2, 3, 5]
    for mode, value, new_z in [
        ("suppress", 0.0, 0 * z),
        ("scale", 2.5, 2.5 * z),
        ("set", 4.0, 0 * z + 4),
    ]:
        result = intervene(acts, sae, Edit(feature, patches=[1, 4], mode=mode, value=value))
        expected = acts[:, [1, 4]] + (new_z - z)[..., None] * row
        torch.testing.assert_close(result.edited[:, [1, 4]], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(result.edited[:, untouched], acts[:, untouched])
        assert torch.equal(result.edited_codes[..., :feature], codes[..., :feature])
    # a per-image mask edits only the marked tokens
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4] = True
    result = intervene(acts, sae, Edit(feature, patches=mask))
    changed = (result.edited != acts).any(-1)
    assert changed.tolist() == mask.tolist()


def test_controls_have_the_same_size_and_other_features():
    sae, acts = _sae(), _acts((4, 6, D))
    codes = sae.encode(acts).detach()
    feature = int(codes.reshape(-1, S).gt(0).sum(0).argmax())
    edit = Edit(feature, patches=[0, 1, 2])
    result = intervene(acts, sae, edit)
    moved = random_direction(acts, result.delta, seed=3)
    change = moved - acts
    torch.testing.assert_close(change.norm(dim=-1), result.delta.norm(dim=-1), rtol=1e-4, atol=1e-6)
    assert not (change[:, 3:] != 0).any()  # unedited tokens do not move
    b, p = divmod(int(result.delta.norm(dim=-1).argmax()), 6)
    direction = change[b, p] / change[b, p].norm()
    feature_direction = result.delta[b, p] / result.delta[b, p].norm()
    assert abs(float(direction @ feature_direction)) < 0.9

    picked = random_features(codes, result.tokens, [feature], 3, seed=0)
    assert len(picked) == 3 and feature not in picked
    assert all((codes[:, :3, f] > 0).any() for f in picked)
    out = compare(acts, sae, edit, lambda x: x, seed=0)
    assert feature not in out.control_features
    table = out.summary()
    assert list(table.index) == ["edited", "random direction", "random feature"]


def test_random_feature_control_is_matched_on_activation_mass():
    # Feature 0 is edited (mass 10 per token); features 1-2 are as strong, 3-9 fire weakly.
    codes = torch.zeros(4, 5, 10)
    codes[..., 0], codes[..., 1], codes[..., 2] = 10.0, 8.0, 15.0
    codes[..., 3:] = 0.01
    tokens = torch.ones(4, 5, dtype=torch.bool)
    for seed in range(5):
        assert set(random_features(codes, tokens, [0], 2, seed=seed)) == {1, 2}
    # When nothing is comparable, the closest masses are taken.
    codes[..., 1:3] = 0.02
    assert set(random_features(codes, tokens, [0], 2, seed=0)) == {1, 2}


def test_edit_features_accept_numpy_integers_and_per_image_indices_are_refused():
    assert Edit(np.int64(3)).features == (3,)
    assert Edit(np.array([1, 2])).features == (1, 2)
    with pytest.raises(ValueError, match="bool \\[B, P\\] mask"):
        token_mask([[0], [3]], torch.Size([2, 4, 8]))


def test_bad_edits_are_refused_with_a_hint():
    sae = _sae()
    with pytest.raises(ValueError, match="one token"):
        intervene(_acts((3, D)), sae, Edit(0, patches=[1]))
    with pytest.raises(ValueError, match="mode"):
        Edit(0, mode="remove")
    with pytest.raises(IndexError):
        intervene(_acts((3, D)), sae, Edit(S))
    with pytest.raises(ValueError, match="d_in"):
        intervene(_acts((3, D + 1)), sae, Edit(0))


def test_continue_forward_reruns_the_encoder_from_the_edited_layer(miniatures):
    encoder = load_encoder(miniatures["dinov2_registers"])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = encoder.forward_pixels(pixels, layers=[0, 2])
    head = torch.nn.Linear(encoder.d_model, 5)
    run = continue_forward(encoder, pixels, layer=0, head=head)
    with torch.no_grad():
        torch.testing.assert_close(run(out.patches[0]), head(out.cls[2]), rtol=0, atol=0)
        # the edited tokens really enter the later blocks: read the patches out after them
        patch_run = continue_forward(encoder, pixels, 0, lambda p: p, tokens="patch")
        torch.testing.assert_close(patch_run(out.patches[0]), out.patches[2], rtol=0, atol=0)
        shifted = patch_run(out.patches[0] + 1.0) - out.patches[2]
        assert shifted.mean() > 0.5
        # the hook is gone afterwards: a plain forward is unchanged
        again = encoder.forward_pixels(pixels, layers=[2])
    assert torch.equal(again.cls[2], out.cls[2])
    with pytest.raises(ValueError, match="before the edited layer"):
        continue_forward(encoder, pixels, layer=2, head=head, readout_layer=1)


def test_toy_world_suppressing_a_part_feature_moves_the_head_there_and_a_random_direction_not():
    from saekit.analysis.probes import SegmentationConfig, mean_iou, train_segmentation_head
    from saekit.mini.toyworld import PART_NAMES, ToyWorld, toyvit_path
    from saekit.sae import SAESpec, train_sae

    try:
        encoder = load_encoder(toyvit_path())
    except FileNotFoundError as err:
        pytest.skip(f"the toy ViT is not shipped in this checkout: {err}")
    torch.manual_seed(0)
    layer, n_train, n_test = encoder.n_layers // 2 - 1, 150, 50
    toys = ToyWorld(seed=0).sample(n_train + n_test, split="train")
    masks = np.stack([toy.mask for toy in toys])
    with torch.no_grad():
        out = encoder([toy.image for toy in toys], layers=[layer])
    patches, (h, w) = out.patches[layer], out.grid
    train, test = patches[:n_train], patches[n_train:]

    # The frozen task head: linear per patch, bilinear upsampling, trained on the part masks.
    # Strong weight decay (paper 002 sweeps it) keeps the head from leaning on directions the
    # data never spans, to which any off-manifold control would otherwise look "causal".
    head = train_segmentation_head(
        train, masks[:n_train], (h, w), len(PART_NAMES),
        config=SegmentationConfig(lr=3e-2, epochs=40, weight_decay=1.0),
    )  # fmt: skip
    # a patch SAE on the same layer
    rows = train.reshape(-1, train.shape[-1])

    def batches(epoch: int) -> list[torch.Tensor]:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(epoch))
        return list(rows[order].split(128))

    spec = SAESpec(arch="topk", d_in=rows.shape[1], expansion=4, k=8, recipe="stevens2025")
    sae = train_sae(spec, batches, steps_per_epoch=-(-len(rows) // 128), epochs=10, progress=False)

    # the planted part: patches at least half covered by the body
    body = PART_NAMES.index("body")
    cells = torch.as_tensor(masks).reshape(len(toys), h, masks.shape[1] // h, w, -1)
    on_part = (cells == body).float().mean((2, 4)).reshape(len(toys), h * w) >= 0.5
    with torch.no_grad():
        codes = sae.encode(train)
    tie = codes[on_part[:n_train]].mean(0) - codes[~on_part[:n_train]].mean(0)
    feature = int(tie.argmax())  # the feature most tied to the body

    region = on_part[n_train:]
    result = compare(test, sae, Edit(feature, patches=region), head.patch_logits, seed=0)
    region_hw = region.reshape(n_test, h, w)
    table = result.summary(region_hw)
    edited, control = table.loc["edited"], table.loc["random direction"]
    # only the edited patches move (a per-patch head, read before upsampling)
    assert edited["mean |Δ| outside"] == 0 and control["mean |Δ| outside"] == 0
    assert edited["mean |Δ| in region"] > 2 * control["mean |Δ| in region"]
    assert edited["changed in region"] > 0.25  # a quarter of the body patches change class...
    assert control["changed in region"] < 0.5 * edited["changed in region"]  # ...noise: far fewer

    def body_contrast(logits_BChw: torch.Tensor) -> torch.Tensor:
        logits_NC = logits_BChw.permute(0, 2, 3, 1)[region_hw]
        others = torch.cat([logits_NC[:, :body], logits_NC[:, body + 1 :]], dim=1)
        return logits_NC[:, body] - others.mean(1)

    before = body_contrast(result.outputs["original"])
    drop = float((body_contrast(result.outputs["edited"]) - before).mean())
    assert drop < 0, "suppressing the body feature must lower 'body' against the other parts"
    scores = result.miou(masks[n_train:], len(PART_NAMES))
    direct = mean_iou(head.predict(test, masks.shape[1:]), masks[n_train:], len(PART_NAMES))
    assert scores["original"] == pytest.approx(direct[0]) and scores["original"] > 0.1


# --------------------------------------------------------------------------- study helpers


def test_tie_scores_find_the_planted_feature_and_equal_the_direct_means():
    sae = _sae()
    acts = _acts((12, 5, D), seed=4).abs() * 0.1
    inside = torch.zeros(12, 5, dtype=torch.bool)
    inside[:6, 1:3] = True
    codes = sae.encode(acts).detach()
    planted = int(codes.reshape(-1, S).mean(0).argmin())  # a quiet feature, made loud inside
    direction = sae.W_enc[:, planted].detach()
    acts[inside] += 3 * direction / direction.norm() ** 2
    codes = sae.encode(acts).detach()
    expected = codes[inside].mean(0) - codes[~inside].mean(0)
    for batch_size in (1, 5, 64):  # chunking never changes the answer
        ties = tie_scores(sae, acts.numpy(), inside.numpy(), batch_size=batch_size)
        np.testing.assert_allclose(ties, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert int(np.argmax(ties)) == planted
    # one token per image works the same way
    ties_cls = tie_scores(sae, acts[:, 0].numpy(), inside[:, 1].numpy())
    cls_codes = codes[:, 0]
    expected_cls = cls_codes[:6].mean(0) - cls_codes[6:].mean(0)
    np.testing.assert_allclose(ties_cls, expected_cls.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="some tokens but not all"):
        tie_scores(sae, acts.numpy(), np.ones((12, 5), bool))
    with pytest.raises(ValueError, match="mark every token"):
        tie_scores(sae, acts.numpy(), np.ones((12,), bool))


def test_class_contrast_and_group_tie_table_known_answers():
    mean_act_SC = np.array([[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_allclose(class_contrast(mean_act_SC, [0, 1]), [2.0, 0.0])
    np.testing.assert_allclose(class_contrast(mean_act_SC, [2]), [-4 / 3, 0.0])
    with pytest.raises(ValueError, match="not all"):
        class_contrast(mean_act_SC, [0, 1, 2, 3])

    class Stats:
        fire_frac_SC = np.array([[1.0, 0.5, 0.0, 0.25], [1.0, 1.0, 1.0, 1.0]])

    Stats.mean_act_SC = mean_act_SC
    table = group_tie_table(Stats, {"a": 0, "b": 1}, {"a": [0, 1], "b": [3]})
    assert table.loc["a", "mean score: group"] == 2.0 and table.loc["a", "fires: group"] == 0.75
    assert table.loc["a", "mean score: others"] == 0.0
    assert table.loc["a", "fires: others"] == pytest.approx(0.125)
    assert table.loc["b", "feature"] == 1 and table.loc["b", "fires: others"] == 1.0


def test_patch_coverage_known_answer():
    mask = np.zeros((1, 4, 6), np.uint8)
    mask[0, :2, :3] = 2  # patch (0, 0) fully part 2
    mask[0, 2, 3:] = 1  # patch (1, 1) half part 1
    object_share = patch_coverage(mask, (2, 2))
    np.testing.assert_allclose(object_share[0], [[1.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(patch_coverage(mask, (2, 2), 1)[0], [[0, 0], [0, 0.5]])
    np.testing.assert_allclose(patch_coverage(mask, (2, 2), [1, 2]), object_share)
    mask[0, :2, 3:] = 255  # unlabelled pixels are not object
    np.testing.assert_allclose(patch_coverage(mask, (2, 2))[0], [[1.0, 0.0], [0.0, 0.5]])
    with pytest.raises(ValueError, match="tile"):
        patch_coverage(mask, (3, 2))


def test_masks_are_cropped_as_the_encoder_crops_the_image(miniatures):
    encoder = load_encoder(miniatures["dinov2"])  # resize shortest edge to 32, crop 32x32
    mask = np.zeros((64, 40), np.uint8)
    mask[20:30, 5:25] = 3
    mask[50:, :] = 7
    got = model_view_mask(mask, encoder.processor)
    resized = np.asarray(Image.fromarray(mask).resize((32, 51), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(got, resized[9:41])  # (51 - 32) // 2 rows cut above
    assert set(np.unique(got)) == {0, 3, 7}  # nearest neighbour: no blended labels
    np.testing.assert_array_equal(model_view_mask(mask), mask)


def test_load_masks_returns_each_store_rows_planted_mask(tmp_path):
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.mini.toyworld import ToyWorld, export_imagefolder, toyvit_path

    try:
        encoder = load_encoder(toyvit_path())
    except FileNotFoundError as err:
        pytest.skip(f"the toy ViT is not shipped in this checkout: {err}")
    root = export_imagefolder(tmp_path / "val", 1, split="val")
    dataset = ImageFolder(root)
    store = extract(encoder, dataset, layers=[0], tokens="patch", out=tmp_path / "store",
                    dtype="float32", num_workers=1, progress=False)  # fmt: skip
    masks = load_masks(store, dataset, encoder.processor)
    world = ToyWorld(seed=0)
    assert masks.shape == (len(store.rows), 48, 48)
    for row in (0, 7, len(store.rows) - 1):
        index = int(store.image_ids[row].split("_")[-1].split(".")[0])
        np.testing.assert_array_equal(masks[row], world.render_arrays(index, "val")[1])
    (tmp_path / "val_masks" / store.image_ids[3]).unlink()
    with pytest.raises(FileNotFoundError, match="_masks"):
        load_masks(store, dataset)


def _logit_comparison() -> Comparison:
    original = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))
    edited = torch.log(torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]]))
    return Comparison({"original": original, "edited": edited}, None, ())


def test_classification_table_known_answer():
    table = classification_table(_logit_comparison(), [0, 1], group=[0, 1])
    assert table.loc["original", "p(true class)"] == pytest.approx(0.75)
    assert table.loc["edited", "p(true class)"] == pytest.approx(0.25)
    assert table.loc["original", "p(group)"] == pytest.approx(0.9)
    assert table.loc["edited", "p(group)"] == pytest.approx(0.65)
    assert table.loc["original", "accuracy"] == 1.0 and table.loc["edited", "accuracy"] == 0.0
    assert table.loc["edited", "changed predictions"] == 1.0
    # image 1's top class is b before the edit and c after: both drawn, b (likelier) first
    fig = plot_class_probabilities(_logit_comparison(), 1, ["a", "b", "c"], top=1)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["b", "c"]
    plt.close(fig)


def test_compare_in_encoder_reads_the_head_after_the_rest_of_the_encoder(miniatures):
    encoder = load_encoder(miniatures["vit"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    head = torch.nn.Linear(encoder.d_model, 4)
    sae = StandardSAE(StandardSAEConfig(d_in=encoder.d_model, d_sae=8))
    with torch.no_grad():
        out = encoder.forward_pixels(pixels, layers=[0, 2])
        feature = int(sae.encode(out.patches[0]).reshape(-1, 8).gt(0).sum(0).argmax())
        result = compare_in_encoder(encoder, pixels, sae, 0, Edit(feature), head)
        torch.testing.assert_close(result.outputs["original"], head(out.cls[2]), rtol=0, atol=0)
        assert not torch.equal(result.outputs["edited"], result.outputs["original"])
        # the edited output is the later layers run on the edited patch tokens
        rerun = continue_forward(encoder, pixels, 0, head)(result.intervention.edited)
        torch.testing.assert_close(result.outputs["edited"], rerun, rtol=0, atol=0)
        no_op = compare_in_encoder(
            encoder, pixels, sae, 0, Edit(feature, mode="scale", value=1.0), head
        )
        assert torch.equal(no_op.outputs["edited"], no_op.outputs["original"])
    curve = suppression_curve(encoder, pixels, sae, 0, [feature, 1, 2], head, [0, 1, 2], [0, 1])
    assert sorted(curve["n_features"].unique()) == [1, 2, 3]
    one = curve[(curve["n_features"] == 1) & (curve["condition"] == "edited")]
    expected = classification_table(result, [0, 1, 2], [0, 1]).loc["edited"]
    assert one["p(group)"].item() == pytest.approx(expected["p(group)"])
    curve["group"] = "g"
    fig = plot_suppression_curves(curve)
    assert len(fig.axes) == 1
    plt.close(fig)


def test_a_planted_part_edit_flips_exactly_the_parts_patches():
    """Feature 0 is the part: the head calls a patch class 1 when dimension 0 is on. Suppressing
    feature 0 on the part's patches must turn every one of them (and nothing else) to class 0."""
    from saekit.analysis.probes import SegmentationHead

    sae = identity_sae(4)
    head = SegmentationHead(4, 2, (2, 2))
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [4.0, 0, 0, 0]]))
        head.linear.bias.copy_(torch.tensor([1.0, 0.0]))
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, :2, :2] = 1  # image 0: top-left patch is the part
    masks[2, 2:, :] = 1  # image 2: bottom row; image 1 has no part
    patches = torch.zeros(3, 4, 4)
    patches[..., 1] = 0.5  # another active feature, unrelated to the part
    coverage = patch_coverage(masks, (2, 2), 1).reshape(3, 4)
    patches[..., 0] = torch.as_tensor(coverage) * 1.0  # part patches: logit 4 > 1
    result = edit_part(patches.numpy(), masks, sae, head, part=1, feature=0)
    assert result.images.tolist() == [0, 2]
    assert result.region_BP.tolist() == [[True, False, False, False], [False, False, True, True]]
    before = result.comparison.outputs["original"].argmax(1).reshape(2, 4)
    after = result.comparison.outputs["edited"].argmax(1).reshape(2, 4)
    assert torch.equal(before, result.region_BP.long())
    assert not after.any()
    assert result.comparison.control_features == (1,)  # the only other active feature
    table = part_effects([result], masks, ["background", "part"])
    assert table.loc["part", "patches"] == 3
    assert table.loc["part", "changed: edited"] == 1.0
    assert table.loc["part", "IoU: edited"] == 0.0 and table.loc["part", "IoU: original"] > 0.5
    assert table.loc["part", "mIoU: original"] > table.loc["part", "mIoU: edited"]
    fig = plot_segmentation_edit(
        [Image.new("RGB", (4, 4))] * 2, masks[result.images], result, [0, 1], ["bg", "part"]
    )
    assert len(fig.axes) == 2 * 6
    assert fig.axes[3].get_title() == "edited"
    plt.close(fig)
    with pytest.raises(ValueError, match="no patch"):
        edit_part(patches.numpy(), masks, sae, head, part=1, feature=0, min_cover=1.01)


def test_iou_and_miou_skip_the_ignore_label():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = 1.0  # predicts class 0 on the left patch, class 1 on the right
    comparison = Comparison({"original": logits}, None, ())
    masks = np.array([[[0, 255]]], np.uint8)  # the right half is unlabelled
    table = comparison.iou(masks, ["a", "b"])
    assert table.loc["original", "a"] == 1.0 and np.isnan(table.loc["original", "b"])
    assert comparison.miou(masks, 2) == {"original": 1.0}
    assert isinstance(table, pd.DataFrame)
