"""Encoders: every miniature kind loads through from_pretrained and yields the right tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from saekit.data import ImageFolder
from saekit.models import EncoderLoadError, load_encoder


@pytest.fixture(scope="module")
def images(image_folder):
    dataset = ImageFolder(image_folder)
    return [dataset.load(i) for i in range(4)]


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "vit", "resnet"])
def test_every_layer_has_cls_and_patches_of_the_right_shape(kind, miniatures, images):
    encoder = load_encoder(miniatures[kind])
    out = encoder(images, layers="all")
    assert sorted(out.cls) == list(range(encoder.n_layers))
    for layer in range(encoder.n_layers):
        rows, cols = out.grids[layer]
        assert out.cls[layer].shape == (4, encoder.widths[layer])
        assert out.patches[layer].shape == (4, rows * cols, encoder.widths[layer])
    if kind != "resnet":
        assert out.grid == encoder.grid == (4, 4)


def test_registers_are_excluded_from_patches(miniatures, images):
    encoder = load_encoder(miniatures["dinov2_registers"])
    assert encoder.n_registers == 4
    pixels = encoder.preprocess(images)
    with torch.inference_mode():
        hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        out = encoder.forward_pixels(pixels, layers=[1])
    assert torch.equal(out.cls[1], hidden[2][:, 0])
    assert torch.equal(out.patches[1], hidden[2][:, 5:])  # CLS + 4 registers come first


def test_resnet_cls_is_the_pooled_stage_and_patches_its_positions(miniatures, images):
    encoder = load_encoder(miniatures["resnet"])
    pixels = encoder.preprocess(images)
    with torch.inference_mode():
        stage = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[3]
        out = encoder.forward_pixels(pixels, layers=[2])
    assert torch.allclose(out.cls[2], stage.mean(dim=(2, 3)))
    # Position (row 1, col 2) of the feature map is patch 1 * cols + 2.
    cols = stage.shape[3]
    assert torch.equal(out.patches[2][:, 1 * cols + 2], stage[:, :, 1, 2])


def test_full_clip_checkpoint_loads_its_vision_tower(miniatures):
    assert transformers.AutoConfig.from_pretrained(miniatures["clip"]).model_type == "clip"
    encoder = load_encoder(miniatures["clip"])
    assert isinstance(encoder.model, transformers.CLIPVisionModel)


def test_one_multi_layer_pass_equals_per_layer_passes(miniatures, images):
    encoder = load_encoder(miniatures["vit"])
    together = encoder(images, layers=[0, 2])
    for layer in (0, 2):
        alone = encoder(images, layers=[layer])
        assert torch.equal(together.cls[layer], alone.cls[layer])
        assert torch.equal(together.patches[layer], alone.patches[layer])


def test_attention_maps_on_request(miniatures, images):
    encoder = load_encoder(miniatures["dinov2"])
    reference = encoder(images, layers=[1]).cls[1]  # sdpa attention
    assert encoder.model.config._attn_implementation == "sdpa"
    out = encoder(images, layers=[0, 1], attentions=True)
    attention = out.attentions[1]
    assert attention.shape == (4, 2, 17, 17)
    assert torch.allclose(attention.sum(-1), torch.ones(4, 2, 17))
    # Eager attention gives the same activations, and is used for that call only.
    assert torch.allclose(out.cls[1], reference, atol=1e-5)
    assert encoder.model.config._attn_implementation == "sdpa"


def test_low_precision_cnn_gets_pixels_in_its_dtype(miniatures, images):
    encoder = load_encoder(miniatures["resnet"], dtype=torch.bfloat16)
    out = encoder(images[:2], layers=[3])
    assert out.cls[3].dtype == torch.bfloat16 and out.cls[3].shape == (2, 48)


def test_negative_layers_and_out_of_range(miniatures):
    encoder = load_encoder(miniatures["vit"])
    assert encoder.resolve_layers("0,-1") == [0, 2]
    with pytest.raises(IndexError, match=r"valid indices are 0\.\.2"):
        encoder.resolve_layers([3])


def test_missing_folder_and_unknown_hub_id_say_what_was_tried(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(tmp_path / "no_such_model")
    with pytest.raises(EncoderLoadError, match="need a network connection"):
        load_encoder("saekit-test/definitely-not-a-model")


def test_unsupported_architecture_is_named(tmp_path):
    transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(EncoderLoadError, match="'bert' model"):
        load_encoder(tmp_path)
