"""Interventions: a no-op edit returns the input bit for bit (the error term), edits move exactly
along decoder rows and only in the chosen tokens, the controls have the promised size and
features, continue_forward re-runs the encoder faithfully, and in the toy world suppressing a
part's feature moves the segmentation head on that part far more than a random direction does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from saekit.interventions import (
    Edit,
    compare,
    continue_forward,
    intervene,
    random_direction,
    random_features,
)
from saekit.models import load_encoder

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
    from saekit.probes import SegmentationConfig, mean_iou, train_segmentation_head
    from saekit.sae import SAESpec, train_sae
    from saekit.toyworld import PART_NAMES, ToyWorld, toyvit_path

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
