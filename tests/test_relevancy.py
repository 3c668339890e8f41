"""Relevancy maps: Eq. 8-9 on hand-set attention, equality with an independent re-implementation
of a ViT's forward pass (explicit attention, explicit autograd, the formula written out), the
register offset of DINOv2, an inactive feature, the share on a region, and the figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.analysis.relevancy import (  # noqa: E402
    RelevancyMaps,
    cls_patch_relevancy,
    plot_relevancy,
    plot_relevancy_rows,
    propagate_relevancy,
    relevancy_maps,
    relevancy_share,
)
from saekit.models import load_encoder  # noqa: E402


def _sae(d_in: int, d_sae: int = 16, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae))
        sae.b_enc.zero_()
    return sae


def test_hand_set_attention_gives_the_hand_computed_map():
    # Block 1, one head, gradient 1 everywhere: Ā1 = A1, R1 = I + A1.
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    # Block 2, two heads: head a (gradient 2) attends CLS -> patch 2; head b has a negative
    # gradient, so its positive part is 0 and the head mean halves head a: Ā2 = A2a.
    a2a = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2b = torch.full((3, 3), 1 / 3)
    attentions = [a1[None, None], torch.stack([a2a, a2b])[None]]
    gradients = [
        torch.ones(1, 1, 3, 3),
        torch.stack([torch.full((3, 3), 2.0), -torch.ones(3, 3)])[None],
    ]
    relevancy = propagate_relevancy(attentions, gradients)
    # R1 = [[1.5, .5, 0], [0, 2, 0], [0, .5, 1.5]]; R2 = R1 + Ā2 R1, whose CLS row is
    # R1[0] + R1[2] = [1.5, 1.0, 1.5].
    np.testing.assert_allclose(relevancy[0, 0].numpy(), [1.5, 1.0, 1.5])
    np.testing.assert_allclose(relevancy[0, 1].numpy(), [0.0, 4.0, 0.0])
    # Drop the identity (1.5 - 1 on CLS), keep the patches [1.0, 1.5], normalise: [.4, .6].
    heat = cls_patch_relevancy(relevancy, first_patch=1, grid=(1, 2))
    np.testing.assert_allclose(heat.numpy(), [[[0.4, 0.6]]])


def _manual_vit_relevancy(model, pixels, sae, layer, feature):
    """A ViT forward written out by hand from the model's weights, attention probabilities kept
    with retain_grad, and Eq. 8-9 as plain loops over images, heads and layers."""
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    hidden = model.embeddings(pixels)
    batch, tokens, width = hidden.shape
    probs = []
    for block in model.layers[: layer + 1]:
        x = block.layernorm_before(hidden)

        def split(t):
            return t.view(batch, tokens, heads, head_dim).transpose(1, 2)

        att = block.attention
        q, k, v = split(att.q_proj(x)), split(att.k_proj(x)), split(att.v_proj(x))
        prob = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        prob.retain_grad()
        probs.append(prob)
        mixed = (prob @ v).transpose(1, 2).reshape(batch, tokens, width)
        hidden = hidden + att.o_proj(mixed)
        y = block.layernorm_after(hidden)
        hidden = hidden + block.mlp.fc2(F.gelu(block.mlp.fc1(y)))
    cls = hidden[:, 0]
    activation = sae.encode(cls)[:, feature]
    activation.sum().backward()
    maps = []
    for b in range(batch):
        relevancy = torch.eye(tokens)
        for prob in probs:
            weighted = torch.zeros(tokens, tokens)
            for h in range(heads):
                weighted += torch.clamp(prob.grad[b, h] * prob[b, h].detach(), min=0) / heads
            relevancy = relevancy + weighted @ relevancy
        row = relevancy[0, 1:].clone()  # the identity's 1 sits on CLS, outside the patches
        maps.append((row / row.sum()).numpy())
    return cls.detach(), activation.detach(), np.stack(maps)


def test_relevancy_equals_an_independent_vit_implementation(miniatures):
    encoder = load_encoder(miniatures["vit"])
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    sae = _sae(encoder.d_model)
    layer = 1  # of 3: the last block must not matter
    with torch.no_grad():
        codes = sae.encode(encoder.forward_pixels(pixels, layers=[layer]).cls[layer])
    feature = int((codes > 0).all(0).float().mul(codes.sum(0)).argmax())
    assert (codes[:, feature] > 0).all()

    cls, activation, expected = _manual_vit_relevancy(encoder.model, pixels, sae, layer, feature)
    got = relevancy_maps(encoder, pixels, sae, layer, [feature])
    # the hand-written forward is the model's forward
    torch.testing.assert_close(cls, encoder.forward_pixels(pixels, layers=[layer]).cls[layer])
    np.testing.assert_allclose(got.activations_FB[0], activation.numpy(), rtol=1e-5)
    assert got.maps_FBhw.shape == (1, 2, 4, 4)
    np.testing.assert_allclose(got.maps_FBhw[0].reshape(2, -1), expected, rtol=1e-4, atol=1e-7)
    assert not np.allclose(expected[0], expected[0].mean())  # a real map, not a flat one


def test_registers_are_left_out_and_an_inactive_feature_gives_zeros(miniatures):
    encoder = load_encoder(miniatures["dinov2_registers"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    sae = _sae(encoder.d_model)
    with torch.no_grad():
        sae.b_enc[3] = -1e6  # feature 3 can never fire
    pixels = encoder.preprocess([image])
    with torch.no_grad():
        codes = sae.encode(encoder.forward_pixels(pixels, layers=[2]).cls[2])
    on = int(codes[0].argmax())
    maps = relevancy_maps(encoder, [image], sae, 2, [on, 3])
    assert maps.maps_FBhw.shape == (2, 1, 4, 4)  # 16 patches; CLS and 4 registers dropped
    assert maps.maps_FBhw[0].sum() == pytest.approx(1.0, abs=1e-5)
    assert maps.activations_FB[1, 0] == 0 and not maps.maps_FBhw[1].any()

    # The full CLS row, from the model's own attentions and their autograd gradients: the map
    # is its last 16 entries (after CLS + 4 registers), renormalised.
    with torch.enable_grad():
        out = encoder.forward_pixels(pixels, layers=[0, 1, 2], attentions=True)
        attentions = [out.attentions[i] for i in range(3)]
        grads = torch.autograd.grad(sae.encode(out.cls[2])[0, on], attentions)
    row = propagate_relevancy([a.detach() for a in attentions], grads)[0, 0].detach()
    assert row.shape == (1 + 4 + 16,)
    patches = row[5:]
    np.testing.assert_allclose(
        maps.maps_FBhw[0, 0].ravel(), (patches / patches.sum()).numpy(), rtol=1e-5
    )


def test_cnn_is_refused_and_the_figure_has_a_panel_per_feature(miniatures):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 36, 3), np.uint8))
    resnet = load_encoder(miniatures["resnet"])
    with pytest.raises(ValueError, match="attention"):
        relevancy_maps(resnet, [image], _sae(48), 3, 0)

    encoder = load_encoder(miniatures["dinov2"])
    sae = _sae(encoder.d_model)
    maps = relevancy_maps(encoder, [image, image], sae, 2, [0, 1, 2])
    fig = plot_relevancy(
        [image, image], maps, processor=encoder.processor, feature_names=["a", "b", "c"]
    )
    assert len(fig.axes) == 2 * 4
    assert fig.axes[1].get_title().startswith("a: ")
    plt.close(fig)


def test_relevancy_share_scores_a_region_and_an_even_map_scores_its_area():
    maps = np.zeros((2, 2, 2))
    maps[0] = [[0.5, 0.5], [0.0, 0.0]]  # all relevancy on the top row
    maps[1] = 0.25  # spread evenly
    coverage = np.array([[[1.0, 0.5], [0.0, 0.0]]] * 2)  # the region: 1.5 patches of 4
    np.testing.assert_allclose(relevancy_share(maps, coverage), [0.75, 1.5 / 4])
    with pytest.raises(ValueError, match="differ"):
        relevancy_share(maps, coverage[:, :1])


def test_feature_rows_figure_and_subsets():
    rng = np.random.default_rng(0)
    maps = RelevancyMaps(rng.random((1, 3, 2, 2)), np.array([[3.0, 2.0, 1.0]]), [5], 1, (2, 2))
    picked = maps.subset([2, 0])
    np.testing.assert_array_equal(picked.maps_FBhw[0], maps.maps_FBhw[0, [2, 0]])
    assert picked.activations_FB.tolist() == [[1.0, 3.0]] and picked.features == [5]
    images = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(3)]
    fig = plot_relevancy_rows([("a", images, maps), ("b", images[:2], maps.subset([0, 1]))])
    assert len(fig.axes) == 2 * 3
    assert not fig.axes[5].axison  # row b has two images; its third panel is blank
    assert fig.axes[0].get_ylabel() == "a" and fig.axes[1].get_title() == "2"
    plt.close(fig)
    with pytest.raises(ValueError, match="one feature's maps"):
        plot_relevancy_rows([("a", images[:2], maps)])
